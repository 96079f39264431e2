"""Flux.1 as a table: the LoRA-able layers of ComfyUI's Flux model, the key spellings of Flux LoRA files, the
SplitFlux block roles, and flow-matching sampling.

Canonical names are ComfyUI's module paths (comfy/ldm/flux/model.py and layers.py: ``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``, …). Spellings, as ComfyUI's LoRA key map reads them (comfy/lora.py
``model_lora_keys_unet``, comfy/utils.py ``flux_to_diffusers``), plus XLabs' processor names:

=========================  ===============================================================================
kohya (sd-scripts)         ``lora_unet_double_blocks_0_img_attn_qkv`` (+ ``.lora_down/.lora_up/.alpha``)
ComfyUI                    ``diffusion_model.double_blocks.0.img_attn.qkv``
diffusers / PEFT           ``transformer.transformer_blocks.0.attn.to_q`` (``lora_A/lora_B``); ai-toolkit and
                           SimpleTuner write these; DiffSynth the same path without ``transformer.``
OneTrainer                 ``lora_transformer_transformer_blocks_0_attn_to_q``
LyCORIS (SimpleTuner)      ``lycoris_transformer_blocks_0_attn_to_q``
XLabs                      ``double_blocks.0.processor.qkv_lora1`` (``.down.weight``/``.up.weight``)
=========================  ===============================================================================

ComfyUI fuses what diffusers splits: ``img_attn.qkv`` is ``attn.to_q``/``to_k``/``to_v`` stacked (``txt_attn.qkv``
the ``add_*_proj``), ``single_blocks.N.linear1`` is ``to_q``/``to_k``/``to_v``/``proj_mlp``. Those are ``Part``s of
the fused layer (its rows), and diffusers' final ``norm_out.linear`` keeps the two halves of the AdaLN rows in
the other order.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..layout import (
    ALIAS_COMFYUI,
    ALIAS_KOHYA_DIFFUSERS,
    ALIAS_XLABS,
    CONTENT,
    STYLE,
    Family,
    Layer,
    Layout,
    Part,
    register_attention_pattern,
    register_block_containers,
)
from .clip import TE_CLIP_L
from .dit import DIFFUSERS_SPELLINGS, Entry, layers_of, spellings
from .sdxl import text_encoder_aliases

register_block_containers(("double_blocks", "single_blocks"))
_ATTENTION = r"^(double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\.linear[12])$"
register_attention_pattern(_ATTENTION)
_ATTENTION_RE = re.compile(_ATTENTION)


@dataclass(frozen=True)
class FluxConfig:
    """The structural hyper-parameters of a Flux.1 transformer (ComfyUI ``unet_config`` names; defaults:
    FLUX.1-dev). ``in_channels``: latent channels (``img_in`` reads ``in_channels·patch_size²``)."""

    in_channels: int = 16
    out_channels: int = 16
    vec_in_dim: int | None = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    patch_size: int = 2
    qkv_bias: bool = True
    guidance_embed: bool = True

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_comfy(cls, unet_config: dict[str, Any]) -> FluxConfig:
        """Build from a ComfyUI Flux ``unet_config``; ValueError for the variants this table does not
        describe (Flux.2's global modulation, Chroma)."""
        model = unet_config.get("image_model")
        if model != "flux":
            raise ValueError(f"image_model {model!r} is not Flux.1")
        if unet_config.get("global_modulation") or unet_config.get("mlp_silu_act"):
            raise ValueError("Flux models with global modulation or SiLU-gated MLPs (Flux.2) are not supported")
        vec = unet_config.get("vec_in_dim", 768)
        return cls(
            in_channels=int(unet_config.get("in_channels", 16)),
            out_channels=int(unet_config.get("out_channels", 16)),
            vec_in_dim=int(vec) if vec is not None else None,
            context_in_dim=int(unet_config.get("context_in_dim", 4096)),
            hidden_size=int(unet_config.get("hidden_size", 3072)),
            mlp_ratio=float(unet_config.get("mlp_ratio", 4.0)),
            num_heads=int(unet_config.get("num_heads", 24)),
            depth=int(unet_config.get("depth", 19)),
            depth_single_blocks=int(unet_config.get("depth_single_blocks", 38)),
            patch_size=int(unet_config.get("patch_size", 2)),
            qkv_bias=bool(unet_config.get("qkv_bias", True)),
            guidance_embed=bool(unet_config.get("guidance_embed", True)),
        )


FLUX_DEV = FluxConfig()

def _entries(cfg: FluxConfig) -> list[Entry]:
    h, mlp = cfg.hidden_size, cfg.mlp_hidden
    p2 = cfg.patch_size * cfg.patch_size
    out: list[Entry] = [("img_in", (h, cfg.in_channels * p2), True, "x_embedder"),
                         ("time_in.in_layer", (h, 256), True, "time_text_embed.timestep_embedder.linear_1"),
                         ("time_in.out_layer", (h, h), True, "time_text_embed.timestep_embedder.linear_2")]
    if cfg.vec_in_dim is not None:
        out += [("vector_in.in_layer", (h, cfg.vec_in_dim), True, "time_text_embed.text_embedder.linear_1"),
                ("vector_in.out_layer", (h, h), True, "time_text_embed.text_embedder.linear_2")]
    if cfg.guidance_embed:
        out += [("guidance_in.in_layer", (h, 256), True, "time_text_embed.guidance_embedder.linear_1"),
                ("guidance_in.out_layer", (h, h), True, "time_text_embed.guidance_embedder.linear_2")]
    out.append(("txt_in", (h, cfg.context_in_dim), True, "context_embedder"))

    def qkv(d: str, names: tuple[str, str, str]) -> tuple[Part, ...]:
        return tuple(Part(f"{d}.{n}", i * h, h) for i, n in enumerate(names))

    for i in range(cfg.depth):
        c, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for side, mod, attn_names, proj, ff in (
                ("img", "norm1", ("to_q", "to_k", "to_v"), "attn.to_out.0", "ff"),
                ("txt", "norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"), "attn.to_add_out", "ff_context")):
            # module order of ComfyUI's DoubleStreamBlock: img_mod, img_attn, img_mlp, then the txt side
            out += [(f"{c}.{side}_mod.lin", (6 * h, h), True, f"{d}.{mod}.linear"),
                    (f"{c}.{side}_attn.qkv", (3 * h, h), cfg.qkv_bias, qkv(f"{d}.attn", attn_names)),
                    (f"{c}.{side}_attn.proj", (h, h), True, f"{d}.{proj}"),
                    (f"{c}.{side}_mlp.0", (mlp, h), True, f"{d}.{ff}.net.0.proj"),
                    (f"{c}.{side}_mlp.2", (h, mlp), True, f"{d}.{ff}.net.2")]
    for i in range(cfg.depth_single_blocks):
        c, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        # the last Part, without a diffusers path, is the attention rows alone: ComfyUI's "linear1_qkv" and XLabs'
        # single-block qkv processor patch them
        linear1 = (*qkv(f"{d}.attn", ("to_q", "to_k", "to_v")), Part(f"{d}.proj_mlp", 3 * h, mlp), Part("", 0, 3 * h))
        out += [(f"{c}.linear1", (3 * h + mlp, h), True, linear1),
                (f"{c}.linear2", (h, h + mlp), True, f"{d}.proj_out"),
                (f"{c}.modulation.lin", (3 * h, h), True, f"{d}.norm.linear")]
    out += [("final_layer.linear", (p2 * cfg.out_channels, h), True, "proj_out"),
            ("final_layer.adaLN_modulation.1", (2 * h, h), True,
             (Part("norm_out.linear", 0, 2 * h, swap_halves=True),))]
    return out


