"""The family-neutral layer table: ``Layer``, ``Layout``, ``Family`` and the lookups every model family shares.

A model family (``duolora.families``: SDXL and its SD1/SD2 relatives, Flux.1, Z-Image, Qwen-Image) is data:
its layer names and shapes, the key spellings of its LoRA files, the block roles of its layer priors and how
its sampling predicts. This module holds the types those tables are made of and the few rules that read
any of them (the block of a layer name, whether a layer is an attention projection). It knows no family.

Inside the engine a layer has one canonical name: the module path of ComfyUI's model for that family,
without ``diffusion_model.`` (text-encoder layers: ``te1.``/``te2.`` + the CLIP path).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

CONTENT = "content"
STYLE = "style"

# How an alias spells a layer; formats.keys turns (alias kind, LoRA suffix) into a key style.
ALIAS_LDM = "ldm"  # canonical / bare LDM path
ALIAS_COMFYUI = "comfyui"  # diffusion_model.… / text_encoders.clip_l.transformer.…
ALIAS_DIFFUSERS = "diffusers"  # unet.… / transformer.… / bare diffusers path / text_encoder.…
ALIAS_ATTN_PROCS = "attn_procs"  # …attn1.processor.to_q / …processor.to_out
ALIAS_KOHYA_LDM = "kohya_ldm"
ALIAS_KOHYA_DIFFUSERS = "kohya_diffusers"
ALIAS_KOHYA_TE = "kohya_te"
ALIAS_XLABS = "xlabs"  # XLabs' Flux processors: double_blocks.N.processor.qkv_lora1 …
# Every other prefix/path combination has the alias kind "<prefix><path style>", e.g. "unet.<ldm>" (how
# OneTrainer spells SDXL UNet layers) or "model.diffusion_model.<diffusers>".


@dataclass(frozen=True)
class Part:
    """A row slice of a fused weight that another writer keeps as a layer of its own.

    ComfyUI fuses what diffusers splits: Flux's ``double_blocks.N.img_attn.qkv`` is diffusers' ``to_q``,
    ``to_k`` and ``to_v`` stacked, ``single_blocks.N.linear1`` adds ``proj_mlp`` below them. A LoRA on a slice
    patches rows ``start:start + rows`` of the fused weight (ComfyUI's key map targets ``(key, (0, start,
    rows))``), so a file's slices fuse exactly into one low-rank layer whose up factor is block-diagonal.
    ``swap_halves``: the writer orders the two halves of the rows the other way round (diffusers' final
    AdaLN keeps (scale, shift) where ComfyUI's Flux keeps (shift, scale); ComfyUI swaps them back).
    """

    path: str
    start: int
    rows: int
    swap_halves: bool = False


@dataclass(frozen=True)
class Layer:
    """One LoRA-able weight.

    ``name`` is the canonical name (ComfyUI module path, or ``te1.``/``te2.`` + CLIP path); ``diffusers``,
    ``kohya`` and ``kohya_diffusers`` are the other spellings (without LoRA suffixes); ``comfyui`` is the
    spelling ComfyUI writes into LoRA files and ``model_key`` the weight's key in a ComfyUI model
    state dict. ``shape`` is the weight shape: (out, in) for linear, (out, in, kh, kw) for conv.
    ``resolution`` is the feature-map side at ``UNetConfig.latent_size`` (0 for non-spatial layers).
    ``bias``: whether the module has a bias (a ``.diff_b`` patch may target it). ``kind`` is "linear",
    "conv", "embedding" (CLIP token/position embeddings: a LoRA patches them as a 2-D weight) or "norm"
    (GroupNorm/LayerNorm: never a low-rank layer; only bias/norm differences target it). ``parts``: the
    slices diffusers-style writers split a fused layer into (``diffusers`` is then empty).
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
    bias: bool = True
    parts: tuple[Part, ...] = ()

    @property
    def is_text_encoder(self) -> bool:
        return self.name.startswith(("te1.", "te2."))


@dataclass(frozen=True)
class Family:
    """What a model family is besides its layers.

    ``presets``: prior preset -> block -> role ("none" included); ``default_preset`` the one a merge uses when
    asked for another family's preset; ``prior_blocks`` the blocks a custom prior may name (full-size model,
    in model order); ``prediction``: how the family's sampling predicts — "eps" (x_t = x0 + σ·ε; ComfyUI's
    EPS/V_PREDICTION models) or "flow" (flow matching, x_t = (1 − σ)·x0 + σ·ε, the model predicts ε − x0;
    ComfyUI's CONST); ``key_styles``: the key styles its merged files can be written in; ``b_lora``: whether
    B-LoRA's two SDXL blocks exist in it.
    """

    name: str
    label: str
    presets: Mapping[str, Mapping[str, str]]
    default_preset: str
    prior_blocks: tuple[str, ...]
    prediction: str
    key_styles: tuple[str, ...]
    b_lora: bool = False
    # How messages name one of ``prior_blocks`` and a custom prior written for this family.
    block_noun: str = "block"
    custom_example: str = ""
    # Short block names a custom prior may use instead (SDXL's in4 … out5, as the prior diagram labels them).
    short_names: Mapping[str, str] = field(default_factory=dict)

    @property
    def preset_names(self) -> tuple[str, ...]:
        return (*self.presets, "custom")

    def blocks_text(self) -> str:
        """The prior blocks as a message lists them: runs of ``container.N`` shortened to ``container.0-37``."""
        runs: list[list] = []
        for b in self.prior_blocks:
            head, _, tail = b.rpartition(".")
            if tail.isdigit() and runs and runs[-1][0] == head and runs[-1][2] == int(tail) - 1 and head:
                runs[-1][2] = int(tail)
            else:
                runs.append([head, b, int(tail) if tail.isdigit() else None])
        out = []
        for head, first, last in runs:
            start = first.rpartition(".")[2]
            out.append(first if last is None or str(last) == start else f"{head}.{start}-{last}")
        return ", ".join(out)

    def choices_text(self) -> str:
        """The blocks a custom prior may name, as its error message lists them (short names first)."""
        if not self.short_names:
            return self.blocks_text()
        return f"{', '.join(self.short_names)} (or their long names {', '.join(self.prior_blocks)})"


# Top-level containers whose blocks are "container.N" (two name components); every other block is the
# first three components (SDXL's input_blocks.4.1). Families register their containers here.
_TWO_PART_CONTAINERS: set[str] = set()
# Attention projections, one pattern per family (registered by each family's table).
_ATTENTION_PATTERNS: list[re.Pattern[str]] = []


def register_block_containers(names: Iterable[str]) -> None:
    """Declare top-level module lists whose blocks are ``name.N`` (Flux's ``single_blocks.N``)."""
    _TWO_PART_CONTAINERS.update(names)


def register_attention_pattern(pattern: str) -> None:
    """Declare a family's attention projections (a regular expression searched in the canonical name)."""
    _ATTENTION_PATTERNS.append(re.compile(pattern))


def block_of(name: str) -> str:
    """The block a canonical layer name belongs to: ``input_blocks.4.1`` for SDXL's
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, ``middle_block.1``, ``single_blocks.3`` for Flux's
    ``single_blocks.3.linear1``."""
    parts = name.split(".")
    if parts[0] in _TWO_PART_CONTAINERS:
        return ".".join(parts[:2])
    return ".".join(parts[:3])


def is_attention_projection(name: str) -> bool:
    """True for the layers ZipRank learns on by default (scope="attention"): each family's attention
    projections (SDXL's 560 attn1/attn2 q/k/v/out; Flux's fused qkv/proj and single-block linear1/linear2)."""
    return any(p.search(name) for p in _ATTENTION_PATTERNS)


@dataclass(frozen=True, eq=False)
class Layout:
    """The LoRA-able layers of one base model with lookups from any spelling.

    ``layers`` maps canonical names to Layers (the denoiser in module order, then te1, then te2): the table
    trainers enumerate. ``extras`` are weights ComfyUI also patches from a LoRA file that trainers rarely
    target (CLIP's text projection, token and position embeddings): looked up, read, merged and written like
    layers, but not enumerated by ``layers``. ``norms`` are the GroupNorm/LayerNorm modules (never low-rank
    layers; bias and norm differences target them). ``resolve(spelling)`` accepts every key spelling a LoRA
    file may use for a layer (without the LoRA suffix such as ``.lora_down.weight``) and returns the Layer
    and the alias kind; ``resolve_module`` also finds norms; ``resolve_part`` also finds the slices of fused
    layers (``Part``). ``family``: the name of the ``Family`` the layout belongs to.
    """

    base: str
    label: str
    config: Any
    layers: dict[str, Layer]
    aliases: dict[str, tuple[str, str]] = field(repr=False)
    extras: dict[str, Layer] = field(default_factory=dict, repr=False)
    norms: dict[str, Layer] = field(default_factory=dict, repr=False)
    norm_aliases: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    # bare module paths (no prefix; dotted and underscored) -> canonical name, to recognise a known path
    # behind a prefix no reader knows
    bare_paths: dict[str, str] = field(default_factory=dict, repr=False)
    family: str = "sdxl"
    # spelling of a slice -> (canonical name, alias kind, index into the layer's parts)
    part_aliases: dict[str, tuple[str, str, int]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, name: object) -> bool:
        return name in self.layers or name in self.extras

    def __getitem__(self, name: str) -> Layer:
        layer = self.get(name)
        if layer is None:
            raise KeyError(name)
        return layer

    def get(self, name: str) -> Layer | None:
        """The layer (or extra layer) of a canonical name, or None."""
        layer = self.layers.get(name)
        return layer if layer is not None else self.extras.get(name)

    def module(self, name: str) -> Layer | None:
        """Any module of a canonical name: a layer, an extra layer or a norm."""
        layer = self.get(name)
        return layer if layer is not None else self.norms.get(name)

    def order(self) -> dict[str, int]:
        """Canonical layer name -> position: the table's module order, then the extras."""
        return {n: i for i, n in enumerate((*self.layers, *self.extras))}

    def resolve(self, spelling: str) -> tuple[Layer, str] | None:
        """(Layer, alias kind) for a layer spelled any known way, or None."""
        hit = self.aliases.get(spelling)
        if hit is None:
            return None
        return self.get(hit[0]), hit[1]  # type: ignore[return-value]

    def resolve_part(self, spelling: str) -> tuple[Layer, str, int | None] | None:
        """(Layer, alias kind, part index) for a whole layer (index None) or a slice of a fused one."""
        hit = self.resolve(spelling)
        if hit is not None:
            return hit[0], hit[1], None
        part = self.part_aliases.get(spelling)
        if part is None:
            return None
        return self.layers[part[0]], part[1], part[2]

    def resolve_module(self, spelling: str) -> tuple[Layer, str] | None:
        """Like resolve, also for norm modules (the targets of bias/norm differences)."""
        hit = self.resolve(spelling)
        if hit is not None:
            return hit
        norm = self.norm_aliases.get(spelling)
        return (self.norms[norm[0]], norm[1]) if norm is not None else None

    def param_shape(self, param: str) -> tuple[int, ...] | None:
        """Shape of a canonical parameter ``<module>.weight`` / ``<module>.bias``; None if it does not exist."""
        module, _, kind = param.rpartition(".")
        layer = self.module(module)
        if layer is None:
            return None
        if kind == "weight":
            return layer.shape
        if kind == "bias" and layer.bias:
            return (layer.shape[0],)
        return None

    def find_known_path(self, spelling: str) -> tuple[str, str] | None:
        """(unrecognised prefix, canonical name) when ``spelling`` ends in a known module path behind a
        prefix no reader knows (e.g. ``my_tool.input_blocks.4.1.…``); None otherwise."""
        for sep in (".", "_"):
            pos = spelling.find(sep)
            while pos != -1:
                rest = spelling[pos + 1:]
                name = self.bare_paths.get(rest)
                if name is not None:
                    return spelling[: pos + 1], name
                pos = spelling.find(sep, pos + 1)
        return None

    def lookup(self, spelling: str) -> Layer | None:
        hit = self.resolve(spelling)
        return hit[0] if hit else None

    def unet_layers(self) -> dict[str, Layer]:
        """The denoiser's layers (a UNet's or a transformer's): every layer that is no text-encoder layer."""
        return {k: v for k, v in self.layers.items() if not v.is_text_encoder}

    def text_encoder_layers(self, which: str | None = None) -> dict[str, Layer]:
        prefixes = (f"{which}.",) if which else ("te1.", "te2.")
        return {k: v for k, v in self.layers.items() if k.startswith(prefixes)}

    def attention_layers(self) -> dict[str, Layer]:
        return {k: v for k, v in self.layers.items() if v.is_attention}


def add_bare(bare: dict[str, str], path: str, name: str) -> None:
    """Record a prefix-free module path (dotted and underscored) for ``Layout.find_known_path``."""
    # Only paths of four or more components: short ones (conv_in, out.2, time_embed.0, text_projection)
    # could end another model's module names and would be taken for a layer behind a foreign prefix.
    if path.count(".") >= 3:
        bare.setdefault(path, name)
        bare.setdefault(path.replace(".", "_"), name)


_RANGE_RE = re.compile(r"^(.+)\.(\d+)-(\d+)$")


def _expand(block: str, family: Family) -> list[str]:
    """A block name, or ``container.A-B`` as the blocks it names when all of them are prior blocks."""
    m = _RANGE_RE.match(block)
    if m is None or block in family.prior_blocks:
        return [block]
    first, last = int(m.group(2)), int(m.group(3))
    names = [f"{m.group(1)}.{i}" for i in range(first, last + 1)]
    return names if names and all(n in family.prior_blocks for n in names) else [block]


def parse_custom_prior(spec: str, family: Family) -> dict[str, str]:
    """Parse a custom prior for ``family``: ``"content: input_blocks.7.1, middle_block.1; style:
    output_blocks.3.1"`` (SDXL), ``"content: single_blocks.0-9; style: single_blocks.10-37"`` (Flux.1: a
    range ``container.A-B`` names every block from A to B).

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
            raise ValueError(f"custom prior {part!r} has no role: write e.g. '{family.custom_example}'")
        role, blocks = (s.strip() for s in part.split(":", 1))
        if role not in (CONTENT, STYLE):
            raise ValueError(f"custom prior role {role!r} must be 'content' or 'style'")
        for token in (x.strip() for x in blocks.split(",")):
            if not token:
                continue
            for b in _expand(family.short_names.get(token.lower(), token), family):
                if b not in family.prior_blocks:
                    raise ValueError(f"custom prior block {(token if b == token else b)!r} is not "
                                     f"{family.block_noun}; choose from {family.choices_text()}")
                if b in roles and roles[b] != role:
                    raise ValueError(f"custom prior block {b!r} is both content and style")
                roles[b] = role
    return roles


def prior_role(name: str, roles: Mapping[str, str]) -> str | None:
    """"content", "style" or None for a canonical layer name under a block -> role mapping."""
    return roles.get(block_of(name))
