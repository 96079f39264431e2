"""What the node definitions tell the front end, read as ComfyUI serves them (``/object_info``'s form): which
ZipRank Merge widgets are in view and which sit behind the advanced switch, and tooltips of one sentence."""

from __future__ import annotations

import json
import re

import comfyhost
import pytest

NODES = ("DuoLoRA_LoadContentLoRA", "DuoLoRA_LoadStyleLoRA", "DuoLoRA_ZipRankMerge", "DuoLoRA_ApplyMergedLoRA",
         "DuoLoRA_SaveMergedLoRA", "DuoLoRA_MergeReport")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# What a user decides on every merge; everything else of ZipRank Merge is advanced.
IN_VIEW = ["mode", "method", "balance", "steps"]
TOOLTIP_MAX = 200  # characters


def _info(host: comfyhost.Host, node_id: str) -> dict:
    # The JSON round trip the HTTP endpoint does (tuples become lists).
    return json.loads(json.dumps(host.node_class_mappings[node_id].GET_NODE_INFO_V1(), default=str))


def _inputs(info: dict) -> dict[str, dict]:
    out = {}
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            out[name] = {"type": kind, **(spec[1] if len(spec) > 1 else {})}
    return out


def test_merge_node_shows_what_a_user_decides_and_hides_the_rest(host: comfyhost.Host) -> None:
    inputs = _inputs(_info(host, "DuoLoRA_ZipRankMerge"))
    widgets = [name for name, spec in inputs.items() if spec["type"] in WIDGET_TYPES]
    in_view = [name for name in widgets if not inputs[name].get("advanced")]
    assert in_view == IN_VIEW
    assert len(widgets) - len(in_view) == 23
    # Sockets are never hidden: the references a mode needs stay connectable.
    assert not [name for name, spec in inputs.items() if spec["type"] not in WIDGET_TYPES and spec.get("advanced")]


@pytest.mark.parametrize("node_id", NODES)
def test_tooltips_are_one_short_sentence(host: comfyhost.Host, node_id: str) -> None:
    info = _info(host, node_id)
    tips = {f"input {name}": spec.get("tooltip") for name, spec in _inputs(info).items()}
    tips |= {f"output {name}": tip for name, tip in zip(info["output_name"], info.get("output_tooltips", []))}
    tips["description"] = info["description"]
    for where, tip in tips.items():
        assert tip, f"{node_id} {where} has no tooltip"
        assert len(tip) <= TOOLTIP_MAX, f"{node_id} {where}: {len(tip)} characters"
        # One sentence: it ends once, with a full stop, and no sentence starts inside it.
        assert tip.endswith("."), f"{node_id} {where}: {tip!r}"
        text = re.sub(r"\b(e\.g|i\.e)\. ", "", tip[:-1])
        assert not re.search(r"[.!?] +[A-Z]", text), f"{node_id} {where} has more than one sentence: {tip!r}"
