"""The ``duolora`` command: inspect, params, merge, demo.

Each sub-command's work lives in the engine module it belongs to; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duolora",
        description="DuoLoRA: merge a content LoRA and a style LoRA for SDXL or Flux.1 (ZipRank, layer priors, "
                    "optional Constyle).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    from .inspect import EXIT_STATUS_HELP

    p = sub.add_parser("inspect", help="describe a LoRA file: key style, base model, layers, ranks, alpha, dtype",
                       description="Describe a LoRA file (read header-only) and say whether a merge accepts it.",
                       epilog=EXIT_STATUS_HELP)
    p.add_argument("file", help="a .safetensors LoRA file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser(
        "params",
        help="trainable-parameter count of every merger on full SDXL attention shapes",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rank", type=int, default=64, help="rank of both LoRAs")
    p.set_defaults(func=_params)

    _add_merge_parser(sub)
    return parser


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import run_inspect

    return run_inspect(args.file, as_json=args.json)


def _params(args: argparse.Namespace) -> int:
    from .mergers import print_parameter_counts

    return print_parameter_counts(rank=args.rank)


# -- merge (weights-only mode) --------------------------------------------------------------------------
EXIT_MERGE_FAILED = 2


class _MergeHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where the help text already states it or none exists."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default:" in text or action.required or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default == "":
            return text + " (default: empty)"
        return super()._get_help_string(action)


def _add_merge_parser(sub: argparse._SubParsersAction) -> None:
    """``duolora merge CONTENT STYLE -o OUT`` or ``duolora merge --content A --content B --style S -o OUT``: the
    weights-only merge (no model, no images) of one content LoRA or several with a style LoRA."""
    from .boxqp import SOLVER_ITERATIONS

    p = sub.add_parser(
        "merge",
        help="merge a content and a style LoRA (or several content LoRAs and a style LoRA) from their weights "
             "alone (weights-only mode) into one LoRA",
        description=(
            "Weights-only DuoLoRA merge (docs/method.md §5): choose ZipRank's rank masks layer by layer from the "
            "LoRA files alone — no model, no reference images — with the layer priors of their model family, and "
            "write an exact standard LoRA (kohya keys, alpha = rank) that ComfyUI's LoraLoader and other tools load. Layers are "
            "streamed, so memory stays near the size of the files. Give CONTENT STYLE, or several subjects with "
            "--content A --content B --style S (a multi-concept merge: every content LoRA is paired with the style "
            "LoRA by the priors). For the paper's objective through the model, use the ZipRank Merge node in "
            "ComfyUI."
        ),
        formatter_class=_MergeHelpFormatter,
    )
    p.add_argument("content", nargs="?", help="the content (subject) LoRA, .safetensors (any common key style)")
    p.add_argument("style", nargs="?", help="the style LoRA, .safetensors")
    p.add_argument("--content", action="append", dest="contents", metavar="FILE",
                   help="a content (subject) LoRA; give it once per subject, with --style, instead of CONTENT STYLE "
                        "(default: none)")
    p.add_argument("--style", dest="style_file", metavar="FILE",
                   help="the style LoRA, with --content (default: none)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="the merged LoRA file to write; its name must end in .safetensors")
    _add_knob_options(p)
    p.add_argument("--iterations", type=int, default=SOLVER_ITERATIONS,
                   help="cap on the solver's projected-gradient steps per batch of layers (it stops earlier "
                        "once the masks settle)")
    p.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                   help="dtype of the written factors (auto: the content file's; bf16 for a float8 file)")
    p.add_argument("--key-style", choices=("kohya_ldm", "comfyui"), default="kohya_ldm",
                   help="key spelling of the written file (both load in ComfyUI's LoraLoader)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    p.set_defaults(func=_merge)


def _cli_knobs() -> tuple:
    """The MergeConfig knobs ``duolora merge`` offers: those with a ``cli`` option name, in field order."""
    from .config import KNOBS

    return tuple(f for f in KNOBS if f.metadata["cli"] is not None)


def _cli_help(text: str) -> str:
    """A knob's help sentence in argparse's style: lower-case start, no closing full stop."""
    return text[0].lower() + text[1:-1] if text.endswith(".") else text


def _add_knob_options(p: argparse.ArgumentParser) -> None:
    """One option per MergeConfig knob with a ``cli`` name: its default, choices and help from the field."""
    for f in _cli_knobs():
        meta, option = f.metadata, f.metadata["cli"]
        text = _cli_help(meta["help"])
        if isinstance(f.default, bool):
            # A True knob is switched off by "--no-…"; a False one on by its plain option.
            p.add_argument(option, action="store_true", dest=option[2:].replace("-", "_"),
                           help=("do not " + text) if option.startswith("--no-") else text)
            continue
        choices = meta["cli_choices"] or meta["choices"]
        if meta["none"] is not None:
            p.add_argument(option, type=float, default=None, dest=f.name,
                           help=f"{text} (default: {meta['none']})")
        elif choices is not None:
            p.add_argument(option, choices=choices, default=f.default, dest=f.name, help=text)
        else:
            p.add_argument(option, type=type(f.default), default=f.default, dest=f.name, help=text)


def _knob_values(args: argparse.Namespace) -> dict:
    """MergeConfig keyword arguments from the parsed knob options."""
    values = {}
    for f in _cli_knobs():
        option = f.metadata["cli"]
        if isinstance(f.default, bool):
            given = getattr(args, option[2:].replace("-", "_"))
            values[f.name] = (not given) if option.startswith("--no-") else given
        else:
            values[f.name] = getattr(args, f.name)
    return values


class _TerminalProgress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        import time

        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.drawn = False

    def __call__(self, done: int, total: int, terms: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        import time

        width = 30
        filled = int(width * done / max(total, 1))
        bar = "█" * filled + "░" * (width - filled)
        sys.stderr.write(f"\rmerging {bar} {done}/{total} layers {time.perf_counter() - self.start:5.1f} s")
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _merge_inputs(args: argparse.Namespace) -> tuple[list[str], str]:
    """(content files, style file) from CONTENT STYLE or from --content … --style …; ValueError otherwise."""
    positional = [f for f in (args.content, args.style) if f is not None]
    if args.contents or args.style_file:
        if positional:
            raise ValueError("give either CONTENT STYLE or --content FILE … --style FILE, not both")
        if not args.contents or not args.style_file:
            raise ValueError("--content FILE (once per subject) needs --style FILE, and --style needs at least one "
                             "--content")
        return list(args.contents), args.style_file
    if len(positional) != 2:
        raise ValueError("give a content LoRA and a style LoRA: duolora merge CONTENT STYLE -o OUT, or "
                         "duolora merge --content A --content B --style S -o OUT")
    return [args.content], args.style


def _merge(args: argparse.Namespace) -> int:
    import torch

    from . import engine, formats
    from .config import MergeConfig
    from .mergers import MergerError
    from .solver import describe

    progress = _TerminalProgress(not args.quiet)
    try:
        contents, style_file = _merge_inputs(args)
        config = MergeConfig(objective="weights_only", **_knob_values(args))
        layout = formats.merge_layout(*contents, style_file)  # the model family (SDXL or a DiT), from the files
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
        if dtype is None:  # auto: the (first) content file's dtype (formats.output_dtype: never float8)
            dtype = formats.output_dtype(None, formats.read_lora(contents[0], load_tensors=False).dtype)
        result = engine.merge_files(contents if len(contents) > 1 else contents[0], style_file, args.output, config,
                                    dtype=dtype, key_style=args.key_style, overwrite=args.force, layout=layout,
                                    progress=progress, iterations=args.iterations)
    except formats.OutputExistsError as e:
        progress.close()
        print(f"error: {e} Pass --force to overwrite it.", file=sys.stderr)
        return EXIT_MERGE_FAILED
    except (formats.LoRAError, MergerError, ValueError) as e:
        progress.close()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_MERGE_FAILED
    progress.close()
    # What the merge carries besides its layers (the inputs' bias/norm differences, written with them) and what
    # it leaves out: every key inspect lists as not merged is said here too.
    content = [formats.read_lora(p, load_tensors=False) for p in contents]
    style = formats.read_lora(style_file, load_tensors=False)
    carried = result.merged.patches
    if not args.quiet:
        share = 100.0 * result.kept_components / max(result.total_components, 1)
        print(f"wrote {result.path}: {result.layers} layers, kept {result.kept_components:,} of "
              f"{result.total_components:,} rank components ({share:.1f} %) in {result.wall_seconds:.1f} s")
        if carried:
            print(f"carried {len(carried)} bias/norm differences of the inputs (summed like layers outside the "
                  "learned scope)")
        print(describe(result))
    for line in formats.merge_notes(content if len(content) > 1 else content[0], style):
        print(f"note: {line}", file=sys.stderr)
    remedy = "give your style LoRA as the second file" if args.contents is None else "give your style LoRA to --style"
    for path in contents:
        if formats.same_file_contents(path, style_file):
            print("warning: " + engine.same_lora_warning(os.path.basename(path), os.path.basename(style_file),
                                                         remedy), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
