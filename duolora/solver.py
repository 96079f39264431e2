"""The per-layer solver of the fast merge modes (docs/method.md §5): ZipRank masks without the paper's 100 steps.

Both modes choose, layer by layer, the rank masks m = [m_c; m_s] (n = r_c + r_s entries) of the merged update
ΔW_m = B_c·diag(m_c)·A_c + B_s·diag(m_s)·A_s by minimising a per-layer version of the paper's two
reconstruction terms, each seen through its own LoRA's output space,

    L_c(m) = ‖Π_c·(ΔW_m − ΔW_c)·X_c‖²,    L_s(m) = ‖Π_s·(ΔW_m − ΔW_s)·X_s‖²,

where Π_c, Π_s project onto col(B_c), col(B_s) (the directions each LoRA writes) and X_c, X_s are the layer's
inputs on the content and on the style side:

* ``weights`` (no model, no images): X_c = A'_cᵀ, the content LoRA's own input subspace, weighted by its
  singular values (A'_c = Σ_c^½·V_cᵀ is the SVD-basis down factor, so X_c·X_cᵀ = (ΔW_cᵀΔW_c)^½ does not
  depend on how a file happens to factor ΔW_c); likewise X_s = A'_sᵀ.
* ``layerwise`` (activation-aware): X_c holds the inputs the layer really sees when the content-only model
  denoises the content references at a few noise levels, X_s the inputs under the style-only model on the
  style references — exactly the target branches of L_c and L_s in paper mode, so to first order in ΔW the
  paper's ε-space reconstruction error is a positive combination of these per-layer terms. One forward pass
  (no backward) per reference records, per layer, only the r×r projections K = A·E[x xᵀ]·Aᵀ with
  A = [A_c; A_s] (``duolora.recording``).

**Gram form (exact, no dense ΔW).** ΔW_m − ΔW_c = B·diag(m − e_c)·A with B = [B_c | B_s], A = [A_c; A_s] and
e_c = [1…1; 0…0], so L_c(m) = (m − e_c)ᵀ·(H_c ∘ K_c)·(m − e_c) with H_c = (Π_c·B)ᵀ(Π_c·B) and
K_c = A·X_c·X_cᵀ·Aᵀ, both n×n (``∘``: element-wise product). H_c differs from BᵀB only in its style block,
C_csᵀ·(B_cᵀB_c)⁺·C_cs with C_cs = B_cᵀB_s (``own_output_grams``), so no out×out projector is formed. In the
SVD basis the diagonal blocks of BᵀB and of A·Aᵀ are diag(σ), so a layer costs two thin (out·r_c·r_s and
in·r_c·r_s) products. The tests check the Gram form against the dense loss.

**Why this objective [decided, measured].** A pure self-reconstruction ‖ΔW_m − ΔW_c‖_F² + ‖ΔW_m − ΔW_s‖_F² is
minimised at ΔW_m = (ΔW_c + ΔW_s)/2: it halves both LoRAs even where they never meet. Restricting each term
to its LoRA's own inputs (X_c, X_s) is not enough: the style LoRA acting on the content inputs is exactly
what a merge is for (the subject drawn in the style), yet ‖(ΔW_m − ΔW_c)·X_c‖² counts all of it as error,
and where both LoRAs read similar inputs (every layer of a real model, and both sides of the layer-wise
mode) the minimiser sits near m = ½ — both LoRAs at half strength; on MiniBench 2 that full-output form
lost the style (layer-wise style hit 14.8 % vs the direct merge's 41.1 %, test split, 2026-11-30). Seen
through its own output space, each term counts only what the other LoRA writes INTO the directions this
LoRA writes — real interference. L_c + L_s is then zero at the direct merge (all masks 1) whenever the two
LoRAs write disjoint output spaces or read disjoint input spaces, and the minimiser trades off, per
singular direction, only where they collide in both.

**Scale and priors [decided].** Per layer the reconstruction is divided by N = ‖ΔW_c·X_c‖² + ‖ΔW_s·X_s‖² (what
is lost when both masks are 0), so it reads "fraction of the two LoRAs' own effect lost" and needs no unit.
The layer priors (docs/method.md §3) enter in the same units through the penalty paper mode uses
(``duolora.priors.prior_penalty``):
the ``share_hinge`` form ν·max(0, ρ_other − ρ_dom + margin) with weight λ_prior per layer (ρ is already a
fraction of each LoRA), the L1 forms (``hinge``: κ·‖m_dom‖₁ + ν·max(0, ‖m_other‖₁ − ‖m_dom‖₁ + margin), or
``code_compat``) with weight λ_prior/r_dom, so λ_prior = 0.1 means "keeping the whole dominant LoRA at mask 1 is
worth 10 % of this layer's reconstruction". The similarity term λ_sim·mean(m_c ⊙ m_s) is included as in paper
mode (``duolora.objective.mask_similarity``; 0 for ZipRank).

**Solver [decided].** Masks are kept in the box [0, 1] (a mask attenuates; it also keeps the problem well
posed when H ∘ K is singular). On the box ‖m‖₁ = Σm and ρ = Σ shareᵢ·mᵢ are linear and the hinge of two
linear functions is convex, so with the ``share_hinge`` or ``hinge`` prior each layer is a small convex problem.
It starts from the closed-form minimiser of the quadratic part (one (r_c + r_s)-sized linear solve, clipped into the box) and
runs accelerated projected (sub)gradient steps (FISTA with restart, Jacobi-preconditioned, all layers of
equal ranks batched). The prior initialisation of paper mode (``prior_init``) is NOT used as a start: the
minimiser of a convex problem does not depend on it, so both fast modes are deterministic (the seed only
draws the layer-wise mode's noise levels and noise).

**Scope.** Rank masks only (``ziprank``; ``direct`` and ``b_lora`` learn nothing and pass through). ZipLoRA's
feature masks couple every input feature through X·Xᵀ (an in×in problem), so ``ziplora_in``/``ziplora_out``
are refused with a message pointing to paper mode. The Constyle cycle terms are not modelled by either fast
mode: their targets come from two chained predictions, not from one layer's inputs.

Where the parts live: this module builds and solves the per-layer problems (``solve_weights``,
``solve_layerwise``); ``duolora.recording`` records the layer-wise mode's statistics with forward hooks;
``duolora.streaming`` runs the weights-only mode over two files a chunk of layers at a time;
``duolora.engine.run_merge`` chooses between them and paper mode.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .config import MergeConfig
from .lora import LoRA
from .mergers import (
    RANK,
    STYLE_TAG,
    SVD_BATCH,
    MergedLayer,
    Merger,
    MergerError,
    build_merger,
    component_weights,
    svd_refactor_many,
)
from .objective import mask_similarity
from .optimize import MergeResult
from .priors import CONTENT, STYLE, prior_pairs, prior_penalty, prior_role

FAST_METHODS: tuple[str, ...] = ("ziprank", "direct", "b_lora")
# Projected-gradient iterations of the per-layer solve (it stops earlier once the masks stop moving).
SOLVER_ITERATIONS = 300
SOLVER_TOLERANCE = 1e-6


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
    # σᵢ of each LoRA's components (``mergers.component_weights``), float64; None (or empty): all ones.
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
        return _slices(self.ranks)

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
        return float(_sum(parts))


def reconstruction_losses(P: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                          m: torch.Tensor) -> list[torch.Tensor]:
    """(L_1, …, L_P) of L layers at masks m (L, n): L_i = (m − e_i)ᵀ·P_i·(m − e_i), one (L,) tensor per LoRA;
    P_i (L, n, n) and m float64, e_i (n,) (``LayerQuadratic.targets``). The batched solver minimises the same
    quadratic in its expanded form mᵀ·P·m − 2·qᵀ·m + const (``_group``)."""
    return [((m - e) * _matvec(P_i, m - e)).sum(1) for e, P_i in zip(targets, P)]


def _slices(ranks: Sequence[int]) -> list[slice]:
    out, lo = [], 0
    for r in ranks:
        out.append(slice(lo, lo + r))
        lo += r
    return out


def _sum(values: Sequence):
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
    sl = _slices([x.shape[-1] for x in xs])
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
    sl = _slices(ranks)

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
    """The weights-only problem of one rank-mask layer (module docstring): K_i = g_i·g_iᵀ, g_i = A·A'_iᵀ.

    ``svd_basis``: the layer's factors are already in the SVD basis (``ZipRankMerger(basis="svd")``), so
    A'_i = A_i and the self Grams are diagonal. Otherwise each A'_i is computed with ``svd_refactor``.
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
            sl = _slices(ranks)
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


