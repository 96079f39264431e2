"""The key grammar of LoRA files: the key styles written, the LoRA tensor suffixes read (kohya, PEFT, diffusers,
attention processors, XLabs), adapters that are not low-rank LoRAs, bias/norm differences, embedded tokens, and
the key style a module's spelling names."""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..layout import (
    ALIAS_ATTN_PROCS,
    ALIAS_COMFYUI,
    ALIAS_KOHYA_DIFFUSERS,
    ALIAS_KOHYA_LDM,
    ALIAS_KOHYA_TE,
    ALIAS_XLABS,
)

KEY_STYLES: tuple[str, ...] = (
    "kohya_ldm",
    "kohya_diffusers",
    "diffusers_peft",
    "diffusers",
    "diffusers_attn_procs",
    "comfyui",
)

# (suffix, part, suffix family); longest match first.
_LORA_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_linear_layer.down.weight", "down", "diffusers"),
    (".lora_linear_layer.up.weight", "up", "diffusers"),
    (".lora_A.default.weight", "down", "peft"),
    (".lora_B.default.weight", "up", "peft"),
    (".lora_down.weight", "down", "kohya"),
    (".lora_up.weight", "up", "kohya"),
    # LyCORIS LoCon with use_tucker: lora_down (r, in, 1, 1) → lora_mid (r, r, kh, kw) → lora_up (out, r, 1, 1)
    (".lora_mid.weight", "mid", "kohya"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    ("_lora.down.weight", "down", "procs"),
    ("_lora.up.weight", "up", "procs"),
    (".lora.down.weight", "down", "diffusers"),
    (".lora.up.weight", "up", "diffusers"),
    # lora_A/lora_B without ".weight" (Mochi's trainer; ComfyUI's LoRAAdapter reads them)
    (".lora_A", "down", "peft"),
    (".lora_B", "up", "peft"),
    (".alpha", "alpha", ""),
)
# How each suffix family is written, for key-style labels of spellings outside KEY_STYLES.
_FAMILY_SUFFIX = {"kohya": ".lora_down", "peft": ".lora_A", "diffusers": ".lora.down", "procs": "_lora.down"}
# Adapters that are not low-rank LoRAs: suffix -> algorithm.
_ADAPTER_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".hada_w1_a", "LoHa"), (".hada_w1_b", "LoHa"), (".hada_w2_a", "LoHa"), (".hada_w2_b", "LoHa"),
    (".hada_t1", "LoHa"), (".hada_t2", "LoHa"),
    (".lokr_w1", "LoKr"), (".lokr_w1_a", "LoKr"), (".lokr_w1_b", "LoKr"), (".lokr_w2", "LoKr"),
    (".lokr_w2_a", "LoKr"), (".lokr_w2_b", "LoKr"), (".lokr_t2", "LoKr"),
    # DoRA's magnitude vector in every spelling: LyCORIS/kohya/ComfyUI ".dora_scale"; PEFT/diffusers
    # ".lora_magnitude_vector" (PEFT's state dict drops the ".weight" and the adapter name, in-memory
    # models keep them; diffusers' kohya conversion keeps the PEFT name on kohya modules)
    (".dora_scale", "DoRA"), (".lora_magnitude_vector", "DoRA"), (".lora_magnitude_vector.weight", "DoRA"),
    (".lora_magnitude_vector.default", "DoRA"), (".lora_magnitude_vector.default.weight", "DoRA"),
    (".oft_blocks", "OFT"), (".oft_diag", "OFT"), (".rescale", "OFT"),
    (".a1.weight", "GLoRA"), (".a2.weight", "GLoRA"), (".b1.weight", "GLoRA"), (".b2.weight", "GLoRA"),
    (".on_input", "IA3"), (".diff", "full"), (".set_weight", "set"),
)
ADAPTER_NAMES = {
    "LoHa": "a LyCORIS LoHa (Hadamard-product) file",
    "LoKr": "a LyCORIS LoKr (Kronecker-product) file",
    "DoRA": "a DoRA (weight-decomposed LoRA) file",
    "OFT": "an OFT/BOFT (orthogonal fine-tuning) file",
    "GLoRA": "a LyCORIS GLoRA file",
    "IA3": "a LyCORIS (IA)^3 file",
    "full": "a full weight-difference file (LyCORIS 'full' / .diff)",
    "set": "a weight-replacement file (set_weight)",
}
# Dense differences ComfyUI adds to a parameter (comfy/lora.py load_lora): suffix -> parameter. A 1-D
# ".diff" (ComfyUI's LoRA training and extraction write one per norm weight) is the weight's difference too;
# a ".diff" of 2 or more dimensions replaces a low-rank layer by a full one and is refused ("full" above).
_PATCH_SUFFIXES: tuple[tuple[str, str], ...] = ((".diff_b", "bias"), (".b_norm", "bias"), (".w_norm", "weight"))
EMBEDDING_REASON = ("embedded textual-inversion token: not merged (ComfyUI's LoRA loader does not apply it "
                    "either; use the original file as an embedding for its token)")
