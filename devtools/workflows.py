"""Example workflows: build them from the real node definitions, check them, convert them to API prompts.

ComfyUI knows two workflow formats. The *UI* format (what the front end saves and what
``example_workflows/*.json`` holds) is a litegraph graph: nodes with positions, ``widgets_values`` as a
positional list, and a link table ``[id, origin node, origin slot, target node, target slot, type]``.
The *API* format (what ``POST /prompt`` and ``execution.PromptExecutor`` take) is
``{node id: {"class_type", "inputs": {name: value or [source id, slot]}, "_meta": {"title"}}}``.

Everything here works on plain dicts and the node definitions as ``/object_info`` serves them, so it runs
without ComfyUI; only :func:`node_definitions` (and the command line) needs a booted ComfyUI.

Facts about the front end this module relies on (ComfyUI_frontend 1.32.9, the version ComfyUI 0.3.75 pins;
read in its bundle and checked by loading these files in it, tests/browser/test_workflow_thumbnails.py):

* A node's widgets follow the definition's ``input_order`` (required, then optional). INT, FLOAT, STRING,
  BOOLEAN and COMBO inputs are widgets unless ``forceInput``; everything else is a socket.
* An INT input gets a second widget "control_after_generate" (fixed/increment/decrement/randomize) right
  after it when its options say ``control_after_generate`` or, if they do not say, when it is named
  ``seed`` or ``noise_seed``; a COMBO input with ``control_after_generate`` gets that widget and a
  "control_filter_list" text widget. Both are saved in ``widgets_values`` but never sent to the server.
* A COMBO with ``image_upload`` gets an "upload" widget (value ``"image"``) after it, saved, never sent.
* Saved workflows list, in ``inputs``, the sockets (required first, then optional) and only those widget
  inputs that carry a link (the front end's ``compressWidgetInputSlots``); link target slots index that list.
* ``graphToPrompt`` skips frontend-only nodes (Note, Reroute, PrimitiveNode, ...), muted (mode 2) and
  bypassed (mode 4) nodes; a link from a bypassed node is taken from the bypassed node's input of the same
  type; an input whose source is not in the prompt is dropped; a value from a PrimitiveNode is inlined.

Command line (boots the in-process ComfyUI for the node definitions)::

    .venv/bin/python devtools/workflows.py            # (re)write example_workflows/*.json
    .venv/bin/python devtools/workflows.py --check    # exit 1 if a file differs from what the generator makes
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "example_workflows"

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
# Nodes that exist only in the front end; graphToPrompt never sends them. Value: their widget names.
FRONTEND_ONLY: dict[str, tuple[str, ...]] = {
    "Note": ("text",),
    "MarkdownNote": ("text",),
    "Reroute": (),
    "PrimitiveNode": (),
}
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
# The front end's INT widget picks up a control widget by name when the definition does not say.
SEED_NAMES = ("seed", "noise_seed")
_FILE_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx",
                    ".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")

CHECKPOINT_LOADER = "CheckpointLoaderSimple"
TINY_CHECKPOINT = "TinySDXLCheckpoint"


class WorkflowError(ValueError):
    """A UI workflow that cannot be converted; the message names the node and the input."""


# ----------------------------------------------------------------------------------------------------
# Node definitions
# ----------------------------------------------------------------------------------------------------

def node_definitions(class_types: Iterable[str] | None = None) -> dict[str, dict]:
    """``/object_info`` built in-process from ``nodes.NODE_CLASS_MAPPINGS`` (ComfyUI must be booted).

    Mirrors ``node_info`` of ComfyUI 0.3.75's server.py: V3 nodes describe themselves with
    ``GET_NODE_INFO_V1()``; V1 nodes are read from INPUT_TYPES, RETURN_TYPES, ... . The JSON round trip
    turns tuples into lists, exactly as the HTTP endpoint does.
    """
    import folder_paths
    from comfy_api.internal import _ComfyNodeInternal

    import nodes

    wanted = list(nodes.NODE_CLASS_MAPPINGS) if class_types is None else list(class_types)
    out: dict[str, dict] = {}
    with folder_paths.cache_helper:
        for name in wanted:
            cls = nodes.NODE_CLASS_MAPPINGS[name]
            if issubclass(cls, _ComfyNodeInternal):
                info = cls.GET_NODE_INFO_V1()
            else:
                types = cls.INPUT_TYPES()
                info = {
                    "input": types,
                    "input_order": {key: list(value.keys()) for key, value in types.items()},
                    "output": cls.RETURN_TYPES,
                    "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)),
                    "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES),
                    "name": name,
                    "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
                    "description": getattr(cls, "DESCRIPTION", ""),
                    "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes"),
                    "category": getattr(cls, "CATEGORY", "sd"),
                    "output_node": getattr(cls, "OUTPUT_NODE", False) is True,
                }
            out[name] = json.loads(json.dumps(info, default=str))
    return out


@dataclass(frozen=True)
class InputSpec:
    """One input of a node definition as the front end sees it."""

    name: str
    type: str  # "COMBO" for a list of options
    options: dict
    optional: bool
    combo: tuple | None  # the option values of a COMBO

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def extra_widgets(self) -> tuple[str, ...]:
        """Widgets the front end adds right after this one: ("control_after_generate",), ("upload",), ..."""
        if not self.is_widget:
            return ()
        if self.type == "INT":
            control = self.options.get("control_after_generate")
            if control if control is not None else self.name in SEED_NAMES:
                return ("control_after_generate",)
        if self.type == "COMBO":
            if self.options.get("control_after_generate"):
                return ("control_after_generate", "control_filter_list")
            if self.options.get("image_upload"):
                return ("upload",)
        return ()


def input_specs(definition: dict) -> list[InputSpec]:
    """The visible inputs of a definition in the front end's order (required, then optional)."""
    inputs = definition.get("input", {})
    order = definition.get("input_order") or {k: list(v) for k, v in inputs.items()}
    specs = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            raw = inputs.get(section, {}).get(name)
            if raw is None:
                continue
            kind, options = raw[0], (raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {})
            if isinstance(kind, list):
                specs.append(InputSpec(name, "COMBO", options, section == "optional", tuple(kind)))
            elif kind == "COMBO":
                specs.append(InputSpec(name, "COMBO", options, section == "optional",
                                       tuple(options.get("options", ()))))
            else:
                specs.append(InputSpec(name, str(kind), options, section == "optional", None))
    return specs


def widget_layout(definition: dict) -> list[tuple[str, InputSpec, str]]:
    """``widgets_values`` position by position: (widget name, the input it belongs to, role).

    role is "value" for the input's own widget, else the extra widget's name (see InputSpec.extra_widgets).
    """
    layout = []
    for spec in input_specs(definition):
        if spec.is_widget:
            layout.append((spec.name, spec, "value"))
            layout.extend((extra, spec, extra) for extra in spec.extra_widgets)
    return layout


def socket_inputs(definition: dict) -> list[InputSpec]:
    """Socket (non-widget) inputs in the order a saved node lists them: required, then optional."""
    specs = [s for s in input_specs(definition) if not s.is_widget]
    return [s for s in specs if not s.optional] + [s for s in specs if s.optional]


def _sent_to_server(role: str) -> bool:
    # The control and upload widgets have options.serialize = false: saved in the file, never in the prompt.
    return role not in ("control_after_generate", "control_filter_list", "upload")


def is_file_combo(spec: InputSpec) -> bool:
    """A COMBO whose options are files on disk (models, LoRAs, input images): they differ per install."""
    if spec.type != "COMBO":
        return False
    if any(spec.options.get(k) for k in ("image_upload", "video_upload", "audio_upload")):
        return True
    # Placeholders such as "[None]" (a loader whose file is optional) are not files.
    values = [v for v in spec.combo or () if not (isinstance(v, str) and v.startswith("[") and v.endswith("]"))]
    return not values or all(isinstance(v, str) and v.lower().endswith(_FILE_EXTENSIONS) for v in values)


def default_widget_value(spec: InputSpec, role: str = "value") -> Any:
    """The value a freshly added node shows (front end: the definition's default, else the first option)."""
    if role == "control_after_generate":
        return "fixed"
    if role == "control_filter_list":
        return ""
    if role == "upload":
        return "image"
    if "default" in spec.options:
        return spec.options["default"]
    if spec.type == "COMBO":
        return spec.combo[0] if spec.combo else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec.type]


# ----------------------------------------------------------------------------------------------------
# UI -> API
# ----------------------------------------------------------------------------------------------------

