"""Where a LoRA file keeps each layer's scale, applied as its writer's loader applies it: ``.alpha`` tensors
(kohya, ComfyUI), PEFT's ``lora_adapter_metadata`` in the header (diffusers), the ``adapter_config.json`` PEFT's
save_pretrained writes beside an ``adapter_model.safetensors``; a file whose places disagree is refused."""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..layout import Layer
from .errors import LoRAError, MalformedLoRAError
from .safetensors_io import read_header

PEFT_METADATA_KEY = "lora_adapter_metadata"
# diffusers' save_lora_weights prefixes each component's LoraConfig with its pipeline attribute name
# (loaders/lora_base.py _pack_dict_with_prefix); a config without prefixes covers every module.
_PEFT_COMPONENTS = (("unet.", "unet"), ("transformer.", "unet"), ("text_encoder.", "te1"),
                    ("text_encoder_2.", "te2"))
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}  # peft.LoraConfig's own defaults
# PEFT's save_pretrained writes a folder: the tensors as adapter_model.safetensors (keys
# base_model.model.<module>.lora_A/lora_B.weight, no alpha) and the LoraConfig as adapter_config.json beside
# them, which PeftModel.from_pretrained reads for the scale (peft utils/constants.py SAFETENSORS_WEIGHTS_NAME,
# CONFIG_NAME; tuners/lora/layer.py update_layer).
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
# Module prefixes PEFT's state dict gives a model it wraps: a file spelled so and holding no scale of its
# own is likely a save_pretrained adapter whose scale stayed in its adapter_config.json.
_PEFT_WRAPPED_PREFIXES = ("base_model.model.", "unet.base_model.model.", "transformer.base_model.model.",
                          "text_encoder.base_model.model.", "text_encoder_2.base_model.model.")
SCALE_SOURCES = {
    "alpha_tensor": ".alpha tensors",
    "peft_metadata": "the header's lora_adapter_metadata (PEFT lora_alpha / r)",
    "peft_config": "the adapter_config.json beside the file (PEFT save_pretrained: lora_alpha / r)",
    "none": "nothing (no .alpha tensor, no lora_adapter_metadata): scale 1",
    "peft_config_missing": ("nothing, but the file looks like a PEFT adapter whose adapter_config.json "
                            "(lora_alpha / r) is not beside it: scale 1, which may be wrong"),
}
PEFT_CONFIG_MISSING_NOTE = (
    "it looks like a PEFT adapter (base_model.model.… lora_A/lora_B keys or the name adapter_model.safetensors, "
    "no .alpha tensors), whose scale lora_alpha / r PEFT keeps in an adapter_config.json beside it; none is "
    "there, so it is read at scale 1, which may be wrong. Keep the folder save_pretrained wrote "
    "(adapter_model.safetensors with its adapter_config.json) together")


@functools.lru_cache(maxsize=32)
def _cached_metadata(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, str], ...]:
    return tuple(read_header(path)[1].items())


def file_metadata(source: str | os.PathLike[str] | None) -> dict[str, str]:
    """The header metadata of ``source`` when it names a readable safetensors file, else {}."""
    if source is None:
        return {}
    try:
        st = os.stat(source)
        return dict(_cached_metadata(os.path.abspath(source), st.st_mtime_ns, st.st_size))
    except (OSError, ValueError, LoRAError):
        return {}


def peft_sidecar(source: str | os.PathLike[str] | None) -> Path | None:
    """The adapter_config.json beside ``source`` when ``source`` is a PEFT adapter_model.safetensors, else None.

    Only PEFT's own pair of names counts: a loras folder may hold one adapter_config.json beside many files,
    and only the adapter_model.safetensors save_pretrained wrote with it is described by it.
    """
    if source is None:
        return None
    p = Path(source)
    if p.name != PEFT_WEIGHTS_NAME:
        return None
    config = p.with_name(PEFT_CONFIG_NAME)
    return config if config.is_file() else None


def sidecar_configs(source: str | None, name: str) -> dict[str, dict] | None:
    """The LoraConfig of the adapter_config.json beside ``source`` as {"*": config}, or None."""
    path = peft_sidecar(source)
    if path is None:
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise TypeError(f"a JSON {type(config).__name__}, not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise MalformedLoRAError(
            f"{name}: the {PEFT_CONFIG_NAME} beside it is not a JSON object ({e}), so the scale its writer meant "
            f"(PEFT lora_alpha / r) cannot be read. Save the adapter again with save_pretrained.", source) from None
    return {"*": config}


