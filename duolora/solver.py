"""The per-layer solver of the fast merge modes (METHOD.md §5): ZipRank masks without the paper's 100 steps.

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
The layer priors (METHOD.md §3, ``duolora.priors``) enter in the same units with weight λ_prior/r_dom per
layer: κ·‖m_dom‖₁ + ν·max(0, ‖m_other‖₁ − ‖m_dom‖₁ + margin) (or the ``code_compat`` form), so λ_prior = 0.1
means "keeping the whole dominant LoRA at mask 1 is worth 10 % of this layer's reconstruction". The
similarity term λ_sim·mean(m_c ⊙ m_s) is included as in paper mode (0 for ZipRank).

**Solver [decided].** Masks are kept in the box [0, 1] (a mask attenuates; it also keeps the problem well
posed when H ∘ K is singular). On the box ‖m‖₁ = Σm is linear and the hinge of two linear functions is
convex, so with the default ``hinge`` prior each layer is a small convex problem. It starts from the
closed-form minimiser of the quadratic part (one (r_c + r_s)-sized linear solve, clipped into the box) and
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
from .mergers import RANK, SVD_BATCH, MergedLayer, Merger, MergerError, build_merger, svd_refactor_many
from .optimize import MergeResult
from .sdxl import CONTENT, STYLE, prior_role

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
    """One learned layer's reconstruction terms as quadratics in m = [m_c; m_s] (n = r_c + r_s).

    L_c(m) = (m − e_c)ᵀ·P_c·(m − e_c) and L_s(m) = (m − e_s)ᵀ·P_s·(m − e_s), P = H ∘ K (n×n, float64, PSD).
    """

    name: str
    r_c: int
    r_s: int
    P_c: torch.Tensor
    P_s: torch.Tensor
    # σᵢ of each LoRA's components (``priors.component_weights``), float64; None: all ones.
    sigma_c: torch.Tensor | None = None
    sigma_s: torch.Tensor | None = None

    def shares(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each component's share of its LoRA's nuclear norm, (r_c,) and (r_s,) float64, each summing to 1."""
        out = []
        for sigma, r in ((self.sigma_c, self.r_c), (self.sigma_s, self.r_s)):
            w = torch.ones(r, dtype=torch.float64) if sigma is None else sigma.double().cpu()
            total = float(w.sum())
            out.append(w / total if total > 0 else torch.full((r,), 1.0 / max(r, 1), dtype=torch.float64))
        return out[0], out[1]

    @property
    def n(self) -> int:
        return self.r_c + self.r_s

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(e_c, e_s): the content-only and style-only masks, each (n,) float64."""
        e_c = torch.zeros(self.n, dtype=torch.float64)
        e_c[: self.r_c] = 1.0
        return e_c, 1.0 - e_c

    def losses(self, m_c: torch.Tensor, m_s: torch.Tensor) -> tuple[float, float]:
        """(L_c, L_s) at the masks (m_c (r_c,), m_s (r_s,)), unnormalised."""
        m = torch.cat([m_c.detach().double().cpu(), m_s.detach().double().cpu()])
        e_c, e_s = self.targets()
        dc, ds = m - e_c, m - e_s
        return float(dc @ self.P_c @ dc), float(ds @ self.P_s @ ds)

    def scale(self) -> float:
        """N = L_c + L_s at m = 0: the two LoRAs' own effect on their own inputs (the normaliser)."""
        e_c, e_s = self.targets()
        return float(e_c @ self.P_c @ e_c + e_s @ self.P_s @ e_s)


