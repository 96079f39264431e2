"""Render the node reference (docs/nodes.md) from the real node definitions (ComfyUI's own INPUT_TYPES view).

    .venv/bin/python devtools/nodedocs.py          # print the section
    .venv/bin/python devtools/nodedocs.py --write  # replace it in docs/nodes.md

tests/test_readme.py checks that docs/nodes.md holds exactly what this renders, so defaults and tooltips in
the docs cannot drift from the nodes.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODES_DOC = REPO / "docs" / "nodes.md"
BEGIN, END = "<!-- nodes:begin -->", "<!-- nodes:end -->"
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


def replace_section(text: str, section: str) -> str:
    a, b = text.index(BEGIN), text.index(END) + len(END)
    return text[:a] + section + text[b:]


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(REPO / "devtools"))
    import comfyhost

    comfyhost.boot()
    import nodes

    section = render(nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS)
    if "--write" in argv:
        NODES_DOC.write_text(replace_section(NODES_DOC.read_text(encoding="utf-8"), section), encoding="utf-8")
    else:
        print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