def peft_configs(metadata: Mapping[str, str], name: str, source: str | None) -> dict[str, dict] | None:
    """The LoraConfig of each component ("unet", "te1", "te2") in ``lora_adapter_metadata``, or None.

    diffusers (≥ 0.35) writes it with ``save_lora_weights`` and builds ``peft.LoraConfig(**config)`` from it
    when loading (utils/peft_utils.py ``_create_lora_config``), so it decides the scale lora_alpha / r.
    """
    raw = metadata.get(PEFT_METADATA_KEY)
    if raw is None:
        return None
    try:
        config = json.loads(raw)
        if not isinstance(config, dict):
            raise TypeError(f"a JSON {type(config).__name__}, not an object")
    except (json.JSONDecodeError, TypeError) as e:
        raise MalformedLoRAError(
            f"{name}: its header's {PEFT_METADATA_KEY} is not a JSON object ({e}), so the scale its writer "
            "meant (PEFT lora_alpha / r) cannot be read. Re-export the LoRA.", source) from None
    parts: dict[str, dict] = {}
    bare: dict = {}
    for key, value in config.items():
        for prefix, component in _PEFT_COMPONENTS:
            if key.startswith(prefix):
                parts.setdefault(component, {})[key[len(prefix):]] = value
                break
        else:
            bare[key] = value
    if not parts and bare:
        parts = {"*": bare}
    return parts


def looks_like_peft_adapter(source: str | None, modules: Iterable[str], families: Mapping[str, str]) -> bool:
    """True when a file without a scale of its own looks like a PEFT save_pretrained adapter: PEFT's file name,
    or lora_A/lora_B keys of a model PEFT wrapped (``base_model.model.…``)."""
    if source is not None and Path(source).name == PEFT_WEIGHTS_NAME:
        return True
    return any(m.startswith(_PEFT_WRAPPED_PREFIXES) and families.get(m) == "peft" for m in modules)


def _pattern_key(patterns: Mapping[str, object], module: str) -> str | None:
    """PEFT's get_pattern_key: the first pattern p (in order) with re.match(rf"(.*\\.)?({p})$", module)."""
    for p in patterns:
        try:
            hit = re.match(rf"(.*\.)?({p})$", module)
        except re.error:
            hit = re.match(rf"(.*\.)?({re.escape(p)})$", module)
        if hit:
            return p
    return None


def _peft_module_name(layer: Layer, part: int | None = None) -> str:
    """The module name PEFT matches rank_pattern/alpha_pattern against: the diffusers path in its model (of the
    slice ``part`` of a fused layer)."""
    if layer.is_text_encoder:
        return layer.diffusers.split(".", 1)[1]
    return layer.parts[part].path if part is not None else layer.diffusers


# Where a LoraConfig was found, as messages name it, and the reader that would refuse a contradiction.
_PEFT_PLACES = {"peft_metadata": (f"its header's {PEFT_METADATA_KEY}", "diffusers"),
                "peft_config": (f"the {PEFT_CONFIG_NAME} beside it", "PEFT")}


def _peft_scale(config: Mapping, layer: Layer, rank: int, module: str, name: str,
                source: str | None, place: str = "peft_metadata", part: int | None = None) -> tuple[float, float, str]:
    """(alpha, scale, detail) of one layer under a component's LoraConfig, as peft's LoraLayer sets it:
    scale = lora_alpha / r (lora_alpha / √r with use_rslora), r and lora_alpha from rank_pattern/alpha_pattern
    where a pattern matches. ``place``: where the config was found (a key of ``_PEFT_PLACES``)."""
    where, reader = _PEFT_PLACES[place]
    peft_name = _peft_module_name(layer, part)
    try:
        r = config.get("r", PEFT_DEFAULTS["r"])
        alpha = config.get("lora_alpha", PEFT_DEFAULTS["lora_alpha"])
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        via = []
        key = _pattern_key(rank_pattern, peft_name)
        if key is not None:
            r = rank_pattern[key]
            via.append(f"rank_pattern['{key}']")
        key = _pattern_key(alpha_pattern, peft_name)
        if key is not None:
            alpha = alpha_pattern[key]
            via.append(f"alpha_pattern['{key}']")
        r, alpha = int(r), float(alpha)
        rslora = bool(config.get("use_rslora", False))
    except (TypeError, ValueError, AttributeError) as e:
        raise MalformedLoRAError(
            f"{name}: {where} has a value that is not a number or a pattern mapping "
            f"({e}), so the scale its writer meant cannot be read. Re-export the LoRA.", source) from None
    if r != rank:
        raise MalformedLoRAError(
            f"{name}: layer '{module}' has rank {rank}, but {where} says r = {r} for it, "
            f"so {reader} could not load this file either and its scale is unknown. Re-export the LoRA.", source)
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    detail = f"lora_alpha {alpha:g} / {'√' if rslora else ''}r {r}" + (f" ({', '.join(via)})" if via else "")
    return alpha, scale, detail


