"""Mergers of K ≥ 1 content LoRAs and a style LoRA (docs/method.md §2 and §7).

A merger holds, for every layer any of its LoRAs patches, the frozen factors of each LoRA and one mask per
LoRA. The formulas below are written for one content LoRA; with several (multi-concept) every content LoRA
adds its own term B_ci·diag(m_ci)·A_ci, and every statement about "both LoRAs" holds for each of them:

* ``rank`` masks (ZipRank, the direct merge, B-LoRA):  ΔW = B_c·diag(m_c)·A_c + B_s·diag(m_s)·A_s,
  m_c ∈ R^{r_c}, m_s ∈ R^{r_s};
* ``out`` masks (ZipLoRA as DuoLoRA reads it):          ΔW = diag(m_c)·ΔW_c + diag(m_s)·ΔW_s, m ∈ R^{out};
* ``in`` masks (ZipLoRA's own paper):                    ΔW = ΔW_c·diag(m_c) + ΔW_s·diag(m_s), m ∈ R^{in}
  (conv layers: one entry per input channel, shared by the kernel taps).

Masks are ``nn.Parameter`` where the method learns them and fixed buffers elsewhere, so one adapter
(``duolora.adapter``) evaluates every method, and every merger exports exactly as a standard LoRA of
rank r_c + r_s (Σ r_i with several content LoRAs; ``duolora.export``).

Each LoRA of a merger has a *tag*: "c" for the (first) content LoRA, "c2", "c3", … for further content
LoRAs, "s" for the style LoRA (``content_tag``). A layer's factors and mask of LoRA ``t`` are its buffers
``B_t``, ``A_t``, ``m_t``, so a one-pair merger has exactly ``m_c`` and ``m_s``.

Which layers learn: layers at least two files patch, inside ``scope`` ("attention": the 560 attention
projections of SDXL, as in the paper; "all": every shared UNet layer). Other shared layers and the
text-encoder parts (``te1.``/``te2.``) are a fixed direct merge with weights (w_c for every content LoRA,
w_s); layers only one file has pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .config import BASES, METHODS, SCOPES, MergeConfig, default
from .export import agreed_value, export_lora, kept_ranks
from .lora import TEXT_ENCODER_PREFIXES, LoRA, LowRank, merge_patches
from .mergedlayer import IN, OUT, RANK, MergedLayer, component_weights
from .sdxl import block_of, is_attention_projection
from .svdbasis import SVD_BATCH, svd_refactor, svd_refactor_many

# Names other modules and hosts import from here (the layer, its mask kinds and the SVD basis live in
# ``duolora.mergedlayer`` and ``duolora.svdbasis``).
__all__ = [
    "B_LORA_CONTENT_BLOCK", "B_LORA_STYLE_BLOCK", "IN", "MULTI_CONTENT_METHODS", "OUT", "RANK",
    "STYLE_TAG", "SVD_BATCH", "BLoRAMerger", "DirectMerger", "MergedLayer", "Merger", "MergerError",
    "ZipLoRAMerger", "ZipRankMerger", "build_merger", "check_content_count", "component_weights", "content_list",
    "content_tag", "describe_lora", "lora_tags", "parameter_counts", "print_parameter_counts",
    "sdxl_attention_shapes", "svd_refactor", "svd_refactor_many", "term_name", "trainable_count",
]

# B-LoRA (Frenkel et al.; docs/method.md §7): the one block that carries content and the one that carries style.
B_LORA_CONTENT_BLOCK = "output_blocks.0.1"
B_LORA_STYLE_BLOCK = "output_blocks.1.1"


STYLE_TAG = "s"
# Methods that can merge several content LoRAs; B-LoRA keeps one block for THE content LoRA.
MULTI_CONTENT_METHODS: tuple[str, ...] = ("ziprank", "ziplora_out", "ziplora_in", "direct")


def content_tag(index: int) -> str:
    """The tag of the content LoRA at ``index`` (0-based): "c", then "c2", "c3", …"""
    return "c" if index == 0 else f"c{index + 1}"


def lora_tags(n_content: int) -> tuple[str, ...]:
    """Every tag of a merger of ``n_content`` content LoRAs and a style LoRA, in export order."""
    return (*(content_tag(i) for i in range(n_content)), STYLE_TAG)


def describe_lora(tag: str, name: str, n_content: int = 1) -> str:
    """How messages name one LoRA of a merge: "the content LoRA 'a.safetensors'", "content LoRA 2 'b…'"."""
    if tag == STYLE_TAG:
        return f"the style LoRA {name!r}"
    if n_content == 1:
        return f"the content LoRA {name!r}"
    return f"content LoRA {1 if tag == 'c' else int(tag[1:])} {name!r}"


def term_name(kind: str, index: int) -> str:
    """The reported name of content LoRA ``index``'s (0-based) loss term of ``kind``: "content", "content2", …"""
    return kind if index == 0 else f"{kind}{index + 1}"


