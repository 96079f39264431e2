"""Node definitions as ComfyUI's ``/object_info`` serves them, and how the front end turns one into widgets and
sockets.

Everything but :func:`node_definitions` works on plain dicts (the definitions as the HTTP endpoint serves them),
so it runs without ComfyUI; :func:`node_definitions`, :func:`widget_defaults` and :func:`output_slot` read the
nodes a booted ComfyUI registered.

Facts about the front end this module relies on (ComfyUI_frontend 1.32.9, the version ComfyUI 0.3.75 pins;
read in its bundle and checked by loading the example workflows in it, tests/browser/test_workflow_thumbnails.py):

* A node's widgets follow the definition's ``input_order`` (required, then optional). INT, FLOAT, STRING,
  BOOLEAN and COMBO inputs are widgets unless ``forceInput``; everything else is a socket.
* An INT input gets a second widget "control_after_generate" (fixed/increment/decrement/randomize) right
  after it when its options say ``control_after_generate`` or, if they do not say, when it is named
  ``seed`` or ``noise_seed``; a COMBO input with ``control_after_generate`` gets that widget and a
  "control_filter_list" text widget. Both are saved in ``widgets_values`` but never sent to the server.
* A COMBO with ``image_upload`` gets an "upload" widget (value ``"image"``) after it, saved, never sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from comfyhost import Host

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
# Nodes that exist only in the front end; graphToPrompt never sends them. Value: their widget names.
FRONTEND_ONLY: dict[str, tuple[str, ...]] = {
    "Note": ("text",),
    "MarkdownNote": ("text",),
    "Reroute": (),
    "PrimitiveNode": (),
}
# The front end's INT widget picks up a control widget by name when the definition does not say.
SEED_NAMES = ("seed", "noise_seed")
_FILE_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx",
                    ".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


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


def is_sent_to_server(role: str) -> bool:
    """Whether a widget of this role (see :func:`widget_layout`) is sent in an API prompt."""
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


def grows_outputs(definition: dict) -> bool:
    """True for ComfyUI's own output nodes: newer ComfyUIs give some of them outputs (SaveImage and PreviewImage
    pass their images on), so a shipped workflow lists their outputs only as far as it links them and loads
    alike in every supported ComfyUI (the front end adds the ones a host declares beyond those)."""
    return bool(definition.get("output_node")) and not str(definition.get("python_module", "")).startswith(
        "custom_nodes")


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
