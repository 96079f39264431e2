"""SDXL UNet layout: the LoRA-able layers and the content/style layer priors (METHOD.md §3).

Block of a layer: the first three components of its canonical (LDM) name, e.g.
``input_blocks.4.1`` for ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` and ``middle_block.1``
for ``middle_block.1.transformer_blocks.3.attn2.to_k``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

CONTENT = "content"
STYLE = "style"

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

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
_ATTN_RE = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def block_of(name: str) -> str:
    """The block a canonical UNet layer name belongs to (first three dotted components)."""
    parts = name.split(".")
    if parts[0] == "middle_block":
        return ".".join(parts[:2])
    return ".".join(parts[:3])


def is_attention_projection(name: str) -> bool:
    """True for the 560 attention projections ZipRank learns on by default (scope="attention")."""
    return bool(_ATTN_RE.search(name))


def parse_custom_preset(spec: str) -> dict[str, str]:
    """Parse ``"content: input_blocks.7.1, middle_block.1; style: output_blocks.3.1"``.

    Raises ValueError with a message that says what is wrong and how to write it.
    """
    roles: dict[str, str] = {}
    spec = spec.strip()
    if not spec:
        return roles
    for part in spec.split(";"):
        part = part.strip()
        if not part:
            continue
        if ":" not in part:
            raise ValueError(
                f"custom prior {part!r} has no role: write e.g. "
                "'content: input_blocks.7.1, middle_block.1; style: output_blocks.3.1'"
            )
        role, blocks = (s.strip() for s in part.split(":", 1))
        if role not in (CONTENT, STYLE):
            raise ValueError(f"custom prior role {role!r} must be 'content' or 'style'")
        for b in (x.strip() for x in blocks.split(",")):
            if not b:
                continue
            if b not in ATTENTION_BLOCKS:
                raise ValueError(
                    f"custom prior block {b!r} is not an SDXL attention block; "
                    f"choose from {', '.join(ATTENTION_BLOCKS)}"
                )
            if b in roles and roles[b] != role:
                raise ValueError(f"custom prior block {b!r} is both content and style")
            roles[b] = role
    return roles


def preset_roles(preset: str, custom: str | dict[str, str] | None = None) -> dict[str, str]:
    """Block -> role for a preset name (``custom`` takes a spec string or a dict)."""
    if preset == "custom":
        if isinstance(custom, dict):
            return dict(custom)
        return parse_custom_preset(custom or "")
    if preset not in PRESETS:
        raise ValueError(f"unknown layer-prior preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    return dict(PRESETS[preset])


def prior_role(name: str, roles: dict[str, str]) -> str | None:
    """"content", "style" or None for a canonical UNet layer name under a block -> role mapping."""
    return roles.get(block_of(name))


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


@dataclass(frozen=True)
class Layer:
    """One LoRA-able weight.

    ``name`` is the canonical name (LDM path, or ``te1.``/``te2.`` + CLIP path); ``diffusers``,
    ``kohya`` and ``kohya_diffusers`` are the other spellings (without LoRA suffixes); ``comfyui`` is the
    spelling ComfyUI writes into LoRA files and ``model_key`` the weight's key in a ComfyUI model
    state dict. ``shape`` is the weight shape: (out, in) for linear, (out, in, kh, kw) for conv.
    ``resolution`` is the feature-map side at ``UNetConfig.latent_size`` (0 for non-spatial layers).
    """

    name: str
    diffusers: str
    kohya: str
    kohya_diffusers: str
    block: str
    resolution: int
    shape: tuple[int, ...]
    kind: str
    is_attention: bool
    comfyui: str = ""
    model_key: str = ""

    @property
    def is_text_encoder(self) -> bool:
        return self.name.startswith(("te1.", "te2."))


def _unet_layer(name: str, diffusers: str, shape: tuple[int, ...], resolution: int) -> Layer:
    return Layer(
        name=name,
        diffusers=diffusers,
        kohya="lora_unet_" + name.replace(".", "_"),
        kohya_diffusers="lora_unet_" + diffusers.replace(".", "_"),
        block=block_of(name),
        resolution=resolution,
        shape=shape,
        kind="conv" if len(shape) == 4 else "linear",
        is_attention=is_attention_projection(name),
        comfyui="diffusion_model." + name,
        model_key=f"diffusion_model.{name}.weight",
    )


def _enumerate_unet(cfg: UNetConfig) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(ldm name, diffusers name, weight shape, resolution) for every Linear/Conv2d weight, in module order."""
    out: list[tuple[str, str, tuple[int, ...], int]] = []
    mc, ted, L = cfg.model_channels, cfg.time_embed_dim, len(cfg.channel_mult)

    def side(level: int) -> int:
        return max(cfg.latent_size >> level, 1)

    def resblock(ldm: str, diff: str, ch_in: int, ch_out: int, res: int) -> None:
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
        out.append((f"{ldm}.proj_in", f"{diff}.proj_in", proj_in, res))
        self_kv = ctx if no_self_attn else inner
        for t in range(depth):
            p, q = f"{ldm}.transformer_blocks.{t}", f"{diff}.transformer_blocks.{t}"
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
    out.append(("out.2", "conv_out", (cfg.out_channels, mc, 3, 3), side(0)))
    return out


