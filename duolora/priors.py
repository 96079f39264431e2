"""SDXL layer priors (METHOD.md §3): prior initialisation of the masks and the rank-constraint loss.

A *prior layer* is a learned layer of a merger whose block has a role ("content" or "style") under the
chosen preset (``duolora.sdxl.preset_roles`` / ``prior_role``). In a content layer the content mask is
the *dominant* one and the style mask the *other* one; in a style layer the other way round.
Both uses of the priors have their own switch in ``MergeConfig`` (``prior_init``, ``prior_loss``).
"""

from __future__ import annotations

import zlib

import torch

from .config import PRIOR_LOSS_KINDS
from .mergers import MergedLayer, Merger
from .sdxl import CONTENT, STYLE, prior_role


def prior_layers(merger: Merger, roles: dict[str, str]) -> list[tuple[MergedLayer, str]]:
    """(learned layer, role) for every learned layer whose block has a role, in the merger's order."""
    out = []
    for layer in merger.learned_layers():
        role = prior_role(layer.name, roles)
        if role in (CONTENT, STYLE):
            out.append((layer, role))
    return out


def _dominant(layer: MergedLayer, role: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dominant mask, other mask): (m_c, m_s) in a content layer, (m_s, m_c) in a style layer."""
    return (layer.m_c, layer.m_s) if role == CONTENT else (layer.m_s, layer.m_c)


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
    merger: Merger, roles: dict[str, str], tau_c: float = 0.75, tau_s: float = 0.5, seed: int = 0
) -> int:
    """Initialise every learned mask from the layer priors (METHOD.md §3, "Initialisation").

    Per learned layer one v ~ N(0,1), min–max normalised to [0, 1]. Literally as METHOD.md §3 writes it:
    content layer  m_c = v·[v > τ_s],  m_s = v·[v > τ_c];
    style layer    the mirror: m_s = v·[v > τ_s], m_c = v·[v > τ_c]
    (the dominant mask is thresholded at τ_s = 0.5, the other at τ_c = 0.75, so the dominant LoRA keeps
    more components); every other learned layer: all ones. When r_c ≠ r_s one v of length max(r_c, r_s)
    is drawn and each mask takes its first entries **[decided]**. Returns the number of prior layers.
    """
    with_role = {layer.name: role for layer, role in prior_layers(merger, roles)}
    for layer in merger.learned_layers():
        role = with_role.get(layer.name)
        if role is None:
            layer.m_c.fill_(1.0)
            layer.m_s.fill_(1.0)
            continue
        dom, other = _dominant(layer, role)
        v = _layer_vector(layer.name, max(dom.numel(), other.numel()), seed).to(dom.device)
        vd, vo = v[: dom.numel()], v[: other.numel()]
        dom.copy_(vd * (vd > tau_s))
        other.copy_(vo * (vo > tau_c))
    return len(with_role)


def layer_prior_loss(
    merger: Merger,
    roles: dict[str, str],
    kind: str = "hinge",
    kappa: float = 1.0,
    nu: float = 1.0,
    margin: float = 0.0,
) -> torch.Tensor:
    """The rank-constraint loss L_prior, mean over prior layers (METHOD.md §3, "Rank constraint").

    rank(diag(m)) = ‖m‖₀ is relaxed to the nuclear norm ‖diag(m)‖_* = ‖m‖₁. Implemented literally as
    METHOD.md §3 writes it: in a content layer

        L = κ·‖m_c‖₁ + ν·max(0, ‖m_s‖₁ − ‖m_c‖₁ + margin),

    mirrored in a style layer (κ·‖m_s‖₁ + ν·max(0, ‖m_c‖₁ − ‖m_s‖₁ + margin)). So the κ term penalises
    the DOMINANT mask (the layer's own LoRA: m_c in a content layer, m_s in a style layer) and the hinge
    keeps the other mask's norm from exceeding it.

    ``kind="code_compat"``: the released code's form, L2 instead of the hinge (the nuclear norm of a
    mask stored as an r×1 matrix is its L2 norm): κ·‖m_dom‖₁ + ν·(‖m_other‖₂ − ‖m_dom‖₂), no hinge.
    A 0-d tensor; zero (without gradient) when the merger has no prior layer.
    """
    if kind not in PRIOR_LOSS_KINDS:
        raise ValueError(f"prior loss kind {kind!r} is not one of {', '.join(PRIOR_LOSS_KINDS)}")
    terms = []
    for layer, role in prior_layers(merger, roles):
        dom, other = _dominant(layer, role)
        l1_dom = dom.abs().sum()
        if kind == "hinge":
            terms.append(kappa * l1_dom + nu * torch.relu(other.abs().sum() - l1_dom + margin))
        else:
            terms.append(kappa * l1_dom + nu * (other.norm() - dom.norm()))
    if not terms:
        return torch.zeros((), device=merger.device)
    return torch.stack(terms).mean()