# ---------------------------------------------------------------------------------------------------------
# The fast objective's weights
# ---------------------------------------------------------------------------------------------------------

@dataclass
class _Terms:
    """Per-layer weights of the fast objective (see the module docstring)."""

    lam_c: float
    lam_s: float
    lam_prior: float
    lam_sim: float
    kind: str
    kappa: float
    nu: float
    margin: float
    keep: float = 0.0

    @classmethod
    def from_config(cls, config: MergeConfig) -> _Terms:
        return cls(*config.reconstruction_weights,
                   float(config.lambda_prior) if config.prior_loss else 0.0, float(config.effective_lambda_sim),
                   config.prior_loss_kind, float(config.kappa), float(config.nu), float(config.margin),
                   float(config.fast_keep))


def _term(tag: str) -> str:
    """The history name of a LoRA's reconstruction term: "content", "content2", …, "style"."""
    if tag == STYLE_TAG:
        return "style"
    return "content" if tag == "c" else f"content{tag[1:]}"


def _pair_slices(tags: Sequence[str], ranks: Sequence[int], role: str | None) -> list[tuple[slice, slice]]:
    """(dominant, other) entries of m for each prior pair of a layer (``priors.prior_pairs``)."""
    if role not in (CONTENT, STYLE):
        return []
    where = dict(zip(tags, _slices(ranks)))
    return [(where[d], where[o]) for d, o in prior_pairs(tags, role)]


