"""Constyle: the cycle-consistency terms of paper mode, their targets and their scale.

Per step, with one σ and one noise ε shared by every branch:

* style cycle on x_c: ε̂ = ε_s(x_c, p_cs), x̂0 from ε̂, re-noise with (σ, ε), ε_csc = ε_s(·, p_c);
  L_cyc = MSE(ε_m(x_c, p_c), ε_csc);
* content cycle, the mirror on x_s with the content LoRA and p_s: L_rev = MSE(ε_m(x_s, p_s), ε_scs);
* ``constyle_iterations`` k repeats the add/remove round trip (0 = off, 1 = the paper).

With several content LoRAs (multi-concept) every content LoRA i has one cycle in each direction ("cycle",
"cycle2", …; "reverse", "reverse2", …). The targets carry no gradient; ``duolora.objective.DuoLoRAObjective``
takes the MSEs against the merged prediction and weighs them (λ_cyc, λ_rev, ``cycle_scales``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .adapter import STYLE, content_branch
from .denoiser import Denoiser, predict_batched
from .mergers import term_name


def cycle_scales(terms: Mapping[str, torch.Tensor], n_content: int, cycle_scale: str) -> dict[str, torch.Tensor]:
    """Per cycle term, the factor of ``cycle_scale="matched"`` (none for "fixed").

    Both a cycle term and its reconstruction term are MSEs of the same merged prediction (ε_m(x_c, p_c)
    for L_cyc and L_c; ε_m(x_s, p_s) for L_rev and L_s) against different targets, so their gradients
    share the Jacobian and differ by the residual: ‖∇L‖ ∝ √L to first order. Multiplying L_cyc by
    √(L_c / L_cyc) (detached) makes λ_cyc·(scaled L_cyc) pull on the masks with the strength of λ_cyc·L_c up
    to how differently the two residuals project through the Jacobian — λ becomes a relative weight of the
    same order as reconstruction at 1, whatever the loss scale of the model (measured on the engine's toy:
    cycle ÷ reconstruction gradient 0.24 at λ = 1 "matched", 0.0025 at the paper's fixed λ = 0.01). The
    reported values stay unscaled. Content LoRA i's cycle is matched to its own L_ci, each reverse cycle
    to L_s.
    """
    if cycle_scale != "matched":
        return {}
    out = {}
    pairs = [(term_name("cycle", i), term_name("content", i)) for i in range(n_content)]
    pairs += [(term_name("reverse", i), "style") for i in range(n_content)]
    for cyc, rec in sorted(pairs, key=lambda p: p[0].startswith("reverse")):
        if cyc in terms and rec in terms:
            ratio = terms[rec].detach() / terms[cyc].detach().clamp_min(torch.finfo(torch.float32).tiny)
            out[cyc] = ratio.sqrt()
    return out


@torch.no_grad()
def targets(den: Denoiser, refs: Any, w: Mapping[str, float], k: int, x_c: Sequence[torch.Tensor], x_s: torch.Tensor,
            eps_c: Sequence[torch.Tensor], eps_s: torch.Tensor, sigma: torch.Tensor) -> dict[str, torch.Tensor]:
    """No-grad targets of the active terms (those of non-zero weight in ``w``), one batched call per hop (2k
    calls for Constyle k): every content LoRA's and the style LoRA's reconstruction target ε_ci(x_ci, p_ci),
    ε_s(x_s, p_s), and the end of each active cycle (``term_name("cycle", i)``, ``term_name("reverse", i)``).

    The reconstruction targets share the first hop's batched call with the cycles' "add" predictions (one
    ``predict`` where there would be two). ``refs``: a ``duolora.objective.References``; x_c, eps_c: one noisy
    latent and its noise per content LoRA; x_s, eps_s the style one's; σ shared by all.
    """
    subjects = refs.subjects
    k = int(k)
    # Constyle "add" hop: style cycle adds the style to x_ci, content cycle adds content LoRA i to x_s.
    # Each entry: (latent, noise, branch of both hops, prompt of the remove hop, prompt of the add hop).
    cyc = {term_name("cycle", i): (x_c[i], eps_c[i], STYLE, sub.p_c, sub.p_cs) for i, sub in enumerate(subjects)}
    cyc.update({term_name("reverse", i): (x_s, eps_s, content_branch(i), refs.p_s, sub.p_cs)
                for i, sub in enumerate(subjects)})
    cyc = {t: v for t, v in cyc.items() if w[t] != 0}
    # The first hop's evaluations ordered by branch (per content LoRA: its target and its add, then the
    # style target and the style adds): the adapter evaluates each run of equal branches with one fixed ΔW.
    first = []
    for i, sub in enumerate(subjects):
        content, reverse = term_name("content", i), term_name("reverse", i)
        first += [(content, (x_c[i], sigma, sub.p_c, content_branch(i))) if w[content] != 0 else None,
                  (reverse + ":add", (x_s, sigma, sub.p_cs, content_branch(i))) if reverse in cyc else None]
    first.append(("style", (x_s, sigma, refs.p_s, STYLE)) if w["style"] != 0 else None)
    for i, sub in enumerate(subjects):
        cycle = term_name("cycle", i)
        first.append((cycle + ":add", (x_c[i], sigma, sub.p_cs, STYLE)) if cycle in cyc else None)
    keys = [f[0] for f in first if f is not None]
    items = [f[1] for f in first if f is not None]
    out: dict[str, torch.Tensor] = {}
    if not items:
        return out
    preds = dict(zip(keys, predict_batched(den, items)))
    out.update({t: p for t, p in preds.items() if not t.endswith(":add")})
    if not cyc:
        return out
    state = {t: (x, preds[t + ":add"]) for t, (x, *_rest) in cyc.items()}  # (latent, ε at that latent)
    for it in range(k):
        # "remove" hop: x̂0 from the add prediction, re-noise with the same σ and ε, predict with the
        # single LoRA under the original prompt (the released code uses the same LoRA for both hops).
        state = _hop(den, cyc, state, sigma, REMOVE_PROMPT)
        if it == k - 1:
            break
        # Next round trip: add the style (content) again to the estimate of the previous one.
        state = _hop(den, cyc, state, sigma, ADD_PROMPT)
    out.update({t: e for t, (_, e) in state.items()})
    return out


# Where a cycle entry (latent, noise, branch, remove prompt, add prompt) keeps the prompt of each hop.
REMOVE_PROMPT, ADD_PROMPT = 3, 4


def _hop(den: Denoiser, cyc: Mapping[str, tuple], state: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
         sigma: torch.Tensor, prompt_at: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One hop of every active cycle: x̂0 from (latent, ε at that latent), re-noised with the cycle's σ and ε,
    predicted with its branch under the hop's prompt; one batched call. Returns the new (latent, ε) per cycle."""
    hop = []
    for t, (x, eps_hat) in state.items():
        noise, branch, prompt = cyc[t][1], cyc[t][2], cyc[t][prompt_at]
        y = den.add_noise(den.x0_from_eps(x, eps_hat, sigma), noise, sigma)
        hop.append((t, y, (y, sigma, prompt, branch)))
    predicted = predict_batched(den, [h[2] for h in hop])
    return {t: (y, e) for (t, y, _), e in zip(hop, predicted)}
