"""The front end's copy of the SDXL prior tables (web/duolora_priors.js) equals duolora/sdxl.py.

No browser needed: the JS file keeps PRESETS as strict JSON between two marker comments, so it parses
with json.loads; ATTENTION_BLOCKS is read line by line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from duolora import sdxl

PRIORS_JS = Path(__file__).resolve().parents[2] / "web" / "duolora_priors.js"


def _js_presets(text: str) -> dict[str, dict[str, str]]:
    start = text.index("// BEGIN PRESETS")
    end = text.index("// END PRESETS")
    body = text[start:end].split("\n", 1)[1].strip()
    prefix = "export const PRESETS ="
    assert body.startswith(prefix) and body.endswith(";"), body[:60]
    return json.loads(body[len(prefix) : -1])


def test_js_presets_equal_python_presets() -> None:
    presets = _js_presets(PRIORS_JS.read_text(encoding="utf-8"))
    assert presets == sdxl.PRESETS
    assert (*presets, "custom") == sdxl.PRESET_NAMES


def test_js_attention_blocks_equal_python_blocks_in_unet_order() -> None:
    text = PRIORS_JS.read_text(encoding="utf-8")
    blocks = re.findall(r'\{ name: "([\w.]+)", short: "\w+", res: (\d+) \}', text)
    assert [(name, int(res)) for name, res in blocks] == list(sdxl.ATTENTION_BLOCKS.items())
    assert len(blocks) == 11


def test_js_preset_table_parse_detects_a_difference() -> None:
    """The parser really reads the table: one changed role is a difference."""
    text = PRIORS_JS.read_text(encoding="utf-8")
    changed = text.replace('"output_blocks.1.1": "style"', '"output_blocks.1.1": "content"', 1)
    assert changed != text
    assert _js_presets(changed)["b_lora"] == {"output_blocks.0.1": "content", "output_blocks.1.1": "content"}
    assert _js_presets(changed) != sdxl.PRESETS