def _links_by_id(workflow: dict) -> dict[int, tuple[int, int, int, int, str]]:
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
        return {name: values[name] for name, _, role in layout if name in values and _sent_to_server(role)}
    if len(values) != len(layout):
        raise WorkflowError(
            f"node {node.get('id')} ({node.get('type')}): {len(values)} widget values for {len(layout)} widgets "
            f"{[name for name, _, _ in layout]}"
        )
    return {name: value for (name, _, role), value in zip(layout, values) if _sent_to_server(role)}


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
    if slot < len(ins) and _types_match(ins[slot].get("type"), out_type) and _types_match(ins[slot].get("type"), wanted):
        return slot
    for i, s in enumerate(ins):
        if s.get("type") == wanted:
            return i
    for i, s in enumerate(ins):
        if _types_match(s.get("type"), out_type) and _types_match(s.get("type"), wanted):
            return i
    return None


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
    links = _links_by_id(workflow)

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


# ----------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------

def _check_value(where: str, spec: InputSpec, value: Any, files_must_exist: bool) -> list[str]:
    o = spec.options
    if spec.type == "COMBO":
        options = list(spec.combo or ())
        if value in options:
            return []
        if is_file_combo(spec) and not files_must_exist:
            if isinstance(value, str) and value.strip():
                return []
            return [f"{where}: file name must be a non-empty string, got {value!r}"]
        return [f"{where}: {value!r} is not one of {options[:12]}{' ...' if len(options) > 12 else ''}"]
    if spec.type == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{where}: expected a boolean, got {value!r}"]
    if spec.type == "STRING":
        return [] if isinstance(value, str) else [f"{where}: expected a string, got {value!r}"]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec.type == "INT" and not (number and float(value).is_integer()):
        return [f"{where}: expected an integer, got {value!r}"]
    if spec.type == "FLOAT" and not (number and math.isfinite(value)):
        return [f"{where}: expected a number, got {value!r}"]
    problems = []
    if "min" in o and value < o["min"]:
        problems.append(f"{where}: {value!r} is below the minimum {o['min']!r}")
    if "max" in o and value > o["max"]:
        problems.append(f"{where}: {value!r} is above the maximum {o['max']!r}")
    return problems


def _types_match(a: str | None, b: str | None) -> bool:
    """litegraph's isValidConnection: equal, a wildcard ("*", "", None), or comma lists that share a type."""
    if a in ("*", "", None) or b in ("*", "", None):
        return True
    return bool({t.strip().upper() for t in str(a).split(",")} & {t.strip().upper() for t in str(b).split(",")})


def grows_outputs(definition: dict) -> bool:
    """True for ComfyUI's own output nodes: newer ComfyUIs give some of them outputs (SaveImage and PreviewImage
    pass their images on), so a shipped workflow lists their outputs only as far as it links them and loads
    alike in every supported ComfyUI (the front end adds the ones a host declares beyond those)."""
    return bool(definition.get("output_node")) and not str(definition.get("python_module", "")).startswith(
        "custom_nodes")


def check_workflow(workflow: dict, object_info: dict, *, files_must_exist: bool = False) -> list[str]:
    """Every problem found in a UI workflow against the node definitions (an empty list: none).

    Checks: every node type exists; ``widgets_values`` fits the definition (count; combo options; INT/FLOAT
    type and min/max; BOOLEAN and STRING types; control_after_generate values); the link table is
    consistent with the nodes' ``inputs``/``outputs`` and slot types; every required socket is linked.
    Combo values that name files (checkpoints, LoRAs, input images) may be absent from this ComfyUI's
    folders unless ``files_must_exist``, but must be non-empty strings.
    """
    problems: list[str] = []
    if workflow.get("definitions", {}).get("subgraphs"):
        problems.append("subgraphs are not supported")
    nodes = {}
    for n in workflow.get("nodes", []):
        if int(n["id"]) in nodes:
            problems.append(f"node id {n['id']} is used twice")
        nodes[int(n["id"])] = n
    links = _links_by_id(workflow)
    if workflow.get("last_node_id") is not None and nodes and max(nodes) > int(workflow["last_node_id"]):
        problems.append(f"last_node_id {workflow['last_node_id']} is below the largest node id {max(nodes)}")
    if workflow.get("last_link_id") is not None and links and max(links) > int(workflow["last_link_id"]):
        problems.append(f"last_link_id {workflow['last_link_id']} is below the largest link id {max(links)}")

    for node_id, node in sorted(nodes.items()):
        kind = node.get("type")
        label = f"node {node_id} ({kind})"
        if kind in FRONTEND_ONLY:
            continue
        definition = object_info.get(kind)
        if definition is None:
            problems.append(f"{label}: unknown node type")
            continue
        layout = widget_layout(definition)
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            values = [values.get(name) for name, _, _ in layout]
        if len(values) != len(layout):
            problems.append(f"{label}: {len(values)} widget values for {len(layout)} widgets "
                            f"{[name for name, _, _ in layout]}")
        else:
            for (name, spec, role), value in zip(layout, values):
                where = f"{label} widget {name}"
                if role == "value":
                    problems += _check_value(where, spec, value, files_must_exist)
                elif role == "control_after_generate" and value not in CONTROL_VALUES:
                    problems.append(f"{where}: {value!r} is not one of {list(CONTROL_VALUES)}")
                elif role == "upload" and value != "image":
                    problems.append(f"{where}: expected 'image', got {value!r}")
        specs = {s.name: s for s in input_specs(definition)}
        slots = node.get("inputs") or []
        for slot in slots:
            spec = specs.get(slot.get("name"))
            if spec is None:
                problems.append(f"{label}: input {slot.get('name')!r} is not in the definition")
            elif spec.is_widget and not slot.get("widget"):
                problems.append(f"{label}: input {spec.name!r} is a widget but its slot has no 'widget' entry")
        linked = {s.get("name") for s in slots if s.get("link") is not None}
        for spec in socket_inputs(definition):
            if not spec.optional and spec.name not in linked:
                problems.append(f"{label}: required input {spec.name!r} is not connected")
        outputs = node.get("outputs") or []
        declared = len(definition.get("output", []))
        if len(outputs) != declared and not (grows_outputs(definition) and len(outputs) < declared):
            problems.append(f"{label}: {len(outputs)} outputs, the definition has {len(definition.get('output', []))}")

    for link_id, (origin_id, origin_slot, target_id, target_slot, link_type) in sorted(links.items()):
        where = f"link {link_id}"
        origin, target = nodes.get(origin_id), nodes.get(target_id)
        if origin is None or target is None:
            problems.append(f"{where}: refers to a missing node ({origin_id} -> {target_id})")
            continue
        outs, ins = origin.get("outputs") or [], target.get("inputs") or []
        if origin_slot >= len(outs) or target_slot >= len(ins):
            problems.append(f"{where}: slot out of range ({origin_id}:{origin_slot} -> {target_id}:{target_slot})")
            continue
        if link_id not in (outs[origin_slot].get("links") or []):
            problems.append(f"{where}: not listed in node {origin_id} output {origin_slot}")
        if ins[target_slot].get("link") != link_id:
            problems.append(f"{where}: node {target_id} input {target_slot} holds link {ins[target_slot].get('link')}")
        out_type, in_type = outs[origin_slot].get("type"), ins[target_slot].get("type")
        if not (_types_match(out_type, link_type) and _types_match(in_type, link_type)):
            problems.append(f"{where}: type {link_type} joins output {out_type} to input {in_type}")
        if origin.get("type") not in FRONTEND_ONLY and origin.get("type") in object_info:
            declared = object_info[origin["type"]].get("output", [])
            if origin_slot < len(declared) and not _types_match(declared[origin_slot], link_type):
                problems.append(f"{where}: node {origin_id} output {origin_slot} is {declared[origin_slot]}, "
                                f"not {link_type}")
    for node_id, node in nodes.items():
        for i, slot in enumerate(node.get("inputs") or []):
            link_id = slot.get("link")
            if link_id is not None and (link_id not in links or links[link_id][2:4] != (node_id, i)):
                problems.append(f"node {node_id} input {slot.get('name')!r}: link {link_id} does not end here")
        for i, out in enumerate(node.get("outputs") or []):
            for link_id in out.get("links") or []:
                if link_id not in links or links[link_id][:2] != (node_id, i):
                    problems.append(f"node {node_id} output {i}: link {link_id} does not start here")
    return problems


