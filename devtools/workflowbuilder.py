"""Assembling a UI workflow node by node from the real node definitions: positions stacked in columns, widget
values filled from the definitions' defaults, links, groups, and the saved file's execution order and id."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable
from typing import Any

from objectinfo import (
    FRONTEND_ONLY,
    InputSpec,
    default_widget_value,
    grows_outputs,
    is_file_combo,
    socket_inputs,
    widget_layout,
)
from workflowformat import MODE_ALWAYS, WorkflowError

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
    """A UI workflow assembled node by node from the real definitions (see objectinfo.py)."""

    def __init__(self, object_info: dict) -> None:
        self.info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def node(self, node_id: int) -> dict:
        """The node with id ``node_id``."""
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
        src, dst = self.node(source), self.node(target)
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
        members = [self.node(i) for i in node_ids]
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