@functools.lru_cache(maxsize=16)
def unet_layers(config: UNetConfig = SDXL) -> dict[str, Layer]:
    """Every LoRA-able UNet weight of ``config``: canonical name -> Layer, in module order.

    SDXL: 794 layers (every 2-D/4-D weight of ComfyUI's SDXL UNet), 560 of them attention projections.
    The returned dict is shared (cached): do not mutate it.
    """
    return {n: _unet_layer(n, d, s, r) for n, d, s, r in _enumerate_unet(config)}


# SDXL's text encoders (ComfyUI clip_l / clip_g) and the single encoders of SD1.x (CLIP-L) and SD2.x
# (OpenCLIP-H, 24 layers in ComfyUI; kohya trains 23 of them).
TE_CLIP_L = (768, 12, 3072)
TE_CLIP_G = (1280, 32, 5120)
TE_CLIP_H = (1024, 24, 4096)
_CLIP_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                 "mlp.fc1", "mlp.fc2")


def text_encoder_layers(
    which: str = "te1",
    hidden: int = 768,
    layers: int = 12,
    mlp: int | None = None,
    *,
    kohya_prefix: str | None = None,
    diffusers_prefix: str | None = None,
    clip_name: str | None = None,
) -> dict[str, Layer]:
    """The LoRA-able linear layers of one CLIP text encoder: canonical ``te1.text_model.encoder.layers.N.*``.

    q/k/v/out_proj are (hidden, hidden); mlp.fc1 is (mlp, hidden), mlp.fc2 (hidden, mlp); mlp defaults to
    4·hidden. Spellings: kohya ``lora_te1_text_model_encoder_layers_N_self_attn_q_proj`` (``kohya_prefix``
    overrides ``lora_te1_``, e.g. ``lora_te_`` for SD1.x), diffusers ``text_encoder.…`` / ``text_encoder_2.…``,
    ComfyUI ``text_encoders.clip_l.transformer.…``.
    """
    if which not in ("te1", "te2"):
        raise ValueError(f"text encoder must be 'te1' or 'te2', not {which!r}")
    mlp = mlp if mlp is not None else 4 * hidden
    kohya_prefix = kohya_prefix if kohya_prefix is not None else f"lora_{which}_"
    if diffusers_prefix is None:
        diffusers_prefix = "text_encoder." if which == "te1" else "text_encoder_2."
    clip_name = clip_name or ("clip_l" if which == "te1" else "clip_g")
    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden),
        "self_attn.out_proj": (hidden, hidden),
        "mlp.fc1": (mlp, hidden),
        "mlp.fc2": (hidden, mlp),
    }
    out: dict[str, Layer] = {}
    for i in range(layers):
        for m in _CLIP_MODULES:
            path = f"text_model.encoder.layers.{i}.{m}"
            kohya = kohya_prefix + path.replace(".", "_")
            out[f"{which}.{path}"] = Layer(
                name=f"{which}.{path}",
                diffusers=diffusers_prefix + path,
                kohya=kohya,
                kohya_diffusers=kohya,
                block=which,
                resolution=0,
                shape=shapes[m],
                kind="linear",
                is_attention=False,
                comfyui=f"text_encoders.{clip_name}.transformer.{path}",
                model_key=f"{clip_name}.transformer.{path}.weight",
            )
    return out


# How an alias spells a layer; formats.py turns (alias kind, LoRA suffix) into a key style.
ALIAS_LDM = "ldm"  # canonical / bare LDM path
ALIAS_COMFYUI = "comfyui"  # diffusion_model.… / text_encoders.clip_l.transformer.…
ALIAS_DIFFUSERS = "diffusers"  # unet.… / bare diffusers path / text_encoder.…
ALIAS_ATTN_PROCS = "attn_procs"  # …attn1.processor.to_q / …processor.to_out
ALIAS_KOHYA_LDM = "kohya_ldm"
ALIAS_KOHYA_DIFFUSERS = "kohya_diffusers"
ALIAS_KOHYA_TE = "kohya_te"