def _similar_pairs(ranks: Sequence[int]) -> list[tuple[int, int, int]]:
    """(offset a, offset b, k) of every pair of LoRAs whose first k = min(r_a, r_b) mask entries the
    similarity term pairs."""
    sl = _slices(ranks)
    return [(sl[a].start, sl[b].start, min(ranks[a], ranks[b]))
            for a in range(len(ranks)) for b in range(a + 1, len(ranks))]


# ---------------------------------------------------------------------------------------------------------
# The batched solver
# ---------------------------------------------------------------------------------------------------------

@dataclass
class _Group:
    """L layers of equal LoRAs and ranks as one batch: f(m) = mᵀ·P·m − 2·qᵀ·m + lin·m (+ hinge / L2 priors).

    One prior pair per content LoRA (with the style LoRA): pair h's hinge reads ``dom[:, h]`` and
    ``other[:, h]`` and weighs ``w[:, h]``.
    """

    P: torch.Tensor  # (L, n, n) float64, symmetric
    q: torch.Tensor  # (L, n)
    const: torch.Tensor  # (L,): f(m) + const is the normalised reconstruction (+ similarity) term
    dom: torch.Tensor  # (L, H, n) the dominant mask's entries of each prior pair (prior layers only)
    other: torch.Tensor  # (L, H, n) the other mask's entries
    w: torch.Tensor  # (L, H) λ_prior (share form) or λ_prior / r_dom on prior layers, else 0
    s: torch.Tensor  # (L, n) Jacobi scaling √diag(P)
    step: torch.Tensor  # (L, 1) 1 / Lipschitz constant of the preconditioned gradient
    P32: torch.Tensor | None = None  # float32 copy of P for the iterations