def layer_scale(layer: Layer, module: str, rank: int, alpha_tensor: torch.Tensor | None,
                 peft: dict[str, dict] | None, name: str, source: str | None,
                 sidecar: dict[str, dict] | None = None, part: int | None = None) -> tuple[float | None, float, str]:
    """(alpha, scale, source) of one layer, applied as the writer's own loader applies it.

    kohya (networks/lora.py), ComfyUI (comfy/weight_adapter/lora.py) and diffusers' kohya conversion all read a
    per-module ``.alpha`` tensor as scale alpha/rank and use scale 1 without one — kohya's loader sets
    alpha = rank for modules without alpha, so a file's ``ss_network_alpha`` metadata is NOT applied. diffusers'
    own files keep the scale in ``lora_adapter_metadata`` instead, PEFT's save_pretrained folders in the
    ``adapter_config.json`` beside the file (``sidecar``). A file whose places disagree is ambiguous (each
    reader applies only its own: diffusers refuses it, ComfyUI applies only the tensor) and is refused unless
    they all give the same scale.
    """
    alpha = None
    if alpha_tensor is not None:
        if alpha_tensor.numel() != 1:
            raise MalformedLoRAError(
                f"{name}: the .alpha of '{module}' should hold one number but has shape "
                f"{tuple(alpha_tensor.shape)} (ComfyUI and kohya cannot read it either). Re-export the file.",
                source)
        if alpha_tensor.device.type != "meta":
            alpha = float(alpha_tensor.detach().to(torch.float64).item())
    # (source, alpha, scale, how a message states it), in the order that names the result
    found: list[tuple[str, float | None, float, str]] = []
    if alpha is not None:
        found.append(("alpha_tensor", alpha, alpha / rank, f"an .alpha tensor ({alpha:g}, scale {alpha / rank:g})"))
    component = "te1" if layer.name.startswith("te1.") else "te2" if layer.name.startswith("te2.") else "unet"
    for place, parts in (("peft_metadata", peft), ("peft_config", sidecar)):
        config = None if parts is None else parts.get(component, parts.get("*"))
        if config is not None:
            p_alpha, p_scale, detail = _peft_scale(config, layer, rank, module, name, source, place, part)
            found.append((place, p_alpha, p_scale, f"{_PEFT_PLACES[place][0]} says {detail} (scale {p_scale:g})"))
    if len(found) > 1 and not all(math.isclose(f[2], found[0][2], rel_tol=1e-6) for f in found[1:]):
        a, b = found[0], next(f for f in found[1:] if not math.isclose(f[2], found[0][2], rel_tol=1e-6))
        why = {("alpha_tensor", "peft_metadata"): "diffusers refuses a file with both and ComfyUI applies only "
                                                   "the tensor",
               ("alpha_tensor", "peft_config"): "PEFT ignores the tensor and ComfyUI applies only the tensor",
               ("peft_metadata", "peft_config"): "diffusers applies the header's and PEFT the adapter_config.json's"
               }[(a[0], b[0])]
        raise MalformedLoRAError(
            f"{name}: layer '{module}' has {a[3]} and {b[3]}. {why}, so what the file means is ambiguous. "
            "Re-export the LoRA.", source)
    if found:
        return found[0][1], found[0][2], found[0][0]
    return None, 1.0, "none"
