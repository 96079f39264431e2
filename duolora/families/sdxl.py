"""SDXL (and its SD1.x/SD2.x relatives) as a table: the UNet's LoRA-able layers generated from its
configuration, the key spellings of its LoRA files, and the content/style block roles of the layer priors.

Block of a layer: the first three components of its canonical (LDM) name, e.g.
``input_blocks.4.1`` for ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` and ``middle_block.1``
for ``middle_block.1.transformer_blocks.3.attn2.to_k``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from ..layout import (
    ALIAS_ATTN_PROCS,
    ALIAS_COMFYUI,
    ALIAS_DIFFUSERS,
    ALIAS_KOHYA_DIFFUSERS,
    ALIAS_KOHYA_LDM,
    ALIAS_KOHYA_TE,
    ALIAS_LDM,
    CONTENT,
    STYLE,
    Family,
    Layer,
    Layout,
    add_bare,
    block_of,
    parse_custom_prior,
    register_attention_pattern,
    register_block_containers,
)
from .clip import (
    TE_CLIP_G,
    TE_CLIP_H,
    TE_CLIP_L,
    text_encoder_extras,
    text_encoder_layers,
    text_encoder_norms,
)

# The ten attention blocks of SDXL, with the latent side they run at for a 1024 px image (128×128 latent).
ATTENTION_BLOCKS: dict[str, int] = {
    "input_blocks.4.1": 64,
    "input_blocks.5.1": 64,
    "input_blocks.7.1": 32,
    "input_blocks.8.1": 32,
    "middle_block.1": 32,
    "output_blocks.0.1": 32,
    "output_blocks.1.1": 32,
    "output_blocks.2.1": 32,
    "output_blocks.3.1": 64,
    "output_blocks.4.1": 64,
    "output_blocks.5.1": 64,
}

_LOW_RES = [b for b, r in ATTENTION_BLOCKS.items() if r == 32]
_HIGH_RES = [b for b, r in ATTENTION_BLOCKS.items() if r == 64]

# Prior presets: block -> role. Layers in blocks a preset does not name get no prior.
PRESETS: dict[str, dict[str, str]] = {
    # The paper: low-resolution attention carries content, high-resolution attention carries style.
    "paper": {**{b: CONTENT for b in _LOW_RES}, **{b: STYLE for b in _HIGH_RES}},
    # What the released research code matched (content only in input_blocks.7/8).
    "code_literal": {
        "input_blocks.7.1": CONTENT,
        "input_blocks.8.1": CONTENT,
        "input_blocks.4.1": STYLE,
        "input_blocks.5.1": STYLE,
        "output_blocks.3.1": STYLE,
        "output_blocks.4.1": STYLE,
        "output_blocks.5.1": STYLE,
    },
    # B-LoRA's finding (Frenkel et al.): one content block and one style block.
    "b_lora": {"output_blocks.0.1": CONTENT, "output_blocks.1.1": STYLE},
    "none": {},
}
PRESET_NAMES: tuple[str, ...] = (*PRESETS.keys(), "custom")
DEFAULT_PRESET = "paper"
CUSTOM_EXAMPLE = "content: input_blocks.7.1, middle_block.1; style: output_blocks.3.1"

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
_ATTN_RE = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
register_block_containers(("middle_block",))
register_attention_pattern(_ATTN_RE.pattern)


def _is_attention(name: str) -> bool:
    """True for the 560 attention projections ZipRank learns on by default (scope="attention")."""
    return bool(_ATTN_RE.search(name))


def short_block(block: str) -> str:
    """Compact label: input_blocks.4.1 -> in4, middle_block.1 -> mid, output_blocks.3.1 -> out3 (the names
    the node's prior diagram and the Merge Report show)."""
    parts = block.split(".")
    if parts[0] == "input_blocks" and len(parts) > 1:
        return "in" + parts[1]
    if parts[0] == "output_blocks" and len(parts) > 1:
        return "out" + parts[1]
    if parts[0] == "middle_block":
        return "mid"
    return parts[0][:5]


# Short name -> attention block, for custom priors typed the way the diagram and the report label blocks.
SHORT_ATTENTION_BLOCKS: dict[str, str] = {short_block(b): b for b in ATTENTION_BLOCKS}


def parse_custom_preset(spec: str) -> dict[str, str]:
    """Parse an SDXL custom prior, e.g. ``"content: input_blocks.7.1, middle_block.1; style: output_blocks.3.1"``;
    each block may also be given by its short name (``"content: in7, mid; style: out3"``). Returns long block
    name -> role.

    Raises ValueError with a message that says what is wrong and how to write it.
    """
    return parse_custom_prior(spec, FAMILY)


# ---------------------------------------------------------------------------------------------------------
# The full layer table, generated from a UNet configuration.
#
# Every Linear and Conv2d weight of an LDM/ComfyUI UNet is LoRA-able. The enumeration below follows the
# module tree of ComfyUI's ``UNetModel`` (comfy/ldm/modules/diffusionmodules/openaimodel.py) and the
# diffusers spelling of ``comfy.utils.unet_to_diffusers``; both were read for facts only. Nothing here
# hard-codes SDXL widths: a tiny SDXL-layout test model (model_channels 32) gets its own exact table.
# ---------------------------------------------------------------------------------------------------------

BASE_LABELS: dict[str, str] = {"sdxl": "SDXL", "sd1": "SD1.x", "sd2": "SD2.x", "unknown": "unknown"}


@dataclass(frozen=True)
class UNetConfig:
    """The structural hyper-parameters of an LDM UNet (ComfyUI ``model_config.unet_config`` names).

    ``transformer_depth`` has one entry per input res-block (e.g. SDXL ``(0, 0, 2, 2, 10, 10)``),
    ``transformer_depth_output`` one per output block, consumed from the end as ComfyUI does
    (SDXL ``(0, 0, 0, 2, 2, 2, 10, 10, 10)``: output_blocks.0-2 have depth 10).
    """

    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    transformer_depth: tuple[int, ...]
    transformer_depth_middle: int
    transformer_depth_output: tuple[int, ...]
    context_dim: int
    in_channels: int = 4
    out_channels: int = 4
    num_heads: int = -1
    num_head_channels: int = -1
    adm_in_channels: int | None = None
    use_linear_in_transformer: bool = False
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    conv_resample: bool = True
    legacy: bool = False
    disable_self_attentions: tuple[bool, ...] | None = None
    num_attention_blocks: tuple[int, ...] | None = None
    disable_middle_self_attn: bool = False
    # Latent side the ``resolution`` column refers to: 128 = a 1024 px image through an 8× VAE.
    latent_size: int = 128

    @classmethod
    def from_comfy(cls, unet_config: dict[str, Any]) -> UNetConfig:
        """Build from a ComfyUI ``model.model_config.unet_config`` dict (unknown keys are ignored).

        Raises ValueError for UNets this table cannot describe (video/temporal blocks, no cross-attention).
        """
        if unet_config.get("use_temporal_attention") or unet_config.get("use_temporal_resblock"):
            raise ValueError("video UNets (temporal attention/res-blocks) are not supported")
        if unet_config.get("context_dim") is None:
            raise ValueError("UNet config has no context_dim: only text-conditioned UNets are supported")
        mult = tuple(int(m) for m in unet_config["channel_mult"])
        nrb = unet_config["num_res_blocks"]
        nrb = tuple(int(n) for n in nrb) if isinstance(nrb, (list, tuple)) else (int(nrb),) * len(mult)
        n_in = sum(nrb)
        n_out = sum(n + 1 for n in nrb)
        td = unet_config.get("transformer_depth", 1)
        td = tuple(int(t) for t in td) if isinstance(td, (list, tuple)) else (int(td),) * n_in
        tdo = unet_config.get("transformer_depth_output")
        tdo = tuple(int(t) for t in tdo) if tdo is not None else (td[-1],) * n_out
        tdm = unet_config.get("transformer_depth_middle")
        tdm = int(tdm) if tdm is not None else td[-1]
        ctx = unet_config["context_dim"]
        if isinstance(ctx, (list, tuple)):
            raise TypeError("per-block context_dim lists are not supported")
        dsa = unet_config.get("disable_self_attentions")
        nab = unet_config.get("num_attention_blocks")
        adm = unet_config.get("adm_in_channels")
        # label_emb exists for num_classes == "sequential" (SDXL); a partial dict without num_classes but
        # with adm_in_channels (supported_models.SDXL.unet_config) means the same.
        num_classes = unet_config.get("num_classes", "sequential" if adm is not None else None)
        if num_classes not in (None, "sequential"):
            raise ValueError(f"num_classes={num_classes!r} is not supported")
        return cls(
            model_channels=int(unet_config["model_channels"]),
            channel_mult=mult,
            num_res_blocks=nrb,
            transformer_depth=td,
            transformer_depth_middle=tdm,
            transformer_depth_output=tdo,
            context_dim=int(ctx),
            in_channels=int(unet_config.get("in_channels", 4)),
            out_channels=int(unet_config.get("out_channels", 4)),
            num_heads=int(unet_config.get("num_heads", -1)),
            num_head_channels=int(unet_config.get("num_head_channels", -1)),
            adm_in_channels=int(adm) if adm is not None and num_classes == "sequential" else None,
            use_linear_in_transformer=bool(unet_config.get("use_linear_in_transformer", False)),
            use_scale_shift_norm=bool(unet_config.get("use_scale_shift_norm", False)),
            resblock_updown=bool(unet_config.get("resblock_updown", False)),
            conv_resample=bool(unet_config.get("conv_resample", True)),
            legacy=bool(unet_config.get("legacy", False)),
            disable_self_attentions=tuple(bool(x) for x in dsa) if dsa is not None else None,
            num_attention_blocks=tuple(int(x) for x in nab) if nab is not None else None,
            disable_middle_self_attn=bool(unet_config.get("disable_middle_self_attn", False)),
        )

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def attention_width(self, ch: int) -> int:
        """Inner width (heads · head_dim) of a spatial transformer on ``ch`` channels, as ComfyUI sizes it."""
        if self.num_head_channels == -1:
            heads = self.num_heads
            dim_head = ch // heads
        else:
            heads = ch // self.num_head_channels
            dim_head = self.num_head_channels
        if self.legacy:
            dim_head = ch // heads
        return heads * dim_head


# Real configurations (ComfyUI supported_models + model_detection, SDXL base 1.0 / SD 1.5 / SD 2.1).
SDXL = UNetConfig(
    model_channels=320,
    channel_mult=(1, 2, 4),
    num_res_blocks=(2, 2, 2),
    transformer_depth=(0, 0, 2, 2, 10, 10),
    transformer_depth_middle=10,
    transformer_depth_output=(0, 0, 0, 2, 2, 2, 10, 10, 10),
    context_dim=2048,
    num_head_channels=64,
    adm_in_channels=2816,
    use_linear_in_transformer=True,
)
SD15 = UNetConfig(
    model_channels=320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=(2, 2, 2, 2),
    transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0),
    transformer_depth_middle=1,
    transformer_depth_output=(1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0),
    context_dim=768,
    num_heads=8,
    use_linear_in_transformer=False,
)
SD21 = UNetConfig(
    model_channels=320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=(2, 2, 2, 2),
    transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0),
    transformer_depth_middle=1,
    transformer_depth_output=(1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0),
    context_dim=1024,
    num_head_channels=64,
    use_linear_in_transformer=True,
)


