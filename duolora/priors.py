"""The layer priors (docs/method.md §3): the block roles in use, the prior initialisation of the masks and the
rank-constraint penalty that paper mode and the per-layer solver both call (``prior_penalty``).

A *prior layer* is a learned layer of a merger whose block has a role ("content" or "style") under the
chosen preset (``preset_roles`` / ``prior_role``; the block tables live with the SDXL layout in
``duolora.sdxl``). In a content layer the content mask is
the *dominant* one and the style mask the *other* one; in a style layer the other way round. With several
content LoRAs (multi-concept) each of them forms such a pair with the style LoRA (``prior_pairs``): every
content LoRA is "content" in content blocks and the style's opposite in style blocks. Between two content
LoRAs there is no prior; only reconstruction decides there.
Both uses of the priors have their own switch in ``MergeConfig`` (``prior_init``, ``prior_loss``).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from .config import PRIOR_LOSS_KINDS, PRIOR_PUSHES, default
from .mergedlayer import MergedLayer, component_weights
from .mergers import STYLE_TAG, Merger
from .sdxl import CONTENT, PRESET_NAMES, PRESETS, STYLE, parse_custom_preset, preset_roles, prior_role

__all__ = [
    "CONTENT", "PRESETS", "PRESET_NAMES", "STYLE", "component_weights", "kept_share", "layer_prior_loss",
    "parse_custom_preset", "preset_roles", "prior_init", "prior_layers", "prior_pairs", "prior_penalty",
    "prior_role",
]


def prior_penalty(kind: str, dom: torch.Tensor, other: torch.Tensor, *, kappa: float = 1.0, nu: float = 1.0,
                  margin: float = 0.0, dom_l2: torch.Tensor | None = None,
                  other_l2: torch.Tensor | None = None) -> torch.Tensor:
    """The rank-constraint penalty of one prior pair, element-wise over any
    leading (batch) shape; the one formula paper mode (``layer_prior_loss``) and the per-layer solver
    (``duolora.boxqp``) evaluate.

    ``dom``, ``other``: how much of each LoRA the masks keep: the kept shares ρ of their nuclear norms
    (``kind="share_hinge"``, see ``kept_share``) or the L1 norms ‖m‖₁ (``"hinge"``, ``"code_compat"``; the
    nuclear norm of diag(m)). ``code_compat`` also needs ``dom_l2``/``other_l2``, the masks' L2 norms.

    * ``share_hinge``: ν·max(0, ρ_other − ρ_dom + margin);
    * ``hinge``:       κ·‖m_dom‖₁ + ν·max(0, ‖m_other‖₁ − ‖m_dom‖₁ + margin);
    * ``code_compat``: κ·‖m_dom‖₁ + ν·(‖m_other‖₂ − ‖m_dom‖₂).
    """
    if kind == "share_hinge":
        return nu * torch.relu(other - dom + margin)
    if kind == "hinge":
        return kappa * dom + nu * torch.relu(other - dom + margin)
    if kind == "code_compat":
        return kappa * dom + nu * (other_l2 - dom_l2)
    raise ValueError(f"prior loss kind {kind!r} is not one of {', '.join(PRIOR_LOSS_KINDS)}")


def prior_layers(merger: Merger, roles: dict[str, str]) -> list[tuple[MergedLayer, str]]:
    """(learned layer, role) for every learned layer whose block has a role, in the merger's order."""
    out = []
    for layer in merger.learned_layers():
        role = prior_role(layer.name, roles)
        if role in (CONTENT, STYLE):
            out.append((layer, role))
    return out


def prior_pairs(present: Sequence[str], role: str) -> list[tuple[str, str]]:
    """(dominant tag, other tag) of each prior pair of a layer with a role, from the tags of the LoRAs that
    patch it (``MergedLayer.present``): every content LoRA with the style LoRA, ("c", "s") in a content layer
    and ("s", "c") in a style layer; none without a style part."""
    if STYLE_TAG not in present:
        return []
    contents = [t for t in present if t != STYLE_TAG]
    return [(t, STYLE_TAG) if role == CONTENT else (STYLE_TAG, t) for t in contents]


def _layer_vector(name: str, n: int, seed: int) -> torch.Tensor:
    """v ~ N(0, 1)^n min–max normalised to [0, 1]; seeded by (seed, layer name).

    Seeding per layer name keeps a layer's draw the same whatever other layers the preset or the
    scope include.
    """
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**62))
    v = torch.randn(n, generator=g, dtype=torch.float64)
    lo, hi = v.min(), v.max()
    if hi - lo <= 0:
        return torch.ones(n, dtype=torch.float32)
    return ((v - lo) / (hi - lo)).to(torch.float32)


