"""ComfyUI's two workflow formats, and the converter from the UI format to the API format.

The *UI* format (what the front end saves and what ``example_workflows/*.json`` holds) is a litegraph graph:
nodes with positions, ``widgets_values`` as a positional list, and a link table
``[id, origin node, origin slot, target node, target slot, type]``. The *API* format (what ``POST /prompt`` and
``execution.PromptExecutor`` take) is ``{node id: {"class_type", "inputs": {name: value or [source id, slot]},
"_meta": {"title"}}}``. Everything here works on plain dicts and the node definitions as ``/object_info`` serves
them (objectinfo.py), so it runs without ComfyUI.

Facts about the front end this module relies on (ComfyUI_frontend 1.32.9; tests/browser/test_workflow_thumbnails.py
compares :func:`ui_to_api` with the front end's own ``graphToPrompt``):

* Saved workflows list, in ``inputs``, the sockets (required first, then optional) and only those widget
  inputs that carry a link (the front end's ``compressWidgetInputSlots``); link target slots index that list.
* ``graphToPrompt`` skips frontend-only nodes (Note, Reroute, PrimitiveNode, ...), muted (mode 2) and
  bypassed (mode 4) nodes; a link from a bypassed node is taken from the bypassed node's input of the same
  type; an input whose source is not in the prompt is dropped; a value from a PrimitiveNode is inlined.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from objectinfo import FRONTEND_ONLY, is_sent_to_server, widget_layout

MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4

CHECKPOINT_LOADER = "CheckpointLoaderSimple"
TINY_CHECKPOINT = "TinySDXLCheckpoint"


class WorkflowError(ValueError):
    """A UI workflow that cannot be converted; the message names the node and the input."""


def links_by_id(workflow: dict) -> dict[int, tuple[int, int, int, int, str]]:
    """Link id -> (origin node, origin slot, target node, target slot, type), from either form of link."""
    table = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):  # the serialised form inside subgraph definitions
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"],
                    link["target_slot"], link.get("type")]
        table[int(link[0])] = (int(link[1]), int(link[2]), int(link[3]), int(link[4]), link[5])
    return table


def _widget_values(node: dict, definition: dict) -> dict[str, Any]:
    """Widget name -> value of one UI node, with the widgets the front end never sends left out."""
    layout = widget_layout(definition)
    values = node.get("widgets_values")
    if values is None:
        values = []
    if isinstance(values, dict):  # some packs save widgets_values as a dict keyed by name
        return {name: values[name] for name, _, role in layout if name in values and is_sent_to_server(role)}
    if len(values) != len(layout):
        raise WorkflowError(
            f"node {node.get('id')} ({node.get('type')}): {len(values)} widget values for {len(layout)} widgets "
            f"{[name for name, _, _ in layout]}"
        )
    return {name: value for (name, _, role), value in zip(layout, values) if is_sent_to_server(role)}


def _bypass_input(node: dict, slot: int, wanted: str) -> int | None:
    """Which input of a bypassed node stands in for its output ``slot`` (frontend 1.32.9, ExecutableNodeDTO):
    the input at the same index if it fits both the output's and the wanted type, else the first input of
    exactly the wanted type, else the first that fits both; None when no input fits. The chosen input may be
    unconnected; then nothing is sent (the front end does not look further)."""
    ins = node.get("inputs") or []
    outs = node.get("outputs") or []
    out_type = outs[slot].get("type", "*") if slot < len(outs) else "*"
    if wanted in ("*", ""):
        return (slot if slot < len(ins) else 0) if ins else None
    if slot < len(ins) and types_match(ins[slot].get("type"), out_type) and types_match(ins[slot].get("type"), wanted):
        return slot
    for i, s in enumerate(ins):
        if s.get("type") == wanted:
            return i
    for i, s in enumerate(ins):
        if types_match(s.get("type"), out_type) and types_match(s.get("type"), wanted):
            return i
    return None

def types_match(a: str | None, b: str | None) -> bool:
    """litegraph's isValidConnection: equal, a wildcard ("*", "", None), or comma lists that share a type."""
    if a in ("*", "", None) or b in ("*", "", None):
        return True
    return bool({t.strip().upper() for t in str(a).split(",")} & {t.strip().upper() for t in str(b).split(",")})


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow into the API prompt ComfyUI executes (what ``graphToPrompt`` sends).

    ``object_info``: node definitions as ``/object_info`` serves them (see :func:`node_definitions`).
    Returns ``{str(node id): {"inputs": {...}, "class_type": type, "_meta": {"title": ...}}}``. Links become
    ``[str(source id), source slot]``; links through Reroute nodes and bypassed nodes are followed to the real
    source; a widget input fed by a PrimitiveNode keeps the value; list values are wrapped as
    ``{"__value__": [...]}`` like the front end does. Raises :class:`WorkflowError` for unknown node types,
    subgraphs and widget lists that do not fit the definition.
    """
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("subgraphs are not supported by this converter")
    nodes = {int(n["id"]): n for n in workflow.get("nodes", [])}
    links = links_by_id(workflow)

    def resolve(link_id: int | None, seen: frozenset = frozenset()) -> tuple[str, Any] | None:
        """("link", [id, slot]) or ("value", v) for a link, following reroutes and bypasses; None if dropped."""
        if link_id is None or link_id not in links:
            return None
        origin_id, origin_slot, _, _, link_type = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None or origin_id in seen:
            return None
        seen = seen | {origin_id}
        kind = origin.get("type")
        mode = origin.get("mode", MODE_ALWAYS)
        if kind == "Reroute":
            ins = origin.get("inputs") or []
            return resolve(ins[0].get("link") if ins else None, seen)
        if kind == "PrimitiveNode":
            vals = origin.get("widgets_values") or []
            return ("value", vals[0]) if vals else None
        if kind in FRONTEND_ONLY or mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            index = _bypass_input(origin, origin_slot, link_type)
            return None if index is None else resolve(origin["inputs"][index].get("link"), seen)
        return ("link", [str(origin_id), origin_slot])

    prompt: dict[str, dict] = {}
    for node_id, node in nodes.items():
        kind = node.get("type")
        if kind in FRONTEND_ONLY or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        definition = object_info.get(kind)
        if definition is None:
            raise WorkflowError(f"node {node_id}: unknown node type {kind!r} (is its custom-node pack installed?)")
        inputs: dict[str, Any] = {}
        for name, value in _widget_values(node, definition).items():
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            resolved = resolve(slot["link"])
            if resolved is None:
                # graphToPrompt sets nothing for an unresolvable link (a widget keeps its own value).
                continue
            what, value = resolved
            if what == "value":
                inputs[slot["name"]] = {"__value__": value} if isinstance(value, list) else value
            else:
                inputs[slot["name"]] = value
        title = node.get("title") or definition.get("display_name") or kind
        prompt[str(node_id)] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    # As graphToPrompt: a link to a node that is not in the prompt is removed.
    for entry in prompt.values():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def use_tiny_checkpoint(prompt: dict, seed: int = 0) -> dict:
    """A copy of an API prompt with every CheckpointLoaderSimple replaced by the test-only TinySDXLCheckpoint.

    Only the loader changes: its three outputs (MODEL, CLIP, VAE) keep their slots, so every link stays.
    """
    out = copy.deepcopy(prompt)
    for entry in out.values():
        if entry["class_type"] == CHECKPOINT_LOADER:
            entry["class_type"] = TINY_CHECKPOINT
            entry["inputs"] = {"seed": seed}
            entry.setdefault("_meta", {})["title"] = "Tiny SDXL checkpoint (tests)"
    return out


def nodes_of_type(workflow_or_prompt: dict, class_type: str) -> list[str]:
    """Ids (as strings) of the nodes of one type in a UI workflow or an API prompt, in id order."""
    if "nodes" in workflow_or_prompt and isinstance(workflow_or_prompt["nodes"], list):
        ids = [n["id"] for n in workflow_or_prompt["nodes"] if n.get("type") == class_type]
    else:
        ids = [k for k, v in workflow_or_prompt.items() if v.get("class_type") == class_type]
    return [str(i) for i in sorted(ids, key=int)]


def dumps(workflow: dict) -> str:
    """The file text of a workflow (stable: 1-space indent, keys in insertion order, final newline)."""
    return json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"


def load(path: str | Path) -> dict:
    """A workflow (or any JSON file) read from ``path``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
