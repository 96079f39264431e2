"""Qwen-Image as a table: its LoRA-able layers and the key spellings of its LoRA files, for reading files
and weights-only merging.

ComfyUI's Qwen-Image model (comfy/ldm/qwen_image/model.py) uses diffusers' module paths, so the canonical name
is also the diffusers path (``transformer_blocks.N.attn.to_q``, ``transformer_blocks.N.img_mlp.net.0.proj``, …);
files spell it bare, behind ``transformer.`` or ``diffusion_model.``, as kohya ``lora_unet_…`` or LyCORIS
``lycoris_…`` (comfy/lora.py ``model_lora_keys_unet``). No layer is fused.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from ..layout import Family, Layout, register_attention_pattern, register_block_containers
from .dit import Entry, layers_of, spellings

register_block_containers(("transformer_blocks",))
_ATTENTION = r"^transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)$"
register_attention_pattern(_ATTENTION)
_ATTENTION_RE = re.compile(_ATTENTION)


@dataclass(frozen=True)
class QwenImageConfig:
    """The structural hyper-parameters of a Qwen-Image transformer (defaults: Qwen-Image)."""

    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    in_channels: int = 64
    out_channels: int = 16
    patch_size: int = 2

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_comfy(cls, unet_config: dict[str, Any]) -> QwenImageConfig:
        if unet_config.get("image_model") != "qwen_image":
            raise ValueError("not a Qwen-Image model")
        d = cls()
        return cls(**{f: type(getattr(d, f))(unet_config.get(f, getattr(d, f)))
                      for f in ("num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                                "in_channels", "out_channels", "patch_size")})


QWEN_IMAGE = QwenImageConfig()


def _entries(cfg: QwenImageConfig) -> list[Entry]:
    d = cfg.inner_dim
    p2 = cfg.patch_size * cfg.patch_size
    out: list[Entry] = []

    def add(name: str, shape: tuple[int, int]) -> None:
        out.append((name, shape, True, name))

    add("time_text_embed.timestep_embedder.linear_1", (d, 256))
    add("time_text_embed.timestep_embedder.linear_2", (d, d))
    add("img_in", (d, cfg.in_channels))
    add("txt_in", (d, cfg.joint_attention_dim))
    for i in range(cfg.num_layers):
        b = f"transformer_blocks.{i}"
        # module order of ComfyUI's QwenImageTransformerBlock
        for side in ("img", "txt"):
            add(f"{b}.{side}_mod.1", (6 * d, d))
            add(f"{b}.{side}_mlp.net.0.proj", (4 * d, d))
            add(f"{b}.{side}_mlp.net.2", (d, 4 * d))
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            add(f"{b}.attn.{proj}", (d, d))
    add("norm_out.linear", (2 * d, d))
    add("proj_out", (p2 * cfg.out_channels, d))
    return out


@functools.lru_cache(maxsize=8)
def layout_for(config: QwenImageConfig = QWEN_IMAGE) -> Layout:
    """The Layout of a Qwen-Image transformer of ``config`` (Qwen-Image: 60 blocks × 14 + 6 = 846 linear layers,
    480 of them attention projections). Its Qwen2.5-VL text encoder's LoRA layers are not in the table."""
    layers = layers_of(_entries(config), _ATTENTION_RE.search)
    aliases, part_aliases, bare = spellings(layers)
    return Layout(base="qwen_image", label=FAMILY.label, config=config, layers=layers, aliases=aliases,
                  bare_paths=bare, family="qwen_image", part_aliases=part_aliases)


FAMILY = Family(
    name="qwen_image", label="Qwen-Image", presets={"none": {}}, default_preset="none",
    prior_blocks=tuple(f"transformer_blocks.{i}" for i in range(QWEN_IMAGE.num_layers)),
    prediction="flow", key_styles=("kohya_ldm", "diffusers_peft", "comfyui"), block_noun="a Qwen-Image block",
    custom_example="content: transformer_blocks.0-29; style: transformer_blocks.30-59",
)
QWEN_IMAGE_LAYOUT = layout_for(QWEN_IMAGE)
