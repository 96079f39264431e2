"""K-LoRA: training-free fusion of a content and a style LoRA at sampling time.

Ouyang, Li and Hou, "K-LoRA: Unlocking Training-Free Fusion of Any Subject and Style LoRAs" (CVPR 2025,
arXiv 2502.18461). Nothing is learned and no merged file exists: in every layer the rule governs, each model
call applies ONE of the two LoRAs whole, chosen from their weights and from how far sampling has got.

The rule, per layer l of the rule's scope (the attention projections by default, as in the paper) and per
model call at sampling progress p ∈ [0, 1] (0 at the first step; the paper's t/T):

    S_c,l = sum of the K largest |ΔW_c,l| entries,   S_s,l likewise,   K = r_c,l · r_s,l
    γ     = Σ_l Σ|ΔW_c,l| / Σ_l Σ|ΔW_s,l|            (over the rule's layers; balances the LoRAs' magnitudes)
    S(p)  = α·p + β                                 (α = 1.5, β = 0.5: the style LoRA's score grows with p)
    layer l applies ΔW_c alone if S_c,l > γ·S(p)·S_s,l, else ΔW_s alone.

Early steps (which lay out the subject) therefore favour the content LoRA and late steps (which draw texture)
the style LoRA. Layers both LoRAs patch outside the scope get both LoRAs summed, layers only one LoRA patches
get that LoRA: the pack's rule for every layer a merge method does not govern (``duolora.mergers``).

Cost. S_c, S_s and the sums behind γ are statistics of the ELEMENTS of ΔW = B·A (a top-K of |B·A| has no
low-rank shortcut), so they are computed once per layer, when the rule is built, from B·A formed a block of
rows at a time (``layer_statistics``: at most ``STAT_CHUNK_ELEMENTS`` entries exist at once); nothing dense is
kept. At sampling time a model call costs one comparison per layer to choose, and the chosen LoRA is applied
through ``duolora.adapter``'s low-rank path (x·Aᵀ·Bᵀ, never a dense ΔW).

Progress. ``schedule_progress(σ, schedule)`` places the σ of a model call on a descending σ schedule: at the
schedule's i-th σ of n steps it is i/n, between two entries it is interpolated (samplers that evaluate the model
between steps), above the first 0 and below the last 1. A host passes the sampling run's own schedule (the
paper's t/T: steps done over steps) or the model's training noise schedule (progress by noise level, the same
for any number of steps, any scheduler and any split of a run into several samplers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .adapter import CONTENT, STYLE, Adapter, plain_weight
from .lora import LoRA
from .mergedlayer import MergedLayer
from .mergers import DirectMerger

if TYPE_CHECKING:
    from typing_extensions import Self

# The paper's scale S(p) = α·p + β (its experiments use α = 1.5, β = 0.5).
DEFAULT_ALPHA = 1.5
DEFAULT_BETA = 0.5
# Entries of B·A that exist at once while a layer's statistics are computed (16 Mi float32 = 64 MiB).
STAT_CHUNK_ELEMENTS = 1 << 24


class KLoRAError(ValueError):
    """A K-LoRA that cannot be built; the message names the files and what to do."""


@dataclass(frozen=True)
class LayerStatistics:
    """What the rule needs from one layer's two ΔW: the top-K sums S_c, S_s (K = ``k``) and the sums of all
    |entries| (γ's terms)."""

    name: str
    k: int
    top_c: float
    top_s: float
    abs_c: float
    abs_s: float


def _largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries of a 1-D tensor, in no order.

    torch.topk over millions of values is slow on a CPU; so first a bound: split the values into at least 4k
    groups and take each group's maximum. The k-th largest maximum is at most the k-th largest value (k groups
    each hold a value at least that large), so the exact top-k runs only on the values at or above it."""
    n = values.numel()
    if k >= n:
        return values
    groups = 4 * k
    size = n // groups
    if size >= 2:
        maxima = values[: groups * size].reshape(groups, size).amax(dim=1)
        bound = torch.topk(maxima, k, sorted=False).values.min()
        values = values[values >= bound]
    return torch.topk(values, k, sorted=False).values


def top_k_abs(B: torch.Tensor, A: torch.Tensor, k: int,
              chunk_elements: int = STAT_CHUNK_ELEMENTS) -> tuple[float, float]:
    """(sum of the k largest |entries| of B·A, sum of all |entries|) for B (out, r), A (r, n), in float64.

    B·A is formed ``chunk_elements // n`` rows at a time (float32, on B's device); a running top-k keeps at
    most k + one block of values. k is capped at out·n.
    """
    out_f, n = B.shape[0], A.shape[1]
    k = max(0, min(int(k), out_f * n))
    B32, A32 = B.detach().float(), A.detach().to(device=B.device, dtype=torch.float32)
    rows = max(1, int(chunk_elements) // max(n, 1))
    best: torch.Tensor | None = None
    total = torch.zeros((), dtype=torch.float64, device=B.device)
    for start in range(0, out_f, rows):
        block = (B32[start:start + rows] @ A32).abs_().flatten()
        total += block.sum(dtype=torch.float64)
        if k == 0:
            continue
        best = _largest(block if best is None else torch.cat([best, block]), k)
    top = 0.0 if best is None else float(best.sum(dtype=torch.float64))
    return top, float(total)


def layer_statistics(layer: MergedLayer, k: int = 0, device: torch.device | str | None = None,
                     chunk_elements: int = STAT_CHUNK_ELEMENTS) -> LayerStatistics:
    """The rule's statistics of one layer both LoRAs patch (``k`` 0: K = r_c·r_s, the paper's choice)."""
    fc, fs = layer.factors("c"), layer.factors("s")
    if fc is None or fs is None:
        raise KLoRAError(f"layer {layer.name}: K-LoRA's rule needs both LoRAs in the layer")
    k = int(k) if k > 0 else layer.rank("c") * layer.rank("s")
    dev = torch.device(device) if device is not None else fc[0].device
    top_c, abs_c = top_k_abs(fc[0].to(dev), fc[1].to(dev), k, chunk_elements)
    top_s, abs_s = top_k_abs(fs[0].to(dev), fs[1].to(dev), k, chunk_elements)
    return LayerStatistics(layer.name, k, top_c, top_s, abs_c, abs_s)


def schedule_progress(sigma: float, schedule: Sequence[float]) -> float:
    """How far sampling has got at noise level ``sigma`` on a σ ``schedule`` (n + 1 values for n steps, from
    the highest σ down): i/n at the schedule's i-th σ, linear between two entries, 0 above the first entry and
    1 below the last (module docstring). A schedule of fewer than two values gives 0."""
    values = [float(v) for v in schedule]
    n = len(values) - 1
    sigma = float(sigma)
    if n < 1 or not sigma < values[0]:
        return 0.0
    for i in range(n):
        hi, lo = values[i], values[i + 1]
        if lo <= sigma <= hi:
            return (i + (0.0 if hi == lo else (hi - sigma) / (hi - lo))) / n
    return 1.0


class KLoRA:
    """The K-LoRA rule over a content and a style LoRA (module docstring).

    ``alpha``, ``beta``: the scale S(p) = α·p + β of the style LoRA's score (both ≥ 0). ``scope``:
    "attention" (the paper: the attention projections) or "all" (every UNet layer both LoRAs patch).
    ``top_k``: K per layer (0: r_c·r_s, the paper's). ``device``: where the statistics are computed (default:
    the factors' device). ``merger`` holds both LoRAs' factors for the adapter (a direct merge, so every layer
    outside the rule is the sum of what the two LoRAs patch there) and their bias/norm differences, summed
    (``patches``: not low-rank layers, so not the rule's to choose).
    """

    def __init__(self, content: LoRA, style: LoRA, *, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA,
                 scope: str = "attention", top_k: int = 0, device: torch.device | str | None = None,
                 chunk_elements: int = STAT_CHUNK_ELEMENTS) -> None:
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not (math.isfinite(float(value)) and float(value) >= 0.0):
                raise KLoRAError(f"K-LoRA's {name} must be a finite number ≥ 0, got {value}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.merger = DirectMerger(content, style, scope=scope)
        self.statistics: dict[str, LayerStatistics] = {}
        with torch.no_grad():
            for name, layer in self.merger.items():
                if self.merger.in_scope(name) and layer.factors("c") is not None and layer.factors("s") is not None:
                    self.statistics[name] = layer_statistics(layer, top_k, device, chunk_elements)
        if not self.statistics:
            raise KLoRAError(
                f"the content LoRA {content.name!r} and the style LoRA {style.name!r} share no "
                f"{'attention ' if scope == 'attention' else ''}layer of the UNet, so K-LoRA has no layer to choose "
                f"in; " + ("try scope 'all' or " if scope == "attention" else "")
                + "check that both LoRAs are for the same base model")
        self.sum_c = math.fsum(s.abs_c for s in self.statistics.values())
        self.sum_s = math.fsum(s.abs_s for s in self.statistics.values())

    @property
    def gamma(self) -> float:
        """γ = Σ|ΔW_c| / Σ|ΔW_s| over the rule's layers (inf when the style LoRA is all zeros there)."""
        if self.sum_s == 0.0:
            return math.inf if self.sum_c > 0.0 else 1.0
        return self.sum_c / self.sum_s

    def scale(self, progress: float) -> float:
        """S(p) = α·p + β."""
        return self.alpha * float(progress) + self.beta

    def choose(self, progress: float) -> dict[str, str]:
        """Layer -> ``"content"`` or ``"style"``: the LoRA each layer of the rule applies at ``progress``."""
        if self.sum_s == 0.0 or self.sum_c == 0.0:
            # One LoRA is zero in every layer of the rule: the other one is the only choice that does anything.
            pick = CONTENT if self.sum_s == 0.0 and self.sum_c > 0.0 else STYLE
            return {name: pick for name in self.statistics}
        threshold = self.gamma * self.scale(progress)
        return {name: CONTENT if s.top_c > threshold * s.top_s else STYLE for name, s in self.statistics.items()}

    def content_share(self, progress: float) -> float:
        """Fraction of the rule's layers that apply the content LoRA at ``progress``."""
        choice = self.choose(progress)
        return sum(1 for v in choice.values() if v == CONTENT) / len(choice)

    def patch(self, modules: Mapping[str, nn.Module], compute_dtype: torch.dtype | None = torch.float32,
              foldable: Callable[[nn.Module], bool] = plain_weight) -> KLoRAPatch:
        """A ``KLoRAPatch`` of this rule over ``modules`` (canonical layer name -> module), not yet attached."""
        return KLoRAPatch(self, modules, compute_dtype, foldable)

    def describe(self) -> str:
        """One line: layers under the rule, γ and the content LoRA's share of them at the first and last step."""
        return (f"K-LoRA over {len(self.statistics)} layers: γ = {self.gamma:.4g}; content LoRA in "
                f"{100 * self.content_share(0.0):.0f} % of them at the first step, "
                f"{100 * self.content_share(1.0):.0f} % at the end (α = {self.alpha:g}, β = {self.beta:g})")


class KLoRAPatch:
    """The rule attached to a model: ``set_progress(p)`` before a model call makes every layer of the rule apply
    the LoRA ``KLoRA.choose(p)`` picks, through the adapter's low-rank path (``constant_path="lowrank"``: no
    ΔW is folded into a weight). Use as a context manager, or ``attach()`` / ``remove()``: removing restores
    every module exactly (``duolora.adapter``)."""

    def __init__(self, klora: KLoRA, modules: Mapping[str, nn.Module],
                 compute_dtype: torch.dtype | None = torch.float32,
                 foldable: Callable[[nn.Module], bool] = plain_weight) -> None:
        self.klora = klora
        self.adapter = Adapter(klora.merger, modules, compute_dtype, foldable, constant_path="lowrank")
        self.progress: float | None = None
        self.choice: dict[str, str] = {}
        self._last: tuple[float, dict[str, str]] | None = None

    def set_progress(self, progress: float) -> dict[str, str]:
        """Choose every layer's LoRA for ``progress`` (clipped to [0, 1]); returns the choice."""
        p = min(1.0, max(0.0, float(progress)))
        if self._last is None or self._last[0] != p:
            self._last = (p, self.klora.choose(p))
            self.adapter.set_layer_branches(self._last[1])
        self.progress, self.choice = p, self._last[1]
        return self.choice

    def attach(self) -> Self:
        if self.progress is None:
            self.set_progress(0.0)
        self.adapter.attach()
        return self

    def remove(self) -> None:
        self.adapter.remove()

    @property
    def attached(self) -> bool:
        return self.adapter.attached_now

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()
