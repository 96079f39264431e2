"""Checks of a UI workflow: against the node definitions (widget values, sockets, the link table) and for a
readable layout (no overlapping nodes or groups). Plain dicts in, a list of problems out; no ComfyUI needed."""

from __future__ import annotations

import math
from typing import Any

from objectinfo import (
    CONTROL_VALUES,
    FRONTEND_ONLY,
    InputSpec,
    grows_outputs,
    input_specs,
    is_file_combo,
    socket_inputs,
    widget_layout,
)
from workflowbuilder import TITLE_HEIGHT
from workflowformat import links_by_id, types_match


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
    links = links_by_id(workflow)
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
        if not (types_match(out_type, link_type) and types_match(in_type, link_type)):
            problems.append(f"{where}: type {link_type} joins output {out_type} to input {in_type}")
        if origin.get("type") not in FRONTEND_ONLY and origin.get("type") in object_info:
            declared = object_info[origin["type"]].get("output", [])
            if origin_slot < len(declared) and not types_match(declared[origin_slot], link_type):
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