# ComfyUI's CrossAttention builds to_q/to_k/to_v without a bias (comfy/ldm/modules/attention.py).
_NO_BIAS_RE = re.compile(r"\.attn[12]\.(to_q|to_k|to_v)$")


def _unet_layer(name: str, diffusers: str, shape: tuple[int, ...], resolution: int, kind: str = "") -> Layer:
    return Layer(
        name=name,
        diffusers=diffusers,
        kohya="lora_unet_" + name.replace(".", "_"),
        kohya_diffusers="lora_unet_" + diffusers.replace(".", "_"),
        block=block_of(name),
        resolution=resolution,
        shape=shape,
        kind=kind or ("conv" if len(shape) == 4 else "linear"),
        is_attention=_is_attention(name),
        comfyui="diffusion_model." + name,
        model_key=f"diffusion_model.{name}.weight",
        bias=not _NO_BIAS_RE.search(name),
    )


def _enumerate_unet(cfg: UNetConfig) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(ldm name, diffusers name, weight shape, resolution) for every Linear/Conv2d weight, in module order."""
    return _enumerate_unet_modules(cfg)[0]


def _enumerate_unet_modules(cfg: UNetConfig) -> tuple[list[tuple[str, str, tuple[int, ...], int]],
                                                       list[tuple[str, str, tuple[int, ...], int]]]:
    """(Linear/Conv2d weights, GroupNorm/LayerNorm weights) as (ldm name, diffusers name, shape, resolution)."""
    out: list[tuple[str, str, tuple[int, ...], int]] = []
    norms: list[tuple[str, str, tuple[int, ...], int]] = []
    mc, ted, L = cfg.model_channels, cfg.time_embed_dim, len(cfg.channel_mult)

    def side(level: int) -> int:
        return max(cfg.latent_size >> level, 1)

    def resblock(ldm: str, diff: str, ch_in: int, ch_out: int, res: int) -> None:
        norms.append((f"{ldm}.in_layers.0", f"{diff}.norm1", (ch_in,), res))
        norms.append((f"{ldm}.out_layers.0", f"{diff}.norm2", (ch_out,), res))
        out.append((f"{ldm}.in_layers.2", f"{diff}.conv1", (ch_out, ch_in, 3, 3), res))
        emb_out = 2 * ch_out if cfg.use_scale_shift_norm else ch_out
        out.append((f"{ldm}.emb_layers.1", f"{diff}.time_emb_proj", (emb_out, ted), res))
        out.append((f"{ldm}.out_layers.3", f"{diff}.conv2", (ch_out, ch_out, 3, 3), res))
        if ch_out != ch_in:
            out.append((f"{ldm}.skip_connection", f"{diff}.conv_shortcut", (ch_out, ch_in, 1, 1), res))

    def transformer(ldm: str, diff: str, ch: int, depth: int, res: int, no_self_attn: bool) -> None:
        inner = cfg.attention_width(ch)
        ctx = cfg.context_dim
        if cfg.use_linear_in_transformer:
            proj_in: tuple[int, ...] = (inner, ch)
            proj_out: tuple[int, ...] = (inner, ch)  # ComfyUI builds Linear(in_channels, inner_dim) here
        else:
            proj_in, proj_out = (inner, ch, 1, 1), (ch, inner, 1, 1)
        norms.append((f"{ldm}.norm", f"{diff}.norm", (ch,), res))
        out.append((f"{ldm}.proj_in", f"{diff}.proj_in", proj_in, res))
        self_kv = ctx if no_self_attn else inner
        for t in range(depth):
            p, q = f"{ldm}.transformer_blocks.{t}", f"{diff}.transformer_blocks.{t}"
            for k in (1, 2, 3):
                norms.append((f"{p}.norm{k}", f"{q}.norm{k}", (inner,), res))
            for attn, kv in (("attn1", self_kv), ("attn2", ctx)):
                out.append((f"{p}.{attn}.to_q", f"{q}.{attn}.to_q", (inner, inner), res))
                out.append((f"{p}.{attn}.to_k", f"{q}.{attn}.to_k", (inner, kv), res))
                out.append((f"{p}.{attn}.to_v", f"{q}.{attn}.to_v", (inner, kv), res))
                out.append((f"{p}.{attn}.to_out.0", f"{q}.{attn}.to_out.0", (inner, inner), res))
                if attn == "attn1":
                    # module order in ComfyUI's BasicTransformerBlock: attn1, ff, attn2
                    out.append((f"{p}.ff.net.0.proj", f"{q}.ff.net.0.proj", (inner * 8, inner), res))
                    out.append((f"{p}.ff.net.2", f"{q}.ff.net.2", (inner, inner * 4), res))
        out.append((f"{ldm}.proj_out", f"{diff}.proj_out", proj_out, res))

    out.append(("time_embed.0", "time_embedding.linear_1", (ted, mc), 0))
    out.append(("time_embed.2", "time_embedding.linear_2", (ted, ted), 0))
    if cfg.adm_in_channels is not None:
        out.append(("label_emb.0.0", "add_embedding.linear_1", (ted, cfg.adm_in_channels), 0))
        out.append(("label_emb.0.2", "add_embedding.linear_2", (ted, ted), 0))
    out.append(("input_blocks.0.0", "conv_in", (mc, cfg.in_channels, 3, 3), side(0)))

    depths = list(cfg.transformer_depth)
    chans = [mc]
    ch, n = mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for i in range(cfg.num_res_blocks[level]):
            resblock(f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{i}", ch, mult * mc, side(level))
            ch = mult * mc
            depth = depths.pop(0)
            allowed = cfg.num_attention_blocks is None or i < cfg.num_attention_blocks[level]
            if depth > 0 and allowed:
                nsa = bool(cfg.disable_self_attentions and cfg.disable_self_attentions[level])
                transformer(f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{i}", ch, depth,
                            side(level), nsa)
            chans.append(ch)
            n += 1
        if level != L - 1:
            if cfg.resblock_updown:
                resblock(f"input_blocks.{n}.0", f"down_blocks.{level}.downsamplers.0", ch, ch, side(level))
            elif cfg.conv_resample:
                out.append((f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv",
                            (ch, ch, 3, 3), side(level)))
            chans.append(ch)
            n += 1

    mid = side(L - 1)
    resblock("middle_block.0", "mid_block.resnets.0", ch, ch, mid)
    if cfg.transformer_depth_middle >= 0:
        transformer("middle_block.1", "mid_block.attentions.0", ch, cfg.transformer_depth_middle, mid,
                    cfg.disable_middle_self_attn)
        resblock("middle_block.2", "mid_block.resnets.1", ch, ch, mid)

    depths_out = list(cfg.transformer_depth_output)
    n = 0
    for x, level in enumerate(reversed(range(L))):
        mult = cfg.channel_mult[level]
        nrb = cfg.num_res_blocks[level]
        for i in range(nrb + 1):
            ich = chans.pop()
            resblock(f"output_blocks.{n}.0", f"up_blocks.{x}.resnets.{i}", ch + ich, mc * mult, side(level))
            ch = mc * mult
            c = 1
            depth = depths_out.pop()
            allowed = cfg.num_attention_blocks is None or i < cfg.num_attention_blocks[level]
            if depth > 0 and allowed:
                nsa = bool(cfg.disable_self_attentions and cfg.disable_self_attentions[level])
                transformer(f"output_blocks.{n}.1", f"up_blocks.{x}.attentions.{i}", ch, depth, side(level), nsa)
                c = 2
            if level and i == nrb:
                if cfg.resblock_updown:
                    resblock(f"output_blocks.{n}.{c}", f"up_blocks.{x}.upsamplers.0", ch, ch, side(level))
                elif cfg.conv_resample:
                    out.append((f"output_blocks.{n}.{c}.conv", f"up_blocks.{x}.upsamplers.0.conv",
                                (ch, ch, 3, 3), side(level)))
            n += 1
    norms.append(("out.0", "conv_norm_out", (mc,), side(0)))
    out.append(("out.2", "conv_out", (cfg.out_channels, mc, 3, 3), side(0)))
    return out, norms


@functools.lru_cache(maxsize=16)
def unet_layers(config: UNetConfig = SDXL) -> dict[str, Layer]:
    """Every LoRA-able UNet weight of ``config``: canonical name -> Layer, in module order.

    SDXL: 794 layers (every 2-D/4-D weight of ComfyUI's SDXL UNet), 560 of them attention projections.
    The returned dict is shared (cached): do not mutate it.
    """
    return {n: _unet_layer(n, d, s, r) for n, d, s, r in _enumerate_unet(config)}


@functools.lru_cache(maxsize=16)
def unet_norms(config: UNetConfig = SDXL) -> dict[str, Layer]:
    """Every GroupNorm/LayerNorm of ``config``'s UNet (kind "norm", shape = its 1-D weight's), module order.

    Not LoRA-able; listed so that the bias and norm differences a LoRA file may carry (``.diff``, ``.diff_b``,
    LyCORIS ``.w_norm``/``.b_norm``: what ComfyUI's own LoRA training and extraction write) resolve by name.
    SDXL: 256 = 11 transformers' norms + 70 transformer blocks × 3 + 17 res-blocks × 2 + the output norm.
    """
    return {n: _unet_layer(n, d, s, r, kind="norm") for n, d, s, r in _enumerate_unet_modules(config)[1]}

# Every other prefix/path combination has the alias kind "<prefix><path style>", e.g. "unet.<ldm>" (how
# OneTrainer spells SDXL UNet layers) or "model.diffusion_model.<diffusers>".

# Prefixes a LoRA file may put before a UNet module path (README "LoRA files it reads"). Dotted prefixes
# take the dotted LDM or diffusers path, underscore prefixes the same path with every dot replaced by "_".
UNET_DOTTED_PREFIXES: tuple[str, ...] = ("", "unet.", "diffusion_model.", "model.diffusion_model.",
                                         "base_model.model.", "unet.base_model.model.")
UNET_UNDERSCORE_PREFIXES: tuple[str, ...] = ("lora_unet_", "lycoris_")
PATH_LDM = "ldm"
PATH_DIFFUSERS = "diffusers"
PATH_CLIP = "clip"


def _unet_alias_kind(prefix: str, path_style: str) -> str:
    if prefix in UNET_UNDERSCORE_PREFIXES:
        if path_style == PATH_DIFFUSERS:
            return ALIAS_KOHYA_DIFFUSERS
        if prefix == "lora_unet_":
            return ALIAS_KOHYA_LDM
    elif path_style == PATH_LDM:
        known = {"": ALIAS_LDM, "diffusion_model.": ALIAS_COMFYUI}.get(prefix)
        if known:
            return known
    elif prefix in ("", "unet.", "base_model.model.", "unet.base_model.model."):
        return ALIAS_DIFFUSERS
    return f"{prefix}<{path_style}>"


def attn_procs_spelling(diffusers: str) -> str | None:
    """Legacy diffusers attention-processor spelling: ``…attn1.processor.to_q``, ``…processor.to_out``."""
    m = re.search(r"\.(attn[12])\.(to_q|to_k|to_v|to_out\.0)$", diffusers)
    if not m:
        return None
    proj = "to_out" if m.group(2) == "to_out.0" else m.group(2)
    return f"{diffusers[: m.start()]}.{m.group(1)}.processor.{proj}"


def _build_aliases(
    layers: dict[str, Layer],
    te_prefixes: dict[str, tuple[tuple[str, str], ...]],
    te_kohya: dict[str, tuple[str, ...]],
    bare: dict[str, str] | None = None,
) -> dict[str, tuple[str, str]]:
    """Spelling -> (canonical name, alias kind) for every prefix × path style × separator a file may use.

    UNet: ``UNET_DOTTED_PREFIXES`` × (LDM path, diffusers path) and ``UNET_UNDERSCORE_PREFIXES`` × the same
    paths with underscores, plus the legacy attention-processor spelling. Text encoders: ``te_prefixes[which]``
    ((dotted prefix, alias kind) pairs) × the CLIP path and ``te_kohya[which]`` × the underscored path.
    ``bare`` (when given) collects the prefix-free paths, dotted and underscored.
    """
    aliases: dict[str, tuple[str, str]] = {}

    def add(spelling: str, name: str, kind: str) -> None:
        # first writer wins: a canonical spelling is never shadowed by a looser alias
        aliases.setdefault(spelling, (name, kind))

    for name, layer in layers.items():
        if layer.is_text_encoder:
            which, path = name.split(".", 1)
            add(name, name, ALIAS_LDM)
            for prefix, kind in te_prefixes.get(which, ()):
                add(prefix + path, name, kind)
            for prefix in te_kohya.get(which, ()):
                add(prefix + path.replace(".", "_"), name, ALIAS_KOHYA_TE)
            if bare is not None:
                add_bare(bare, path, name)
            continue
        paths = [(PATH_LDM, name)] + [(PATH_DIFFUSERS, d) for d in (layer.diffusers,
                                                                     *_diffusers_variants(layer.diffusers))]
        for prefix in UNET_DOTTED_PREFIXES:
            for style, path in paths:
                add(prefix + path, name, _unet_alias_kind(prefix, style))
        for prefix in UNET_UNDERSCORE_PREFIXES:
            for style, path in paths:
                add(prefix + path.replace(".", "_"), name, _unet_alias_kind(prefix, style))
        for _, path in paths[1:]:
            procs = attn_procs_spelling(path)
            if procs:
                add(procs, name, ALIAS_ATTN_PROCS)
                add("unet." + procs, name, ALIAS_ATTN_PROCS)
        if bare is not None:
            for _, path in paths:
                add_bare(bare, path, name)
    return aliases


def _diffusers_variants(diffusers: str) -> tuple[str, ...]:
    # ComfyUI's unet_to_diffusers also accepts class_embedding.* for the ADM (label_emb) layers.
    if diffusers.startswith("add_embedding."):
        return ("class_embedding." + diffusers[len("add_embedding."):],)
    return ()


def _guess_base(config: UNetConfig) -> str:
    if config.transformer_depth == SDXL.transformer_depth and config.channel_mult == SDXL.channel_mult:
        return "sdxl"
    if config.transformer_depth == SD15.transformer_depth and config.channel_mult == SD15.channel_mult:
        return "sd2" if config.use_linear_in_transformer else "sd1"
    return "unknown"


# The encoder names OneTrainer's OMI key format puts before a CLIP module path.
OMI_TE_NAMES = {"te1": "clip_l", "te2": "clip_g"}

# Where LDM/SGM checkpoints keep the first text encoder's CLIP module (a LoRA keyed like the checkpoint
# uses these); SD2.x's OpenCLIP and SDXL's CLIP-G use OpenCLIP's own fused names there, which no LoRA uses.
_CHECKPOINT_TE1_PREFIX = {"sdxl": "conditioner.embedders.0.transformer.", "sd1": "cond_stage_model.transformer."}


@functools.lru_cache(maxsize=16)
def _layout_cached(
    config: UNetConfig, te_dims: tuple[tuple[str, int, int, int], ...], base: str, label: str
) -> Layout:
    layers = dict(unet_layers(config))
    extras: dict[str, Layer] = {}
    norms = dict(unet_norms(config))
    te_prefixes: dict[str, tuple[tuple[str, str], ...]] = {}
    te_kohya: dict[str, tuple[str, ...]] = {}
    single_te = len(te_dims) == 1
    for which, hidden, n_layers, mlp in te_dims:
        clip_name = ("clip_h" if base == "sd2" else "clip_l") if single_te else ("clip_l" if which == "te1"
                                                                                 else "clip_g")
        # SD1.x/SD2.x kohya files say lora_te_; ComfyUI also maps lora_te1_ onto the first encoder (and
        # lora_te_ onto SDXL's first).
        kohya_prefix = "lora_te_" if single_te else f"lora_{which}_"
        diffusers_prefix = "text_encoder." if which == "te1" else "text_encoder_2."
        kw = {"kohya_prefix": kohya_prefix, "diffusers_prefix": diffusers_prefix, "clip_name": clip_name}
        layers.update(text_encoder_layers(which, hidden, n_layers, mlp, **kw))
        extras.update(text_encoder_extras(which, hidden, **kw))
        norms.update(text_encoder_norms(which, hidden, n_layers, **kw))
        prefixes = [(diffusers_prefix, ALIAS_DIFFUSERS),
                    (f"text_encoders.{clip_name}.transformer.", ALIAS_COMFYUI),
                    (f"{clip_name}.transformer.", f"{clip_name}.transformer.<{PATH_CLIP}>"),
                    (diffusers_prefix + "base_model.model.", f"{diffusers_prefix}base_model.model.<{PATH_CLIP}>")]
        # OneTrainer's OMI keys: the encoder's name + its transformers module path (clip_l.text_model.…,
        # clip_g.text_projection), one-to-one with kohya's lora_te1_/lora_te2_ names (OneTrainer's
        # convert_sdxl_lora key sets). OneTrainer names an SD1.x/SD2.x encoder clip_l whatever it is.
        for omi in dict.fromkeys((OMI_TE_NAMES[which] if not single_te else "clip_l", clip_name)):
            prefixes.append((f"{omi}.", f"{omi}.<{PATH_CLIP}>"))
        if which == "te1" and base in _CHECKPOINT_TE1_PREFIX:
            p = _CHECKPOINT_TE1_PREFIX[base]
            prefixes.append((p, f"{p}<{PATH_CLIP}>"))
        te_prefixes[which] = tuple(prefixes)
        if which == "te1":
            te_kohya[which] = (kohya_prefix, "lora_te1_" if single_te else "lora_te_")
        else:
            te_kohya[which] = (kohya_prefix,)
    bare: dict[str, str] = {}
    aliases = _build_aliases({**layers, **extras}, te_prefixes, te_kohya, bare)
    norm_aliases = _build_aliases(norms, te_prefixes, te_kohya, bare)
    return Layout(base=base, label=label, config=config, layers=layers, aliases=aliases, extras=extras,
                  norms=norms, norm_aliases=norm_aliases, bare_paths=bare)


def layout_for(
    config: UNetConfig = SDXL,
    te_dims: dict[str, tuple[int, ...]] | None = None,
    base: str | None = None,
    label: str | None = None,
) -> Layout:
    """The Layout of a UNet config plus text encoders (cached).

    ``te_dims`` maps "te1"/"te2" to (hidden, layers) or (hidden, layers, mlp); default: SDXL's CLIP-L +
    CLIP-G for an SDXL-structured config, CLIP-L for SD1.x, OpenCLIP-H for SD2.x, none otherwise.
    ``base`` defaults to a guess from the block structure (so a width-shrunk SDXL test model is "sdxl").
    """
    base = base or _guess_base(config)
    if te_dims is None:
        te_dims = {
            "sdxl": {"te1": TE_CLIP_L, "te2": TE_CLIP_G},
            "sd1": {"te1": TE_CLIP_L},
            "sd2": {"te1": TE_CLIP_H},
        }.get(base, {})
    dims = []
    for which in sorted(te_dims):
        d = tuple(int(x) for x in te_dims[which])
        hidden, n_layers = d[0], d[1]
        mlp = d[2] if len(d) > 2 else 4 * hidden
        dims.append((which, hidden, n_layers, mlp))
    return _layout_cached(config, tuple(dims), base, label or BASE_LABELS.get(base, base))


SDXL_LAYOUT = layout_for(SDXL, base="sdxl")
SD15_LAYOUT = layout_for(SD15, base="sd1")
SD21_LAYOUT = layout_for(SD21, base="sd2")
# Candidate bases for detection, most common first (ties go to the earlier one).
STANDARD_LAYOUTS: tuple[Layout, ...] = (SDXL_LAYOUT, SD15_LAYOUT, SD21_LAYOUT)

# The key styles merged SDXL files can be written in (formats.KEY_STYLES).
KEY_STYLES: tuple[str, ...] = ("kohya_ldm", "kohya_diffusers", "diffusers_peft", "diffusers", "diffusers_attn_procs",
                               "comfyui")
FAMILY = Family(
    name="sdxl", label="SDXL", presets=PRESETS, default_preset=DEFAULT_PRESET, prior_blocks=tuple(ATTENTION_BLOCKS),
    prediction="eps", key_styles=KEY_STYLES, b_lora=True, block_noun="an SDXL attention block",
    custom_example=CUSTOM_EXAMPLE, short_names=SHORT_ATTENTION_BLOCKS,
)


def text_encoder_aliases(which: str, dims: tuple[int, int, int], *, clip_name: str, kohya: tuple[str, ...],
                         bare: dict[str, str]) -> tuple[dict[str, Layer], dict[str, Layer], dict[str, Layer],
                                                        dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """One CLIP text encoder for another family's table (Flux.1's CLIP-L): (layers, extras, norms, aliases,
    norm aliases), spelled as for SDXL's encoder of the same ComfyUI name; ``kohya``: the kohya prefixes, the
    first one written."""
    hidden, n_layers, mlp = dims
    diffusers_prefix = "text_encoder." if which == "te1" else "text_encoder_2."
    kw = {"kohya_prefix": kohya[0], "diffusers_prefix": diffusers_prefix, "clip_name": clip_name}
    layers = text_encoder_layers(which, hidden, n_layers, mlp, **kw)
    extras = text_encoder_extras(which, hidden, **kw)
    norms = text_encoder_norms(which, hidden, n_layers, **kw)
    prefixes = ((diffusers_prefix, ALIAS_DIFFUSERS), (f"text_encoders.{clip_name}.transformer.", ALIAS_COMFYUI),
                (f"{clip_name}.transformer.", f"{clip_name}.transformer.<{PATH_CLIP}>"),
                (diffusers_prefix + "base_model.model.", f"{diffusers_prefix}base_model.model.<{PATH_CLIP}>"),
                (f"{clip_name}.", f"{clip_name}.<{PATH_CLIP}>"))
    aliases = _build_aliases({**layers, **extras}, {which: prefixes}, {which: kohya}, bare)
    norm_aliases = _build_aliases(norms, {which: prefixes}, {which: kohya}, bare)
    return layers, extras, norms, aliases, norm_aliases
