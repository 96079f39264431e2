"""MiniBench 2's paired statistics (bench/minibench/mb_stats.py): unit means, paired differences and the
percentile bootstrap, on hand-made numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "minibench"))
import mb_stats


def test_unit_means_count_both_hits_per_sample() -> None:
    m = mb_stats.unit_means({"content_hit": [1, 1, 0, 0], "style_hit": [1, 0, 1, 0],
                             "content_cos": [0.5, 0.5, 0.0, 1.0], "style_cos": [0.1, 0.2, 0.3, 0.4]})
    assert m == pytest.approx({"content_hit": 0.5, "style_hit": 0.5, "both_hit": 0.25, "content_cos": 0.5,
                               "style_cos": 0.25})


def test_paired_difference_uses_common_units_and_brackets_the_mean() -> None:
    ref = {("a", 0): {"both_hit": 0.10}, ("a", 1): {"both_hit": 0.20}, ("b", 0): {"both_hit": 0.30}}
    new = {("a", 0): {"both_hit": 0.15}, ("a", 1): {"both_hit": 0.30}, ("b", 0): {"both_hit": 0.30},
           ("b", 1): {"both_hit": 0.90}}  # ("b", 1) has no reference: not a paired unit
    d = mb_stats.paired_difference(new, ref, "both_hit", resamples=2000)
    assert d["units"] == 3
    assert d["diff"] == pytest.approx(0.05)
    # Resampled means of {0.05, 0.10, 0.00} lie in [0, 0.10]; the interval is inside and around the mean.
    assert 0.0 <= d["lo"] <= d["diff"] <= d["hi"] <= 0.10
    assert d["half_width"] == pytest.approx((d["hi"] - d["lo"]) / 2)


def test_bootstrap_interval_shrinks_like_one_over_root_n() -> None:
    diffs = [(-1) ** i * 0.1 for i in range(16)]
    w16 = mb_stats.bootstrap_interval(diffs, seed=1)
    w64 = mb_stats.bootstrap_interval(diffs * 4, seed=1)
    ratio = (w16[1] - w16[0]) / (w64[1] - w64[0])
    assert 1.6 <= ratio <= 2.5  # √(64/16) = 2
    assert mb_stats.bootstrap_interval([0.3]) == (0.3, 0.3)
    with pytest.raises(ValueError, match="no units"):
        mb_stats.bootstrap_interval([])