def _group(problems: list[LayerQuadratic], roles: list[str | None], terms: _Terms) -> _Group:
    tags, ranks = problems[0].tags, problems[0].ranks
    sl = _slices(ranks)
    n, L = sl[-1].stop, len(problems)
    Ps = [torch.stack([p.P[i] for p in problems]) for i in range(len(ranks))]
    # e_iᵀ·P_i·e_i is the sum of P_i's own block; P_i·e_i the row sums of its own columns.
    pe = [P_i[:, :, s].sum(2) for P_i, s in zip(Ps, sl)]
    own = [pe_i[:, s].sum(1) for pe_i, s in zip(pe, sl)]
    scale = _sum(own)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    lam = [terms.lam_s if t == STYLE_TAG else terms.lam_c for t in tags]
    P = _sum([w * P_i for w, P_i in zip(lam, Ps)]) / scale[:, None, None]
    q = _sum([w * pe_i for w, pe_i in zip(lam, pe)]) / scale[:, None]
    const = _sum([w * own_i for w, own_i in zip(lam, own)]) / scale
    del Ps
    pairs = _similar_pairs(ranks)
    for a, b, k in pairs:
        if terms.lam_sim and k:
            # λ_sim·mean over pairs of mean_i(m_a,i·m_b,i) = mᵀ·S·m, S[a + i, b + i] = S[b + i, a + i] =
            # λ_sim / (2k·pairs) (masks are ≥ 0).
            idx = torch.arange(k)
            P[:, a + idx, b + idx] += terms.lam_sim / (2 * k * len(pairs))
            P[:, b + idx, a + idx] += terms.lam_sim / (2 * k * len(pairs))
    shares = torch.stack([torch.cat(p.shares()) for p in problems])  # (L, n): each LoRA's part sums to 1
    if terms.keep:
        # keep·Σᵢ shareᵢ·(1 − mᵢ)² per LoRA: mᵀ·diag(keep·share)·m − 2·(keep·share)ᵀ·m + keep·Σ share.
        P = P + torch.diag_embed(terms.keep * shares)
        q = q + terms.keep * shares
        const = const + terms.keep * shares.sum(1)
    P = 0.5 * (P + P.transpose(1, 2))
    n_pairs = len(prior_pairs(tags, CONTENT))
    dom = torch.zeros(L, n_pairs, n, dtype=torch.float64)
    other = torch.zeros(L, n_pairs, n, dtype=torch.float64)
    w = torch.zeros(L, n_pairs, dtype=torch.float64)
    for i, role in enumerate(roles):
        if not terms.lam_prior:
            continue
        for h, (d, o) in enumerate(_pair_slices(tags, ranks, role)):
            if terms.kind == "share_hinge":
                # ρ = Σ shareᵢ·mᵢ on the box: the hinge ν·max(0, ρ_other − ρ_dom + δ) is linear inside.
                dom[i, h, d] = shares[i, d]
                other[i, h, o] = shares[i, o]
                w[i, h] = terms.lam_prior
                continue
            dom[i, h, d] = 1.0
            other[i, h, o] = 1.0
            w[i, h] = terms.lam_prior / (d.stop - d.start)
    # Jacobi preconditioning: u = s ⊙ m, s = √diag(P), so the Hessian in u has a unit diagonal (the
    # two LoRAs interfere weakly, so it is close to the identity and a few steps converge).
    # A layer whose two ΔW are zero (P = 0: factors saved before training) has a constant objective; s = 1
    # there, as a floor of ~1e-150 would underflow to 0 in the float32 iterations and divide 0 by 0.
    diag = torch.diagonal(P, dim1=1, dim2=2).clamp_min(0)
    top = diag.amax(dim=1, keepdim=True)
    floor = torch.where(top > 0, top * 1e-12, torch.ones_like(top))
    s = diag.clamp_min(floor).sqrt()
    return _Group(P, q, const, dom, other, w, s, (1.0 / _lipschitz(P, s))[:, None])