@functools.lru_cache(maxsize=16)
def transformer_layers(config: FluxConfig = FLUX_DEV) -> dict[str, Layer]:
    """Every LoRA-able weight of ``config``'s transformer: canonical name -> Layer, in module order.

    FLUX.1-dev: 19 double blocks × 10 + 38 single blocks × 3 + 10 = 314 linear layers, 152 of them attention
    projections (double blocks' qkv/proj, single blocks' linear1/linear2).
    """
    return layers_of(_entries(config), _ATTENTION_RE.search, kohya_diffusers_prefix="lora_transformer_")


# XLabs' LoRA processors (x-flux): the double blocks' fused attention of each stream and, in the single
# blocks, the attention part of linear1 and all of linear2 (as ComfyUI's own conversion maps them).
_XLABS_DOUBLE = {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv", "proj_lora1": "img_attn.proj",
                 "proj_lora2": "txt_attn.proj"}


# OneTrainer spells the diffusers path with lora_transformer_ (ComfyUI maps it for Flux).
_DIFFUSERS_SPELLINGS = (*DIFFUSERS_SPELLINGS, ("lora_transformer_", "_", ALIAS_KOHYA_DIFFUSERS))


def _spellings(layers: dict[str, Layer], config: FluxConfig
               ) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str, int]], dict[str, str]]:
    """(whole-layer aliases, slice aliases, bare paths) of every spelling a Flux LoRA file may use."""
    aliases, part_aliases, bare = spellings(layers, _DIFFUSERS_SPELLINGS)
    for i in range(config.depth):
        for proc, target in _XLABS_DOUBLE.items():
            aliases.setdefault(f"double_blocks.{i}.processor.{proc}", (f"double_blocks.{i}.{target}", ALIAS_XLABS))
    for i in range(config.depth_single_blocks):
        name = f"single_blocks.{i}.linear1"
        # ComfyUI's "linear1_qkv" (its conversion of XLabs-style single-block LoRAs): the attention rows of linear1
        index = len(layers[name].parts) - 1
        part_aliases.setdefault(f"diffusion_model.{name}_qkv", (name, ALIAS_COMFYUI, index))
        part_aliases.setdefault(f"single_blocks.{i}.processor.qkv", (name, ALIAS_XLABS, index))
        aliases.setdefault(f"single_blocks.{i}.processor.proj", (f"single_blocks.{i}.linear2", ALIAS_XLABS))
    return aliases, part_aliases, bare