@dataclass(frozen=True, eq=False)
class Layout:
    """The LoRA-able layers of one base model (UNet + text encoders) with lookups from any spelling.

    ``layers`` maps canonical names to Layers (UNet in module order, then te1, then te2).
    ``resolve(spelling)`` accepts every key spelling a LoRA file may use for a layer (without the LoRA
    suffix such as ``.lora_down.weight``) and returns the Layer and the alias kind.
    """

    base: str
    label: str
    config: UNetConfig
    layers: dict[str, Layer]
    aliases: dict[str, tuple[str, str]] = field(repr=False)

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __getitem__(self, name: str) -> Layer:
        return self.layers[name]

    def get(self, name: str) -> Layer | None:
        return self.layers.get(name)

    def resolve(self, spelling: str) -> tuple[Layer, str] | None:
        """(Layer, alias kind) for a layer spelled any known way, or None."""
        hit = self.aliases.get(spelling)
        if hit is None:
            return None
        return self.layers[hit[0]], hit[1]

    def lookup(self, spelling: str) -> Layer | None:
        hit = self.resolve(spelling)
        return hit[0] if hit else None

    def unet_layers(self) -> dict[str, Layer]:
        return {k: v for k, v in self.layers.items() if not v.is_text_encoder}

    def text_encoder_layers(self, which: str | None = None) -> dict[str, Layer]:
        prefixes = (f"{which}.",) if which else ("te1.", "te2.")
        return {k: v for k, v in self.layers.items() if k.startswith(prefixes)}

    def attention_layers(self) -> dict[str, Layer]:
        return {k: v for k, v in self.layers.items() if v.is_attention}


def _attn_procs_spelling(diffusers: str) -> str | None:
    """Legacy diffusers attention-processor spelling: ``…attn1.processor.to_q``, ``…processor.to_out``."""
    m = re.search(r"\.(attn[12])\.(to_q|to_k|to_v|to_out\.0)$", diffusers)
    if not m:
        return None
    proj = "to_out" if m.group(2) == "to_out.0" else m.group(2)
    return f"{diffusers[: m.start()]}.{m.group(1)}.processor.{proj}"


def _build_aliases(layers: dict[str, Layer], te_kohya_extra: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, str]]:
    aliases: dict[str, tuple[str, str]] = {}

    def add(spelling: str, name: str, kind: str) -> None:
        # first writer wins: a canonical spelling is never shadowed by a looser alias
        aliases.setdefault(spelling, (name, kind))

    for name, layer in layers.items():
        if layer.is_text_encoder:
            add(name, name, ALIAS_LDM)
            add(layer.kohya, name, ALIAS_KOHYA_TE)
            add(layer.comfyui, name, ALIAS_COMFYUI)
            add(layer.diffusers, name, ALIAS_DIFFUSERS)
            path = name.split(".", 1)[1]
            for prefix in te_kohya_extra.get(name.split(".", 1)[0], ()):
                add(prefix + path.replace(".", "_"), name, ALIAS_KOHYA_TE)
            continue
        add(name, name, ALIAS_LDM)
        add(layer.comfyui, name, ALIAS_COMFYUI)
        add(layer.kohya, name, ALIAS_KOHYA_LDM)
        add(layer.kohya_diffusers, name, ALIAS_KOHYA_DIFFUSERS)
        for d in (layer.diffusers, *_diffusers_variants(layer.diffusers)):
            add(d, name, ALIAS_DIFFUSERS)
            add("unet." + d, name, ALIAS_DIFFUSERS)
            add("base_model.model." + d, name, ALIAS_DIFFUSERS)
            add("unet.base_model.model." + d, name, ALIAS_DIFFUSERS)
            add("lora_unet_" + d.replace(".", "_"), name, ALIAS_KOHYA_DIFFUSERS)
            add("lycoris_" + d.replace(".", "_"), name, ALIAS_KOHYA_DIFFUSERS)
            procs = _attn_procs_spelling(d)
            if procs:
                add(procs, name, ALIAS_ATTN_PROCS)
                add("unet." + procs, name, ALIAS_ATTN_PROCS)
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


@functools.lru_cache(maxsize=16)
def _layout_cached(
    config: UNetConfig, te_dims: tuple[tuple[str, int, int, int], ...], base: str, label: str
) -> Layout:
    layers = dict(unet_layers(config))
    extra: dict[str, tuple[str, ...]] = {}
    single_te = len(te_dims) == 1
    for which, hidden, n_layers, mlp in te_dims:
        clip_name = None
        if single_te:
            clip_name = "clip_h" if base == "sd2" else "clip_l"
        # SD1.x/SD2.x kohya files say lora_te_; ComfyUI also maps lora_te1_ onto the first encoder.
        kohya_prefix = "lora_te_" if single_te else None
        layers.update(text_encoder_layers(which, hidden, n_layers, mlp, kohya_prefix=kohya_prefix,
                                          clip_name=clip_name))
    if single_te:
        extra["te1"] = ("lora_te1_",)
    else:
        extra["te1"] = ("lora_te_",)
    return Layout(base=base, label=label, config=config, layers=layers, aliases=_build_aliases(layers, extra))


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