class MergerError(ValueError):
    """A merge that cannot be built; the message names the layer, the files and what to do."""


def check_content_count(method: str, content_names: Sequence[str]) -> None:
    """Raise MergerError when ``method`` cannot merge this many content LoRAs (B-LoRA merges exactly one)."""
    if len(content_names) > 1 and method not in MULTI_CONTENT_METHODS:
        raise MergerError(
            f"method {method!r} merges exactly one content LoRA (B-LoRA keeps {B_LORA_CONTENT_BLOCK} for the "
            f"content and {B_LORA_STYLE_BLOCK} for the style), but {len(content_names)} content LoRAs were given "
            f"({', '.join(repr(n) for n in content_names)}); use method "
            f"{', '.join(repr(m) for m in MULTI_CONTENT_METHODS)} for a multi-concept merge")


def content_list(content: LoRA | Sequence[LoRA]) -> list[LoRA]:
    """One content LoRA or a sequence of them, as a list (refused when empty)."""
    contents = [content] if isinstance(content, LoRA) else list(content)
    if not contents:
        raise MergerError("a merge needs at least one content LoRA")
    return contents


def _ones_mask(kind: str, lr: LowRank) -> torch.Tensor:
    n = {RANK: lr.rank, OUT: lr.out_features, IN: lr.in_features}[kind]
    return torch.ones(n, device=lr.down.device)


