"""Paired statistics of MiniBench 2: per-unit means, paired differences and bootstrap intervals.

A *unit* is one (content × style pair, seed): within a unit every method samples from the same initial noise
with the same sampler and prompt, so the methods' scores of one unit are paired. Every number here is a mean
over units of the unit's mean over its samples; an interval is the 2.5 % / 97.5 % percentile of the mean
paired difference over ``resamples`` bootstrap draws of units with replacement (pairs × seeds resampled
together as units; Efron & Tibshirani 1993, ch. 13, percentile interval). Pure functions, no torch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

METRICS: tuple[str, ...] = ("content_hit", "style_hit", "both_hit", "content_cos", "style_cos")


def unit_means(per_sample: dict[str, Sequence[float]]) -> dict[str, float]:
    """Means over the samples of one run for every metric in ``METRICS`` (both_hit from the two hits)."""
    ch, sh = per_sample["content_hit"], per_sample["style_hit"]
    n = len(ch)
    out = {
        "content_hit": sum(ch) / n,
        "style_hit": sum(sh) / n,
        "both_hit": sum(a * b for a, b in zip(ch, sh, strict=True)) / n,
        "content_cos": sum(per_sample["content_cos"]) / n,
        "style_cos": sum(per_sample["style_cos"]) / n,
    }
    return out


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def bootstrap_interval(diffs: Sequence[float], resamples: int = 4000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs`` (one paired difference per unit).

    Raises ValueError on an empty sequence. With one unit the interval is that unit's value twice.
    """
    if not diffs:
        raise ValueError("no units to bootstrap")
    n = len(diffs)
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def paired_difference(method: dict[tuple, dict[str, float]], reference: dict[tuple, dict[str, float]],
                      metric: str, resamples: int = 4000, seed: int = 0) -> dict[str, float]:
    """Mean paired difference (method − reference) of ``metric`` over the units both have, with its interval.

    ``method``/``reference``: unit → unit means. Returns {"diff", "lo", "hi", "half_width", "units"}.
    """
    units = sorted(set(method) & set(reference))
    diffs = [method[u][metric] - reference[u][metric] for u in units]
    lo, hi = bootstrap_interval(diffs, resamples, seed)
    return {"diff": mean(diffs), "lo": lo, "hi": hi, "half_width": (hi - lo) / 2, "units": len(units)}
