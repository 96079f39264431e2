"""The docs hold what the code declares: docs/method.md's option table is exactly what devtools/nodedocs.py
renders from MergeConfig's field metadata (every field, with its real default, exactly once) and docs/nodes.md is
the node reference rendered from the live nodes. The README itself stays short (at most 250 lines), links both
and holds no option table of its own."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from duolora.config import MergeConfig

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
METHOD = REPO / "docs" / "method.md"
NODES_DOC = REPO / "docs" / "nodes.md"


def _option_section() -> str:
    import nodedocs

    text = METHOD.read_text(encoding="utf-8")
    return text[text.index(nodedocs.OPTIONS_BEGIN):text.index(nodedocs.OPTIONS_END) + len(nodedocs.OPTIONS_END)]


def _method_rows(section: str) -> dict[str, str]:
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


def test_method_doc_option_table_is_the_one_generated_from_the_config() -> None:
    """docs/method.md §9's table is exactly what devtools/nodedocs.py renders from the knobs' declarations (run
    `.venv/bin/python devtools/nodedocs.py --write` after changing a knob), and that rendering documents every
    MergeConfig field once, with its real default."""
    import nodedocs

    rendered = nodedocs.render_options()
    assert _option_section() == rendered
    rows = _method_rows(rendered)
    defaults = MergeConfig().to_dict()
    assert set(rows) == set(defaults), (sorted(set(defaults) - set(rows)), sorted(set(rows) - set(defaults)))
    for name, value in defaults.items():
        assert rows[name] == _as_text(value), f"{name}: docs/method.md says {rows[name]!r}, MergeConfig has {value!r}"


def test_node_reference_matches_the_registered_nodes(host) -> None:
    """docs/nodes.md's node section is exactly what devtools/nodedocs.py renders from the live node definitions
    (run `.venv/bin/python devtools/nodedocs.py --write` after changing a node)."""
    import nodedocs

    import nodes

    rendered = nodedocs.render(nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS)
    text = NODES_DOC.read_text(encoding="utf-8")
    current = text[text.index(nodedocs.BEGIN):text.index(nodedocs.END) + len(nodedocs.END)]
    assert current == rendered


def test_cli_doc_option_table_is_the_one_generated_from_the_parser() -> None:
    """docs/cli.md's table is exactly what devtools/nodedocs.py renders from `duolora merge`'s own parser (whose
    knob options come from MergeConfig), so it lists every option of `duolora merge --help` with its default."""
    import nodedocs

    rendered = nodedocs.render_cli_options()
    text = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    assert text[text.index(nodedocs.CLI_BEGIN):text.index(nodedocs.CLI_END) + len(nodedocs.CLI_END)] == rendered
    options = [re.match(r"\| `([^` ]+)", line).group(1) for line in rendered.splitlines()[3:-1]]
    assert {"-o,", "--balance", "--priors", "--no-prior-loss", "--iterations", "--force"} <= set(options)
    assert "| `--margin` | `0.4` |" in rendered and "| `-o, --output OUT` | (required) |" in rendered


def test_readme_is_short_and_links_what_moved_out() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    # The option table lives in docs/method.md alone: no README table row names a knob.
    knobs = {f.name for f in dataclasses.fields(MergeConfig)}
    rows = [line for line in text.splitlines() if (m := re.match(r"\|\s*`([^`]+)`", line)) and m.group(1) in knobs]
    assert rows == [], rows
    for doc in ("docs/method.md", "docs/nodes.md", "docs/cli.md", "docs/lora-files.md", "docs/hosts.md",
                "docs/benchmarks.md"):
        assert f"]({doc}" in text, f"the README does not link {doc}"
        assert (REPO / doc).is_file(), doc
    # Every relative link in the README and the docs points at a file of the repository.
    for page in (README, *sorted((REPO / "docs").glob("*.md"))):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"