class Merger(nn.Module):
    """Base merger: every layer of any of its LoRAs, learned where the method learns, fixed elsewhere.

    ``content`` is one LoRA or a sequence of K ≥ 1 content LoRAs (multi-concept). Layers are kept in sorted
    name order in ``self.layers`` (an ``nn.ModuleList``; names contain dots, which ``nn.ModuleDict``
    refuses). Subclasses decide the learned layers in ``_learned_layer``.
    """

    method = "merger"
    mask_kind = RANK

    def __init__(
        self,
        content: LoRA | Sequence[LoRA],
        style: LoRA,
        *,
        scope: str = default("scope"),
        w_c: float = default("w_c"),
        w_s: float = default("w_s"),
        prune_threshold: float = default("prune_threshold"),
        max_rank: int = default("max_rank"),
    ) -> None:
        super().__init__()
        if scope not in SCOPES:
            raise MergerError(f"merge scope {scope!r} is not one of {', '.join(SCOPES)}")
        # A rank-0 layer changes nothing: merged as absent, so no layer has an empty factor (the solver, the
        # recorder and the adapter all assume r ≥ 1 per present LoRA).
        contents = [c.without_empty_layers() for c in content_list(content)]
        style = style.without_empty_layers()
        self.scope = scope
        self.w_c = float(w_c)
        self.w_s = float(w_s)
        self.prune_threshold = float(prune_threshold)
        self.max_rank = int(max_rank)
        self.tags: tuple[str, ...] = lora_tags(len(contents))
        self.content_tags: tuple[str, ...] = self.tags[:-1]
        self.content_names: list[str] = [c.name for c in contents]
        self.content_name = " + ".join(self.content_names)
        self.style_name = style.name
        loras = [*contents, style]
        self._names = dict(zip(self.tags, [lora.name for lora in loras]))
        # The export is spelled and typed like the inputs when they all agree (a writer may override both).
        self.export_key_style = agreed_value([lora.key_style for lora in loras], "unknown")
        self.export_base = agreed_value([lora.base for lora in loras], "unknown")
        self.export_dtype = agreed_value([lora.dtype for lora in loras], None)
        # Bias/norm differences are not low-rank layers: every method sums them like its fixed layers.
        self.patches = merge_patches([c.patches for c in contents], style.patches, self.w_c, self.w_s)
        self.layers = nn.ModuleList()
        self._index: dict[str, int] = {}
        names = sorted(set().union(*(lora.layers for lora in loras)))
        for name in names:
            self._check_compatible(name, {t: lora.layers.get(name) for t, lora in zip(self.tags, loras)})
        self._prepare(dict(zip(self.tags, loras)), names)
        for name in names:
            layer = self._make_layer(name, {t: lora.layers.get(name) for t, lora in zip(self.tags, loras)})
            self._index[name] = len(self.layers)
            self.layers.append(layer)

    @property
    def n_content(self) -> int:
        return len(self.content_tags)

    def lora_name(self, tag: str) -> str:
        """The file name (or description) of the LoRA with this tag."""
        return self._names[tag]

    def describe(self, tag: str) -> str:
        """The LoRA with this tag as messages name it (``describe_lora``)."""
        return describe_lora(tag, self._names[tag], self.n_content)

    # -- construction ----------------------------------------------------------------------------------
    def _check_compatible(self, name: str, parts: Mapping[str, LowRank | None]) -> None:
        present = [(t, lr) for t, lr in parts.items() if lr is not None]
        for tag, lr in present[1:]:
            first_tag, first = present[0]
            if lr.weight_shape != first.weight_shape:
                both = "both LoRAs" if len(self.tags) == 2 else "all LoRAs of a merge"
                raise MergerError(
                    f"layer {name}: {self.describe(first_tag)} patches a weight of shape "
                    f"{tuple(first.weight_shape)} but {self.describe(tag)} one of shape "
                    f"{tuple(lr.weight_shape)}; {both} must be made for the same base model"
                )

    def _prepare(self, loras: Mapping[str, LoRA], names: list[str]) -> None:
        """Work shared by all layers, done once before they are built (default: none)."""

    def in_scope(self, name: str) -> bool:
        """True if a shared layer of this name is learned (UNet only; attention projections by default)."""
        if name.startswith(TEXT_ENCODER_PREFIXES):
            return False
        return self.scope == "all" or is_attention_projection(name)

    def _learns(self, name: str, parts: Mapping[str, LowRank | None]) -> bool:
        """A layer is learned where at least two of the LoRAs patch it, inside the scope."""
        return sum(lr is not None for lr in parts.values()) >= 2 and self.in_scope(name)

    def _make_layer(self, name: str, parts: Mapping[str, LowRank | None]) -> MergedLayer:
        if sum(lr is not None for lr in parts.values()) >= 2:
            if self.in_scope(name):
                return self._learned_layer(name, parts)
            return self._fixed_layer(name, parts, self.w_c, self.w_s)
        # Only one file has this layer: it passes through unchanged.
        return self._fixed_layer(name, parts, 1.0, 1.0)

    def _fixed_layer(self, name: str, parts: Mapping[str, LowRank | None], w_c: float, w_s: float) -> MergedLayer:
        template = next(lr for lr in parts.values() if lr is not None)
        return MergedLayer(
            name,
            template,
            RANK,
            {tag: None if lr is None else ((lr.B, lr.A), _ones_mask(RANK, lr) * (w_s if tag == STYLE_TAG else w_c))
             for tag, lr in parts.items()},
            learned=False,
        )

    def _learned_layer(self, name: str, parts: Mapping[str, LowRank | None]) -> MergedLayer:
        raise NotImplementedError

    # -- access ----------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def layer(self, name: str) -> MergedLayer:
        return self.layers[self._index[name]]

    def items(self) -> list[tuple[str, MergedLayer]]:
        return [(n, self.layers[i]) for n, i in self._index.items()]

    def learned_layers(self) -> list[MergedLayer]:
        return [layer for layer in self.layers if layer.learned]

    @property
    def device(self) -> torch.device:
        """Where the factors and masks live (the CPU for an empty merger)."""
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def mask_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_parameters(self) -> int:
        """Number of trainable mask values (docs/method.md §6: 71,680 for ZipRank on SDXL at rank 64)."""
        return sum(p.numel() for p in self.mask_parameters())

    def delta(self, name: str) -> torch.Tensor:
        """Dense merged ΔW of one layer (tests and tiny layers only)."""
        return self.layer(name).delta()

    # -- export ----------------------------------------------------------------------------------------
    def export(self, prune_threshold: float | None = None) -> LoRA:
        """The merge as a standard LoRA, pruned at ``prune_threshold`` (default: the merger's); see
        ``duolora.export.export_lora``."""
        return export_lora(self, prune_threshold)

    def kept_ranks(self, prune_threshold: float | None = None) -> dict[str, tuple[int, ...]]:
        """Per layer: the kept components of each LoRA after pruning, in tag order ((content, style) for a
        pair); see ``duolora.export.kept_ranks``."""
        return kept_ranks(self, prune_threshold)

    def extra_repr(self) -> str:
        return (f"method={self.method}, scope={self.scope}, layers={len(self.layers)}, "
                f"learned={len(self.learned_layers())}, trainable={self.trainable_parameters()}")


