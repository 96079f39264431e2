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
        description="DuoLoRA: merge a content LoRA and a style LoRA for SDXL (ZipRank, layer priors, optional Constyle).",
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
    from .config import BASES, DEFAULT_PRUNE_THRESHOLD, PRIOR_LOSS_KINDS, SCOPES, MergeConfig
    from .sdxl import PRESET_NAMES
    from .solver import SOLVER_ITERATIONS

    d = MergeConfig()
    p = sub.add_parser(
        "merge",
        help="merge a content and a style LoRA (or several content LoRAs and a style LoRA) from their weights "
             "alone (weights-only mode) into one LoRA",
        description=(
            "Weights-only DuoLoRA merge (docs/method.md §5): choose ZipRank's rank masks layer by layer from the "
            "LoRA files alone — no model, no reference images — with the SDXL layer priors, and write an exact "
            "standard LoRA (kohya keys, alpha = rank) that ComfyUI's LoraLoader and other tools load. Layers are "
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
    p.add_argument("--method", choices=("ziprank", "direct", "b_lora"), default=d.method,
                   help="ziprank: solve DuoLoRA's rank masks; direct: plain sum w_c·ΔW_c + w_s·ΔW_s; b_lora: content "
                        "only in output_blocks.0.1, style only in output_blocks.1.1 (ZipLoRA needs the paper mode)")
    p.add_argument("--basis", choices=BASES, default=d.basis,
                   help="svd: one mask entry per singular direction (the paper's math); raw: per rank component "
                        "of the file's own factors (the released code)")
    p.add_argument("--scope", choices=SCOPES, default=d.scope,
                   help="attention: masks on the 560 attention projections (the paper); all: on every layer both "
                        "files patch. Other shared layers are summed with --w-c/--w-s")
    p.add_argument("--priors", choices=PRESET_NAMES, default=d.prior_preset, dest="prior_preset",
                   help="SDXL layer priors: which blocks carry content and which style (paper: low-resolution "
                        "attention = content, high-resolution = style; none: no priors)")
    p.add_argument("--custom-prior", default=d.custom_prior, metavar="SPEC",
                   help="block roles for --priors custom, e.g. 'content: in7, in8, mid; style: out3' (the short "
                        "names the node's diagram and the Merge Report show) or with the long names, 'content: "
                        "input_blocks.7.1, middle_block.1; style: output_blocks.3.1'")
    p.add_argument("--no-prior-loss", action="store_true",
                   help="leave out the priors' rank-constraint term (the masks then only reconstruct)")
    p.add_argument("--prior-loss-kind", choices=PRIOR_LOSS_KINDS, default=d.prior_loss_kind,
                   help="share_hinge: ν·max(0, ρ_other − ρ_dom + margin), ρ the kept share of each LoRA's nuclear "
                        "norm; hinge: κ‖m_dom‖₁ + ν·max(0, ‖m_other‖₁ − ‖m_dom‖₁ + margin) (docs/method.md §3 "
                        "literally); code_compat: the released code's L2 form")
    p.add_argument("--lambda-prior", type=float, default=d.lambda_prior,
                   help="weight of the prior term (per layer, in units of the layer's lost reconstruction)")
    p.add_argument("--kappa", type=float, default=d.kappa, help="κ: weight of the dominant mask's L1 norm")
    p.add_argument("--nu", type=float, default=d.nu, help="ν: weight of the hinge between the two masks")
    p.add_argument("--margin", type=float, default=d.margin, help="margin of the hinge")
    p.add_argument("--lambda-content", type=float, default=d.lambda_content,
                   help="weight of the content reconstruction term")
    p.add_argument("--lambda-style", type=float, default=d.lambda_style, help="weight of the style reconstruction term")
    p.add_argument("--balance", type=float, default=d.balance, metavar="B",
                   help="subject against style where the LoRAs collide, from -1 (style) to 1 (content): the "
                        "reconstruction terms weigh lambda_content·(1 + B) and lambda_style·(1 − B); 0 = the paper")
    p.add_argument("--lambda-sim", type=float, default=None,
                   help="weight of the mask-similarity term mean|m_c ⊙ m_s| (default: the method's, 0 for ziprank)")
    p.add_argument("--fast-keep", type=float, default=d.fast_keep,
                   help="γ of the keep term γ·Σ shareᵢ·(1 − mᵢ)²: holds each LoRA's strongest singular directions "
                        "near full strength (0: pure per-layer reconstruction, which weakens LoRAs where they collide)")
    p.add_argument("--prune-threshold", type=float, default=DEFAULT_PRUNE_THRESHOLD,
                   help="rank components with |mask| below this are dropped from the file")
    p.add_argument("--max-rank", type=int, default=d.max_rank,
                   help="rank budget: keep at most this many components of each LoRA per learned layer, the "
                        "strongest by σ·|mask| (0: no budget)")
    p.add_argument("--w-c", type=float, default=d.w_c,
                   help="content weight (of each content LoRA) in the layers merged as a plain sum (text encoders, "
                        "layers out of scope)")
    p.add_argument("--w-s", type=float, default=d.w_s, help="style weight of the layers merged as a plain sum")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="recorded in the file's metadata; the weights-only solve is deterministic (a convex "
                        "problem per layer), so the result does not depend on it")
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
        config = MergeConfig(
            method=args.method, basis=args.basis, scope=args.scope, objective="weights_only", seed=args.seed,
            prior_preset=args.prior_preset, custom_prior=args.custom_prior, prior_loss=not args.no_prior_loss,
            prior_loss_kind=args.prior_loss_kind, kappa=args.kappa, nu=args.nu, margin=args.margin,
            lambda_content=args.lambda_content, lambda_style=args.lambda_style, balance=args.balance,
            lambda_prior=args.lambda_prior,
            lambda_sim=args.lambda_sim, prune_threshold=args.prune_threshold, w_c=args.w_c, w_s=args.w_s,
            fast_keep=args.fast_keep, max_rank=args.max_rank,
        )
        layout = formats.merge_layout(contents[0])  # the model family: SDXL's or a DiT's, from the content file
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
        if dtype is None:  # auto: the (first) content file's dtype (formats.output_dtype: never float8)
            dtype = formats.output_dtype(None, formats.read_lora(contents[0], load_tensors=False).dtype)
        output = engine.OutputFile(args.output, key_style=args.key_style, dtype=dtype, overwrite=args.force)
        result = engine.run_merge(contents if len(contents) > 1 else contents[0], style_file, config, output=output,
                                  progress=progress, iterations=args.iterations, layout=layout)
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
