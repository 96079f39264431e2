"""The example workflow files the pack ships: write them, or check that they are what the generator makes.

``example_workflows/*.json`` are built from the real node definitions of an in-process ComfyUI
(examplegraphs.py), checked (workflowcheck.py) and written as stable JSON text (workflowformat.dumps), together
with locales/en/main.json, which labels the pack's category in ComfyUI's template browser. The modules beside
this one hold the parts: node definitions and widgets (objectinfo.py), the UI and API formats and the converter
(workflowformat.py), the builder (workflowbuilder.py), the examples (exampleparts.py, examplegraphs.py), the
files they name (exampleinputs.py) and the front end in a browser (frontendpage.py).

Command line (boots the in-process ComfyUI for the node definitions)::

    .venv/bin/python devtools/workflows.py            # (re)write example_workflows/*.json
    .venv/bin/python devtools/workflows.py --check    # exit 1 if a file differs from what the generator makes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "example_workflows"
# Folder names the pack is installed under: a git clone (and ComfyUI-Manager) uses the repository's name,
# the Comfy Registry the package's. The template browser labels the pack's category by the folder's name
# unless locales/en/main.json names it.
PACK_FOLDER_NAMES = ("comfyui-duolora", "duolora")
LOCALES_FILE = REPO_ROOT / "locales" / "en" / "main.json"


def locale_messages() -> dict:
    """locales/en/main.json: "DuoLoRA" as the template browser's label of the pack's category, under each folder
    name the pack is installed under (ComfyUI serves every pack's locales at /i18n)."""
    return {"templateWorkflows": {"category": dict.fromkeys(PACK_FOLDER_NAMES, "DuoLoRA")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) example_workflows/*.json from the real "
                                                 "node definitions of an in-process ComfyUI.")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a file differs")
    parser.add_argument("--out", type=Path, default=EXAMPLES_DIR, help="folder (default: example_workflows/)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import comfyhost
    from examplegraphs import build_examples
    from objectinfo import node_definitions
    from workflowcheck import check_workflow, layout_problems
    from workflowformat import dumps

    comfyhost.boot()
    info = node_definitions()
    status = 0
    for name, workflow in build_examples(info).items():
        problems = check_workflow(workflow, info) + layout_problems(workflow)
        if problems:
            print(f"{name}: " + "\n  ".join(problems))
            status = 1
        path = args.out / f"{name}.json"
        text = dumps(workflow)
        if args.check:
            same = path.is_file() and path.read_text(encoding="utf-8") == text
            print(f"{path}: {'up to date' if same else 'DIFFERS from the generator'}")
            status |= 0 if same else 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path} ({len(workflow['nodes'])} nodes, {len(workflow['links'])} links)")
    locales = dumps(locale_messages())
    if args.check:
        same = LOCALES_FILE.is_file() and LOCALES_FILE.read_text(encoding="utf-8") == locales
        print(f"{LOCALES_FILE}: {'up to date' if same else 'DIFFERS from the generator'}")
        status |= 0 if same else 1
    elif args.out == EXAMPLES_DIR:
        LOCALES_FILE.parent.mkdir(parents=True, exist_ok=True)
        LOCALES_FILE.write_text(locales, encoding="utf-8")
        print(f"wrote {LOCALES_FILE}")
    return status


if __name__ == "__main__":
    sys.exit(main())