class DirectMerger(Merger):
    """ΔW = w_c·ΔW_c + w_s·ΔW_s on every shared layer (w_c on each content LoRA); nothing learned (docs/method.md §2,
    baseline)."""

    method = "direct"

    def _learned_layer(self, name: str, parts: Mapping[str, LowRank | None]) -> MergedLayer:
        return self._fixed_layer(name, parts, self.w_c, self.w_s)


class ZipLoRAMerger(Merger):
    """ZipLoRA: one learned mask entry per output (``side="out"``) or input (``side="in"``) feature.

    ΔW = diag(m_c)·ΔW_c + diag(m_s)·ΔW_s (out) or ΔW_c·diag(m_c) + ΔW_s·diag(m_s) (in); masks start at 1.
    """

    def __init__(self, content: LoRA | Sequence[LoRA], style: LoRA, *, side: str = "out", **kwargs: Any) -> None:
        if side not in (OUT, IN):
            raise MergerError(f"ZipLoRA side {side!r} must be 'out' or 'in'")
        self.side = side
        self.method = f"ziplora_{side}"
        self.mask_kind = side
        super().__init__(content, style, **kwargs)

    def _learned_layer(self, name: str, parts: Mapping[str, LowRank | None]) -> MergedLayer:
        template = next(lr for lr in parts.values() if lr is not None)
        return MergedLayer(name, template, self.side,
                           {t: None if lr is None else ((lr.B, lr.A), _ones_mask(self.side, lr))
                            for t, lr in parts.items()}, learned=True)


class ZipRankMerger(Merger):
    """ZipRank (DuoLoRA): ΔW = B_c·diag(m_c)·A_c + B_s·diag(m_s)·A_s, one learned entry per rank component.

    ``basis="svd"`` (default) re-factors both LoRAs once into their SVD bases (``svd_refactor_many``), so a zero
    mask entry removes one singular direction and Theorem 1 holds; ``basis="raw"`` masks the file's own
    B, A (the released code). Both start at m = 1, where they equal the direct merge exactly.
    """

    method = "ziprank"

    def __init__(self, content: LoRA | Sequence[LoRA], style: LoRA, *, basis: str = default("basis"), **kwargs: Any) -> None:
        if basis not in BASES:
            raise MergerError(f"ZipRank basis {basis!r} is not one of {', '.join(BASES)}")
        self.basis = basis
        self._svd_factors: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(content, style, **kwargs)

    def _prepare(self, loras: Mapping[str, LoRA], names: list[str]) -> None:
        """SVD basis: re-factor every LoRA of every learned layer at once (``svd_refactor_many`` batches the
        pairs of equal shapes), not layer by layer."""
        if self.basis != "svd":
            return
        keys = [(n, t) for n in names if self._learns(n, {t: lo.layers.get(n) for t, lo in loras.items()})
                for t, lo in loras.items() if n in lo.layers]
        refactored = svd_refactor_many([(loras[t].layers[n].B, loras[t].layers[n].A) for n, t in keys])
        self._svd_factors = dict(zip(keys, refactored))

    def _learned_layer(self, name: str, parts: Mapping[str, LowRank | None]) -> MergedLayer:
        out = {}
        for tag, lr in parts.items():
            if lr is None:
                out[tag] = None
                continue
            f = self._svd_factors.pop((name, tag)) if self.basis == "svd" else (lr.B, lr.A)
            out[tag] = (f, torch.ones(f[1].shape[0], device=f[1].device))
        template = next(lr for lr in parts.values() if lr is not None)
        return MergedLayer(name, template, RANK, out, learned=True)


class BLoRAMerger(Merger):
    """B-LoRA block selection (docs/method.md §7): the content LoRA only in output_blocks.0.1, the style LoRA
    only in output_blocks.1.1, no UNet update elsewhere; nothing learned.

    Every layer keeps both factors (with fixed 0/1 masks) so the adapter can still evaluate the
    content-only and style-only branches; the export drops the zero-masked components. Text-encoder
    parts pass through as a direct merge, as in every merger.
    """

    method = "b_lora"

    def __init__(self, content: LoRA | Sequence[LoRA], style: LoRA, **kwargs: Any) -> None:
        contents = content_list(content)
        check_content_count(self.method, [c.name for c in contents])
        super().__init__(contents, style, **kwargs)

    def _make_layer(self, name: str, parts: Mapping[str, LowRank | None]) -> MergedLayer:
        both = all(lr is not None for lr in parts.values())
        if name.startswith(TEXT_ENCODER_PREFIXES):
            if both:
                return self._fixed_layer(name, parts, self.w_c, self.w_s)
            return self._fixed_layer(name, parts, 1.0, 1.0)
        block = block_of(name)
        w_c = 1.0 if block == B_LORA_CONTENT_BLOCK else 0.0
        w_s = 1.0 if block == B_LORA_STYLE_BLOCK else 0.0
        return self._fixed_layer(name, parts, w_c, w_s)


