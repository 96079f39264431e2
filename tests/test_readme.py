"""The README's option table is the MergeConfig: every field, with its real default, exactly once."""

from __future__ import annotations

import re
from pathlib import Path

from duolora.config import MergeConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def _method_rows() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("<!-- method:begin -->"):text.index("<!-- method:end -->")]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[1])
        assert len(names) == len(defaults), line
        for name, default in zip(names, defaults):
            assert name not in rows, f"{name} documented twice"
            rows[name] = default
    return rows


def _as_text(value: object) -> str:
    return '""' if value == "" else str(value)


def test_readme_documents_every_merge_option_with_its_default() -> None:
    rows = _method_rows()
    defaults = MergeConfig().to_dict()
    assert set(rows) == set(defaults), (sorted(set(defaults) - set(rows)), sorted(set(rows) - set(defaults)))
    for name, value in defaults.items():
        assert rows[name] == _as_text(value), f"{name}: README says {rows[name]!r}, MergeConfig has {value!r}"


def test_readme_node_reference_matches_the_registered_nodes(host) -> None:
    """The README's node section is exactly what devtools/nodedocs.py renders from the live node definitions
    (run `.venv/bin/python devtools/nodedocs.py --write` after changing a node)."""
    import nodedocs

    import nodes

    rendered = nodedocs.render(nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS)
    text = README.read_text(encoding="utf-8")
    current = text[text.index(nodedocs.BEGIN):text.index(nodedocs.END) + len(nodedocs.END)]
    assert current == rendered