def layout_problems(workflow: dict) -> list[str]:
    """Readability of a UI workflow's layout: overlapping nodes or groups, nodes cut by a group's edge.

    A node occupies its title bar (TITLE_HEIGHT above ``pos``) and its body (``size``).
    """
    def rect(x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
        return x, y, x + w, y + h

    def overlap(a: tuple, b: tuple) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    def inside(a: tuple, b: tuple) -> bool:
        return b[0] <= a[0] and b[1] <= a[1] and a[2] <= b[2] and a[3] <= b[3]

    nodes = [(n["id"], n["type"], rect(n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["size"][0],
                                        n["size"][1] + TITLE_HEIGHT)) for n in workflow.get("nodes", [])]
    groups = [(g["title"], rect(*g["bounding"])) for g in workflow.get("groups", [])]
    problems = []
    for i, (ia, ta, ra) in enumerate(nodes):
        for ib, tb, rb in nodes[i + 1:]:
            if overlap(ra, rb):
                problems.append(f"nodes {ia} ({ta}) and {ib} ({tb}) overlap")
        for title, rg in groups:
            if overlap(ra, rg) and not inside(ra, rg):
                problems.append(f"node {ia} ({ta}) crosses the edge of group {title!r}")
    for i, (ta, ra) in enumerate(groups):
        for tb, rb in groups[i + 1:]:
            if overlap(ra, rb):
                problems.append(f"groups {ta!r} and {tb!r} overlap")
    return problems


# ----------------------------------------------------------------------------------------------------
# Building UI workflows
# ----------------------------------------------------------------------------------------------------

SLOT_HEIGHT, WIDGET_HEIGHT, TITLE_HEIGHT = 20, 24, 30


class Column:
    """Stacks nodes top to bottom at one x position."""

    def __init__(self, x: float, y: float = 0.0, gap: float = 40.0) -> None:
        self.x, self.y, self.gap = x, y, gap

    def take(self, height: float) -> list[float]:
        pos = [self.x, self.y]
        self.y += height + TITLE_HEIGHT + self.gap
        return pos


class WorkflowBuilder:
    """A UI workflow assembled node by node from the real definitions (see module docstring)."""

    def __init__(self, object_info: dict) -> None:
        self.info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def _node(self, node_id: int) -> dict:
        return next(n for n in self.nodes if n["id"] == node_id)

    def add(self, class_type: str, column: Column, widgets: dict[str, Any] | None = None, *,
            title: str | None = None, width: float = 300, height: float | None = None,
            color: str | None = None, bgcolor: str | None = None, properties: dict | None = None) -> int:
        """Add a node; ``widgets`` overrides defaults by widget name (a seed's control widget is
        "<name>:control"). File combos have no default and must be given. Returns the node id."""
        widgets = dict(widgets or {})
        node_id = len(self.nodes) + 1
        if class_type in FRONTEND_ONLY:
            values = [widgets.pop(name) for name in FRONTEND_ONLY[class_type]]
            sockets: list[InputSpec] = []
            outputs: list[dict] = []
            n_widgets = len(values)
        else:
            definition = self.info[class_type]
            values = []
            n_shown = 0
            for name, spec, role in widget_layout(definition):
                # The front end draws advanced widgets only on request: they take no room in a new node.
                n_shown += not spec.options.get("advanced")
                key = name if role == "value" else f"{spec.name}:{role}"
                if key in widgets:
                    values.append(widgets.pop(key))
                elif role == "value" and is_file_combo(spec) and spec.type == "COMBO":
                    raise WorkflowError(f"{class_type}.{name} names a file: give it explicitly")
                else:
                    values.append(default_widget_value(spec, role))
            sockets = socket_inputs(definition)
            outputs = [{"name": name, "type": kind, "links": []} for name, kind in
                       zip(definition.get("output_name", definition["output"]), definition["output"])]
            n_widgets = n_shown
        if widgets:
            raise WorkflowError(f"{class_type} has no widgets {sorted(widgets)}")
        auto = max(len(sockets), len(outputs)) * SLOT_HEIGHT + 6 + (n_widgets * WIDGET_HEIGHT + 8 if n_widgets else 0)
        size = [width, max(height or 0, auto)]
        node: dict[str, Any] = {
            "id": node_id,
            "type": class_type,
            "pos": column.take(size[1]),
            "size": size,
            "flags": {},
            "order": 0,
            "mode": MODE_ALWAYS,
            "inputs": [{"name": s.name, "localized_name": s.name, "type": s.type, "link": None,
                        **({"shape": 7} if s.optional else {})} for s in sockets],
            "outputs": [{**o, "localized_name": o["name"]} for o in outputs],
            "properties": ({"Node name for S&R": class_type} if class_type not in FRONTEND_ONLY else {})
            | dict(properties or {}),
            "widgets_values": values,
        }
        if title and title != self.info.get(class_type, {}).get("display_name", class_type):
            # litegraph saves a title only when it differs from the type's own.
            node["title"] = title
        if color:
            node["color"] = color
        if bgcolor:
            node["bgcolor"] = bgcolor
        self.nodes.append(node)
        return node_id

    def connect(self, source: int, output: str | int, target: int, input_name: str) -> int:
        """Link ``source``'s output (name or index) to ``target``'s input; returns the link id."""
        src, dst = self._node(source), self._node(target)
        if isinstance(output, str):
            names = [o["name"] for o in src["outputs"]]
            if output not in names:
                raise WorkflowError(f"{src['type']} has no output {output!r} (outputs: {names})")
            slot = names.index(output)
        else:
            slot = output
        ins = [i["name"] for i in dst["inputs"]]
        if input_name not in ins:
            raise WorkflowError(f"{dst['type']} has no socket {input_name!r} (sockets: {ins})")
        target_slot = ins.index(input_name)
        if dst["inputs"][target_slot]["link"] is not None:
            raise WorkflowError(f"{dst['type']}.{input_name} is already connected")
        link_id = len(self.links) + 1
        link_type = src["outputs"][slot]["type"]
        self.links.append([link_id, source, slot, target, target_slot, link_type])
        src["outputs"][slot]["links"].append(link_id)
        dst["inputs"][target_slot]["link"] = link_id
        return link_id

    def group(self, title: str, node_ids: Iterable[int], color: str = "#3f789e", pad: float = 20.0) -> None:
        """A titled box around some nodes (litegraph group)."""
        members = [self._node(i) for i in node_ids]
        x0 = min(n["pos"][0] for n in members) - pad
        y0 = min(n["pos"][1] for n in members) - TITLE_HEIGHT - pad - 34
        x1 = max(n["pos"][0] + n["size"][0] for n in members) + pad
        y1 = max(n["pos"][1] + n["size"][1] for n in members) + pad
        self.groups.append({"id": len(self.groups) + 1, "title": title,
                            "bounding": [x0, y0, x1 - x0, y1 - y0], "color": color, "font_size": 24,
                            "flags": {}})

    def _execution_order(self) -> None:
        # litegraph stores a topological "order"; the front end recomputes it, but keep the file truthful.
        deps = {n["id"]: {link[1] for link in self.links if link[3] == n["id"]} for n in self.nodes}
        done: list[int] = []
        while len(done) < len(self.nodes):
            ready = sorted(i for i, d in deps.items() if i not in done and d <= set(done))
            if not ready:
                raise WorkflowError("the graph has a cycle")
            done.extend(ready)
        for n in self.nodes:
            n["order"] = done.index(n["id"])

    def build(self, name: str) -> dict:
        """The UI workflow (version 0.4) with a stable id derived from ``name``."""
        self._execution_order()
        nodes = copy.deepcopy(self.nodes)
        for node in nodes:
            if grows_outputs(self.info.get(node["type"], {})):
                while node["outputs"] and not node["outputs"][-1].get("links"):
                    node["outputs"].pop()
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-duolora/example_workflows/{name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": copy.deepcopy(self.links),
            "groups": copy.deepcopy(self.groups),
            "config": {},
            # No saved view ("ds"): the front end then fits the whole graph into the window on load.
            "extra": {},
            "version": 0.4,
        }


# ----------------------------------------------------------------------------------------------------
# The example workflows
# ----------------------------------------------------------------------------------------------------

CKPT = "sd_xl_base_1.0.safetensors"
# Shown by the front end's missing-models dialog (node.properties.models), as ComfyUI's own templates do.
CKPT_MODELS = [{
    "name": CKPT,
    "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
    "directory": "checkpoints",
}]
CONTENT_LORA = "content_lora.safetensors"
STYLE_LORA = "style_lora.safetensors"
CONTENT_IMAGES = ("content_1.png", "content_2.png")
STYLE_IMAGE = "style.png"
P_C = "a photo of sks dog"
P_S = "a cat in zwz style"
P_CS = "a sks dog in zwz style"
# The second subject of the multi-concept example.
CONTENT2_LORA = "content2_lora.safetensors"
CONTENT2_IMAGES = ("content2_1.png",)
P_C2 = "a photo of pqr fox"
P_CS2 = "a pqr fox in zwz style"
NEGATIVE = "blurry, low quality, deformed, watermark, text"
SEED = 42
SIZE = 1024  # SDXL's native resolution
SAMPLER = {"seed": SEED, "seed:control_after_generate": "fixed", "steps": 30, "cfg": 7.0,
           "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}
MERGE_SEED = {"seed": 0, "seed:control_after_generate": "fixed"}

GREEN, GREEN_BG = "#232", "#353"  # ComfyUI's own colours for positive / negative prompts
RED, RED_BG = "#322", "#533"
GROUP_COLOURS = {"model": "#3f789e", "refs": "#8A8", "prompts": "#b58b2a", "merge": "#a1309b",
                 "out": "#88A"}

# The examples, simplest first. ComfyUI's template browser shows a custom-node template by its file name
# alone (front ends 1.32.9 to 1.49.6: the card's title, and again as its description with "_" and "-" as
# spaces), so the file name is the title; its number keeps the order in an alphabetical listing, and
# web/duolora_templates.js sorts the server's directory-order list by it.
QUICK = "1. Merge two LoRAs in seconds"
WITHOUT_IMAGES = "2. Merge without pictures (each LoRA draws its references)"
WITH_IMAGES = "3. Merge with your own pictures (as in the paper)"
COMPARISON = "4. Compare plain sum, ZipLoRA and DuoLoRA"
KLORA = "5. Subject in a style without merging (K-LoRA)"
MULTI = "6. Several subjects in one style (multi-concept)"
WORKFLOW_NAMES = (QUICK, WITHOUT_IMAGES, WITH_IMAGES, COMPARISON, KLORA, MULTI)
# Folder names the pack is installed under: a git clone (and ComfyUI-Manager) uses the repository's name,
# the Comfy Registry the package's. The template browser labels the pack's category by the folder's name
# unless locales/en/main.json names it.
PACK_FOLDER_NAMES = ("comfyui-duolora", "duolora")
LOCALES_FILE = REPO_ROOT / "locales" / "en" / "main.json"
# What a user sees of ZipRank Merge in a new graph (mode, method, steps, balance, the advanced button, the loss
# curve): the height a template gives it, measured in front end 1.32.9 (tests/browser/test_frontend.py).
MERGE_HEIGHT = 454
# A loader and Save Merged LoRA with the line that shows, after a run, the file's summary / the saved name.
LOADER_HEIGHT, SAVE_HEIGHT = 142, 110
# Add Content LoRA: five input sockets, two widgets and the same summary line as the loaders.
ADD_CONTENT_HEIGHT = 202


def _note(b: WorkflowBuilder, col: Column, text: str, height: float = 180, width: float = 340) -> int:
    return b.add("Note", col, {"text": text}, width=width, height=height)


def _prompt(b: WorkflowBuilder, col: Column, text: str, title: str, negative: bool = False) -> int:
    colours = (RED, RED_BG) if negative else (GREEN, GREEN_BG)
    return b.add("CLIPTextEncode", col, {"text": text}, title=title, width=400, height=120,
                 color=colours[0], bgcolor=colours[1])


def _merge(b: WorkflowBuilder, col: Column, title: str, **widgets: Any) -> int:
    return b.add("DuoLoRA_ZipRankMerge", col, {**MERGE_SEED, **widgets}, title=title, width=400, height=MERGE_HEIGHT)


def _reference_images(b: WorkflowBuilder, vae_src: int, cols: tuple[Column, Column]) -> tuple[int, int, list[int]]:
    """LoadImage ×2 -> ImageBatch -> VAEEncode (content) and LoadImage -> VAEEncode (style)."""
    top = max(c.y for c in cols) + 60  # room for the group's title above the first node
    for c in cols:
        c.y = top
    imgs = [b.add("LoadImage", cols[0], {"image": name}, title=f"Content image {i + 1}", width=300, height=330)
            for i, name in enumerate(CONTENT_IMAGES)]
    style_img = b.add("LoadImage", cols[0], {"image": STYLE_IMAGE}, title="Style image", width=300, height=330)
    batch = b.add("ImageBatch", cols[1], title="Content images (batch)", width=240)
    b.connect(imgs[0], "IMAGE", batch, "image1")
    b.connect(imgs[1], "IMAGE", batch, "image2")
    enc_c = b.add("VAEEncode", cols[1], title="VAE Encode (content)", width=240)
    b.connect(batch, "IMAGE", enc_c, "pixels")
    b.connect(vae_src, "VAE", enc_c, "vae")
    cols[1].y = max(cols[1].y, b._node(style_img)["pos"][1])
    enc_s = b.add("VAEEncode", cols[1], title="VAE Encode (style)", width=240)
    b.connect(style_img, "IMAGE", enc_s, "pixels")
    b.connect(vae_src, "VAE", enc_s, "vae")
    return enc_c, enc_s, [*imgs, style_img, batch, enc_c, enc_s]


def _loras(b: WorkflowBuilder, col: Column) -> tuple[int, int]:
    # A loader shows its file's summary (key style, base model, layers, rank) in the node after a run.
    c = b.add("DuoLoRA_LoadContentLoRA", col, {"lora_name": CONTENT_LORA}, width=320, height=LOADER_HEIGHT)
    s = b.add("DuoLoRA_LoadStyleLoRA", col, {"lora_name": STYLE_LORA}, width=320, height=LOADER_HEIGHT)
    return c, s


def _generate(b: WorkflowBuilder, model_src: int, positive: int, negative: int, vae_src: int,
              cols: tuple[Column, Column], prefix: str, title: str = "KSampler",
              latent: int | None = None) -> tuple[int, int, int]:
    """EmptyLatentImage (unless given) -> KSampler -> VAEDecode -> SaveImage."""
    if latent is None:
        latent = b.add("EmptyLatentImage", cols[0], {"width": SIZE, "height": SIZE, "batch_size": 1}, width=300)
    ks = b.add("KSampler", cols[0], SAMPLER, title=title, width=300)
    b.connect(model_src, "MODEL", ks, "model")
    b.connect(positive, "CONDITIONING", ks, "positive")
    b.connect(negative, "CONDITIONING", ks, "negative")
    b.connect(latent, "LATENT", ks, "latent_image")
    dec = b.add("VAEDecode", cols[1], width=220)
    b.connect(ks, "LATENT", dec, "samples")
    b.connect(vae_src, "VAE", dec, "vae")
    save = b.add("SaveImage", cols[1], {"filename_prefix": prefix}, width=380, height=400)
    b.connect(dec, "IMAGE", save, "images")
    return latent, ks, save


def _merge_inputs(b: WorkflowBuilder, merge: int, model: int, content: int, style: int,
                  latents: tuple[int, str, int, str] | None, prompts: tuple[int, int, int] | None,
                  content_output: str = "content_lora") -> None:
    """``content_output``: the content node's output ("content_loras" from Add Content LoRA)."""
    b.connect(model, "MODEL", merge, "model")
    b.connect(content, content_output, merge, "content_lora")
    b.connect(style, "style_lora", merge, "style_lora")
    if latents:
        b.connect(latents[0], latents[1], merge, "content_latents")
        b.connect(latents[2], latents[3], merge, "style_latents")
    if prompts:
        for src, name in zip(prompts, ("content_prompt", "style_prompt", "combined_prompt")):
            b.connect(src, "CONDITIONING", merge, name)


def _save_and_report(b: WorkflowBuilder, merge: int, col: Column) -> tuple[int, int]:
    """Save Merged LoRA and Merge Report on the merge's outputs."""
    save_lora = b.add("DuoLoRA_SaveMergedLoRA", col, {"filename_prefix": "duolora/merged"}, width=320,
                      height=SAVE_HEIGHT)
    b.connect(merge, "merged_lora", save_lora, "merged_lora")
    report = b.add("DuoLoRA_MergeReport", col, width=400, height=340)
    b.connect(merge, "stats", report, "stats")
    return save_lora, report


def _apply_and_generate(b: WorkflowBuilder, merge: int, ckpt: int, cols: tuple[Column, Column],
                        negative_title: str) -> list[int]:
    """Apply Merged LoRA (MODEL + CLIP) -> prompts encoded by the patched CLIP -> sampler and SaveImage.

    Returns the nodes of the "Generate with the merged LoRA" group."""
    apply = b.add("DuoLoRA_ApplyMergedLoRA", cols[0], width=320)
    b.connect(ckpt, "MODEL", apply, "model")
    b.connect(ckpt, "CLIP", apply, "clip")
    b.connect(merge, "merged_lora", apply, "merged_lora")
    pos = _prompt(b, cols[0], P_CS, "Prompt (merged LoRA)")
    b.connect(apply, "CLIP", pos, "clip")
    neg = _prompt(b, cols[0], NEGATIVE, negative_title, negative=True)
    b.connect(apply, "CLIP", neg, "clip")
    latent, ks, save = _generate(b, apply, pos, neg, ckpt, cols, "duolora/merged")
    return [apply, pos, neg, latent, ks, save]


def workflow_with_reference_images(info: dict) -> dict:
    """Example 3: the paper's setting — reference images and prompts of both LoRAs."""
    b = WorkflowBuilder(info)
    c0, c1, c2, c3, c4, c5, c6 = (Column(x) for x in (0, 360, 660, 1120, 1580, 2040, 2500))
    ckpt = b.add("CheckpointLoaderSimple", c0, {"ckpt_name": CKPT}, width=300, properties={"models": CKPT_MODELS})
    _note(b, c0, (
        "DuoLoRA: merge a content LoRA (your subject) and a style LoRA into one LoRA.\n\n"
        "1. Put both LoRAs in models/loras and pick them in the two loaders.\n"
        "2. Load two pictures of the subject (Image Batch joins them) and one picture in the style, "
        "ideally from the LoRAs' training images, and write each LoRA's prompt.\n"
        "3. Press Run. The merge learns 100 steps (the paper's setting); Save Merged LoRA shows the file it "
        "wrote in models/loras/duolora/, and the KSampler draws with the merged LoRA."), height=250)
    enc_c, enc_s, ref_nodes = _reference_images(b, ckpt, (c0, c1))
    p_c = _prompt(b, c2, P_C, "p_c: content LoRA prompt")
    b.connect(ckpt, "CLIP", p_c, "clip")
    p_s = _prompt(b, c2, P_S, "p_s: style LoRA prompt")
    b.connect(ckpt, "CLIP", p_s, "clip")
    p_cs = _prompt(b, c2, P_CS, "p_cs: subject in the style")
    b.connect(ckpt, "CLIP", p_cs, "clip")
    content, style = _loras(b, c3)
    merge = _merge(b, c4, "ZipRank Merge (DuoLoRA)")
    _merge_inputs(b, merge, ckpt, content, style, (enc_c, "LATENT", enc_s, "LATENT"), (p_c, p_s, p_cs))
    save_lora, report = _save_and_report(b, merge, c4)
    generate = _apply_and_generate(b, merge, ckpt, (c5, c6), "Negative prompt")
    b.group("Base model", [ckpt], GROUP_COLOURS["model"])
    b.group("Reference images", ref_nodes, GROUP_COLOURS["refs"])
    b.group("Prompts of the two LoRAs", [p_c, p_s, p_cs], GROUP_COLOURS["prompts"])
    b.group("DuoLoRA merge", [content, style, merge, save_lora, report], GROUP_COLOURS["merge"])
    b.group("Generate with the merged LoRA", generate, GROUP_COLOURS["out"])
    return b.build(WITH_IMAGES)


def workflow_without_training_images(info: dict) -> dict:
    """Example 2: no images — each LoRA, picked once in its DuoLoRA loader, draws its own reference latents
    (Apply Merged LoRA applies that loader's LoRA alone) and goes on to the merge."""
    b = WorkflowBuilder(info)
    c0, c1, c2, c3, c5, c6, c7 = (Column(x) for x in (0, 460, 920, 1280, 1720, 2180, 2580))
    ckpt = b.add("CheckpointLoaderSimple", c0, {"ckpt_name": CKPT}, width=300, properties={"models": CKPT_MODELS})
    _note(b, c0, (
        "No training images? Each LoRA draws its own references: the content LoRA renders p_c, the "
        "style LoRA renders p_s, and ZipRank Merge learns from those latents.\n\n"
        "Pick each LoRA once, in Load Content LoRA and Load Style LoRA: the same loader feeds its drawing "
        "and the merge. Write each LoRA's prompt with its trigger words, then press Run."), height=220)
    duo_loaders = {"content": "DuoLoRA_LoadContentLoRA", "style": "DuoLoRA_LoadStyleLoRA"}
    neg = _prompt(b, c0, NEGATIVE, "Negative prompt", negative=True)
    b.connect(ckpt, "CLIP", neg, "clip")
    p_cs = _prompt(b, c0, P_CS, "p_cs: subject in the style")
    b.connect(ckpt, "CLIP", p_cs, "clip")
    rows = {}
    c1.y = c2.y = c3.y = 0
    for which, lora, text, seed in (("content", CONTENT_LORA, P_C, SEED), ("style", STYLE_LORA, P_S, SEED + 1)):
        # Room for the group title between the two rows.
        start = max(c1.y, c2.y, c3.y) + (90 if rows else 0)
        c1.y = c2.y = c3.y = start
        duo = b.add(duo_loaders[which], c1, {"lora_name": lora}, width=320, height=LOADER_HEIGHT)
        apply = b.add("DuoLoRA_ApplyMergedLoRA", c1, title=f"Apply the {which} LoRA alone", width=320)
        b.connect(ckpt, "MODEL", apply, "model")
        b.connect(ckpt, "CLIP", apply, "clip")
        b.connect(duo, f"{which}_lora", apply, "merged_lora")
        prompt = _prompt(b, c1, text, f"p_{which[0]}: {which} LoRA prompt")
        b.connect(apply, "CLIP", prompt, "clip")
        latent = b.add("EmptyLatentImage", c2, {"width": SIZE, "height": SIZE, "batch_size": 2},
                       title=f"{which.capitalize()} references: size and count", width=300)
        ks = b.add("KSampler", c2, {**SAMPLER, "seed": seed}, title=f"Draw {which} references", width=300)
        b.connect(apply, "MODEL", ks, "model")
        b.connect(prompt, "CONDITIONING", ks, "positive")
        b.connect(neg, "CONDITIONING", ks, "negative")
        b.connect(latent, "LATENT", ks, "latent_image")
        dec = b.add("VAEDecode", c3, width=220)
        b.connect(ks, "LATENT", dec, "samples")
        b.connect(ckpt, "VAE", dec, "vae")
        preview = b.add("PreviewImage", c3, title=f"{which.capitalize()} references", width=380, height=300)
        b.connect(dec, "IMAGE", preview, "images")
        rows[which] = (duo, apply, prompt, latent, ks, dec, preview)
        b.group(f"{which.capitalize()} LoRA draws its references", rows[which],
                GROUP_COLOURS["refs"] if which == "content" else GROUP_COLOURS["prompts"])
    content, style = rows["content"][0], rows["style"][0]
    merge = _merge(b, c5, "ZipRank Merge (DuoLoRA)")
    _merge_inputs(b, merge, ckpt, content, style,
                  (rows["content"][4], "LATENT", rows["style"][4], "LATENT"),
                  (rows["content"][2], rows["style"][2], p_cs))
    save_lora, report = _save_and_report(b, merge, c5)
    generate = _apply_and_generate(b, merge, ckpt, (c6, c7), "Negative prompt (merged LoRA)")
    b.group("Base model and shared prompts", [ckpt, neg, p_cs], GROUP_COLOURS["model"])
    b.group("DuoLoRA merge", [merge, save_lora, report], GROUP_COLOURS["merge"])
    b.group("Generate with the merged LoRA", generate, GROUP_COLOURS["out"])
    return b.build(WITHOUT_IMAGES)


def workflow_baseline_comparison(info: dict) -> dict:
    """Example 4: direct merge, ZipLoRA and DuoLoRA side by side (same references, prompt and seed)."""
    b = WorkflowBuilder(info)
    c0, c1, c2 = (Column(x) for x in (0, 360, 660))
    ckpt = b.add("CheckpointLoaderSimple", c0, {"ckpt_name": CKPT}, width=300, properties={"models": CKPT_MODELS})
    _note(b, c0, (
        "Three merges of the same two LoRAs, sampled with the same prompt, seed and canvas:\n"
        "- direct: the plain sum of both LoRAs (nothing learned)\n"
        "- ZipLoRA: a learned mask per output column (no priors, no cycle loss)\n"
        "- DuoLoRA: ZipRank masks and SDXL layer priors (the defaults; the Constyle cycle loss is an option)\n\n"
        "Each column encodes the prompt with its own merged CLIP, as a Load LoRA node would."), height=230)
    enc_c, enc_s, ref_nodes = _reference_images(b, ckpt, (c0, c1))
    p_c = _prompt(b, c2, P_C, "p_c: content LoRA prompt")
    p_s = _prompt(b, c2, P_S, "p_s: style LoRA prompt")
    p_cs = _prompt(b, c2, P_CS, "p_cs: subject in the style")
    for p in (p_c, p_s, p_cs):
        b.connect(ckpt, "CLIP", p, "clip")
    content, style = _loras(b, c2)
    latent = b.add("EmptyLatentImage", c2, {"width": SIZE, "height": SIZE, "batch_size": 1}, width=300)
    b.group("Base model", [ckpt], GROUP_COLOURS["model"])
    b.group("Reference images", ref_nodes, GROUP_COLOURS["refs"])
    b.group("LoRAs, prompts, canvas", [p_c, p_s, p_cs, content, style, latent], GROUP_COLOURS["prompts"])
    methods = (
        ("direct", "Direct merge (nothing learned)", {"method": "direct", "steps": 0}),
        ("ziplora", "ZipLoRA (per-column masks)", {
            "method": "ziplora_out", "prior_preset": "none", "prior_init": False, "prior_loss": False,
            "constyle_iterations": 0}),
        ("duolora", "DuoLoRA (ZipRank + priors, defaults)", {"method": "ziprank"}),
    )
    x = 1120
    for key, title, widgets in methods:
        cm, ca = Column(x, 0), Column(x + 460, 0)
        merge = _merge(b, cm, title, **widgets)
        _merge_inputs(b, merge, ckpt, content, style, (enc_c, "LATENT", enc_s, "LATENT"), (p_c, p_s, p_cs))
        apply = b.add("DuoLoRA_ApplyMergedLoRA", ca, title=f"Apply ({key})", width=300)
        b.connect(ckpt, "MODEL", apply, "model")
        b.connect(ckpt, "CLIP", apply, "clip")
        b.connect(merge, "merged_lora", apply, "merged_lora")
        pos = _prompt(b, ca, P_CS, f"Prompt ({key})")
        neg = _prompt(b, ca, NEGATIVE, f"Negative prompt ({key})", negative=True)
        for p in (pos, neg):
            b.connect(apply, "CLIP", p, "clip")
        members = [merge, apply, pos, neg]
        if key == "duolora":
            save_lora = b.add("DuoLoRA_SaveMergedLoRA", cm, {"filename_prefix": "duolora/compare_duolora"},
                              width=320, height=SAVE_HEIGHT)
            b.connect(merge, "merged_lora", save_lora, "merged_lora")
            report = b.add("DuoLoRA_MergeReport", cm, width=400, height=300)
            b.connect(merge, "stats", report, "stats")
            members += [save_lora, report]
        _, ks, save = _generate(b, apply, pos, neg, ckpt, (ca, ca), f"duolora/compare_{key}",
                                title=f"KSampler ({key})", latent=latent)
        b.group(title, [*members, ks, save], GROUP_COLOURS["merge"] if key == "duolora" else GROUP_COLOURS["out"])
        x += 980
    return b.build(COMPARISON)


def workflow_merge_two_loras(info: dict) -> dict:
    """The quick start: two loaders, ZipRank Merge in weights mode (no pictures, no prompts), Save Merged LoRA
    and Merge Report. The checkpoint only gives the merge the model's layer shapes; nothing is drawn."""
    b = WorkflowBuilder(info)
    c0, c1, c2, c3 = (Column(x, 90) for x in (0, 380, 740, 1180))
    _note(b, c0, (
        "Merge two LoRAs in seconds:\n\n"
        "1. Load Checkpoint: your SDXL model (the merge reads its layer shapes; nothing is drawn).\n"
        "2. Load Content LoRA: your subject LoRA. Load Style LoRA: your style LoRA.\n"
        "3. Press Run.\n"
        "4. Save Merged LoRA shows the file it wrote in models/loras/duolora/. Press R, then pick it in any "
        "Load LoRA node.\n\n"
        "Mode 'weights' needs no pictures; for the paper's method (reference pictures, 100 learning steps) "
        "open the other DuoLoRA templates."), width=340, height=300)
    ckpt = b.add("CheckpointLoaderSimple", c0, {"ckpt_name": CKPT}, width=340, properties={"models": CKPT_MODELS})
    content, style = _loras(b, c1)
    merge = _merge(b, c2, "ZipRank Merge (DuoLoRA)", mode="weights")
    _merge_inputs(b, merge, ckpt, content, style, None, None)
    save_lora, report = _save_and_report(b, merge, c3)
    b.group("Pick two LoRAs, press Run", [ckpt, content, style, merge, save_lora, report],
            GROUP_COLOURS["merge"])
    return b.build(QUICK)


def locale_messages() -> dict:
    """locales/en/main.json: "DuoLoRA" as the template browser's label of the pack's category, under each folder
    name the pack is installed under (ComfyUI serves every pack's locales at /i18n)."""
    return {"templateWorkflows": {"category": dict.fromkeys(PACK_FOLDER_NAMES, "DuoLoRA")}}


def workflow_klora(info: dict) -> dict:
    """K-LoRA: both LoRAs applied at sampling time, nothing learned, merged or saved."""
    b = WorkflowBuilder(info)
    c0, c1, c2, c3 = (Column(x) for x in (0, 360, 720, 1160))
    ckpt = b.add("CheckpointLoaderSimple", c0, {"ckpt_name": CKPT}, width=300, properties={"models": CKPT_MODELS})
    _note(b, c0, (
        "K-LoRA: a subject in a style without a merge. No reference images, no merge time, no file: in every "
        "attention layer, at every step, Apply K-LoRA uses one of the two LoRAs, the content LoRA early in "
        "sampling and the style LoRA later.\n\n"
        "Too little subject: lower beta. Too little style: raise beta or alpha. To keep the result as one "
        "LoRA file, merge with ZipRank Merge instead."), height=250)
    content, style = _loras(b, c1)
    klora = b.add("DuoLoRA_ApplyKLoRA", c1, width=320)
    b.connect(ckpt, "MODEL", klora, "model")
    b.connect(content, "content_lora", klora, "content_lora")
    b.connect(style, "style_lora", klora, "style_lora")
    pos = _prompt(b, c2, P_CS, "Prompt")
    neg = _prompt(b, c2, NEGATIVE, "Negative prompt", negative=True)
    for p in (pos, neg):
        b.connect(ckpt, "CLIP", p, "clip")
    latent, ks, save = _generate(b, klora, pos, neg, ckpt, (c2, c3), "duolora/klora")
    b.group("Base model", [ckpt], GROUP_COLOURS["model"])
    b.group("K-LoRA (training-free)", [content, style, klora], GROUP_COLOURS["merge"])
    b.group("Generate", [pos, neg, latent, ks, save], GROUP_COLOURS["out"])
    return b.build(KLORA)


def workflow_multi_concept(info: dict) -> dict:
    """Two subjects and one style in one merged LoRA (multi-concept); each subject has its own
    pictures and prompts, and the merged LoRA draws either subject in the style."""
    b = WorkflowBuilder(info)
    c0, c1, c2, c3, c4, c5, c6 = (Column(x) for x in (0, 360, 660, 1120, 1580, 2040, 2500))
    ckpt = b.add("CheckpointLoaderSimple", c0, {"ckpt_name": CKPT}, width=300, properties={"models": CKPT_MODELS})
    _note(b, c0, (
        "Multi-concept DuoLoRA: two subjects (two content LoRAs) and one style LoRA merged into ONE LoRA, "
        "which draws either subject in the style when its prompt asks for it.\n\n"
        "Load Content LoRA holds the first subject (its pictures and prompts go to ZipRank Merge); Add "
        "Content LoRA adds the second one with its own pictures and prompts. Chain more Add Content LoRA "
        "nodes for more subjects."), height=250)
    enc_c, enc_s, ref_nodes = _reference_images(b, ckpt, (c0, c1))
    second_img = b.add("LoadImage", c0, {"image": CONTENT2_IMAGES[0]}, title="Second subject image", width=300,
                       height=330)
    c1.y = max(c1.y, b._node(second_img)["pos"][1])
    enc_c2 = b.add("VAEEncode", c1, title="VAE Encode (subject 2)", width=260)
    b.connect(second_img, "IMAGE", enc_c2, "pixels")
    b.connect(ckpt, "VAE", enc_c2, "vae")
    prompts = {}
    for key, text, title in (("p_c", P_C, "p_c: first subject's prompt"), ("p_c2", P_C2, "p_c: second subject's prompt"),
                             ("p_s", P_S, "p_s: style LoRA prompt"), ("p_cs", P_CS, "p_cs: first subject in the style"),
                             ("p_cs2", P_CS2, "p_cs: second subject in the style")):
        prompts[key] = _prompt(b, c2, text, title)
        b.connect(ckpt, "CLIP", prompts[key], "clip")
    content = b.add("DuoLoRA_LoadContentLoRA", c3, {"lora_name": CONTENT_LORA}, title="Load Content LoRA (subject 1)",
                    width=320, height=LOADER_HEIGHT)
    second = b.add("DuoLoRA_AddContentLoRA", c3, {"lora_name": CONTENT2_LORA}, title="Add Content LoRA (subject 2)",
                   width=320, height=ADD_CONTENT_HEIGHT)
    b.connect(content, "content_lora", second, "content_lora")
    b.connect(enc_c2, "LATENT", second, "content_latents")
    b.connect(prompts["p_c2"], "CONDITIONING", second, "content_prompt")
    b.connect(prompts["p_cs2"], "CONDITIONING", second, "combined_prompt")
    style = b.add("DuoLoRA_LoadStyleLoRA", c3, {"lora_name": STYLE_LORA}, width=320, height=LOADER_HEIGHT)
    merge = _merge(b, c4, "ZipRank Merge (DuoLoRA)")
    _merge_inputs(b, merge, ckpt, second, style, (enc_c, "LATENT", enc_s, "LATENT"),
                  (prompts["p_c"], prompts["p_s"], prompts["p_cs"]), content_output="content_loras")
    save_lora, report = _save_and_report(b, merge, c3)
    apply = b.add("DuoLoRA_ApplyMergedLoRA", c5, width=320)
    b.connect(ckpt, "MODEL", apply, "model")
    b.connect(ckpt, "CLIP", apply, "clip")
    b.connect(merge, "merged_lora", apply, "merged_lora")
    neg = _prompt(b, c5, NEGATIVE, "Negative prompt", negative=True)
    b.connect(apply, "CLIP", neg, "clip")
    generate = [apply, neg]
    latent = None
    for i, text in enumerate((P_CS, P_CS2)):
        pos = _prompt(b, c5, text, f"Prompt (subject {i + 1} in the style)")
        b.connect(apply, "CLIP", pos, "clip")
        c6.y = max(c6.y, b._node(pos)["pos"][1])
        latent, ks, save = _generate(b, apply, pos, neg, ckpt, (c5, c6), f"duolora/multi_subject{i + 1}",
                                     title=f"KSampler (subject {i + 1})", latent=latent)
        generate += [pos, ks, save] + ([latent] if i == 0 else [])
    b.group("Base model", [ckpt], GROUP_COLOURS["model"])
    b.group("Reference images", [*ref_nodes, second_img, enc_c2], GROUP_COLOURS["refs"])
    b.group("Prompts of the three LoRAs", list(prompts.values()), GROUP_COLOURS["prompts"])
    b.group("DuoLoRA merge", [content, second, style, merge, save_lora, report], GROUP_COLOURS["merge"])
    b.group("Generate with the merged LoRA", generate, GROUP_COLOURS["out"])
    return b.build(MULTI)


def indirection_example(object_info: dict) -> tuple[dict, dict[str, int]]:
    """A small UI graph with every indirection the converter must resolve, for tests (not an example).

    Checkpoint -> Reroute -> LoraLoader (bypassed) -> KSampler.model; the bypassed loader's CLIP output feeds
    CLIPTextEncode (-> the checkpoint's CLIP); KSampler.seed is a converted widget fed by a front-end-only
    PrimitiveNode (value 1234) and KSampler.steps one fed by the backend node PrimitiveInt (a link); a Note
    sits beside. Returns the workflow and node ids by role.
    """
    b = WorkflowBuilder(object_info)
    col, col2 = Column(0), Column(420)
    ids = {
        "ckpt": b.add("CheckpointLoaderSimple", col, {"ckpt_name": CKPT}),
        "reroute": b.add("Reroute", col, width=80),
        "lora": b.add("LoraLoader", col, {"lora_name": "y.safetensors"}),
        "text": b.add("CLIPTextEncode", col, {"text": "a"}, width=400, height=120),
        "latent": b.add("EmptyLatentImage", col2),
        "steps": b.add("PrimitiveInt", col2, {"value": 7}),
        "ksampler": b.add("KSampler", col2, {"seed": 5, "steps": 20}),
        "note": b.add("Note", col2, {"text": "ignored"}),
        "primitive": b.add("PrimitiveNode", col2, width=240, height=80),
    }
    nodes = {n["id"]: n for n in b.nodes}
    nodes[ids["reroute"]]["inputs"] = [{"name": "", "type": "*", "link": None}]
    nodes[ids["reroute"]]["outputs"] = [{"name": "", "type": "*", "links": []}]
    prim = nodes[ids["primitive"]]
    prim["outputs"] = [{"name": "connect to widget input", "type": "INT", "links": [],
                        "widget": {"name": "seed"}}]
    prim["properties"] = {"Run widget replace on values": False}
    prim["widgets_values"] = [1234, "fixed"]
    ks = nodes[ids["ksampler"]]
    ks["inputs"] += [{"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": None},
                     {"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": None}]
    nodes[ids["lora"]]["mode"] = MODE_BYPASS

    def link(src: str, slot: int, dst: str, name: str, kind: str) -> None:
        link_id = len(b.links) + 1
        target = nodes[ids[dst]]
        target_slot = next(i for i, s in enumerate(target["inputs"]) if s["name"] == name)
        b.links.append([link_id, ids[src], slot, ids[dst], target_slot, kind])
        nodes[ids[src]]["outputs"][slot]["links"].append(link_id)
        target["inputs"][target_slot]["link"] = link_id

    link("ckpt", 0, "reroute", "", "MODEL")
    link("reroute", 0, "lora", "model", "MODEL")
    link("ckpt", 1, "lora", "clip", "CLIP")
    link("lora", 0, "ksampler", "model", "MODEL")
    link("lora", 1, "text", "clip", "CLIP")
    link("text", 0, "ksampler", "positive", "CONDITIONING")
    link("text", 0, "ksampler", "negative", "CONDITIONING")
    link("latent", 0, "ksampler", "latent_image", "LATENT")
    link("primitive", 0, "ksampler", "seed", "INT")
    link("steps", 0, "ksampler", "steps", "INT")
    return b.build("indirection-test"), ids


# ----------------------------------------------------------------------------------------------------
# Inputs for running the examples without downloads (tests, demo, thumbnails)
# ----------------------------------------------------------------------------------------------------

def put_example_files(base: str | Path, image_size: int = 64) -> None:
    """Every file the example workflows name, in a ComfyUI base directory: tiny LoRAs in models/loras, pictures in
    input/, and an empty placeholder for the checkpoint (nothing here loads it). Front end 1.49.6 marks a node whose
    file combo names a missing file as having errors; with these in place the examples load clean."""
    base = Path(base)
    make_tiny_loras(base / "models" / "loras", {CONTENT_LORA: (8, 1), STYLE_LORA: (8, 2), CONTENT2_LORA: (4, 3)})
    make_reference_images(base / "input", size=image_size)
    checkpoint = base / "models" / "checkpoints" / CKPT
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.touch()


def make_reference_images(folder: str | Path, size: int = 64,
                          names: tuple[str, ...] = (*CONTENT_IMAGES, STYLE_IMAGE),
                          second: tuple[str, ...] = CONTENT2_IMAGES) -> dict[str, Path]:
    """Procedural reference pictures: two of a simple "subject" (a cartoon dog face), one "style" (stripes),
    and ``second`` of the multi-concept example's second subject (a cartoon fox face).

    ``names``: the content images first, the style image last (default: the examples' file names).
    Returns name -> path of RGB PNGs of size×size. Deterministic; drawn with Pillow only.
    """
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    k = size / 256.0

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [x0 * k, y0 * k, x1 * k, y1 * k]

    def subject(bg: tuple[int, int, int], cx: float, cy: float, r: float, fur: tuple[int, int, int]) -> Image.Image:
        img = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(img)
        ear = tuple(int(c * 0.6) for c in fur)
        d.ellipse(box(cx - 1.15 * r, cy - 0.9 * r, cx - 0.45 * r, cy + 0.5 * r), fill=ear)
        d.ellipse(box(cx + 0.45 * r, cy - 0.9 * r, cx + 1.15 * r, cy + 0.5 * r), fill=ear)
        d.ellipse(box(cx - r, cy - r, cx + r, cy + r), fill=fur)
        d.ellipse(box(cx - 0.45 * r, cy + 0.05 * r, cx + 0.45 * r, cy + 0.75 * r), fill=(235, 220, 200))
        for ex in (-0.38, 0.38):
            d.ellipse(box(cx + (ex - 0.1) * r, cy - 0.35 * r, cx + (ex + 0.1) * r, cy - 0.15 * r), fill=(20, 20, 20))
        d.ellipse(box(cx - 0.14 * r, cy + 0.12 * r, cx + 0.14 * r, cy + 0.32 * r), fill=(30, 20, 20))
        return img

    def stripes() -> Image.Image:
        img = Image.new("RGB", (size, size), (24, 40, 92))
        d = ImageDraw.Draw(img)
        for i in range(-8, 12):
            x = i * 40
            d.polygon([(x * k, 0), ((x + 20) * k, 0), ((x + 20 + 256) * k, 256 * k), ((x + 256) * k, 256 * k)],
                      fill=(236, 124, 38))
        for gx in range(20, 256, 64):
            for gy in range(20, 256, 64):
                d.ellipse(box(gx - 9, gy - 9, gx + 9, gy + 9), fill=(250, 214, 70))
        return img

    def fox() -> Image.Image:
        img = Image.new("RGB", (size, size), (236, 226, 196))
        d = ImageDraw.Draw(img)
        cx, cy, r = 128, 140, 66
        for side in (-1, 1):
            d.polygon([((cx + side * 0.95 * r) * k, (cy - 0.2 * r) * k), ((cx + side * 0.75 * r) * k, (cy - 1.35 * r) * k),
                       ((cx + side * 0.2 * r) * k, (cy - 0.75 * r) * k)], fill=(214, 96, 30))
        d.polygon([((cx - r) * k, (cy - 0.5 * r) * k), ((cx + r) * k, (cy - 0.5 * r) * k), (cx * k, (cy + r) * k)],
                  fill=(224, 110, 40))
        d.polygon([((cx - 0.45 * r) * k, (cy + 0.1 * r) * k), ((cx + 0.45 * r) * k, (cy + 0.1 * r) * k),
                   (cx * k, (cy + r) * k)], fill=(250, 244, 232))
        for ex in (-0.4, 0.4):
            d.ellipse(box(cx + (ex - 0.09) * r, cy - 0.3 * r, cx + (ex + 0.09) * r, cy - 0.12 * r), fill=(20, 20, 20))
        d.ellipse(box(cx - 0.1 * r, cy + 0.78 * r, cx + 0.1 * r, cy + 0.96 * r), fill=(30, 20, 20))
        return img

    pictures = [subject((196, 214, 230), 118, 128, 70, (150, 96, 52)),
                subject((120, 170, 96), 150, 120, 56, (176, 120, 70))]
    paths = {}
    for i, name in enumerate(names):
        img = stripes() if i == len(names) - 1 else pictures[i % len(pictures)]
        path = folder / name
        img.save(path, format="PNG")
        paths[name] = path
    for name in second:
        path = folder / name
        fox().save(path, format="PNG")
        paths[name] = path
    return paths


def make_tiny_loras(folder: str | Path, specs: dict[str, tuple[int, int]] | None = None,
                    text_encoder: bool = False) -> dict[str, Path]:
    """Synthetic LoRAs for the tiny SDXL test model (devtools/tinysdxl.TINY_UNET_CONFIG), kohya keys.

    ``specs``: file name -> (rank, seed); default: the examples' content LoRA (rank 8, seed 1) and style
    LoRA (rank 8, seed 2). ``text_encoder`` adds te1/te2 layers of the tiny CLIP. Returns name -> path.
    """
    import tinysdxl

    from duolora import formats, sdxl, synthetic

    specs = specs or {CONTENT_LORA: (8, 1), STYLE_LORA: (8, 2)}
    te_dims = tinysdxl.TINY_TE_DIMS if text_encoder else None
    layout = sdxl.layout_for(sdxl.UNetConfig.from_comfy(tinysdxl.TINY_UNET_CONFIG), te_dims=te_dims)
    paths = {}
    for name, (rank, seed) in specs.items():
        lora = synthetic.synthetic_lora(layout, rank=rank, seed=seed, std=0.2, text_encoder=text_encoder)
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        formats.save_lora(lora, path, overwrite=True, layout=layout)
        paths[name] = path
    return paths


def input_file_names(workflow: dict) -> dict[str, list[str]]:
    """The files a UI workflow names, by kind: {"loras": [...], "images": [...], "checkpoints": [...]}."""
    kinds = {"lora_name": "loras", "image": "images", "ckpt_name": "checkpoints"}
    found: dict[str, list[str]] = {v: [] for v in kinds.values()}
    for node in workflow.get("nodes", []):
        names = {"LoraLoader": ["lora_name"], "DuoLoRA_LoadContentLoRA": ["lora_name"],
                 "DuoLoRA_AddContentLoRA": ["lora_name"], "DuoLoRA_LoadStyleLoRA": ["lora_name"], "LoadImage": ["image"],
                 "CheckpointLoaderSimple": ["ckpt_name"]}.get(node.get("type"), [])
        for i, name in enumerate(names):
            value = (node.get("widgets_values") or [])[i]
            if value not in found[kinds[name]]:
                found[kinds[name]].append(value)
    return found


# ----------------------------------------------------------------------------------------------------
# The front end in a browser (a Playwright page showing ComfyUI; no Playwright import here)
# ----------------------------------------------------------------------------------------------------

_JS_FIT = """(margin) => {
    const app = window.comfyAPI.app.app;
    const items = [...app.graph._nodes.map(n => [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30]),
                   ...app.graph._groups.map(g => g._bounding ? [...g._bounding] : [...g.bounding])];
    if (!items.length) return null;
    const x0 = Math.min(...items.map(b => b[0])), y0 = Math.min(...items.map(b => b[1]));
    const x1 = Math.max(...items.map(b => b[0] + b[2])), y1 = Math.max(...items.map(b => b[1] + b[3]));
    const el = app.canvas.canvas, W = el.clientWidth, H = el.clientHeight;
    const scale = Math.min((W - 2 * margin) / (x1 - x0), (H - 2 * margin) / (y1 - y0));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [(W / scale - (x1 - x0)) / 2 - x0, (H / scale - (y1 - y0)) / 2 - y0];
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    return [x0, y0, x1, y1, scale];
}"""

# Everything but the graph canvas and the node widgets that live in the DOM (text areas, our diagrams).
_THUMBNAIL_CSS = """
body * { visibility: hidden !important; }
#graph-canvas, .dom-widget, .dom-widget * { visibility: visible !important; }
"""


# ComfyUI's template browser, in every front end the tests meet: up to 1.35.9 a dialog with this class; 1.49.6 draws
# it as a layout dialog labelled by its key, "global-workflow-template-selector".
TEMPLATE_DIALOG = ".workflow-template-selector-dialog, [role=dialog][aria-labelledby*='workflow-template-selector']"


def template_pictures_js() -> str:
    """A JavaScript expression: the pictures the template browser shows, e.g. once a pack's category is chosen, that
    pack's card pictures (front end 1.49.6 shows them from blob: URLs of the fetched files, so not by their URL)."""
    # One selector list, so an image inside two matching elements (a front end whose dialog matches both forms) is
    # listed once.
    images = ", ".join(f"{part.strip()} img" for part in TEMPLATE_DIALOG.split(","))
    return f"[...document.querySelectorAll({json.dumps(images)})].filter(i => i.offsetParent !== null)"


def page_open_template_pack(page: Any, pack: str, timeout: float) -> Any:
    """Templates in the side bar → the ``pack`` category, as a user clicks through it; returns the dialog."""
    page.locator(".templates-tab-button").first.click(timeout=timeout)
    dialog = page.locator(TEMPLATE_DIALOG).first
    dialog.wait_for(state="visible", timeout=timeout)
    dialog.get_by_role("button", name=pack).first.click(timeout=timeout)
    return dialog


def page_load_workflow(page: Any, workflow: dict) -> None:
    """Load a UI workflow into the page's ComfyUI app the way opening a file does (``app.loadGraphData``)."""
    page.evaluate("async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf, true, true, null, {}); }",
                  workflow)
    page.wait_for_timeout(300)


def page_graph_to_prompt(page: Any) -> dict:
    """The API prompt the front end itself would queue for the graph on screen (``app.graphToPrompt``)."""
    return page.evaluate("async () => (await window.comfyAPI.app.app.graphToPrompt()).output")


def page_fit_view(page: Any, margin: float = 24.0) -> list[float] | None:
    """Zoom and pan the canvas so every node and group is visible; returns [x0, y0, x1, y1, scale]."""
    bounds = page.evaluate(_JS_FIT, margin)
    page.wait_for_timeout(300)
    return bounds


def page_thumbnail(page: Any, path: str | Path, width: int = 600, quality: int = 85) -> Path:
    """Fit the graph and save a JPEG of the canvas alone (menus hidden), ``width`` pixels wide."""
    import io

    from PIL import Image

    # A <style> element put in by hand: Playwright's add_style_tag waits for the element's load event and fails
    # with whatever the page reports meanwhile (the server's CSP blocking the front end's api.comfy.org lookups).
    style = page.evaluate_handle("css => { const el = document.createElement('style'); el.textContent = css; "
                                 "document.head.appendChild(el); return el; }", _THUMBNAIL_CSS)
    try:
        page_fit_view(page)
        png = page.screenshot()
    finally:
        style.evaluate("el => el.remove()")
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img = img.resize((width, round(img.height * width / img.width)), Image.Resampling.LANCZOS)
    path = Path(path)
    img.save(path, format="JPEG", quality=quality, optimize=True)
    return path


BUILDERS = {
    QUICK: workflow_merge_two_loras,
    WITHOUT_IMAGES: workflow_without_training_images,
    WITH_IMAGES: workflow_with_reference_images,
    COMPARISON: workflow_baseline_comparison,
    KLORA: workflow_klora,
    MULTI: workflow_multi_concept,
}


def build_examples(object_info: dict) -> dict[str, dict]:
    """Name -> UI workflow of every example, built from ``object_info``."""
    return {name: build(object_info) for name, build in BUILDERS.items()}


def dumps(workflow: dict) -> str:
    """The file text of a workflow (stable: 1-space indent, keys in insertion order, final newline)."""
    return json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) example_workflows/*.json from the real "
                                                 "node definitions of an in-process ComfyUI.")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a file differs")
    parser.add_argument("--out", type=Path, default=EXAMPLES_DIR, help="folder (default: example_workflows/)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import comfyhost

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