def build_merger(method: str, content: LoRA | Sequence[LoRA], style: LoRA,
                 config: MergeConfig | None = None) -> Merger:
    """The merger ``method`` over the LoRAs (one content LoRA or several), with scope/basis/weights/threshold
    from ``config``.

    ``config`` is a ``duolora.config.MergeConfig`` (None: its defaults). Raises MergerError for an
    unknown method or basis, incompatible layer shapes, a learning method with no layer to learn, or
    several content LoRAs for a method that merges one (B-LoRA).
    """
    config = MergeConfig() if config is None else config
    scope = config.scope
    kwargs: dict[str, Any] = {"scope": scope, "w_c": config.w_c, "w_s": config.w_s,
                              "prune_threshold": config.prune_threshold, "max_rank": config.max_rank}
    if method == "ziprank":
        merger: Merger = ZipRankMerger(content, style, basis=config.basis, **kwargs)
    elif method in ("ziplora_out", "ziplora_in"):
        merger = ZipLoRAMerger(content, style, side=method.split("_")[1], **kwargs)
    elif method == "direct":
        merger = DirectMerger(content, style, **kwargs)
    elif method == "b_lora":
        merger = BLoRAMerger(content, style, **kwargs)
    else:
        raise MergerError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if method in ("ziprank", "ziplora_out", "ziplora_in") and not merger.learned_layers():
        contents = content_list(content)
        names = (f"the content LoRA {contents[0].name!r}" if len(contents) == 1
                 else "the content LoRAs " + ", ".join(repr(c.name) for c in contents))
        raise MergerError(
            f"{names} and the style LoRA {style.name!r} share no "
            f"{'attention ' if scope == 'attention' else ''}layer, so {method} has nothing to learn; "
            + ("try scope='all' or " if scope == "attention" else "")
            + "check that both LoRAs are for the same base model"
        )
    return merger


# -- parameter counts on shapes (no tensors) ------------------------------------------------------------
def trainable_count(method: str, out_features: int, in_features: int, rank_c: int, rank_s: int) -> int:
    """Trainable mask values of one learned layer, from shapes alone (svd basis: rank capped by out/in)."""
    if method == "ziprank":
        return min(rank_c, out_features, in_features) + min(rank_s, out_features, in_features)
    if method == "ziplora_out":
        return 2 * out_features
    if method == "ziplora_in":
        return 2 * in_features
    if method in ("direct", "b_lora"):
        return 0
    raise MergerError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")


def sdxl_attention_shapes() -> list[tuple[str, int, int]]:
    """(name, out, in) of SDXL's 560 attention projections, from ``duolora.sdxl.unet_layers`` (shapes only)."""
    from . import sdxl

    if not hasattr(sdxl, "unet_layers") or not hasattr(sdxl, "SDXL"):
        raise RuntimeError("duolora.sdxl.unet_layers is not available yet; the full SDXL layer table is needed")
    table = sdxl.unet_layers(sdxl.SDXL)
    shapes = []
    for layer in table.values() if isinstance(table, dict) else table:
        if layer.is_attention:
            shapes.append((layer.name, int(layer.shape[0]), int(layer.shape[1])))
    return shapes


def parameter_counts(rank: int = 64, rank_s: int | None = None,
                     shapes: list[tuple[str, int, int]] | None = None) -> dict[str, int]:
    """Trainable parameters of every merger over ``shapes`` (default: full SDXL attention), by method."""
    shapes = sdxl_attention_shapes() if shapes is None else shapes
    rank_s = rank if rank_s is None else rank_s
    return {m: sum(trainable_count(m, o, i, rank, rank_s) for _, o, i in shapes) for m in METHODS}


def print_parameter_counts(rank: int = 64) -> int:
    """``duolora params``: print each merger's trainable parameters on SDXL attention; returns exit code 0."""
    shapes = sdxl_attention_shapes()
    counts = parameter_counts(rank, shapes=shapes)
    print(f"Trainable parameters on SDXL attention ({len(shapes)} layers), both LoRAs at rank {rank}:")
    for method in METHODS:
        ratio = ""
        if method != "ziprank" and counts[method] and counts["ziprank"]:
            ratio = f"  ({counts[method] / counts['ziprank']:.1f}× ZipRank)"
        print(f"  {method:<12} {counts[method]:>12,}{ratio}")
    return 0
