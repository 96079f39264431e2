"""The per-layer quadratics of the fast merge modes (docs/method.md §5; the objective and why it is this one:
``duolora.solver``).

Each learned rank-mask layer's reconstruction terms L_i(m) = ‖Π_i·(ΔW_m − ΔW_i)·X_i‖² are quadratics in its masks
m, held as n×n matrices P_i (``LayerQuadratic``): from the LoRAs' own input subspaces (``weights_quadratics``, the
weights-only mode) or from recorded layer inputs (``activation_quadratic``, the layer-wise mode, statistics from
``duolora.recording``). ``duolora.boxqp`` minimises them with the priors on the box [0, 1].

**Gram form (exact, no dense ΔW).** ΔW_m − ΔW_c = B·diag(m − e_c)·A with B = [B_c | B_s], A = [A_c; A_s] and
e_c = [1…1; 0…0], so L_c(m) = (m − e_c)ᵀ·(H_c ∘ K_c)·(m − e_c) with H_c = (Π_c·B)ᵀ(Π_c·B) and
K_c = A·X_c·X_cᵀ·Aᵀ, both n×n (``∘``: element-wise product). H_c differs from BᵀB only in its style block,
C_csᵀ·(B_cᵀB_c)⁺·C_cs with C_cs = B_cᵀB_s (``own_output_grams``), so no out×out projector is formed. In the
SVD basis the diagonal blocks of BᵀB and of A·Aᵀ are diag(σ), so a layer costs two thin (out·r_c·r_s and
in·r_c·r_s) products. The tests check the Gram form against the dense loss.

**Scope.** Rank masks only (``ziprank``; ``direct`` and ``b_lora`` learn nothing and pass through). ZipLoRA's
feature masks couple every input feature through X·Xᵀ (an in×in problem), so ``ziplora_in``/``ziplora_out``
are refused with a message pointing to paper mode. The Constyle cycle terms are not modelled by either fast
mode: their targets come from two chained predictions, not from one layer's inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .mergedlayer import RANK, MergedLayer, component_weights
from .mergers import MergerError
from .svdbasis import SVD_BATCH, svd_refactor_many

FAST_METHODS: tuple[str, ...] = ("ziprank", "direct", "b_lora")


class FastModeError(MergerError):
    """A merge the fast modes cannot do; the message says what to use instead."""


def check_method(method: str, mode: str = "weights") -> None:
    """Raise FastModeError unless ``method`` works in the fast ``mode``."""
    if method in FAST_METHODS:
        return
    raise FastModeError(
        f"the {mode!r} mode solves ZipRank's rank masks; method {method!r} learns per-feature masks, whose "
        f"per-layer problem couples every input feature. Use method 'ziprank' (or 'direct'/'b_lora'), or "
        f"mode 'paper' for {method}."
    )


# ---------------------------------------------------------------------------------------------------------
# The per-layer quadratic
# ---------------------------------------------------------------------------------------------------------

@dataclass
class LayerQuadratic:
    """One learned layer's reconstruction terms as quadratics in its masks m = [m_1; …; m_P], one mask per LoRA
    that patches the layer (``tags``, in the merger's order; n = Σ r_i).

    L_i(m) = (m − e_i)ᵀ·P_i·(m − e_i), P_i = H_i ∘ K_i (n×n, float64, PSD), e_i the masks of LoRA i alone. A
    one-pair layer has two: ``P_c`` (content) and ``P_s`` (style), in m = [m_c; m_s].
    """

    name: str
    tags: tuple[str, ...]
    ranks: tuple[int, ...]
    P: tuple[torch.Tensor, ...]
    # σᵢ of each LoRA's components (``mergedlayer.component_weights``), float64; None (or empty): all ones.
    sigmas: tuple[torch.Tensor | None, ...] = ()

    @property
    def r_c(self) -> int:
        return self.ranks[0]

    @property
    def r_s(self) -> int:
        return self.ranks[-1]

    @property
    def P_c(self) -> torch.Tensor:
        return self.P[0]

    @property
    def P_s(self) -> torch.Tensor:
        return self.P[-1]

    @property
    def n(self) -> int:
        return sum(self.ranks)

    def slices(self) -> list[slice]:
        """Where each LoRA's entries sit in m."""
        return mask_slices(self.ranks)

    def shares(self) -> tuple[torch.Tensor, ...]:
        """Each component's share of its LoRA's nuclear norm, one (r_i,) float64 tensor per LoRA summing to 1."""
        out = []
        for i, r in enumerate(self.ranks):
            sigma = self.sigmas[i] if i < len(self.sigmas) else None
            w = torch.ones(r, dtype=torch.float64) if sigma is None else sigma.double().cpu()
            total = float(w.sum())
            out.append(w / total if total > 0 else torch.full((r,), 1.0 / max(r, 1), dtype=torch.float64))
        return tuple(out)

    def targets(self) -> tuple[torch.Tensor, ...]:
        """(e_1, …, e_P): the masks of each LoRA alone ((e_c, e_s) for a pair), each (n,) float64."""
        out = []
        for sl in self.slices():
            e = torch.zeros(self.n, dtype=torch.float64)
            e[sl] = 1.0
            out.append(e)
        return tuple(out)

    def losses(self, *masks: torch.Tensor) -> tuple[float, ...]:
        """(L_1, …, L_P) at the masks (one per LoRA: m_c (r_c,), m_s (r_s,) for a pair), unnormalised."""
        m = torch.cat([mask.detach().double().cpu() for mask in masks])[None]
        losses = reconstruction_losses([P[None] for P in self.P], self.targets(), m)
        return tuple(float(L[0]) for L in losses)

    def scale(self) -> float:
        """N = Σ L_i at m = 0: the LoRAs' own effect on their own inputs (the normaliser)."""
        parts = [e @ P @ e for e, P in zip(self.targets(), self.P)]
        return float(sum_in_order(parts))


def reconstruction_losses(P: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                          m: torch.Tensor) -> list[torch.Tensor]:
    """(L_1, …, L_P) of L layers at masks m (L, n): L_i = (m − e_i)ᵀ·P_i·(m − e_i), one (L,) tensor per LoRA;
    P_i (L, n, n) and m float64, e_i (n,) (``LayerQuadratic.targets``). The batched solver minimises the same
    quadratic in its expanded form mᵀ·P·m − 2·qᵀ·m + const (``duolora.boxqp``)."""
    return [((m - e) * batched_matvec(P_i, m - e)).sum(1) for e, P_i in zip(targets, P)]


def mask_slices(ranks: Sequence[int]) -> list[slice]:
    out, lo = [], 0
    for r in ranks:
        out.append(slice(lo, lo + r))
        lo += r
    return out


def sum_in_order(values: Sequence):
    """values[0] + values[1] + … in that order (a one-element list is its element, unchanged)."""
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


def _rank_layer(layer: MergedLayer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(B, A) as float32 of every LoRA that patches a rank-mask layer, in tag order."""
    if layer.kind != RANK or len(layer.present) < 2:
        raise FastModeError(f"layer {layer.name}: the fast modes need rank masks of at least two LoRAs")
    return [(B.float(), A.float()) for B, A in (layer.factors(t) for t in layer.present)]


def _block_gram(xs: Sequence[torch.Tensor], diagonal_blocks: bool) -> torch.Tensor:
    """[x_1 | … | x_P]ᵀ·[x_1 | … | x_P] as float64 (…, n, n); x_i (…, d, r_i) (leading dims: a batch).

    ``diagonal_blocks``: the columns of each part are orthogonal (SVD basis), so its own block is the
    diagonal of squared column norms and only the cross blocks need a product (a quarter of the work for a pair).
    """
    # float64 products: the own-output projector pseudo-inverts the up factors' Grams down to (1e-6)² of their
    # largest eigenvalue, far below float32's resolution of a Gram (~1e-7 of it) — in the raw basis an
    # ill-conditioned up factor would otherwise give an indefinite P. The factors are r columns wide: cheap.
    xs = [x.double() for x in xs]
    sl = mask_slices([x.shape[-1] for x in xs])
    n = sl[-1].stop
    g = torch.zeros(*xs[0].shape[:-2], n, n, dtype=torch.float64, device=xs[0].device)
    for i, a in enumerate(xs):
        for j in range(i + 1, len(xs)):
            cross = a.transpose(-1, -2) @ xs[j]
            g[..., sl[i], sl[j]] = cross
            g[..., sl[j], sl[i]] = cross.transpose(-1, -2)
    for i, a in enumerate(xs):
        if diagonal_blocks:
            g[..., sl[i], sl[i]] = torch.diag_embed(a.square().sum(-2))
        else:
            g[..., sl[i], sl[i]] = a.transpose(-1, -2) @ a
    return g


# Singular values of a LoRA's up factor below this fraction of its largest one span no output direction (a
# zero-padded or numerically dependent component), so the projector onto its outputs ignores them.
OUTPUT_RTOL = 1e-6


def own_output_grams(H: torch.Tensor, ranks: int | Sequence[int]) -> tuple[torch.Tensor, ...]:
    """(H_1, …, H_P): the Gram H = BᵀB of B = [B_1 | … | B_P] (…, n, n) seen through each LoRA's own output
    space; ``ranks``: the parts' ranks (an int r_c: a pair [B_c | B_s]).

    H_i = (Π_i·B)ᵀ(Π_i·B) with Π_i the orthogonal projector onto col(B_i): each block between two other LoRAs
    j, k becomes C_ijᵀ·(B_iᵀB_i)⁺·C_ik with C_ij = B_iᵀB_j (for a pair only the other LoRA's own block
    changes), the blocks that involve B_i stay, so everything stays r-sized (no out×out projector), and Π_i
    depends only on col(B_i) — not on how a file factors ΔW_i, nor on zero-padded components (the
    pseudo-inverse drops singular values below ``OUTPUT_RTOL`` of the largest).
    """
    H = H.double()
    n = H.shape[-1]
    ranks = (ranks, n - ranks) if isinstance(ranks, int) else tuple(ranks)
    sl = mask_slices(ranks)

    def cross(i: int, j: int) -> torch.Tensor:
        """B_jᵀB_i (r_j × r_i), read from the block above the diagonal (as a view)."""
        return H[..., sl[j], sl[i]] if j < i else H[..., sl[i], sl[j]].transpose(-1, -2)

    out = []
    for i in range(len(ranks)):
        H_i = H.clone()
        inverse = torch.linalg.pinv(H[..., sl[i], sl[i]], rtol=OUTPUT_RTOL ** 2, hermitian=True)
        others = [j for j in range(len(ranks)) if j != i]
        for j in others:
            for k in others:
                H_i[..., sl[j], sl[k]] = cross(i, j) @ inverse @ cross(i, k).transpose(-1, -2)
        out.append(H_i)
    return tuple(out)


def weights_quadratic(layer: MergedLayer, svd_basis: bool = True) -> LayerQuadratic:
    """The weights-only problem of one rank-mask layer (``duolora.solver``'s docstring): K_i = g_i·g_iᵀ, g_i = A·A'_iᵀ.

    ``svd_basis``: the layer's factors are already in the SVD basis (``ZipRankMerger(basis="svd")``), so
    A'_i = A_i and the self Grams are diagonal. Otherwise each A'_i is computed with ``svdbasis.svd_refactor_many``.
    """
    return weights_quadratics([layer], svd_basis)[0]


def weights_quadratics(layers: Sequence[MergedLayer], svd_basis: bool = True,
                       batch: int = SVD_BATCH) -> list[LayerQuadratic]:
    """``weights_quadratic`` of every layer, in order; layers of equal factor shapes (and device) share
    batched products, up to ``batch`` layers at a time (SDXL's 560 attention layers come in 4 shapes)."""
    groups: dict[tuple, list[int]] = {}
    factors = [_rank_layer(layer) for layer in layers]
    for i, f in enumerate(factors):
        key = (layers[i].present, *(tuple(t.shape) for pair in f for t in pair), f[0][0].device)
        groups.setdefault(key, []).append(i)
    out: list[LayerQuadratic | None] = [None] * len(layers)
    for idx in groups.values():
        for lo in range(0, len(idx), max(1, int(batch))):
            part = idx[lo:lo + max(1, int(batch))]
            n_parts = len(factors[part[0]])
            Bs = [torch.stack([factors[i][p][0] for i in part]) for p in range(n_parts)]
            As = [torch.stack([factors[i][p][1] for i in part]) for p in range(n_parts)]
            ranks = tuple(int(A.shape[1]) for A in As)
            sl = mask_slices(ranks)
            H = _block_gram(Bs, svd_basis)
            if svd_basis:
                G = _block_gram([A.transpose(1, 2) for A in As], True)  # A·Aᵀ
                gs = [G[..., s] for s in sl]
            else:
                A = torch.cat(As, dim=1)
                refactored = svd_refactor_many([factors[i][p] for p in range(n_parts) for i in part])
                gs = []
                for p in range(n_parts):
                    a_p = torch.stack([a for _, a in refactored[p * len(part):(p + 1) * len(part)]]).to(A)
                    gs.append((A @ a_p.transpose(1, 2)).double())
            Ps = [(H_p * (g @ g.transpose(1, 2))).cpu() for H_p, g in zip(own_output_grams(H, ranks), gs)]
            for j, i in enumerate(part):
                out[i] = LayerQuadratic(layers[i].name, layers[i].present, ranks, tuple(P[j] for P in Ps),
                                        _sigmas(layers[i]))
    return out  # type: ignore[return-value]


@dataclass
class LayerActivations:
    """Recorded input statistics of one layer, per LoRA that patches it (its tag): K = A·E[x xᵀ]·Aᵀ (n×n,
    float64, A = [A_1; …; A_P] the layer's stacked down factors) on that LoRA's side, and its token count."""

    K: dict[str, torch.Tensor]
    tokens: dict[str, int]

    @property
    def K_c(self) -> torch.Tensor:
        return self.K["c"]

    @property
    def K_s(self) -> torch.Tensor:
        return self.K["s"]

    @property
    def tokens_c(self) -> int:
        return self.tokens["c"]

    @property
    def tokens_s(self) -> int:
        return self.tokens["s"]


def activation_quadratic(layer: MergedLayer, stats: LayerActivations) -> LayerQuadratic:
    """The layer-wise problem of one rank-mask layer from its recorded statistics: P_i = H_i ∘ K_i."""
    factors = _rank_layer(layer)
    ranks = tuple(layer.rank(t) for t in layer.present)
    svd_like = False  # the recorder's K is exact in any basis; H's blocks are only diagonal in the SVD one
    Hs = own_output_grams(_block_gram([B for B, _ in factors], svd_like).cpu(), ranks)
    return LayerQuadratic(layer.name, layer.present, ranks,
                          tuple(H_i * stats.K[t].cpu() for H_i, t in zip(Hs, layer.present)), _sigmas(layer))


def _sigmas(layer: MergedLayer) -> tuple[torch.Tensor, ...]:
    return tuple(component_weights(layer, t).double().cpu() for t in layer.present)


def batched_matvec(P: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """P·m per layer for symmetric P (L, n, n), m (L, n): computed as mᵀ·P, a batched row-vector product, which
    on the CPU is ~1.5× faster than (P·m[:, None, :]).sum(-1) and ~6× faster than a batched P·m."""
    return torch.bmm(m[:, None, :], P)[:, 0]
