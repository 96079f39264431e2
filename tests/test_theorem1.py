"""Theorem 1 of the paper: masking rank components in the SVD basis of ΔW loses no more than masking output
features at the same budget. Keeping the k leading singular directions is the best rank-k approximation
(Eckart–Young), so its error is √(Σ_{i>k} σᵢ²), which no choice of k output rows can beat. In the raw basis of a
file's factors the statement need not hold; a two-component counterexample shows it.

All LoRAs here are synthetic (random factors with a decaying spectrum, see engine_toys.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from engine_toys import Q, single_thread, synthetic_layer  # noqa: F401 - autouse fixture

from duolora.lora import LoRA, LowRank
from duolora.mergers import ZipLoRAMerger, ZipRankMerger


def _best_rows_error(delta: torch.Tensor, k: int) -> float:
    """Output masking with budget k: keep the k rows of largest norm (the optimal binary choice; a
    real-valued diagonal mask cannot do better since each kept row is best scaled by 1)."""
    norms = delta.norm(dim=1) ** 2
    return float((norms.sum() - norms.topk(k).values.sum()).clamp_min(0).sqrt())


def test_theorem1_rank_masking_in_svd_basis_beats_output_masking() -> None:
    g = torch.Generator().manual_seed(7)
    for trial in range(3):
        c = synthetic_layer((24, 20), 8, g, decay=0.6)
        s = synthetic_layer((24, 20), 8, g, decay=0.6)
        content = LoRA(layers={Q: c})
        style = LoRA(layers={Q: s})
        rank_m = ZipRankMerger(content, style, basis="svd")
        out_m = ZipLoRAMerger(content, style, side="out")
        target = c.delta()
        sig = torch.linalg.svdvals(target.double())
        for k in (1, 2, 4, 6):
            with torch.no_grad():
                lr, lo = rank_m.layer(Q), out_m.layer(Q)
                lr.m_s.zero_()
                lo.m_s.zero_()
                lr.m_c.zero_()
                lr.m_c[:k] = 1.0  # the k leading singular directions
                lo.m_c.zero_()
                lo.m_c[target.norm(dim=1).topk(k).indices] = 1.0
                e_rank = float((rank_m.delta(Q) - target).norm())
                e_out = float((out_m.delta(Q) - target).norm())
            assert e_out == pytest.approx(_best_rows_error(target, k), rel=1e-4)
            assert e_rank == pytest.approx(float(sig[k:].pow(2).sum().sqrt()), rel=1e-4)
            assert e_rank <= e_out + 1e-6, (trial, k, e_rank, e_out)
            assert e_rank < 0.9 * e_out  # decaying spectrum, random rows: a clear margin


def test_theorem1_need_not_hold_in_the_raw_basis() -> None:
    # ΔW = b1·a1ᵀ + b2·a2ᵀ = e1·e1ᵀ built from two components that cancel: b1 = e1 + e2, a1 = e1,
    # b2 = e2, a2 = −e1. One output row reproduces ΔW exactly; no single raw component does.
    e = torch.eye(4)
    B = torch.stack([e[0] + e[1], e[1]], dim=1)
    A = torch.stack([e[0], -e[0]])
    layer = LowRank(B, A)
    target = layer.delta()
    content, style = LoRA(layers={Q: layer}), LoRA(layers={Q: layer})
    raw = ZipRankMerger(content, style, basis="raw")
    svd = ZipRankMerger(content, style, basis="svd")
    k = 1
    e_out = _best_rows_error(target, k)
    errors = []
    for keep in itertools.combinations(range(2), k):
        with torch.no_grad():
            raw.layer(Q).m_s.zero_()
            raw.layer(Q).m_c.zero_()
            raw.layer(Q).m_c[list(keep)] = 1.0
            errors.append(float((raw.delta(Q) - target).norm()))
        with torch.no_grad():
            svd.layer(Q).m_s.zero_()
            svd.layer(Q).m_c.zero_()
            svd.layer(Q).m_c[0] = 1.0
            e_svd = float((svd.delta(Q) - target).norm())
    assert e_out == 0.0
    assert min(errors) == pytest.approx(1.0)  # raw rank masking with budget 1 is off by ‖e2·e1ᵀ‖ = 1
    assert e_svd <= 1e-6
