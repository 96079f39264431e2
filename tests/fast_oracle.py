"""The fast modes' per-layer objective evaluated one layer at a time, as the docstrings of ``duolora.solver`` and
``duolora.boxqp`` write it: the oracle the tests hold ``boxqp.mean_objective`` (the batched history) and the
solver's optimality against.
It evaluates the prior with ``priors.prior_penalty`` and the similarity with ``objective.mask_similarity``, the
formulas the engine uses."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from duolora.mergers import STYLE_TAG
from duolora.objective import mask_similarity
from duolora.priors import CONTENT, STYLE, prior_pairs, prior_penalty
from duolora.solver import LayerQuadratic


def layer_prior(m_dom: torch.Tensor, m_other: torch.Tensor, kind: str = "hinge", kappa: float = 1.0,
                nu: float = 1.0, margin: float = 0.0, w_dom: torch.Tensor | None = None,
                w_other: torch.Tensor | None = None) -> torch.Tensor:
    """One prior pair's ``priors.prior_penalty`` at masks m_dom, m_other, unweighted, 0-d.

    ``share_hinge`` needs ``w_dom``/``w_other``: each component's share of its LoRA's nuclear norm.
    """
    if kind == "share_hinge":
        return prior_penalty(kind, (w_dom * m_dom.abs()).sum(), (w_other * m_other.abs()).sum(), nu=nu,
                             margin=margin)
    return prior_penalty(kind, m_dom.abs().sum(), m_other.abs().sum(), kappa=kappa, nu=nu, margin=margin,
                         dom_l2=m_dom.norm(), other_l2=m_other.norm())


def _history_name(tag: str) -> str:
    """The solver history's name of a LoRA's reconstruction term: "content", "content2", …, "style"."""
    if tag == STYLE_TAG:
        return "style"
    return "content" if tag == "c" else f"content{tag[1:]}"


def layer_objective(q: LayerQuadratic, role: str | None, masks: Sequence[torch.Tensor], terms) -> dict[str, float]:
    """The fast objective of one layer at given masks (one per LoRA of the layer, in its tag order):
    normalised reconstruction per LoRA ("content", …, "style"), prior (summed over the prior pairs),
    similarity (mean over pairs of LoRAs), keep and total. ``terms``: ``boxqp.FastTerms.from_config(config)``."""
    losses = q.losses(*masks)
    scale = q.scale() or 1.0
    out = {_history_name(t): L / scale for t, L in zip(q.tags, losses)}
    lam = [terms.lam_s if t == STYLE_TAG else terms.lam_c for t in q.tags]
    recon = sum(w * L for w, L in zip(lam, losses)) / scale
    prior = 0.0
    m = torch.cat([mask.detach().double().cpu() for mask in masks])
    shares = torch.cat(q.shares())
    if terms.lam_prior and role in (CONTENT, STYLE):
        where = dict(zip(q.tags, q.slices()))
        for d_tag, o_tag in prior_pairs(q.tags, role):
            d, o = where[d_tag], where[o_tag]
            raw = float(layer_prior(m[d], m[o], terms.kind, terms.kappa, terms.nu, terms.margin, shares[d], shares[o]))
            # The L1 forms are per entry of the dominant mask; the share form is already a fraction.
            prior += raw if terms.kind == "share_hinge" else raw / (d.stop - d.start)
    sim = float(mask_similarity([m[sl] for sl in q.slices()]))
    keep = float((shares * (1.0 - m) ** 2).sum()) if terms.keep else 0.0
    out["prior"] = prior
    out["similarity"] = sim
    out["keep"] = keep
    out["total"] = recon + terms.lam_prior * prior + terms.lam_sim * sim + terms.keep * keep
    return out
