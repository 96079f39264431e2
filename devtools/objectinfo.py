"""Node definitions of the nodes a booted ComfyUI registered: every widget's default, and where an output is."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from comfyhost import Host


def widget_defaults(host: Host, class_type: str) -> dict[str, Any]:
    """Every widget default of a registered node, from its ``INPUT_TYPES()`` (an API prompt must give every
    widget; the front end fills them from the same defaults)."""
    spec = host.node_class_mappings[class_type].INPUT_TYPES()
    out: dict[str, Any] = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            if len(entry) > 1 and isinstance(entry[1], dict) and "default" in entry[1]:
                out[name] = entry[1]["default"]
    return out


def output_slot(host: Host, class_type: str, output_type: str) -> int:
    """The index of the first output of ``output_type`` of a registered node (outputs move between ComfyUI versions,
    e.g. Train LoRA's LORA_MODEL)."""
    cls = host.node_class_mappings[class_type]
    types = list(cls.GET_NODE_INFO_V1()["output"] if hasattr(cls, "GET_NODE_INFO_V1") else cls.RETURN_TYPES)
    if output_type not in types:
        raise LookupError(f"{class_type} has no {output_type} output (its outputs: {types})")
    return types.index(output_type)