@functools.lru_cache(maxsize=8)
def layout_for(config: FluxConfig = FLUX_DEV, clip_l: tuple[int, int, int] | None = TE_CLIP_L) -> Layout:
    """The Layout of a Flux.1 transformer of ``config`` plus its CLIP-L text encoder (``clip_l``: (hidden,
    layers, mlp); None for none). T5-XXL LoRA layers are not in the table (few trainers target them)."""
    layers = dict(transformer_layers(config))
    aliases, part_aliases, bare = _spellings(layers, config)
    extras: dict[str, Layer] = {}
    norms: dict[str, Layer] = {}
    if clip_l is not None:
        te_layers, te_extras, te_norms, te_aliases, te_norm_aliases = text_encoder_aliases(
            "te1", clip_l, clip_name="clip_l", kohya=("lora_te1_", "lora_te_"), bare=bare)
        layers.update(te_layers)
        extras.update(te_extras)
        norms.update(te_norms)
        for spelling, hit in te_aliases.items():
            aliases.setdefault(spelling, hit)
    else:
        te_norm_aliases = {}
    return Layout(base="flux", label=FAMILY.label, config=config, layers=layers, aliases=aliases, extras=extras,
                  norms=norms, norm_aliases=te_norm_aliases, bare_paths=bare, family="flux",
                  part_aliases=part_aliases)


# Which width of a Flux layer's weight (out, in) is the hidden size: the dimension, by layer name.
_HIDDEN_IN = re.compile(r"_attn\.qkv$|\.linear1$|\.lin$|_mlp\.0$|^final_layer\.")
_HIDDEN_OUT = re.compile(r"_attn\.proj$|_mlp\.2$|\.linear2$|^(img_in|txt_in)$|^(time|vector|guidance)_in\.")
_BLOCK_INDEX = re.compile(r"^(double|single)_blocks\.(\d+)\.")