def _lipschitz(P: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """An upper bound (L,) of 2·λ_max(D^-½·P·D^-½) with D = diag(s²): a power-iteration estimate with a
    20 % margin, never above Gershgorin's bound (which is always safe)."""
    Pt = P / s[:, :, None] / s[:, None, :]
    gershgorin = Pt.abs().sum(2).amax(1)
    v = torch.ones(Pt.shape[:2], dtype=Pt.dtype)
    for _ in range(10):
        v = _matvec(Pt, v)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    estimate = (v * _matvec(Pt, v)).sum(1)
    return 2.0 * torch.minimum(1.2 * estimate, gershgorin).clamp_min(1e-12)


def _matvec(P: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """P·m per layer for symmetric P (L, n, n), m (L, n): computed as mᵀ·P, a batched row-vector product, which
    on the CPU is ~1.5× faster than (P·m[:, None, :]).sum(-1) and ~6× faster than a batched P·m."""
    return torch.bmm(m[:, None, :], P)[:, 0]


def _box_qp(g: _Group, lin: torch.Tensor, m: torch.Tensor, iterations: int, tolerance: float,
            extra: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """min mᵀPm − 2qᵀm + linᵀm (+ a term with gradient ``extra``) over the box [0, 1]ⁿ, from ``m``.

    Jacobi-preconditioned FISTA with O'Donoghue–Candès gradient restarts; stops when no mask entry moves
    more than ``tolerance`` in one step. The iterations run in float32 (masks are float32 parameters; the
    preconditioned problem is well scaled), the problem is set up and checked in float64.
    """
    if g.P32 is None:
        g.P32 = g.P.float()
    P, q, s, step = g.P32, g.q.float(), g.s.float(), g.step.float()
    lin = lin.float()
    u = m.float() * s
    y = u.clone()
    t = 1.0
    zero = torch.zeros_like(u)
    for _ in range(int(iterations)):
        my = y / s
        grad = 2.0 * (_matvec(P, my) - q) + lin
        if extra is not None:
            grad = grad + extra(my.double()).float()
        u_new = torch.minimum(torch.maximum(y - step * grad / s, zero), s)
        moved = float(((u_new - u) / s).abs().amax())
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        uphill = ((y - u_new) * (u_new - u)).sum(1, keepdim=True) > 0
        beta = torch.where(uphill, torch.zeros_like(step), torch.full_like(step, (t - 1.0) / t_new))
        y = u_new + beta * (u_new - u)
        u, t = u_new, t_new
        if moved < tolerance:
            break
    return (u / s).clamp(0.0, 1.0).double()


# Sweeps over the prior pairs when a layer has several (multi-concept): each sweep moves every pair's hinge
# multiplier to its best value with the others held (coordinate ascent on the concave dual).
HINGE_SWEEPS = 30


def _solve_group(g: _Group, terms: _Terms, iterations: int, tolerance: float) -> torch.Tensor:
    """Masks (L, n) minimising the group's fast objective on the box [0, 1] (module docstring).

    ``hinge`` prior (convex): on the box it is w·κ·Σm_dom + w·ν·max(0, h(m)), h = Σm_other − Σm_dom + margin,
    handled exactly through its multiplier θ ∈ [0, w·ν] (``_hinge_multiplier``). With several prior pairs
    (multi-concept) their hinges are handled by coordinate ascent on the multipliers (``HINGE_SWEEPS``).
    ``code_compat`` (not convex): projected gradient from the same start, with the gradient of its L2 terms.
    """
    L, n = g.q.shape
    ridge = 1e-10 * torch.diagonal(g.P, dim1=1, dim2=2).sum(1).clamp_min(1e-300) / n
    try:
        m0 = torch.linalg.solve(g.P + ridge[:, None, None] * torch.eye(n, dtype=torch.float64), g.q)
    except RuntimeError:  # singular even with the ridge (an all-zero layer): start at the direct merge
        m0 = torch.ones(L, n, dtype=torch.float64)
    m0 = torch.nan_to_num(m0, nan=1.0).clamp(0.0, 1.0)
    pairs = range(g.w.shape[1])
    w = [g.w[:, h][:, None] for h in pairs]
    if not w:  # no prior pair (a layer of content LoRAs only)
        return _box_qp(g, torch.zeros_like(g.q), m0, iterations, tolerance)
    if terms.kind == "code_compat":
        def l2_grad(m: torch.Tensor) -> torch.Tensor:
            def unit(part: torch.Tensor) -> torch.Tensor:
                v = m * part
                return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return _sum([w[h] * terms.nu * (unit(g.other[:, h]) - unit(g.dom[:, h])) for h in pairs])

        return _box_qp(g, _sum([w[h] * terms.kappa * g.dom[:, h] for h in pairs]), m0, iterations, tolerance,
                       l2_grad)

    lin0 = (_sum([w[h] * terms.kappa * g.dom[:, h] for h in pairs]) if terms.kind == "hinge"
            else torch.zeros_like(g.dom[:, 0]))
    a = [g.other[:, h] - g.dom[:, h] for h in pairs]
    wnu = [(g.w[:, h] * terms.nu)[:, None] for h in pairs]
    if len(a) == 1:
        return _hinge_multiplier(g, terms, lin0, a[0], wnu[0], m0, iterations, tolerance)[0]
    theta = [torch.zeros_like(wnu[h]) for h in pairs]
    m = m0
    for _ in range(HINGE_SWEEPS):
        moved = 0.0
        for h in pairs:
            lin = lin0
            for k in pairs:
                if k != h:
                    lin = lin + theta[k] * a[k]
            m, new = _hinge_multiplier(g, terms, lin, a[h], wnu[h], m, iterations, tolerance)
            moved = max(moved, float((new - theta[h]).abs().max()))
            theta[h] = new
        if moved <= tolerance * max(1.0, max(float(x.max()) for x in wnu)):
            break
    return m


def _hinge_multiplier(g: _Group, terms: _Terms, lin0: torch.Tensor, a: torch.Tensor, wnu: torch.Tensor,
                      m0: torch.Tensor, iterations: int,
                      tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks, θ) of one hinge ν·w·max(0, aᵀm + margin) over the box QP with linear term ``lin0``.

    m(θ) minimises the box QP with the linear term lin0 + θ·a, and h(m(θ)) = aᵀm(θ) + margin falls as θ grows;
    θ = 0 if h(m(0)) ≤ 0, θ = w·ν if h(m(w·ν)) ≥ 0, else the root of h(m(θ)) = 0 (regula falsi, Illinois
    variant). ``m0`` is the start of the first solve.
    """
    n = g.q.shape[1]

    def hinge(m: torch.Tensor) -> torch.Tensor:
        return (m * a).sum(1, keepdim=True) + terms.margin

    m_lo = _box_qp(g, lin0, m0, iterations, tolerance)
    h_lo = hinge(m_lo)
    need = (wnu > 0) & (h_lo > 0)
    if not bool(need.any()):
        return m_lo, torch.zeros_like(wnu)
    m_hi = _box_qp(g, lin0 + wnu * a, m_lo, iterations, tolerance)
    h_hi = hinge(m_hi)
    kink = need & (h_hi < 0)
    result = torch.where(need, m_hi, m_lo)
    if not bool(kink.any()):
        return result, torch.where(need, wnu, torch.zeros_like(wnu))
    # Regula falsi on θ for the layers whose optimum sits on the hinge's kink (others keep their θ).
    th_a, th_b = torch.zeros_like(wnu), wnu.clone()
    f_a, f_b = h_lo.clone(), h_hi.clone()
    m = torch.where(kink, m_hi, result)
    theta = torch.where(kink, th_b, torch.where(need, wnu, torch.zeros_like(wnu)))
    h_tol = 1e-5 * n  # in mask-sum units: float32 iterations resolve about 1e-6 per entry
    for _ in range(30):
        denom = f_b - f_a
        cand = th_b - f_b * (th_b - th_a) / torch.where(denom != 0, denom, torch.ones_like(denom))
        cand = torch.where(denom != 0, cand, 0.5 * (th_a + th_b)).clamp(torch.minimum(th_a, th_b),
                                                                           torch.maximum(th_a, th_b))
        theta = torch.where(kink, cand, theta)
        m = _box_qp(g, lin0 + theta * a, m, iterations, tolerance)
        f = hinge(m)
        done = ~kink | (f.abs() <= h_tol)
        if bool(done.all()):
            break
        crossed = f * f_b < 0
        # Illinois: keep the bracket; halve the stale end's value when the same end is kept twice.
        th_a = torch.where(kink & crossed, th_b, th_a)
        f_a = torch.where(kink & crossed, f_b, torch.where(kink & ~crossed, 0.5 * f_a, f_a))
        th_b = torch.where(kink, theta, th_b)
        f_b = torch.where(kink, f, f_b)
    return torch.where(kink, m, result), theta


def _mean_objective(problems: Sequence[LayerQuadratic], roles: Sequence[str | None],
                    masks: Sequence[Sequence[torch.Tensor]], terms: _Terms) -> dict[str, float]:
    """The mean over layers of each term of the per-layer fast objective (content, …, style, prior, similarity,
    keep, total), computed for layers of equal LoRAs and ranks at once (float64; the tests check it against a
    layer-by-layer evaluation). A term of a LoRA a layer lacks counts as 0 there."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault((p.tags, p.ranks), []).append(i)
    sums: dict[str, float] = {}
    for (tags, ranks), idx in groups.items():
        sl = _slices(ranks)
        Ps = [torch.stack([problems[i].P[j] for i in idx]) for j in range(len(ranks))]
        m = torch.stack([torch.cat([mask.detach().double().cpu() for mask in masks[i]]) for i in idx])
        e = problems[idx[0]].targets()
        losses = reconstruction_losses(Ps, e, m)
        scale = _sum([P_j[:, s, s].sum((1, 2)) for P_j, s in zip(Ps, sl)])
        scale = torch.where(scale != 0, scale, torch.ones_like(scale))
        # layer_prior on the (dominant, other) parts of each prior pair of the prior layers, per dominant entry.
        a = m.abs()
        shares = torch.stack([torch.cat(problems[i].shares()) for i in idx])
        where = dict(zip(tags, e))
        content_role = torch.tensor([roles[i] == CONTENT for i in idx])[:, None]
        has_role = torch.tensor([roles[i] in (CONTENT, STYLE) for i in idx]) & bool(terms.lam_prior)
        per_pair = []
        for d_tag, o_tag in prior_pairs(tags, CONTENT):
            dom = torch.where(content_role, where[d_tag], where[o_tag])
            oth = torch.where(content_role, where[o_tag], where[d_tag])
            if terms.kind == "share_hinge":
                raw = prior_penalty(terms.kind, (a * shares * dom).sum(1), (a * shares * oth).sum(1), nu=terms.nu,
                                    margin=terms.margin)
                per_entry = torch.ones_like(raw)  # already a fraction of each LoRA
            else:
                l2 = terms.kind == "code_compat"
                raw = prior_penalty(terms.kind, (a * dom).sum(1), (a * oth).sum(1), kappa=terms.kappa, nu=terms.nu,
                                    margin=terms.margin, dom_l2=(m * dom).norm(dim=1) if l2 else None,
                                    other_l2=(m * oth).norm(dim=1) if l2 else None)
                per_entry = dom.sum(1)
            per_pair.append(raw / per_entry)
        zeros = torch.zeros(len(idx), dtype=torch.float64)
        prior = torch.where(has_role, _sum(per_pair), torch.zeros_like(per_pair[0])) if per_pair else zeros
        sim = mask_similarity([m[:, s] for s in sl])
        keep = (shares * (1.0 - m) ** 2).sum(1) if terms.keep else zeros
        lam = [terms.lam_s if t == STYLE_TAG else terms.lam_c for t in tags]
        recon = _sum([w * L_j for w, L_j in zip(lam, losses)]) / scale
        group = {_term(t): L_j / scale for t, L_j in zip(tags, losses)}
        group.update({"prior": prior, "similarity": sim, "keep": keep,
                      "total": recon + terms.lam_prior * prior + terms.lam_sim * sim + terms.keep * keep})
        for key, value in group.items():
            sums[key] = sums.get(key, 0.0) + float(value.sum())
    order = {name: i for i, name in enumerate(["content", *sorted(k for k in sums if k.startswith("content")
                                                                  and k != "content"), "style"])}
    keys = sorted(sums, key=lambda k: order.get(k, len(order)))
    return {key: sums[key] / len(problems) for key in keys}


def solve_quadratics(problems: Sequence[LayerQuadratic], roles: Sequence[str | None], config: MergeConfig,
                     iterations: int = SOLVER_ITERATIONS,
                     tolerance: float = SOLVER_TOLERANCE) -> list[tuple[torch.Tensor, ...]]:
    """Masks (one float32 (r_i,) tensor per LoRA of the layer: (m_c, m_s) for a pair) minimising each layer's
    fast objective; layers of equal LoRAs and ranks are solved as one batch."""
    terms = _Terms.from_config(config)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault((p.tags, p.ranks), []).append(i)
    out: list[tuple[torch.Tensor, ...] | None] = [None] * len(problems)
    for (_, ranks), idx in groups.items():
        g = _group([problems[i] for i in idx], [roles[i] for i in idx], terms)
        m = _solve_group(g, terms, iterations, tolerance)
        for j, i in enumerate(idx):
            out[i] = tuple(m[j, s].float() for s in _slices(ranks))
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# Solving a merger in place
# ---------------------------------------------------------------------------------------------------------

def _learned_rank_layers(merger: Merger, mode: str) -> list[MergedLayer]:
    check_method(merger.method, mode)
    return merger.learned_layers()


def _apply(merger: Merger, problems: list[LayerQuadratic], config: MergeConfig, start: float,
           iterations: int) -> MergeResult:
    """Solve, write the masks into the merger, and return a MergeResult with the objective at the direct
    merge (all masks 1) and after the solve as a two-point history."""
    roles_map = config.roles()
    roles = [prior_role(p.name, roles_map) for p in problems]
    masks = solve_quadratics(problems, roles, config, iterations)
    terms = _Terms.from_config(config)
    ones = [tuple(torch.ones(r) for r in p.ranks) for p in problems]
    with torch.no_grad():
        before, after = _mean_objective(problems, roles, ones, terms), _mean_objective(problems, roles, masks, terms)
        for p, layer_masks in zip(problems, masks):
            layer = merger.layer(p.name)
            for tag, m in zip(p.tags, layer_masks):
                target = layer.mask(tag)
                target.copy_(m.to(target.device))
    history = {k: [before[k], after[k]] for k in after}
    return MergeResult(merger=merger, history=history, steps_done=0, cancelled=False,
                       wall_seconds=time.perf_counter() - start)


def solve_weights(merger: Merger, config: MergeConfig, iterations: int = SOLVER_ITERATIONS) -> MergeResult:
    """Weights-only mode on a built merger: set every learned mask from the two LoRAs alone.

    ``history`` holds each term of the fast objective (mean over learned layers) at the direct merge and
    after the solve. A merger with nothing to learn (direct, B-LoRA) is returned unchanged.
    """
    start = time.perf_counter()
    layers = _learned_rank_layers(merger, "weights")
    svd_basis = getattr(merger, "basis", "svd") == "svd"
    with torch.no_grad():
        problems = weights_quadratics(layers, svd_basis)
    return _apply(merger, problems, config, start, iterations)


def merge_weights_only(content: LoRA | Sequence[LoRA], style: LoRA, config: MergeConfig | None = None) -> MergeResult:
    """build_merger + solve_weights: the weights-only merge of in-memory LoRAs (one content LoRA or several)."""
    config = config or MergeConfig()
    check_method(config.method, "weights")
    merger = build_merger(config.method, content, style, config)
    return solve_weights(merger, config)


def solve_layerwise(merger: Merger, stats: Mapping[str, LayerActivations], config: MergeConfig,
                    iterations: int = SOLVER_ITERATIONS) -> MergeResult:
    """Layer-wise mode on a built merger from recorded statistics; same result shape as ``solve_weights``."""
    start = time.perf_counter()
    layers = _learned_rank_layers(merger, "layerwise")
    with torch.no_grad():
        problems = [activation_quadratic(layer, stats[layer.name]) for layer in layers]
    return _apply(merger, problems, config, start, iterations)



def _percent(fraction: float) -> str:
    return f"{100.0 * fraction:.2g} %"


def describe(result: MergeResult) -> str:
    """What the solve did, in terms a user can judge: the share of each LoRA's own effect that the merge gives up
    (the reconstruction terms of the fast objective, mean over learned layers: "content", "content2", …,
    "style"), then the same for the plain sum it starts from and why the two differ. One or two lines."""
    h = result.history
    if "content" not in h or "style" not in h:
        return "nothing to learn (the method fixes every mask)"
    terms = [k for k in h if k.startswith("content")] + ["style"]
    after = ", ".join(f"{k} {_percent(h[k][1])}" for k in terms)
    pair = len(terms) == 2
    text = (f"given up by the merge: {after} of the {'two ' if pair else ''}LoRAs' own effect "
            "(mean over the learned layers; 0 % = kept exactly)")
    if any(h[k][1] > h[k][0] for k in terms):
        before = " and ".join(_percent(h[k][0]) for k in terms) if pair else ", ".join(
            f"{k} {_percent(h[k][0])}" for k in terms)
        text += (f"\nthe plain sum gives up {before}, keeping {'both' if pair else 'every'} LoRA"
                 f"{'s' if pair else ''} at full strength in every block; the layer priors weaken each LoRA in the "
                 f"blocks they give to {'the other' if pair else 'another'}")
    return text