@torch.no_grad()
def prior_init(
    merger: Merger, roles: dict[str, str], tau_c: float = default("tau_c"), tau_s: float = default("tau_s"),
    seed: int = default("seed"),
) -> int:
    """Initialise every learned mask from the layer priors (docs/method.md §3, "Initialisation").

    Per learned layer one v ~ N(0,1), min–max normalised to [0, 1]. Literally as docs/method.md §3 writes it:
    content layer  m_c = v·[v > τ_s],  m_s = v·[v > τ_c];
    style layer    the mirror: m_s = v·[v > τ_s], m_c = v·[v > τ_c]
    (the dominant mask is thresholded at τ_s = 0.5, the other at τ_c = 0.75, so the dominant LoRA keeps
    more components); every other learned layer: all ones. When r_c ≠ r_s one v of length max(r_c, r_s)
    is drawn and each mask takes its first entries **[decided]**. Further content LoRAs (multi-concept) draw
    their own v, seeded by (seed, layer name, tag), and are thresholded like the first content LoRA.
    Returns the number of prior layers.
    """
    with_role = {layer.name: role for layer, role in prior_layers(merger, roles)}
    for layer in merger.learned_layers():
        role = with_role.get(layer.name)
        pairs = prior_pairs(layer.present, role) if role is not None else []
        if not pairs:
            for tag in layer.present:
                layer.mask(tag).fill_(1.0)
            continue
        dom, other = layer.mask(pairs[0][0]), layer.mask(pairs[0][1])
        v = _layer_vector(layer.name, max(dom.numel(), other.numel()), seed).to(dom.device)
        vd, vo = v[: dom.numel()], v[: other.numel()]
        dom.copy_(vd * (vd > tau_s))
        other.copy_(vo * (vo > tau_c))
        for d, o in pairs[1:]:
            tag = d if role == CONTENT else o
            mask = layer.mask(tag)
            vt = _layer_vector(f"{layer.name}#{tag}", mask.numel(), seed).to(mask.device)
            mask.copy_(vt * (vt > (tau_s if role == CONTENT else tau_c)))
    return len(with_role)


def kept_share(layer: MergedLayer, which: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ρ = Σᵢ wᵢ·|mᵢ| / Σᵢ wᵢ: the share of this LoRA's nuclear norm that the masks keep (1 at m = 1; 0-d).

    See ``component_weights`` for w. Differentiable in the masks.
    """
    w = component_weights(layer, which)
    m = layer.mask(which) if mask is None else mask
    return (w * m.abs()).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)


def layer_prior_loss(
    merger: Merger,
    roles: dict[str, str],
    kind: str = default("prior_loss_kind"),
    kappa: float = default("kappa"),
    nu: float = default("nu"),
    margin: float = default("margin"),
    push: str = default("prior_push"),
) -> torch.Tensor:
    """The rank-constraint loss L_prior (docs/method.md §3, "Rank constraint"): ``prior_penalty`` of every prior
    pair, summed per layer, mean over prior layers; with several
    content LoRAs a layer's term is the sum over its prior pairs (``prior_pairs``), each as below.

    The paper: "in a content layer the content LoRA keeps more rank than the style LoRA, and vice versa",
    with rank relaxed to the nuclear norm and the constraint enforced by a Lagrangian penalty.

    ``kind="share_hinge"`` (default): in a content layer  L = ν·max(0, ρ_s − ρ_c + margin), mirrored in a
    style layer, where ρ is the kept share of each LoRA's nuclear norm (``kept_share``). Scale-free: it does
    not depend on the LoRAs' ranks, on how a file factors ΔW (zero-padded or split components), on the
    number of prior layers (a mean) or on the loss scale — once the dominant LoRA keeps ``margin`` more of its
    nuclear norm than the other, the penalty and its gradient are zero and reconstruction alone decides
    (an exact penalty: the same end state for any ν·λ_prior large enough). κ is not used. ``push="dominant"``
    stops the gradient through ρ_other: the prior then only strengthens the block's own LoRA (masks may exceed
    1) and never weakens the other one; ``push="both"`` moves both.

    ``kind="hinge"``: docs/method.md §3 literally, L = κ·‖m_dom‖₁ + ν·max(0, ‖m_other‖₁ − ‖m_dom‖₁ + margin)
    (the nuclear norm of diag(m) is ‖m‖₁). With κ = ν it equals κ·max(‖m_dom‖₁, ‖m_other‖₁ + margin): blind
    to which LoRA should dominate, minimal at zero masks (measured on MiniBench: masks sink to ~0.1).

    ``kind="code_compat"``: the released code's form, L2 instead of the hinge (the nuclear norm of a mask
    stored as an r×1 matrix is its L2 norm): κ·‖m_dom‖₁ + ν·(‖m_other‖₂ − ‖m_dom‖₂), no hinge, no margin.

    A 0-d tensor; zero (without gradient) when the merger has no prior layer.
    """
    if kind not in PRIOR_LOSS_KINDS:
        raise ValueError(f"prior loss kind {kind!r} is not one of {', '.join(PRIOR_LOSS_KINDS)}")
    if push not in PRIOR_PUSHES:
        raise ValueError(f"prior push {push!r} is not one of {', '.join(PRIOR_PUSHES)}")
    terms = []
    for layer, role in prior_layers(merger, roles):
        pair_terms = []
        for d, o in prior_pairs(layer.present, role):
            dom, other = layer.mask(d), layer.mask(o)
            if kind == "share_hinge":
                rho_other = kept_share(layer, o)
                if push == "dominant":
                    rho_other = rho_other.detach()
                pair_terms.append(prior_penalty(kind, kept_share(layer, d), rho_other, nu=nu, margin=margin))
            elif kind == "hinge":
                pair_terms.append(prior_penalty(kind, dom.abs().sum(), other.abs().sum(), kappa=kappa, nu=nu,
                                                margin=margin))
            else:
                pair_terms.append(prior_penalty(kind, dom.abs().sum(), other.abs().sum(), kappa=kappa, nu=nu,
                                                dom_l2=dom.norm(), other_l2=other.norm()))
        if pair_terms:
            terms.append(pair_terms[0] if len(pair_terms) == 1 else torch.stack(pair_terms).sum())
    if not terms:
        return torch.zeros((), device=merger.device)
    return torch.stack(terms).mean()
