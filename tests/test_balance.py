"""MergeConfig.balance: one knob that trades subject against style by weighing the two reconstruction terms
λ_c·(1 + b) and λ_s·(1 − b). Neutral at 0 (bit for bit), and it moves every mode the way it says."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_toys import ToyDenoiser, single_thread, toy_references, toy_setup  # noqa: F401 - autouse fixture

from duolora.adapter import attach
from duolora.boxqp import FastTerms
from duolora.cli import main
from duolora.config import MergeConfig
from duolora.mergers import build_merger
from duolora.objective import DuoLoRAObjective
from duolora.optimize import optimize
from duolora.priors import component_weights
from duolora.solver import merge_weights_only

PAPER_STEPS = 20


def kept_shares(merger) -> tuple[float, float]:
    """Each LoRA's kept share of its nuclear norm over the learned layers: Σ σᵢ·|mᵢ| / Σ σᵢ."""
    out = []
    for which in ("c", "s"):
        num = den = 0.0
        for layer in merger.learned_layers():
            w = component_weights(layer, which).double()
            num += float((w * layer.mask(which).detach().abs().double()).sum())
            den += float(w.sum())
        out.append(num / den)
    return out[0], out[1]


def yardstick(merger, model, refs, n: int = 16) -> tuple[float, float]:
    """Mean (L_c, L_s) of the merged masks over n fixed (σ, ε) draws."""
    with attach(merger, model.lora_modules()) as adapter:
        obj = DuoLoRAObjective(merger, ToyDenoiser(model, adapter), refs, MergeConfig(prior_loss=False))
        g = torch.Generator().manual_seed(1234)
        lc = ls = 0.0
        with torch.no_grad():
            for i in range(n):
                _, terms = obj(i, g)
                lc += terms["content"]
                ls += terms["style"]
    return lc / n, ls / n


@pytest.mark.parametrize(("lam_c", "lam_s"), [(1.0, 1.0), (0.7, 3.3), (0.0, 1e-7), (2.0**-30, 0.1 + 0.2)])
def test_balance_zero_leaves_the_reconstruction_weights_exactly_as_they_are(lam_c: float, lam_s: float) -> None:
    config = MergeConfig(lambda_content=lam_c, lambda_style=lam_s)
    assert config.balance == 0.0 and config.reconstruction_weights == (lam_c, lam_s)
    model, content, style = toy_setup()
    merger = build_merger("ziprank", content, style, config)
    with attach(merger, model.lora_modules()) as adapter:
        weights = DuoLoRAObjective(merger, ToyDenoiser(model, adapter), toy_references(), config).weights
    assert (weights["content"], weights["style"]) == (lam_c, lam_s)
    terms = FastTerms.from_config(config)
    assert (terms.lam_c, terms.lam_s) == (lam_c, lam_s)
    b = 0.25
    assert MergeConfig(lambda_content=lam_c, lambda_style=lam_s, balance=b).reconstruction_weights == (
        lam_c * (1 + b), lam_s * (1 - b))


def test_a_merge_at_balance_zero_is_bit_for_bit_the_merge_without_the_knob() -> None:
    """A config saved before the knob existed (no "balance" key) and one at 0 merge identically, in the
    weights-only mode and in paper steps."""
    model, content, style = toy_setup()
    refs = toy_references()
    old = {k: v for k, v in MergeConfig(steps=4).to_dict().items() if k != "balance"}
    results = []
    for config in (MergeConfig.from_dict(old), MergeConfig(steps=4, balance=0.0)):
        weights = merge_weights_only(content, style, dataclasses.replace(config, objective="weights_only"))
        merger = build_merger("ziprank", content, style, config)
        with attach(merger, model.lora_modules()) as adapter:
            paper = optimize(merger, ToyDenoiser(model, adapter), refs, config)
        results.append((weights.merger.state_dict(), weights.history, merger.state_dict(), paper.history))
    (w0, h0, p0, ph0), (w1, h1, p1, ph1) = results
    assert h0 == h1 and ph0 == ph1
    assert all(torch.equal(w0[k], w1[k]) for k in w0) and all(torch.equal(p0[k], p1[k]) for k in p0)


def test_towards_content_the_weights_only_merge_keeps_more_content_and_less_style() -> None:
    _, content, style = toy_setup()
    runs = {b: merge_weights_only(content, style, MergeConfig(objective="weights_only", balance=b))
            for b in (-0.5, 0.0, 0.5)}
    shares = {b: kept_shares(r.merger) for b, r in runs.items()}
    loss = {b: (r.history["content"][1], r.history["style"][1]) for b, r in runs.items()}
    # Measured on this toy: content share 0.796 / 0.842 / 0.877, style share 0.896 / 0.856 / 0.792;
    # content reconstruction 0.0328 / 0.0235 / 0.0180, style 0.0127 / 0.0182 / 0.0301. Demanded: the order.
    assert shares[-0.5][0] < shares[0.0][0] < shares[0.5][0]
    assert shares[-0.5][1] > shares[0.0][1] > shares[0.5][1]
    assert loss[-0.5][0] > loss[0.0][0] > loss[0.5][0]
    assert loss[-0.5][1] < loss[0.0][1] < loss[0.5][1]


def test_towards_content_the_paper_merge_reconstructs_content_better_and_style_worse() -> None:
    model, content, style = toy_setup()
    refs = toy_references()
    out = {}
    for b in (-0.8, 0.0, 0.8):
        config = MergeConfig(steps=PAPER_STEPS, balance=b)
        merger = build_merger("ziprank", content, style, config)
        with attach(merger, model.lora_modules()) as adapter:
            optimize(merger, ToyDenoiser(model, adapter), refs, config)
        c, s = kept_shares(merger)
        out[b] = (*yardstick(merger, model, refs), c / (c + s))
    lc, ls, share = ({b: v[i] for b, v in out.items()} for i in range(3))
    # Measured on this toy (20 steps): L_c 0.0222 / 0.0134 / 0.0125, L_s 0.0074 / 0.0086 / 0.0104, content's part
    # of the kept shares 0.4994 / 0.5003 / 0.5027. Demanded: the order.
    assert lc[-0.8] > lc[0.0] > lc[0.8], lc
    assert ls[-0.8] < ls[0.0] < ls[0.8], ls
    assert share[-0.8] < share[0.0] < share[0.8], share


def test_balance_out_of_range_is_one_clear_error(tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match=r"^MergeConfig.balance must be between -1 \(style\) and 1 \(content\), "
                                         r"got 1.5$"):
        MergeConfig(balance=1.5)
    # The command line checks its options before it reads a file.
    code = main(["merge", str(tmp_path / "c.safetensors"), str(tmp_path / "s.safetensors"), "-o",
                 str(tmp_path / "out.safetensors"), "--balance", "-2"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: MergeConfig.balance must be between -1 (style) and 1 (content), got -2.0")
