"""SDXL's layer table and layer priors under their long-standing import path.

The table lives in ``duolora.families.sdxl`` (the UNet, generated from its configuration), the CLIP text
encoders in ``duolora.families.clip``, and the family-neutral types and lookups (``Layer``, ``Layout``,
``block_of``) in ``duolora.layout``; this module re-exports them, so ``from duolora.sdxl import …`` keeps working.
``preset_roles`` here knows every family's presets (SDXL's give what they always gave).
"""

from __future__ import annotations

from .families import BASE_LABELS, KNOWN_LAYOUTS, preset_roles
from .families.clip import (
    CLIP_POSITIONS,
    CLIP_VOCAB,
    TE_CLIP_G,
    TE_CLIP_H,
    TE_CLIP_L,
    text_encoder_extras,
    text_encoder_layers,
    text_encoder_norms,
)
from .families.sdxl import (
    ATTENTION_BLOCKS,
    ATTENTION_PROJECTIONS,
    DEFAULT_PRESET,
    OMI_TE_NAMES,
    PATH_CLIP,
    PATH_DIFFUSERS,
    PATH_LDM,
    PRESET_NAMES,
    PRESETS,
    SD15,
    SD15_LAYOUT,
    SD21,
    SD21_LAYOUT,
    SDXL,
    SDXL_LAYOUT,
    SHORT_ATTENTION_BLOCKS,
    STANDARD_LAYOUTS,
    UNET_DOTTED_PREFIXES,
    UNET_UNDERSCORE_PREFIXES,
    UNetConfig,
    attn_procs_spelling,
    layout_for,
    parse_custom_preset,
    short_block,
    unet_layers,
    unet_norms,
)
from .layout import (
    ALIAS_ATTN_PROCS,
    ALIAS_COMFYUI,
    ALIAS_DIFFUSERS,
    ALIAS_KOHYA_DIFFUSERS,
    ALIAS_KOHYA_LDM,
    ALIAS_KOHYA_TE,
    ALIAS_LDM,
    CONTENT,
    STYLE,
    Layer,
    Layout,
    block_of,
    is_attention_projection,
    prior_role,
)

__all__ = [
    "ALIAS_ATTN_PROCS", "ALIAS_COMFYUI", "ALIAS_DIFFUSERS", "ALIAS_KOHYA_DIFFUSERS", "ALIAS_KOHYA_LDM",
    "ALIAS_KOHYA_TE", "ALIAS_LDM", "ATTENTION_BLOCKS", "ATTENTION_PROJECTIONS", "BASE_LABELS", "CLIP_POSITIONS",
    "CLIP_VOCAB", "CONTENT", "DEFAULT_PRESET", "KNOWN_LAYOUTS", "OMI_TE_NAMES", "PATH_CLIP", "PATH_DIFFUSERS",
    "PATH_LDM", "PRESETS", "PRESET_NAMES", "SD15", "SD15_LAYOUT", "SD21", "SD21_LAYOUT", "SDXL", "SDXL_LAYOUT",
    "SHORT_ATTENTION_BLOCKS", "STANDARD_LAYOUTS", "STYLE", "TE_CLIP_G", "TE_CLIP_H", "TE_CLIP_L", "UNET_DOTTED_PREFIXES",
    "UNET_UNDERSCORE_PREFIXES", "Layer", "Layout", "UNetConfig", "attn_procs_spelling", "block_of",
    "is_attention_projection", "layout_for", "parse_custom_preset", "preset_roles", "prior_role", "short_block",
    "text_encoder_extras", "text_encoder_layers", "text_encoder_norms", "unet_layers", "unet_norms",
]
