"""The export of a merger as a standard LoRA (docs/method.md §2, last paragraph), with the adaptive rank.

Every merger exports exactly as a LoRA of rank r_c + r_s: B_m = [B_c·diag(m_c) | B_s·diag(m_s)],
A_m = [A_c; A_s]; with K content LoRAs, rank Σ r_i: B_m = [B_c1·diag(m_c1) | … | B_cK·diag(m_cK) | B_s·diag(m_s)].
Feature masks (ZipLoRA) fold into B's rows (``out``) or A's columns (``in``) instead. Components whose mask entry
is below the prune threshold (or exactly 0) are dropped, so the exported rank is what the masks keep; the rest is
exact: B_m·A_m equals the merger's ΔW with the pruned entries set to zero.

``Merger.export`` and ``Merger.kept_ranks`` call ``export_lora`` and ``kept_ranks``; the streaming weights-only
merge spells its output with ``agreed_value`` as the export does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .config import DEFAULT_PRUNE_THRESHOLD
from .lora import LoRA, LowRank
from .mergedlayer import RANK, MergedLayer, component_weights

if TYPE_CHECKING:
    from .mergers import Merger


def agreed_value(values: Sequence[Any], default: Any) -> Any:
    """The inputs' common value (their key style, base model or dtype), or ``default`` when they differ: the
    export is spelled and typed like its inputs when they all agree."""
    return values[0] if all(v == values[0] for v in values) else default


def kept_factors(layer: MergedLayer, which: str, threshold: float,
                 max_rank: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(keep (r,) bool, B_eff, A_eff) of LoRA ``which`` of ``layer`` after pruning mask entries with
    |m| < threshold (and exact zeros); None when that LoRA does not patch the layer.

    ``max_rank`` > 0 (rank masks only): of what survives, keep at most that many components, those with
    the largest σᵢ·|mᵢ| (their weight in the masked update's nuclear norm, ``component_weights``).
    """
    f = layer.factors(which)
    if f is None:
        return None
    m = layer.mask(which).detach()
    pruned = torch.where((m.abs() < threshold) | (m == 0), torch.zeros_like(m), m)
    if max_rank > 0 and layer.kind == RANK and int((pruned != 0).sum()) > max_rank:
        weight = component_weights(layer, which).to(pruned.device) * pruned.abs()
        keep_idx = torch.topk(weight, max_rank).indices
        pruned = torch.zeros_like(pruned).index_copy_(0, keep_idx, pruned[keep_idx])
    B_eff, A_eff = layer.masked_factors(which, pruned)
    if layer.kind == RANK:
        keep = pruned != 0
    else:
        # Feature masks zero rows of B or columns of A; a component survives while both of its
        # factors still have a non-zero entry.
        keep = (B_eff.abs().amax(dim=0) > 0) & (A_eff.abs().amax(dim=1) > 0)
    return keep, B_eff.detach(), A_eff.detach()


def kept_components(layer: MergedLayer, threshold: float = DEFAULT_PRUNE_THRESHOLD,
                    max_rank: int = 0) -> tuple[int, ...]:
    """How many rank components of each LoRA the export keeps of ``layer``, in tag order ((content, style) for a
    pair)."""
    out = []
    for which in layer.tags:
        k = kept_factors(layer, which, threshold, max_rank)
        out.append(0 if k is None else int(k[0].sum()))
    return tuple(out)


def export_factors(layer: MergedLayer, threshold: float = DEFAULT_PRUNE_THRESHOLD,
                   max_rank: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The exported factors of ``layer``: (out, k), (k, in·kh·kw), k = kept components; None if nothing is
    kept."""
    Bs, As = [], []
    for which in layer.tags:
        k = kept_factors(layer, which, threshold, max_rank)
        if k is None:
            continue
        keep, B_eff, A_eff = k
        if not bool(keep.all()):
            # index_select with positions is several times faster than boolean indexing on the CPU.
            idx = keep.nonzero().squeeze(1)
            B_eff, A_eff = B_eff.index_select(1, idx), A_eff.index_select(0, idx)
        Bs.append(B_eff)
        As.append(A_eff)
    if not Bs or sum(b.shape[1] for b in Bs) == 0:
        return None
    return torch.cat(Bs, dim=1).contiguous(), torch.cat(As, dim=0).contiguous()


def export_lora(merger: Merger, prune_threshold: float | None = None) -> LoRA:
    """The merge as a standard LoRA: per layer rank r_c + r_s (Σ r_i over every LoRA) minus pruned components.

    Components whose mask satisfies |m| < ``prune_threshold`` (default: the merger's, 1e-3) or m = 0
    are dropped (the "adaptive rank", docs/method.md §2); layers with nothing left are omitted. The rest is
    exact: B_m·A_m equals the merger's ΔW with the pruned mask entries set to zero. Tensors are float32
    on the CPU with the scale folded into ``up`` (so a writer stores alpha = rank); ``key_style``,
    ``base`` and ``dtype`` are the inputs' when all agree. ``duolora_content`` names the content LoRAs
    joined by " + ". The merger's ``max_rank`` (the opt-in rank
    budget) caps the components each LoRA keeps per LEARNED layer (see ``kept_factors``); fixed layers
    keep their files' components.
    ``patches`` are the inputs' bias/norm
    differences, w_c·d_c + w_s·d_s where several have one (``lora.merge_patches``).
    """
    threshold = merger.prune_threshold if prune_threshold is None else float(prune_threshold)
    layers: dict[str, LowRank] = {}
    with torch.no_grad():
        for name, layer in merger.items():
            ex = export_factors(layer, threshold, merger.max_rank if layer.learned else 0)
            if ex is None:
                continue
            layers[name] = layer.template.with_factors(ex[0].cpu(), ex[1].cpu())
    metadata = {
        "duolora_method": merger.method,
        "duolora_content": merger.content_name,
        "duolora_style": merger.style_name,
        "duolora_scope": merger.scope,
        "duolora_prune_threshold": repr(threshold),
    }
    basis = getattr(merger, "basis", None)
    if basis is not None:
        metadata["duolora_basis"] = basis
    return LoRA(layers=layers, metadata=metadata, source=None, key_style=merger.export_key_style,
                base=merger.export_base, dtype=merger.export_dtype, patches=dict(merger.patches))


def kept_ranks(merger: Merger, prune_threshold: float | None = None) -> dict[str, tuple[int, ...]]:
    """Per layer: the kept components of each LoRA after pruning, in tag order ((content, style) for a
    pair)."""
    threshold = merger.prune_threshold if prune_threshold is None else float(prune_threshold)
    with torch.no_grad():
        return {name: kept_components(layer, threshold, merger.max_rank if layer.learned else 0)
                for name, layer in merger.items()}
