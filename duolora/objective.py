"""The DuoLoRA objective through the diffusion model (docs/method.md §4, "paper mode").

The model is reached only through ``duolora.denoiser.Denoiser``. Per step, with one σ and one noise ε shared by
every branch:

* reconstruction  L_c = MSE(ε_m(x_c, p_c), ε_c(x_c, p_c)),  L_s = MSE(ε_m(x_s, p_s), ε_s(x_s, p_s));
* Constyle        L_cyc = MSE(ε_m(x_c, p_c), ε_csc), L_rev = MSE(ε_m(x_s, p_s), ε_scs): the targets of the style
                  and content cycles and their scale live in ``duolora.constyle``;
* similarity      L_sim = mean over learned layers of mean|m_c ⊙ m_s| (``mask_similarity``);
* priors          L_prior from ``duolora.priors.layer_prior_loss``.

With several content LoRAs (multi-concept) each content LoRA i has its own references and prompts (x_ci, p_ci,
p_csi) and its own terms: reconstruction L_ci = MSE(ε_m(x_ci, p_ci), ε_ci(x_ci, p_ci)) (reported as "content",
"content2", …) and, with Constyle on, one cycle per content LoRA in each direction ("cycle", "cycle2", …;
"reverse", "reverse2", …). Each term has the weight of its kind (λ_c, λ_cyc, λ_rev), so every LoRA's
reconstruction weighs as much as the style LoRA's.

Targets carry no gradient. All no-grad evaluations of one hop share one batched ``predict`` call
(2k calls in all) and the two merged evaluations share one call with gradient: 8 evaluations per
step at k = 1, 2 of them with gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from . import constyle
from .adapter import MERGED
from .denoiser import Denoiser, DiscreteSchedule, predict_batched
from .mergers import Merger, term_name
from .priors import layer_prior_loss, preset_roles

if TYPE_CHECKING:
    from .config import MergeConfig

# Names other modules and hosts import from here.
__all__ = [
    "LOSS_TERMS", "ContentReferences", "Denoiser", "DiscreteSchedule", "DuoLoRAObjective", "References",
    "loss_terms", "mask_similarity", "predict_batched", "similarity_loss", "term_name",
]

LOSS_TERMS: tuple[str, ...] = ("content", "style", "cycle", "reverse", "prior", "similarity")


def loss_terms(n_content: int = 1) -> tuple[str, ...]:
    """Every loss term of a merge of ``n_content`` content LoRAs, in the order they are summed."""
    names = [term_name("content", i) for i in range(n_content)] + ["style"]
    for kind in ("cycle", "reverse"):
        names += [term_name(kind, i) for i in range(n_content)]
    return (*names, "prior", "similarity")


@dataclass
class ContentReferences:
    """A further content LoRA's training material (multi-concept): its clean latents and its content and cross
    prompts, as ``References`` holds them for the first content LoRA."""

    latents: Sequence[torch.Tensor]
    p_c: Any
    p_cs: Any


@dataclass
class References:
    """The merge's training material (docs/method.md §4).

    ``content``/``style``: clean latents, each (C, H, W) or (1, C, H, W); the loop takes one of each per
    step and cycles through the lists. ``p_c``, ``p_s``, ``p_cs``: the content, style and cross
    ("<content> in <style> style") conditionings, each one opaque per-sample conditioning.
    ``more_content``: one ``ContentReferences`` per further content LoRA (multi-concept), in order.
    """

    content: Sequence[torch.Tensor]
    style: Sequence[torch.Tensor]
    p_c: Any
    p_s: Any
    p_cs: Any
    more_content: Sequence[ContentReferences] = ()

    def __post_init__(self) -> None:
        if isinstance(self.content, torch.Tensor) or isinstance(self.style, torch.Tensor):
            # A batched tensor is a list of latents.
            self.content = list(self.content) if isinstance(self.content, torch.Tensor) else self.content
            self.style = list(self.style) if isinstance(self.style, torch.Tensor) else self.style
        if not self.content or not self.style:
            raise ValueError("the merge needs at least one content latent and one style latent")
        self.content = [_as_batch1(x, "content") for x in self.content]
        self.style = [_as_batch1(x, "style") for x in self.style]
        more = []
        for i, refs in enumerate(self.more_content):
            latents = list(refs.latents)
            if not latents:
                raise ValueError(f"content LoRA {i + 2} needs at least one latent")
            more.append(ContentReferences([_as_batch1(x, f"content LoRA {i + 2}") for x in latents],
                                          refs.p_c, refs.p_cs))
        self.more_content = more

    @property
    def subjects(self) -> list[ContentReferences]:
        """Every content LoRA's (latents, p_c, p_cs), the first one's from the main fields."""
        return [ContentReferences(self.content, self.p_c, self.p_cs), *self.more_content]


def _as_batch1(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"a {what} latent must be (C, H, W) or (1, C, H, W), got {tuple(x.shape)}")
    return x


def mask_similarity(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """ZipLoRA's similarity of one layer's masks (one per LoRA, along the last dimension; any leading batch
    shape): mean over every pair of LoRAs of mean_i |m_a,i·m_b,i| over their first k = min(r_a, r_b) entries
    (0 where k = 0). The one formula of L_sim for paper mode (``similarity_loss``) and the per-layer solver."""
    pairs = []
    for i, a in enumerate(masks):
        for b in masks[i + 1:]:
            k = min(a.shape[-1], b.shape[-1])
            pairs.append((a[..., :k] * b[..., :k]).abs().mean(-1) if k else a.new_zeros(a.shape[:-1]))
    return pairs[0] if len(pairs) == 1 else torch.stack(pairs).mean(0)


def similarity_loss(merger: Merger) -> torch.Tensor:
    """L_sim = mean over learned layers of mean|m_c ⊙ m_s| (ZipLoRA; docs/method.md §4).

    When r_c ≠ r_s (ZipRank) the first min(r_c, r_s) entries are paired **[decided]**. With more than two LoRAs
    in a layer, that layer's value is the mean over every pair of its LoRAs. 0-d tensor; zero without
    gradient when nothing is learned.
    """
    terms = [mask_similarity([layer.mask(t) for t in layer.present]) for layer in merger.learned_layers()]
    if not terms:
        return torch.zeros((), device=merger.device)
    return torch.stack(terms).mean()


class DuoLoRAObjective:
    """L = λ_c·L_c + λ_s·L_s + λ_cyc·L_cyc + λ_rev·L_rev + λ_prior·L_prior + λ_sim·L_sim (docs/method.md §4); with
    several content LoRAs, λ_c·L_ci, λ_cyc·L_cyci and λ_rev·L_revi for each content LoRA i (module docstring).

    A term whose weight is 0 (or whose switch is off: ``constyle_iterations = 0``, ``prior_loss = False``)
    is not computed at all, nor are its targets.
    """

    def __init__(self, merger: Merger, denoiser: Denoiser, references: References,
                 config: MergeConfig, roles: dict[str, str] | None = None) -> None:
        self.merger = merger
        self.denoiser = denoiser
        self.references = references
        self.config = config
        self.roles = preset_roles(config.prior_preset, config.custom_prior) if roles is None else roles
        self.n_content = len(references.subjects)
        n_merger = merger.n_content
        if self.n_content != n_merger:
            raise ValueError(f"the merger has {n_merger} content LoRA(s) but the references are for "
                             f"{self.n_content}")
        k = int(config.constyle_iterations)
        lam_c, lam_s = config.reconstruction_weights
        per_kind = {"content": lam_c,
                    "cycle": float(config.lambda_cyc) if k > 0 else 0.0,
                    "reverse": float(config.lambda_rev) if k > 0 else 0.0}
        self.weights: dict[str, float] = {
            "style": lam_s,
            "prior": float(config.lambda_prior) if config.prior_loss else 0.0,
            "similarity": float(config.effective_lambda_sim),
        }
        for kind, weight in per_kind.items():
            for i in range(self.n_content):
                self.weights[term_name(kind, i)] = weight

    @property
    def active_terms(self) -> list[str]:
        return [t for t in loss_terms(self.n_content) if self.weights[t] != 0.0]

    def __call__(self, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of training step ``step`` (0-based) and its unweighted terms (plus "total") as floats.

        ``generator`` (CPU) draws σ and ε; the same generator state gives the same loss.
        """
        w, den, refs = self.weights, self.denoiser, self.references
        subjects = refs.subjects
        x_c0 = [sub.latents[step % len(sub.latents)] for sub in subjects]
        x_s0 = refs.style[step % len(refs.style)]
        # σ and ε are drawn on the CPU generator (the same numbers on every device) and moved to the
        # latents' device once; everything after that (x_t, x̂0, the losses) stays on that device.
        sigma = torch.as_tensor(den.sample_sigma(generator), dtype=torch.float32).reshape(()).to(x_c0[0].device)
        eps_c = [torch.randn(x_c0[0].shape, generator=generator).to(device=x_c0[0].device, dtype=x_c0[0].dtype)]
        if x_s0.shape == x_c0[0].shape:
            eps_s = eps_c[0].to(device=x_s0.device, dtype=x_s0.dtype)  # one noise shared by every branch
        else:
            # Latents of different sizes cannot share one noise tensor; draw the style one next.
            eps_s = torch.randn(x_s0.shape, generator=generator).to(device=x_s0.device, dtype=x_s0.dtype)
        for x in x_c0[1:]:
            # Further content LoRAs share the first one's noise where their latents have its size.
            same = x.shape == x_c0[0].shape
            noise = eps_c[0] if same else torch.randn(x.shape, generator=generator)
            eps_c.append(noise.to(device=x.device, dtype=x.dtype))
        x_c = [den.add_noise(x0, e, sigma) for x0, e in zip(x_c0, eps_c)]
        x_s = den.add_noise(x_s0, eps_s, sigma)

        names = range(self.n_content)
        need_c = [w[term_name("content", i)] != 0 or w[term_name("cycle", i)] != 0 for i in names]
        need_s = w["style"] != 0 or any(w[term_name("reverse", i)] != 0 for i in names)
        targets = constyle.targets(den, refs, w, self.config.constyle_iterations, x_c, x_s, eps_c, eps_s, sigma)

        terms: dict[str, torch.Tensor] = {}
        grad_items = [(x_c[i], sigma, subjects[i].p_c, MERGED) for i in names if need_c[i]]
        if need_s:
            grad_items.append((x_s, sigma, refs.p_s, MERGED))
        if grad_items:
            preds = iter(predict_batched(den, grad_items))
            eps_m_c = [next(preds) if need_c[i] else None for i in names]
            eps_m_s = next(preds) if need_s else None
            order = ([(term_name("content", i), eps_m_c[i]) for i in names] + [("style", eps_m_s)]
                     + [(term_name("cycle", i), eps_m_c[i]) for i in names]
                     + [(term_name("reverse", i), eps_m_s) for i in names])
            for term, pred in order:
                if w[term] != 0:
                    terms[term] = F.mse_loss(pred.float(), targets[term].float())
        if w["prior"] != 0:
            c = self.config
            terms["prior"] = layer_prior_loss(self.merger, self.roles, c.prior_loss_kind, c.kappa, c.nu, c.margin,
                                              c.prior_push)
        if w["similarity"] != 0:
            terms["similarity"] = similarity_loss(self.merger)

        scale = constyle.cycle_scales(terms, self.n_content, self.config.cycle_scale)
        total = torch.zeros(())
        for i, (t, v) in enumerate(terms.items()):
            # Start from the first term so the total lives on the model's device.
            weighted = w[t] * scale.get(t, 1.0) * v
            total = weighted if i == 0 else total + weighted
        # One device-to-host copy for every reported value (float64 holds each float32 value exactly).
        numbers = torch.stack([v.detach().double() for v in (*terms.values(), total)]).tolist()
        values = dict(zip((*terms, "total"), numbers))
        return total, values