def _rank_layer(layer: MergedLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if layer.kind != RANK or layer.factors("c") is None or layer.factors("s") is None:
        raise FastModeError(f"layer {layer.name}: the fast modes need rank masks of both LoRAs")
    (B_c, A_c), (B_s, A_s) = layer.factors("c"), layer.factors("s")
    return B_c.float(), A_c.float(), B_s.float(), A_s.float()


def _block_gram(x_c: torch.Tensor, x_s: torch.Tensor, diagonal_blocks: bool) -> torch.Tensor:
    """[x_c | x_s]ᵀ·[x_c | x_s] as float64 (…, n, n); x_c (…, d, r_c), x_s (…, d, r_s) (leading dims: a batch).

    ``diagonal_blocks``: the columns of each part are orthogonal (SVD basis), so its own block is the
    diagonal of squared column norms and only the cross block needs a product (a quarter of the work).
    """
    # float64 products: the own-output projector pseudo-inverts the up factors' Grams down to (1e-6)² of their
    # largest eigenvalue, far below float32's resolution of a Gram (~1e-7 of it) — in the raw basis an
    # ill-conditioned up factor would otherwise give an indefinite P. The factors are r columns wide: cheap.
    x_c, x_s = x_c.double(), x_s.double()
    r_c = x_c.shape[-1]
    n = r_c + x_s.shape[-1]
    g = torch.zeros(*x_c.shape[:-2], n, n, dtype=torch.float64, device=x_c.device)
    cross = x_c.transpose(-1, -2) @ x_s
    g[..., :r_c, r_c:] = cross
    g[..., r_c:, :r_c] = cross.transpose(-1, -2)
    if diagonal_blocks:
        g[..., :r_c, :r_c] = torch.diag_embed(x_c.square().sum(-2))
        g[..., r_c:, r_c:] = torch.diag_embed(x_s.square().sum(-2))
    else:
        g[..., :r_c, :r_c] = x_c.transpose(-1, -2) @ x_c
        g[..., r_c:, r_c:] = x_s.transpose(-1, -2) @ x_s
    return g


# Singular values of a LoRA's up factor below this fraction of its largest one span no output direction (a
# zero-padded or numerically dependent component), so the projector onto its outputs ignores them.
OUTPUT_RTOL = 1e-6


def own_output_grams(H: torch.Tensor, r_c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_c, H_s): the Gram H = BᵀB of B = [B_c | B_s] (…, n, n) seen through each LoRA's own output space.

    H_c = (Π_c·B)ᵀ(Π_c·B) with Π_c the orthogonal projector onto col(B_c): only the style block changes,
    to C_csᵀ·(B_cᵀB_c)⁺·C_cs with C_cs = B_cᵀB_s, so everything stays r-sized (no out×out projector), and
    Π_c depends only on col(B_c) — not on how a file factors ΔW_c, nor on zero-padded components (the
    pseudo-inverse drops singular values below ``OUTPUT_RTOL`` of the largest). Likewise H_s with Π_s.
    """
    H = H.double()
    C = H[..., :r_c, r_c:]
    H_c, H_s = H.clone(), H.clone()
    H_c[..., r_c:, r_c:] = C.transpose(-1, -2) @ torch.linalg.pinv(H[..., :r_c, :r_c], rtol=OUTPUT_RTOL ** 2,
                                                                    hermitian=True) @ C
    H_s[..., :r_c, :r_c] = C @ torch.linalg.pinv(H[..., r_c:, r_c:], rtol=OUTPUT_RTOL ** 2, hermitian=True) \
        @ C.transpose(-1, -2)
    return H_c, H_s


def weights_quadratic(layer: MergedLayer, svd_basis: bool = True) -> LayerQuadratic:
    """The weights-only problem of one rank-mask layer (module docstring): K_c = g_c·g_cᵀ, g_c = A·A'_cᵀ.

    ``svd_basis``: the layer's factors are already in the SVD basis (``ZipRankMerger(basis="svd")``), so
    A'_c = A_c and the self Grams are diagonal. Otherwise A'_c, A'_s are computed with ``svd_refactor``.
    """
    return weights_quadratics([layer], svd_basis)[0]


def weights_quadratics(layers: Sequence[MergedLayer], svd_basis: bool = True,
                       batch: int = SVD_BATCH) -> list[LayerQuadratic]:
    """``weights_quadratic`` of every layer, in order; layers of equal factor shapes (and device) share
    batched products, up to ``batch`` layers at a time (SDXL's 560 attention layers come in 4 shapes)."""
    groups: dict[tuple, list[int]] = {}
    factors = [_rank_layer(layer) for layer in layers]
    for i, f in enumerate(factors):
        groups.setdefault((*(tuple(t.shape) for t in f), f[0].device), []).append(i)
    out: list[LayerQuadratic | None] = [None] * len(layers)
    for idx in groups.values():
        for lo in range(0, len(idx), max(1, int(batch))):
            part = idx[lo:lo + max(1, int(batch))]
            B_c, A_c, B_s, A_s = (torch.stack([factors[i][k] for i in part]) for k in range(4))
            r_c = A_c.shape[1]
            H = _block_gram(B_c, B_s, svd_basis)
            if svd_basis:
                G = _block_gram(A_c.transpose(1, 2), A_s.transpose(1, 2), True)  # A·Aᵀ
                g_c, g_s = G[..., :r_c], G[..., r_c:]
            else:
                A = torch.cat([A_c, A_s], dim=1)
                refactored = svd_refactor_many([(factors[i][0], factors[i][1]) for i in part]
                                               + [(factors[i][2], factors[i][3]) for i in part])
                a_c = torch.stack([a for _, a in refactored[:len(part)]]).to(A)
                a_s = torch.stack([a for _, a in refactored[len(part):]]).to(A)
                g_c = (A @ a_c.transpose(1, 2)).double()
                g_s = (A @ a_s.transpose(1, 2)).double()
            H_c, H_s = own_output_grams(H, r_c)
            P_c = (H_c * (g_c @ g_c.transpose(1, 2))).cpu()
            P_s = (H_s * (g_s @ g_s.transpose(1, 2))).cpu()
            for j, i in enumerate(part):
                out[i] = LayerQuadratic(layers[i].name, r_c, A_s.shape[1], P_c[j], P_s[j], *_sigmas(layers[i]))
    return out  # type: ignore[return-value]


@dataclass
class LayerActivations:
    """Recorded input statistics of one layer: K = A·E[x xᵀ]·Aᵀ (n×n, float64, A = [A_c; A_s]) per side."""

    K_c: torch.Tensor
    K_s: torch.Tensor
    tokens_c: int = 0
    tokens_s: int = 0


def activation_quadratic(layer: MergedLayer, stats: LayerActivations) -> LayerQuadratic:
    """The layer-wise problem of one rank-mask layer from its recorded statistics: P = H ∘ K."""
    B_c, _, B_s, _ = _rank_layer(layer)
    svd_like = False  # the recorder's K is exact in any basis; H's blocks are only diagonal in the SVD one
    H_c, H_s = own_output_grams(_block_gram(B_c, B_s, svd_like).cpu(), layer.rank("c"))
    return LayerQuadratic(layer.name, layer.rank("c"), layer.rank("s"), H_c * stats.K_c.cpu(),
                          H_s * stats.K_s.cpu(), *_sigmas(layer))


def _sigmas(layer: MergedLayer) -> tuple[torch.Tensor, torch.Tensor]:
    from .priors import component_weights

    return (component_weights(layer, "c").double().cpu(), component_weights(layer, "s").double().cpu())


# ---------------------------------------------------------------------------------------------------------
# Priors in the per-layer units
# ---------------------------------------------------------------------------------------------------------

def layer_prior(m_dom: torch.Tensor, m_other: torch.Tensor, kind: str = "hinge", kappa: float = 1.0,
                nu: float = 1.0, margin: float = 0.0, w_dom: torch.Tensor | None = None,
                w_other: torch.Tensor | None = None) -> torch.Tensor:
    """One prior layer's term of ``duolora.priors.layer_prior_loss`` (METHOD.md §3), unweighted, 0-d.

    ``share_hinge`` needs ``w_dom``/``w_other``: each component's share of its LoRA's nuclear norm.
    """
    if kind == "share_hinge":
        return nu * torch.relu((w_other * m_other.abs()).sum() - (w_dom * m_dom.abs()).sum() + margin)
    l1_dom = m_dom.abs().sum()
    if kind == "hinge":
        return kappa * l1_dom + nu * torch.relu(m_other.abs().sum() - l1_dom + margin)
    if kind == "code_compat":
        return kappa * l1_dom + nu * (m_other.norm() - m_dom.norm())
    raise ValueError(f"prior loss kind {kind!r} is not one of share_hinge, hinge, code_compat")


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


def _split(m: torch.Tensor, r_c: int, role: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dominant, other) parts of m (…, n) for a layer of ``role``."""
    mc, ms = m[..., :r_c], m[..., r_c:]
    return (mc, ms) if role == CONTENT else (ms, mc)


def layer_objective(q: LayerQuadratic, role: str | None, m_c: torch.Tensor, m_s: torch.Tensor,
                    terms: _Terms) -> dict[str, float]:
    """The fast objective of one layer at given masks: normalised reconstruction, prior and similarity."""
    L_c, L_s = q.losses(m_c, m_s)
    scale = q.scale() or 1.0
    out = {"content": L_c / scale, "style": L_s / scale}
    recon = (terms.lam_c * L_c + terms.lam_s * L_s) / scale
    prior = 0.0
    m = torch.cat([m_c.detach().double().cpu(), m_s.detach().double().cpu()])
    shares = torch.cat(q.shares())
    if role in (CONTENT, STYLE) and terms.lam_prior:
        dom, other = _split(m, q.r_c, role)
        w_dom, w_other = _split(shares, q.r_c, role)
        raw = float(layer_prior(dom, other, terms.kind, terms.kappa, terms.nu, terms.margin, w_dom, w_other))
        # The L1 forms are per entry of the dominant mask; the share form is already a fraction.
        prior = raw if terms.kind == "share_hinge" else raw / dom.numel()
    k = min(q.r_c, q.r_s)
    sim = float((m_c.detach()[:k].double() * m_s.detach()[:k].double()).abs().mean()) if k else 0.0
    keep = float((shares * (1.0 - m) ** 2).sum()) if terms.keep else 0.0
    out["prior"] = prior
    out["similarity"] = sim
    out["keep"] = keep
    out["total"] = recon + terms.lam_prior * prior + terms.lam_sim * sim + terms.keep * keep
    return out


# ---------------------------------------------------------------------------------------------------------
# The batched solver
# ---------------------------------------------------------------------------------------------------------

@dataclass
class _Group:
    """L layers of equal (r_c, r_s) as one batch: f(m) = mᵀ·P·m − 2·qᵀ·m + lin·m (+ hinge / L2 prior)."""

    P: torch.Tensor  # (L, n, n) float64, symmetric
    q: torch.Tensor  # (L, n)
    const: torch.Tensor  # (L,): f(m) + const is the normalised reconstruction (+ similarity) term
    dom: torch.Tensor  # (L, n) 1 on the dominant mask's entries (prior layers only)
    other: torch.Tensor  # (L, n) 1 on the other mask's entries
    w: torch.Tensor  # (L,) λ_prior / r_dom on prior layers, else 0
    s: torch.Tensor  # (L, n) Jacobi scaling √diag(P)
    step: torch.Tensor  # (L, 1) 1 / Lipschitz constant of the preconditioned gradient
    P32: torch.Tensor | None = None  # float32 copy of P for the iterations


def _group(problems: list[LayerQuadratic], roles: list[str | None], terms: _Terms) -> _Group:
    r_c, n, L = problems[0].r_c, problems[0].n, len(problems)
    P_c = torch.stack([p.P_c for p in problems])
    P_s = torch.stack([p.P_s for p in problems])
    # e_cᵀ·P·e_c is the sum of P's content-content block; P·e_c the row sums of its content columns.
    pe_c, pe_s = P_c[:, :, :r_c].sum(2), P_s[:, :, r_c:].sum(2)
    own_c, own_s = pe_c[:, :r_c].sum(1), pe_s[:, r_c:].sum(1)
    scale = own_c + own_s
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    P = (terms.lam_c * P_c + terms.lam_s * P_s) / scale[:, None, None]
    q = (terms.lam_c * pe_c + terms.lam_s * pe_s) / scale[:, None]
    const = (terms.lam_c * own_c + terms.lam_s * own_s) / scale
    del P_c, P_s
    k = min(r_c, n - r_c)
    if terms.lam_sim and k:
        # λ_sim·mean_i(m_c,i·m_s,i) = mᵀ·S·m, S[i, r_c + i] = S[r_c + i, i] = λ_sim / (2k) (masks are ≥ 0).
        idx = torch.arange(k)
        P[:, idx, r_c + idx] += terms.lam_sim / (2 * k)
        P[:, r_c + idx, idx] += terms.lam_sim / (2 * k)
    shares = torch.stack([torch.cat(p.shares()) for p in problems])  # (L, n): each LoRA's part sums to 1
    if terms.keep:
        # keep·Σᵢ shareᵢ·(1 − mᵢ)² per LoRA: mᵀ·diag(keep·share)·m − 2·(keep·share)ᵀ·m + keep·Σ share.
        P = P + torch.diag_embed(terms.keep * shares)
        q = q + terms.keep * shares
        const = const + terms.keep * shares.sum(1)
    P = 0.5 * (P + P.transpose(1, 2))
    dom = torch.zeros(L, n, dtype=torch.float64)
    other = torch.zeros(L, n, dtype=torch.float64)
    w = torch.zeros(L, dtype=torch.float64)
    for i, role in enumerate(roles):
        if role in (CONTENT, STYLE) and terms.lam_prior:
            if terms.kind == "share_hinge":
                # ρ = Σ shareᵢ·mᵢ on the box: the hinge ν·max(0, ρ_other − ρ_dom + δ) is linear inside.
                (dom if role == CONTENT else other)[i, :r_c] = shares[i, :r_c]
                (other if role == CONTENT else dom)[i, r_c:] = shares[i, r_c:]
                w[i] = terms.lam_prior
                continue
            (dom if role == CONTENT else other)[i, :r_c] = 1.0
            (other if role == CONTENT else dom)[i, r_c:] = 1.0
            w[i] = terms.lam_prior / (r_c if role == CONTENT else n - r_c)
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


def _solve_group(g: _Group, terms: _Terms, iterations: int, tolerance: float) -> torch.Tensor:
    """Masks (L, n) minimising the group's fast objective on the box [0, 1] (module docstring).

    ``hinge`` prior (convex): on the box it is w·κ·Σm_dom + w·ν·max(0, h(m)), h = Σm_other − Σm_dom + margin,
    handled exactly through its multiplier θ ∈ [0, w·ν]: m(θ) minimises the box QP with the linear term
    w·κ·dom + θ·(other − dom), and h(m(θ)) falls as θ grows; θ = 0 if h(m(0)) ≤ 0, θ = w·ν if h(m(w·ν)) ≥ 0,
    else the root of h(m(θ)) = 0 (regula falsi, Illinois variant). ``code_compat`` (not convex): projected
    gradient from the same start, with the gradient of its L2 terms.
    """
    L, n = g.q.shape
    ridge = 1e-10 * torch.diagonal(g.P, dim1=1, dim2=2).sum(1).clamp_min(1e-300) / n
    try:
        m0 = torch.linalg.solve(g.P + ridge[:, None, None] * torch.eye(n, dtype=torch.float64), g.q)
    except RuntimeError:  # singular even with the ridge (an all-zero layer): start at the direct merge
        m0 = torch.ones(L, n, dtype=torch.float64)
    m0 = torch.nan_to_num(m0, nan=1.0).clamp(0.0, 1.0)
    w = g.w[:, None]
    if terms.kind == "code_compat":
        def l2_grad(m: torch.Tensor) -> torch.Tensor:
            def unit(part: torch.Tensor) -> torch.Tensor:
                v = m * part
                return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return w * terms.nu * (unit(g.other) - unit(g.dom))

        return _box_qp(g, w * terms.kappa * g.dom, m0, iterations, tolerance, l2_grad)

    lin0 = w * terms.kappa * g.dom if terms.kind == "hinge" else torch.zeros_like(g.dom)
    a = g.other - g.dom
    wnu = (g.w * terms.nu)[:, None]

    def hinge(m: torch.Tensor) -> torch.Tensor:
        return (m * a).sum(1, keepdim=True) + terms.margin

    m_lo = _box_qp(g, lin0, m0, iterations, tolerance)
    h_lo = hinge(m_lo)
    need = (wnu > 0) & (h_lo > 0)
    if not bool(need.any()):
        return m_lo
    m_hi = _box_qp(g, lin0 + wnu * a, m_lo, iterations, tolerance)
    h_hi = hinge(m_hi)
    kink = need & (h_hi < 0)
    result = torch.where(need, m_hi, m_lo)
    if not bool(kink.any()):
        return result
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
    return torch.where(kink, m, result)


def _mean_objective(problems: Sequence[LayerQuadratic], roles: Sequence[str | None],
                    masks: Sequence[tuple[torch.Tensor, torch.Tensor]], terms: _Terms) -> dict[str, float]:
    """The mean over layers of each term of ``layer_objective`` (content, style, prior, similarity, total),
    computed for layers of equal ranks at once (float64; equal to the per-layer terms to float64 rounding)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault((p.r_c, p.r_s), []).append(i)
    sums: dict[str, float] = {}
    for (r_c, r_s), idx in groups.items():
        n, k = r_c + r_s, min(r_c, r_s)
        P_c = torch.stack([problems[i].P_c for i in idx])
        P_s = torch.stack([problems[i].P_s for i in idx])
        m = torch.stack([torch.cat([masks[i][0].detach().double().cpu(), masks[i][1].detach().double().cpu()])
                         for i in idx])
        e_c = torch.zeros(n, dtype=torch.float64)
        e_c[:r_c] = 1.0
        dc, ds = m - e_c, m - (1.0 - e_c)
        L_c = (dc * _matvec(P_c, dc)).sum(1)
        L_s = (ds * _matvec(P_s, ds)).sum(1)
        scale = P_c[:, :r_c, :r_c].sum((1, 2)) + P_s[:, r_c:, r_c:].sum((1, 2))
        scale = torch.where(scale != 0, scale, torch.ones_like(scale))
        # layer_prior on the (dominant, other) parts of prior layers, per dominant entry; 0 elsewhere.
        content_role = torch.tensor([roles[i] == CONTENT for i in idx])[:, None]
        has_role = torch.tensor([roles[i] in (CONTENT, STYLE) for i in idx]) & bool(terms.lam_prior)
        dom = torch.where(content_role, e_c, 1.0 - e_c)
        a = m.abs()
        shares = torch.stack([torch.cat(problems[i].shares()) for i in idx])
        if terms.kind == "share_hinge":
            rho_dom, rho_other = (a * shares * dom).sum(1), (a * shares * (1.0 - dom)).sum(1)
            raw = terms.nu * torch.relu(rho_other - rho_dom + terms.margin)
            per_entry = torch.ones_like(raw)  # already a fraction of each LoRA
        else:
            l1_dom, l1_other = (a * dom).sum(1), (a * (1.0 - dom)).sum(1)
            if terms.kind == "hinge":
                raw = terms.kappa * l1_dom + terms.nu * torch.relu(l1_other - l1_dom + terms.margin)
            elif terms.kind == "code_compat":
                raw = terms.kappa * l1_dom + terms.nu * ((m * (1.0 - dom)).norm(dim=1) - (m * dom).norm(dim=1))
            else:
                raise ValueError(f"prior loss kind {terms.kind!r} is not one of share_hinge, hinge, code_compat")
            per_entry = dom.sum(1)
        prior = torch.where(has_role, raw / per_entry, torch.zeros_like(raw))
        sim = (m[:, :k] * m[:, r_c:r_c + k]).abs().mean(1) if k else torch.zeros(len(idx), dtype=torch.float64)
        keep = (shares * (1.0 - m) ** 2).sum(1) if terms.keep else torch.zeros(len(idx), dtype=torch.float64)
        recon = (terms.lam_c * L_c + terms.lam_s * L_s) / scale
        group = {"content": L_c / scale, "style": L_s / scale, "prior": prior, "similarity": sim, "keep": keep,
                 "total": recon + terms.lam_prior * prior + terms.lam_sim * sim + terms.keep * keep}
        for key, value in group.items():
            sums[key] = sums.get(key, 0.0) + float(value.sum())
    return {key: value / len(problems) for key, value in sums.items()}


def solve_quadratics(problems: Sequence[LayerQuadratic], roles: Sequence[str | None], config: MergeConfig,
                     iterations: int = SOLVER_ITERATIONS,
                     tolerance: float = SOLVER_TOLERANCE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Masks (m_c (r_c,), m_s (r_s,)) float32 minimising each layer's fast objective; layers of equal ranks
    are solved as one batch."""
    terms = _Terms.from_config(config)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault((p.r_c, p.r_s), []).append(i)
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(problems)
    for (r_c, _), idx in groups.items():
        g = _group([problems[i] for i in idx], [roles[i] for i in idx], terms)
        m = _solve_group(g, terms, iterations, tolerance)
        for j, i in enumerate(idx):
            out[i] = (m[j, :r_c].float(), m[j, r_c:].float())
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
    ones = [(torch.ones(p.r_c), torch.ones(p.r_s)) for p in problems]
    with torch.no_grad():
        before, after = _mean_objective(problems, roles, ones, terms), _mean_objective(problems, roles, masks, terms)
        for p, (m_c, m_s) in zip(problems, masks):
            layer = merger.layer(p.name)
            layer.m_c.copy_(m_c.to(layer.m_c.device))
            layer.m_s.copy_(m_s.to(layer.m_s.device))
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


def merge_weights_only(content: LoRA, style: LoRA, config: MergeConfig | None = None) -> MergeResult:
    """build_merger + solve_weights: the weights-only merge of two in-memory LoRAs."""
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
    """What the solve did, in terms a user can judge: the share of the two LoRAs' own effect that the merge
    gives up on each side (the reconstruction terms of the fast objective, mean over learned layers), then the
    same for the plain sum it starts from and why the two differ. One or two lines."""
    h = result.history
    if "content" not in h or "style" not in h:
        return "nothing to learn (the method fixes every mask)"
    (c0, c1), (s0, s1) = h["content"], h["style"]
    text = (f"given up by the merge: content {_percent(c1)}, style {_percent(s1)} of the two LoRAs' own effect "
            "(mean over the learned layers; 0 % = kept exactly)")
    if c1 > c0 or s1 > s0:
        text += (f"\nthe plain sum gives up {_percent(c0)} and {_percent(s0)}, keeping both LoRAs at full strength "
                 "in every block; the layer priors weaken each LoRA in the blocks they give to the other")
    return text
