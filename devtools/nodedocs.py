"""Render the docs' generated sections: the node reference (docs/nodes.md) from the real node definitions
(ComfyUI's own INPUT_TYPES view), and the merge option table (docs/method.md §9) from ``MergeConfig``'s field
metadata (``duolora.config.knob``: help, node input, command-line option, bounds, choices).

    .venv/bin/python devtools/nodedocs.py          # print both sections
    .venv/bin/python devtools/nodedocs.py --write  # replace them in docs/nodes.md and docs/method.md

tests/test_readme.py checks that both files hold exactly what this renders, so defaults, tooltips and option
meanings in the docs cannot drift from the nodes and the config.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from duolora.config import KNOBS, ui_value

REPO = Path(__file__).resolve().parents[1]
NODES_DOC = REPO / "docs" / "nodes.md"
BEGIN, END = "<!-- nodes:begin -->", "<!-- nodes:end -->"
METHOD_DOC = REPO / "docs" / "method.md"
OPTIONS_BEGIN, OPTIONS_END = "<!-- method:begin -->", "<!-- method:end -->"
CLI_DOC = REPO / "docs" / "cli.md"
CLI_BEGIN, CLI_END = "<!-- cli:begin -->", "<!-- cli:end -->"
NODE_IDS = (
    "DuoLoRA_LoadContentLoRA", "DuoLoRA_AddContentLoRA", "DuoLoRA_LoadStyleLoRA", "DuoLoRA_ZipRankMerge",
    "DuoLoRA_ApplyMergedLoRA", "DuoLoRA_SaveMergedLoRA", "DuoLoRA_MergeReport", "DuoLoRA_ApplyKLoRA",
)


# Combos whose options are the files on disk: their options depend on the machine, not on the node.
FILE_COMBOS = {"lora_name": "a file in models/loras"}


def _default(kind: object, opts: dict) -> str:
    if isinstance(kind, list):
        return f"`{opts.get('default', kind[0] if kind else '')}` ({', '.join(map(str, kind))})" if kind else "file list"
    if kind == "COMBO":
        options = opts.get("options", [])
        default = opts.get("default", options[0] if options else "")
        return f"`{default}` ({', '.join(map(str, options))})" if options else "file list"
    if "default" in opts:
        value = opts["default"]
        return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"
    return "socket"


def render(mappings: dict, display_names: dict) -> str:
    lines = [BEGIN, "## The nodes", ""]
    for node_id in NODE_IDS:
        cls = mappings[node_id]
        info = cls.INPUT_TYPES()
        lines.append(f"### {display_names.get(node_id, node_id)} (`{node_id}`)")
        lines.append("")
        description = getattr(cls, "DESCRIPTION", "") or ""
        if description:
            lines += [description, ""]
        lines += ["| input | type | default | what it does |", "|---|---|---|---|"]
        for section in ("required", "optional"):
            for name, spec in info.get(section, {}).items():
                kind = spec[0]
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                type_name = "COMBO" if isinstance(kind, list) else str(kind)
                optional = " (optional)" if section == "optional" else ""
                # Behind the node's "Show … advanced settings" button in the front end.
                optional += " (advanced)" if opts.get("advanced") else ""
                tooltip = str(opts.get("tooltip", "")).replace("|", "\\|")
                default = FILE_COMBOS.get(name) or _default(kind, opts)
                lines.append(f"| `{name}`{optional} | {type_name} | {default} | {tooltip} |")
        outputs = list(zip(cls.RETURN_NAMES or cls.RETURN_TYPES, cls.RETURN_TYPES))
        if outputs:
            lines += ["", "Outputs: " + ", ".join(f"`{n}` ({t})" for n, t in outputs) + "."]
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def _code(value: object) -> str:
    """A value as the option table writes it: `""` for the empty string, else its str()."""
    return '`""`' if value == "" else f"`{value}`"


def _bound(value: float) -> str:
    if value >= 2 ** 32 and (int(value) + 1) & int(value) == 0:
        return f"2^{(int(value) + 1).bit_length() - 1} − 1"  # a seed's range
    return f"{value:g}" if isinstance(value, float) else str(value)


def _values(f: dataclasses.Field) -> str:
    """The values a knob takes: its choices, True/False, or its bounds (the node widget's); a knob whose None has
    a meaning (``none``) is shown with it, not with the node's -1 that stands for it."""
    meta = f.metadata
    if meta["choices"] is not None:
        return ", ".join(_code(c) for c in meta["choices"])
    if isinstance(f.default, bool):
        return "`True`, `False`"
    low = 0 if meta["none"] is not None else meta["min"]
    if low is None and meta["max"] is None:
        text = "a number" if isinstance(f.default, (int, float)) else "text"
    elif meta["max"] is None:
        text = f"≥ {_bound(low)}"
    else:
        text = f"{_bound(low)} … {_bound(meta['max'])}"
    return f"`None` ({meta['none']}) or {text}" if meta["none"] is not None else text


def _node_input(f: dataclasses.Field) -> str:
    meta = f.metadata
    if meta["ui"] is None:
        return "—"
    text = f"`{meta['ui']}`"
    if meta["choices"] is not None:
        shown = [ui_value(f, c) for c in meta["choices"]]
        if shown != list(meta["choices"]):
            text += ": " + ", ".join(_code(c) for c in shown)
    return text + (" (advanced)" if meta["advanced"] else "")


def _cli_option(f: dataclasses.Field) -> str:
    meta = f.metadata
    if meta["cli"] is None:
        return "—"
    text = f"`{meta['cli']}`"
    if meta["cli_choices"] is not None:
        text += " (" + ", ".join(_code(c) for c in meta["cli_choices"]) + ")"
    return text


def render_options(knobs: tuple[dataclasses.Field, ...] = KNOBS) -> str:
    """The option table of docs/method.md §9: one row per ``MergeConfig`` field, in its declaration order, all
    from the field's default and ``knob`` metadata."""
    lines = [OPTIONS_BEGIN, "| option | default | values | node input | `duolora merge` | meaning |",
             "|---|---|---|---|---|---|"]
    for f in knobs:
        cells = [f"`{f.name}`", _code(f.default), _values(f), _node_input(f), _cli_option(f), f.metadata["help"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines.append(OPTIONS_END)
    return "\n".join(lines)


def render_cli_options() -> str:
    """The option table of docs/cli.md: every option of ``duolora merge`` as its parser declares it, in the parser's
    order (the merge knobs' options come from MergeConfig's metadata through ``duolora.cli``)."""
    import argparse

    from duolora import cli

    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    lines = [CLI_BEGIN, "| option | default | meaning |", "|---|---|---|"]
    for action in commands.choices["merge"]._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        option = ", ".join(action.option_strings)
        if action.choices:
            option += " {" + ",".join(str(c) for c in action.choices) + "}"
        elif action.metavar:
            option += f" {action.metavar}"
        if action.required:
            default = "(required)"
        elif isinstance(action, argparse._StoreTrueAction):
            default = "off"
        elif action.default is None:
            default = "none"
        else:
            default = _code(action.default)
        lines.append("| " + " | ".join(_cell(c) for c in (f"`{option}`", default, action.help)) + " |")
    lines.append(CLI_END)
    return "\n".join(lines)


def replace_section(text: str, section: str, begin: str = BEGIN, end: str = END) -> str:
    a, b = text.index(begin), text.index(end) + len(end)
    return text[:a] + section + text[b:]


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(REPO / "devtools"))
    import comfyhost

    comfyhost.boot()
    import nodes

    section = render(nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS)
    options = render_options()
    if "--write" in argv:
        NODES_DOC.write_text(replace_section(NODES_DOC.read_text(encoding="utf-8"), section), encoding="utf-8")
        METHOD_DOC.write_text(replace_section(METHOD_DOC.read_text(encoding="utf-8"), options, OPTIONS_BEGIN,
                                              OPTIONS_END), encoding="utf-8")
        CLI_DOC.write_text(replace_section(CLI_DOC.read_text(encoding="utf-8"), render_cli_options(), CLI_BEGIN,
                                           CLI_END), encoding="utf-8")
    else:
        print(section)
        print()
        print(options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