def config_for_shapes(shapes: Mapping[str, tuple[int, ...]]) -> FluxConfig | None:
    """The Flux.1 configuration whose table has the layers of ``shapes`` (canonical name -> weight shape): the
    widths they show (hidden size, MLP width, latent channels, text widths), at least FLUX.1-dev's block counts.

    A model built like Flux.1 at other widths (a small test or benchmark model) has LoRAs of those widths; the
    widths no layer shows keep FLUX.1-dev's. None when a name is no Flux.1 layer or no layer shows the hidden
    size. The caller checks the layers against the table it builds, so a file whose widths disagree is refused
    with the usual shape message.
    """
    unet = {n: s for n, s in shapes.items() if not n.startswith(("te1.", "te2."))}
    if not unet or any(n not in FLUX_LAYOUT for n in shapes) or any(len(s) != 2 for s in unet.values()):
        return None
    hidden = next((s[1] for n, s in unet.items() if _HIDDEN_IN.search(n)), None) or \
        next((s[0] for n, s in unet.items() if _HIDDEN_OUT.search(n)), None)
    if hidden is None:
        return None
    mlp = next((s[0] for n, s in unet.items() if n.endswith("_mlp.0")), None) or \
        next((s[1] for n, s in unet.items() if n.endswith("_mlp.2")), None) or \
        next((s[0] - 3 * hidden for n, s in unet.items() if n.endswith(".linear1")), None) or \
        next((s[1] - hidden for n, s in unet.items() if n.endswith(".linear2")), None) or \
        int(hidden * FLUX_DEV.mlp_ratio)
    p2 = FLUX_DEV.patch_size ** 2
    depth, single = FLUX_DEV.depth, FLUX_DEV.depth_single_blocks
    for n in unet:
        m = _BLOCK_INDEX.match(n)
        if m is not None and m.group(1) == "double":
            depth = max(depth, int(m.group(2)) + 1)
        elif m is not None:
            single = max(single, int(m.group(2)) + 1)
    return FluxConfig(
        in_channels=unet["img_in"][1] // p2 if "img_in" in unet else FLUX_DEV.in_channels,
        out_channels=unet["final_layer.linear"][0] // p2 if "final_layer.linear" in unet else FLUX_DEV.out_channels,
        vec_in_dim=unet.get("vector_in.in_layer", (0, FLUX_DEV.vec_in_dim))[1],
        context_in_dim=unet.get("txt_in", (0, FLUX_DEV.context_in_dim))[1],
        hidden_size=hidden, mlp_ratio=_ratio(mlp, hidden), depth=depth, depth_single_blocks=single)


def _ratio(mlp: int, hidden: int) -> float:
    """An ``mlp_ratio`` that gives back ``mlp`` as ComfyUI computes the width (``int(hidden · ratio)``)."""
    ratio = mlp / hidden
    return ratio if int(hidden * ratio) == mlp else (mlp + 0.5) / hidden


def fitted_layout(shapes: Mapping[str, tuple[int, ...]]) -> Layout | None:
    """The Layout of ``config_for_shapes(shapes)`` (its text encoder: CLIP-L as in FLUX.1), or None."""
    config = config_for_shapes(shapes)
    return None if config is None else layout_for(config)


# SplitFlux (arXiv 2511.15258), by prompt injection on FLUX.1: the double-stream blocks matter little, the
# early single-stream blocks carry content and the later ones style (10–11 a boundary). A B-LoRA replication on
# Flux found style in the double blocks too: the preset is a soft, configurable starting point.
PRESETS: dict[str, dict[str, str]] = {
    "flux_splitflux": {**{f"single_blocks.{i}": CONTENT for i in range(10)},
                       **{f"single_blocks.{i}": STYLE for i in range(10, 38)}},
    "none": {},
}
# No prior by default: the SplitFlux preset has not been measured on a merge benchmark yet.
DEFAULT_PRESET = "none"
FAMILY = Family(
    name="flux", label="Flux.1", presets=PRESETS, default_preset=DEFAULT_PRESET,
    prior_blocks=(*(f"double_blocks.{i}" for i in range(FLUX_DEV.depth)),
                  *(f"single_blocks.{i}" for i in range(FLUX_DEV.depth_single_blocks))),
    prediction="flow", key_styles=("kohya_ldm", "kohya_diffusers", "diffusers_peft", "diffusers", "comfyui"),
    block_noun="a Flux.1 block", custom_example="content: single_blocks.0-9; style: single_blocks.10-37",
)
FLUX_LAYOUT = layout_for(FLUX_DEV)