EMBEDDING_RE = re.compile(r"^(bundle_emb\..*|emb_params|string_to_param\..*|string_to_token\..*|clip_[lgh])$")
CLONEOFSIMO_RE = re.compile(r"^(unet|text_encoder):\d+:(up|down)$")


# XLabs' Flux LoRA processors: double_blocks.N.processor.qkv_lora1.down.weight (lora1: the image stream, lora2:
# the text stream); their single-block qkv_lora/proj_lora end like diffusers' processors ("_lora.down.weight").
_XLABS_RE = re.compile(r"^(.+\.processor\.(?:qkv|proj)_lora[12])\.(down|up)\.weight$")


def split_key(key: str) -> tuple[str, str, str] | None:
    """(module, part, suffix family) for a LoRA tensor key, or None."""
    xlabs = _XLABS_RE.match(key)
    if xlabs is not None:
        return xlabs.group(1), xlabs.group(2), "xlabs"
    for suffix, part, family in _LORA_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], part, family
    return None


def adapter_of(key: str) -> tuple[str, str] | None:
    """(module, algorithm) for a non-LoRA adapter tensor, or None."""
    for suffix, algo in _ADAPTER_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], algo
    return None


def patch_of(key: str, shape: Iterable[int]) -> tuple[str, str] | None:
    """(module, "weight"/"bias") for a bias/norm difference tensor, or None."""
    for suffix, param in _PATCH_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], param
    if key.endswith(".diff") and len(key) > 5 and len(tuple(shape)) <= 1:
        module = key[:-5]
        # ComfyUI's UNet key map also names a bias by its own key (comfy/lora.py: "generic lora format for
        # not .weight"), so "<module>.bias.diff" patches that bias
        if module.endswith(".bias") and len(module) > 5:
            return module[:-5], "bias"
        return module, "weight"
    return None


def syntactic_style(module: str, family: str) -> str:
    """The key style a module spelling suggests when no layout knows the layer."""
    if module.startswith(("lora_unet_", "lora_te")):
        return "kohya_diffusers" if re.match(r"lora_unet_(down|up)_blocks_|lora_unet_mid_block_", module) \
            else "kohya_ldm"
    if module.startswith(("diffusion_model.", "text_encoders.")):
        return "comfyui"
    return {"peft": "diffusers_peft", "procs": "diffusers_attn_procs"}.get(family, "diffusers")


def style_of(alias_kind: str, family: str) -> str:
    """Key style of one resolved module from how its name and its suffix are spelled.

    The spellings of KEY_STYLES get their names; any other prefix/path/suffix combination is labelled by
    its parts, e.g. "unet.<ldm>.lora_down" (OneTrainer's SDXL UNet keys).
    """
    if alias_kind == ALIAS_KOHYA_LDM:
        return "kohya_ldm"
    if alias_kind == ALIAS_KOHYA_DIFFUSERS:
        return "kohya_diffusers"
    if alias_kind == ALIAS_KOHYA_TE:
        return "kohya"  # text encoders are spelled alike in both kohya styles
    if alias_kind == ALIAS_COMFYUI:
        return "comfyui"
    if alias_kind == ALIAS_XLABS:
        return "xlabs"
    if alias_kind == ALIAS_ATTN_PROCS or family == "procs":
        return "diffusers_attn_procs"
    if "<" in alias_kind:  # a combination outside KEY_STYLES: "<prefix><path>" + the suffix family
        return alias_kind + _FAMILY_SUFFIX.get(family, "")
    if family == "peft":
        return "diffusers_peft"
    if family == "kohya":
        return "comfyui"  # bare LDM/diffusers names with lora_down/lora_up
    return "diffusers"
