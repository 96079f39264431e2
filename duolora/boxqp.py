"""The batched solve of the fast objective (docs/method.md §5): every learned layer's masks minimise its
normalised reconstruction quadratics (``duolora.quadratics``) plus the layer priors, the similarity and the keep
term, on the box [0, 1]; layers of equal LoRAs and ranks are solved as one batch (``solve_quadratics``).

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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import MergeConfig
from .mergers import STYLE_TAG
from .objective import mask_similarity
from .priors import CONTENT, STYLE, prior_pairs, prior_penalty
from .quadratics import LayerQuadratic, batched_matvec, mask_slices, reconstruction_losses, sum_in_order

# Projected-gradient iterations of the per-layer solve (it stops earlier once the masks stop moving).
SOLVER_ITERATIONS = 300
SOLVER_TOLERANCE = 1e-6


# ---------------------------------------------------------------------------------------------------------
# The fast objective's weights
# ---------------------------------------------------------------------------------------------------------

@dataclass
class FastTerms:
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
    def from_config(cls, config: MergeConfig) -> FastTerms:
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
    where = dict(zip(tags, mask_slices(ranks)))
    return [(where[d], where[o]) for d, o in prior_pairs(tags, role)]


def _similar_pairs(ranks: Sequence[int]) -> list[tuple[int, int, int]]:
    """(offset a, offset b, k) of every pair of LoRAs whose first k = min(r_a, r_b) mask entries the
    similarity term pairs."""
    sl = mask_slices(ranks)
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


def _group(problems: list[LayerQuadratic], roles: list[str | None], terms: FastTerms) -> _Group:
    tags, ranks = problems[0].tags, problems[0].ranks
    sl = mask_slices(ranks)
    n, L = sl[-1].stop, len(problems)
    Ps = [torch.stack([p.P[i] for p in problems]) for i in range(len(ranks))]
    # e_iᵀ·P_i·e_i is the sum of P_i's own block; P_i·e_i the row sums of its own columns.
    pe = [P_i[:, :, s].sum(2) for P_i, s in zip(Ps, sl)]
    own = [pe_i[:, s].sum(1) for pe_i, s in zip(pe, sl)]
    scale = sum_in_order(own)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    lam = [terms.lam_s if t == STYLE_TAG else terms.lam_c for t in tags]
    P = sum_in_order([w * P_i for w, P_i in zip(lam, Ps)]) / scale[:, None, None]
    q = sum_in_order([w * pe_i for w, pe_i in zip(lam, pe)]) / scale[:, None]
    const = sum_in_order([w * own_i for w, own_i in zip(lam, own)]) / scale
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
        v = batched_matvec(Pt, v)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    estimate = (v * batched_matvec(Pt, v)).sum(1)
    return 2.0 * torch.minimum(1.2 * estimate, gershgorin).clamp_min(1e-12)




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
        grad = 2.0 * (batched_matvec(P, my) - q) + lin
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


def _solve_group(g: _Group, terms: FastTerms, iterations: int, tolerance: float) -> torch.Tensor:
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
            return sum_in_order([w[h] * terms.nu * (unit(g.other[:, h]) - unit(g.dom[:, h])) for h in pairs])

        return _box_qp(g, sum_in_order([w[h] * terms.kappa * g.dom[:, h] for h in pairs]), m0, iterations, tolerance,
                       l2_grad)

    lin0 = (sum_in_order([w[h] * terms.kappa * g.dom[:, h] for h in pairs]) if terms.kind == "hinge"
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


def _hinge_multiplier(g: _Group, terms: FastTerms, lin0: torch.Tensor, a: torch.Tensor, wnu: torch.Tensor,
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


def mean_objective(problems: Sequence[LayerQuadratic], roles: Sequence[str | None],
                    masks: Sequence[Sequence[torch.Tensor]], terms: FastTerms) -> dict[str, float]:
    """The mean over layers of each term of the per-layer fast objective (content, …, style, prior, similarity,
    keep, total), computed for layers of equal LoRAs and ranks at once (float64; the tests check it against a
    layer-by-layer evaluation). A term of a LoRA a layer lacks counts as 0 there."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault((p.tags, p.ranks), []).append(i)
    sums: dict[str, float] = {}
    for (tags, ranks), idx in groups.items():
        sl = mask_slices(ranks)
        Ps = [torch.stack([problems[i].P[j] for i in idx]) for j in range(len(ranks))]
        m = torch.stack([torch.cat([mask.detach().double().cpu() for mask in masks[i]]) for i in idx])
        e = problems[idx[0]].targets()
        losses = reconstruction_losses(Ps, e, m)
        scale = sum_in_order([P_j[:, s, s].sum((1, 2)) for P_j, s in zip(Ps, sl)])
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
        prior = torch.where(has_role, sum_in_order(per_pair), torch.zeros_like(per_pair[0])) if per_pair else zeros
        sim = mask_similarity([m[:, s] for s in sl])
        keep = (shares * (1.0 - m) ** 2).sum(1) if terms.keep else zeros
        lam = [terms.lam_s if t == STYLE_TAG else terms.lam_c for t in tags]
        recon = sum_in_order([w * L_j for w, L_j in zip(lam, losses)]) / scale
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
    terms = FastTerms.from_config(config)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault((p.tags, p.ranks), []).append(i)
    out: list[tuple[torch.Tensor, ...] | None] = [None] * len(problems)
    for (_, ranks), idx in groups.items():
        g = _group([problems[i] for i in idx], [roles[i] for i in idx], terms)
        m = _solve_group(g, terms, iterations, tolerance)
        for j, i in enumerate(idx):
            out[i] = tuple(m[j, s].float() for s in mask_slices(ranks))
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# Solving a merger in place
