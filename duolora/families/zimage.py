"""Z-Image (ComfyUI's Lumina2 class, NextDiT) as a table: its LoRA-able layers and the key spellings of its
LoRA files, for reading files and weights-only merging.

Canonical names are ComfyUI's module paths (comfy/ldm/lumina/model.py: ``layers.N.attention.qkv``,
``noise_refiner.N.feed_forward.w1``, …). Files spell them as ComfyUI's key map reads them (comfy/lora.py,
comfy/utils.py ``z_image_to_diffusers``): kohya ``lora_unet_layers_0_attention_qkv``, ComfyUI
``diffusion_model.layers.0.attention.qkv``, and diffusers paths — ``layers.0.attention.to_q`` behind
``diffusion_model.``, ``transformer.``, ``lycoris_`` or no prefix — where the fused ``attention.qkv`` is split
into ``to_q``/``to_k``/``to_v`` (``Part``s) and ``attention.out`` is ``attention.to_out.0``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from ..layout import (
    ALIAS_COMFYUI,
    Family,
    Layout,
    Part,
    register_attention_pattern,
    register_block_containers,
)
from .dit import DIFFUSERS_SPELLINGS, Entry, layers_of, spellings

_CONTAINERS = ("layers", "noise_refiner", "context_refiner")
register_block_containers(_CONTAINERS)
_ATTENTION = r"^(layers|noise_refiner|context_refiner)\.\d+\.attention\.(qkv|out)$"
register_attention_pattern(_ATTENTION)
_ATTENTION_RE = re.compile(_ATTENTION)


@dataclass(frozen=True)
class ZImageConfig:
    """The structural hyper-parameters of a Z-Image NextDiT (ComfyUI ``unet_config`` names; defaults:
    Z-Image Turbo)."""

    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    multiple_of: int = 256
    ffn_dim_multiplier: float = 8.0 / 3.0
    cap_feat_dim: int = 2560
    in_channels: int = 16
    patch_size: int = 2

    @property
    def ffn_hidden(self) -> int:
        hidden = int(self.ffn_dim_multiplier * self.dim)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_comfy(cls, unet_config: dict[str, Any]) -> ZImageConfig:
        """Build from a ComfyUI Lumina2 ``unet_config``; ValueError for Lumina 2 itself (not Z-Image's
        modulation)."""
        if unet_config.get("image_model") != "lumina2" or not unet_config.get("z_image_modulation"):
            raise ValueError("only Z-Image (Lumina2 with Z-Image modulation) has a table")
        kv = unet_config.get("n_kv_heads")
        return cls(
            dim=int(unet_config.get("dim", 3840)), n_layers=int(unet_config.get("n_layers", 30)),
            n_refiner_layers=int(unet_config.get("n_refiner_layers", 2)),
            n_heads=int(unet_config.get("n_heads", 30)),
            n_kv_heads=int(kv) if kv is not None else int(unet_config.get("n_heads", 30)),
            multiple_of=int(unet_config.get("multiple_of", 256)),
            ffn_dim_multiplier=float(unet_config.get("ffn_dim_multiplier", 8.0 / 3.0)),
            cap_feat_dim=int(unet_config.get("cap_feat_dim", 2560)),
            in_channels=int(unet_config.get("in_channels", 16)), patch_size=int(unet_config.get("patch_size", 2)),
        )


Z_IMAGE_TURBO = ZImageConfig()


def _entries(cfg: ZImageConfig) -> list[Entry]:
    d, ffn = cfg.dim, cfg.ffn_hidden
    head = d // cfg.n_heads
    q, kv = cfg.n_heads * head, cfg.n_kv_heads * head
    p2 = cfg.patch_size * cfg.patch_size
    t_hidden, mod_in = min(d, 1024), min(d, 256)

    def block(container: str, i: int, modulation: bool) -> list[Entry]:
        c = f"{container}.{i}"
        qkv = (Part(f"{c}.attention.to_q", 0, q), Part(f"{c}.attention.to_k", q, kv),
               Part(f"{c}.attention.to_v", q + kv, kv))
        out: list[Entry] = [(f"{c}.attention.qkv", (q + 2 * kv, d), False, qkv),
                            (f"{c}.attention.out", (d, q), False, f"{c}.attention.to_out.0"),
                            (f"{c}.feed_forward.w1", (ffn, d), False, f"{c}.feed_forward.w1"),
                            (f"{c}.feed_forward.w2", (d, ffn), False, f"{c}.feed_forward.w2"),
                            (f"{c}.feed_forward.w3", (ffn, d), False, f"{c}.feed_forward.w3")]
        if modulation:
            out.append((f"{c}.adaLN_modulation.0", (4 * d, mod_in), True, f"{c}.adaLN_modulation.0"))
        return out

    # module order of ComfyUI's NextDiT
    out: list[Entry] = [("x_embedder", (d, p2 * cfg.in_channels), True, "all_x_embedder.2-1")]
    for i in range(cfg.n_refiner_layers):
        out += block("noise_refiner", i, True)
    for i in range(cfg.n_refiner_layers):
        out += block("context_refiner", i, False)
    out += [("t_embedder.mlp.0", (t_hidden, 256), True, "t_embedder.mlp.0"),
            ("t_embedder.mlp.2", (256, t_hidden), True, "t_embedder.mlp.2"),
            ("cap_embedder.1", (d, cfg.cap_feat_dim), True, "cap_embedder.1")]
    for i in range(cfg.n_layers):
        out += block("layers", i, True)
    out += [("final_layer.linear", (p2 * cfg.in_channels, d), True, "all_final_layer.2-1.linear"),
            ("final_layer.adaLN_modulation.1", (d, mod_in), True, "all_final_layer.2-1.adaLN_modulation.1")]
    return out


# ComfyUI maps Z-Image's diffusers paths behind diffusion_model. too.
_DIFFUSERS_SPELLINGS = (*DIFFUSERS_SPELLINGS, ("diffusion_model.", ".", "diffusion_model.<diffusers>"))


@functools.lru_cache(maxsize=8)
def layout_for(config: ZImageConfig = Z_IMAGE_TURBO) -> Layout:
    """The Layout of a Z-Image transformer of ``config`` (Z-Image Turbo: 30 layers + 2 × 2 refiners, 208 linear
    layers, 68 of them attention projections). Its Qwen3 text encoder's LoRA layers are not in the table."""
    layers = layers_of(_entries(config), _ATTENTION_RE.search)
    aliases, part_aliases, bare = spellings(layers, _DIFFUSERS_SPELLINGS)
    # diffusion_model.<path> is ComfyUI's own spelling wherever the two paths agree
    for spelling, (name, kind) in list(aliases.items()):
        if spelling == f"diffusion_model.{name}":
            aliases[spelling] = (name, ALIAS_COMFYUI)
    return Layout(base="zimage", label=FAMILY.label, config=config, layers=layers, aliases=aliases,
                  bare_paths=bare, family="zimage", part_aliases=part_aliases)


FAMILY = Family(
    name="zimage", label="Z-Image", presets={"none": {}}, default_preset="none",
    prior_blocks=(*(f"noise_refiner.{i}" for i in range(2)), *(f"context_refiner.{i}" for i in range(2)),
                  *(f"layers.{i}" for i in range(Z_IMAGE_TURBO.n_layers))),
    prediction="flow", key_styles=("kohya_ldm", "comfyui"), block_noun="a Z-Image block",
    custom_example="content: layers.0-14; style: layers.15-29",
)
ZIMAGE_LAYOUT = layout_for(Z_IMAGE_TURBO)
