"""Engine tests of duolora.objective on a small real denoiser (engine_toys.ToyUNet; synthetic LoRAs)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from engine_toys import ToyDenoiser, single_thread, toy_references, toy_setup  # noqa: F401 - autouse fixture

from duolora.adapter import attach
from duolora.config import MergeConfig
from duolora.mergers import build_merger
from duolora.objective import (
    LOSS_TERMS,
    Denoiser,
    DiscreteSchedule,
    DuoLoRAObjective,
    References,
    predict_batched,
    similarity_loss,
)
from duolora.priors import prior_init
from duolora.sdxl import preset_roles

# Fixed cycle weights: with "matched" scaling a cycle term's weight depends on its reconstruction term, so
# the terms are not additive (test_matched_cycle_scale_pulls_as_hard_as_reconstruction covers that).
ALL_ON = MergeConfig(lambda_sim=0.01, cycle_scale="fixed", constyle_iterations=1)  # every term on


@pytest.fixture
def setup():
    model, content, style = toy_setup()
    merger = build_merger("ziprank", content, style)
    prior_init(merger, preset_roles("paper"), seed=0)  # masks away from 1, so every term has a gradient
    with attach(merger, model.lora_modules()) as adapter:
        yield merger, ToyDenoiser(model, adapter), toy_references()


def test_schedule_is_sdxl_training_schedule_and_noise_inverts() -> None:
    s = DiscreteSchedule.scaled_linear()
    assert s.sigmas.numel() == 1000
    assert float(s.sigmas[0]) == pytest.approx(0.0292, abs=1e-4)
    assert float(s.sigmas[-1]) == pytest.approx(14.6146, abs=1e-3)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigma = torch.tensor([0.5, 3.0])
    assert torch.allclose(s.x0_from_eps(s.add_noise(x0, eps, sigma), eps, sigma), x0, atol=1e-5)


def test_calls_are_batched_per_hop(setup) -> None:
    merger, den, refs = setup
    assert isinstance(den, Denoiser)
    expected = {
        0: [(2, False), (2, True)],
        1: [(4, False), (2, False), (2, True)],  # docs/method.md §4: 8 evaluations, 2 with gradient
        2: [(4, False), (2, False), (2, False), (2, False), (2, True)],
    }
    for k, calls in expected.items():
        den.calls.clear()
        obj = DuoLoRAObjective(merger, den, refs, dataclasses.replace(ALL_ON, constyle_iterations=k))
        _, terms = obj(0, torch.Generator().manual_seed(0))
        assert den.calls == calls, k
        assert set(terms) == {"content", "style", "prior", "similarity", "total"} | (
            {"cycle", "reverse"} if k else set())


def _manual_terms(den: ToyDenoiser, refs: References, k: int, seed: int) -> dict[str, float]:
    """The docs/method.md §4 recipe written out with one unbatched predict per evaluation."""
    g = torch.Generator().manual_seed(seed)
    sigma = den.sample_sigma(g)
    eps = torch.randn(refs.content[0].shape, generator=g)
    s1 = sigma.reshape(1)

    def p(x, cond, branch):
        return den.predict(x, s1, [cond], [branch])

    with torch.no_grad():
        x_c = refs.content[0] + sigma * eps
        x_s = refs.style[0] + sigma * eps
        eps_m_c, eps_m_s = p(x_c, refs.p_c, "merged"), p(x_s, refs.p_s, "merged")
        out = {"content": F.mse_loss(eps_m_c, p(x_c, refs.p_c, "content")).item(),
               "style": F.mse_loss(eps_m_s, p(x_s, refs.p_s, "style")).item()}
        for term, x, lora, prompt, pred in (("cycle", x_c, "style", refs.p_c, eps_m_c),
                                            ("reverse", x_s, "content", refs.p_s, eps_m_s)):
            y = x
            for _ in range(k):
                e_add = p(y, refs.p_cs, lora)  # add the style (content)
                y = (y - sigma * e_add) + sigma * eps  # x̂0, re-noised with the same σ and ε
                e_remove = p(y, prompt, lora)  # remove it again under the original prompt
                y = (y - sigma * e_remove) + sigma * eps
            out[term] = F.mse_loss(pred, e_remove).item()
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_loss_terms_follow_the_written_recipe(setup, k: int) -> None:
    merger, den, refs = setup
    obj = DuoLoRAObjective(merger, den, refs, dataclasses.replace(ALL_ON, constyle_iterations=k))
    _, terms = obj(0, torch.Generator().manual_seed(11))
    manual = _manual_terms(den, refs, k, seed=11)
    for term in ("content", "style", "cycle", "reverse"):
        assert terms[term] == pytest.approx(manual[term], rel=1e-4), term
        assert terms[term] > 1e-6
    # Cycle targets differ from the plain single-LoRA targets (the round trip moves the latent).
    assert abs(terms["cycle"] - terms["content"]) > 1e-4 * terms["content"]


def _grads(merger, den, refs, config: MergeConfig) -> torch.Tensor:
    for p in merger.mask_parameters():
        p.grad = None
    loss, _ = DuoLoRAObjective(merger, den, refs, config)(3, torch.Generator().manual_seed(5))
    if loss.requires_grad:
        loss.backward()
    return torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()
                      for p in merger.mask_parameters()])


SWITCH_OFF = {
    "content": {"lambda_content": 0.0},
    "style": {"lambda_style": 0.0},
    "cycle": {"lambda_cyc": 0.0},
    "reverse": {"lambda_rev": 0.0},
    "prior": {"prior_loss": False},
    "similarity": {"lambda_sim": 0.0},
}


def test_each_term_switches_off_with_its_gradient(setup) -> None:
    merger, den, refs = setup
    g_all = _grads(merger, den, refs, ALL_ON)
    everything_off = {k: v for off in SWITCH_OFF.values() for k, v in off.items()}
    assert float(_grads(merger, den, refs, MergeConfig(**everything_off)).abs().max()) == 0.0
    for term, off in SWITCH_OFF.items():
        g_without = _grads(merger, den, refs, dataclasses.replace(ALL_ON, **off))
        only = {k: v for t, o in SWITCH_OFF.items() if t != term for k, v in o.items()}
        g_only = _grads(merger, den, refs, dataclasses.replace(ALL_ON, **only))
        # Measured: ‖g_all‖ = 0.045, the smallest term gradient (L_rev) 5e-5, residuals ≤ 1e-8.
        assert float(g_only.norm()) >= 1e-5, term
        # Switching a term off removes exactly its gradient (float summation order aside).
        assert float((g_all - g_without - g_only).norm()) <= 1e-6 * float(g_all.norm()), term
        _, terms = DuoLoRAObjective(merger, den, refs, dataclasses.replace(ALL_ON, **off))(
            0, torch.Generator().manual_seed(0))
        assert term not in terms
    assert set(LOSS_TERMS) == set(SWITCH_OFF)
    # constyle_iterations = 0 switches both Constyle terms off.
    obj = DuoLoRAObjective(merger, den, refs, dataclasses.replace(ALL_ON, constyle_iterations=0))
    assert obj.active_terms == ["content", "style", "prior", "similarity"]


def test_similarity_loss_value() -> None:
    _, content, style = toy_setup(rank_c=4, rank_s=3)
    merger = build_merger("ziprank", content, style)
    with torch.no_grad():
        for i, layer in enumerate(merger.learned_layers()):
            layer.m_c.copy_(torch.tensor([1.0, -2.0, 0.5, 9.0]))  # the 4th entry has no style partner
            layer.m_s.copy_(torch.tensor([0.5, 0.5, float(i % 2), ]))
    # per layer mean|m_c ⊙ m_s| over 3 pairs: (0.5 + 1.0 + 0)/3 or (0.5 + 1.0 + 0.5)/3, alternating
    n = len(merger.learned_layers())
    want = (n // 2 * (1.5 / 3) + (n - n // 2) * (2.0 / 3)) / n
    assert similarity_loss(merger).item() == pytest.approx(want, abs=1e-6)


def test_same_generator_same_loss_and_mixed_latent_sizes(setup) -> None:
    merger, den, refs = setup
    obj = DuoLoRAObjective(merger, den, refs, ALL_ON)
    a = obj(2, torch.Generator().manual_seed(9))[1]
    b = obj(2, torch.Generator().manual_seed(9))[1]
    c = obj(2, torch.Generator().manual_seed(10))[1]
    assert a == b and a != c
    wide = References(content=refs.content, style=[torch.randn(4, 8, 16)], p_c=refs.p_c, p_s=refs.p_s, p_cs=refs.p_cs)
    den.calls.clear()
    _, terms = DuoLoRAObjective(merger, den, wide, ALL_ON)(0, torch.Generator().manual_seed(0))
    # one call per latent size and hop: 2 (first hop) + 2 (remove hop) + 2 (merged, with gradient)
    assert den.calls == [(2, False), (2, False), (1, False), (1, False), (1, True), (1, True)]
    assert all(0 <= v < float("inf") for v in terms.values())


def test_predict_batched_keeps_order_and_references_validate(setup) -> None:
    _, den, refs = setup
    x = [torch.randn(1, 4, 8, 8) for _ in range(3)]
    items = [(x[0], torch.tensor(1.0), refs.p_c, "content"), (x[1], torch.tensor(1.0), refs.p_s, "style"),
             (x[2], torch.tensor(1.0), refs.p_cs, "merged")]
    with torch.no_grad():
        together = predict_batched(den, items)
        alone = [predict_batched(den, [it])[0] for it in items]
    assert all(float((t - a).abs().max()) <= 1e-5 for t, a in zip(together, alone, strict=True))
    with pytest.raises(ValueError, match="at least one content latent and one style latent"):
        References(content=[], style=refs.style, p_c=None, p_s=None, p_cs=None)
    with pytest.raises(ValueError, match=r"a style latent must be \(C, H, W\) or \(1, C, H, W\), got \(2, 4, 8, 8\)"):
        References(content=refs.content, style=[torch.randn(2, 4, 8, 8)], p_c=None, p_s=None, p_cs=None)


def _recording(den: ToyDenoiser) -> list[list]:
    """Make ``den`` record the branch list of every predict call."""
    seen: list[list] = []
    inner = den.predict

    def predict(x_t, sigma, cond, branches):
        seen.append(list(branches))
        return inner(x_t, sigma, cond, branches)

    den.predict = predict
    return seen


def test_first_hop_is_grouped_by_branch(setup) -> None:
    """Equal branches sit next to each other, so the adapter evaluates each run with one fixed ΔW."""
    merger, den, refs = setup
    seen = _recording(den)
    DuoLoRAObjective(merger, den, refs, ALL_ON)(0, torch.Generator().manual_seed(0))
    assert seen == [["content", "content", "style", "style"], ["style", "content"], ["merged", "merged"]]


def test_new_batch_order_and_constant_paths_change_only_rounding(setup) -> None:
    """Where the maths is unchanged the results are bit-identical: the first hop in the order used before
    (content, style, style, content) and in the grouped one give the same bits per item under the
    per-element mask path. The fold / low-rank paths of the no-grad targets change float32 rounding only."""
    merger, den, refs = setup
    sigma = torch.tensor(3.0)
    g = torch.Generator().manual_seed(1)
    x_c = den.add_noise(refs.content[0], torch.randn(refs.content[0].shape, generator=g), sigma)
    x_s = den.add_noise(refs.style[0], torch.randn(refs.style[0].shape, generator=g), sigma)
    c, s = (x_c, sigma, refs.p_c, "content"), (x_s, sigma, refs.p_s, "style")
    cyc, rev = (x_c, sigma, refs.p_cs, "style"), (x_s, sigma, refs.p_cs, "content")
    den.adapter.constant_path = "masks"
    with torch.no_grad():
        before = predict_batched(den, [c, s, cyc, rev])
        grouped = predict_batched(den, [c, rev, s, cyc])
    assert all(torch.equal(a, b) for a, b in zip(before, [grouped[0], grouped[2], grouped[3], grouped[1]], strict=True))
    terms, grads = {}, {}
    for path in ("masks", "auto"):
        den.adapter.constant_path = path
        terms[path] = DuoLoRAObjective(merger, den, refs, ALL_ON)(2, torch.Generator().manual_seed(7))[1]
        grads[path] = _grads(merger, den, refs, ALL_ON)
    for term, value in terms["masks"].items():
        assert terms["auto"][term] == pytest.approx(value, rel=1e-5, abs=1e-9), term
    assert float((grads["auto"] - grads["masks"]).norm()) <= 1e-5 * float(grads["masks"].norm())


def _term_grad(merger, den, refs, config: MergeConfig, term: str) -> torch.Tensor:
    """Gradient of the masks from one weighted term of the total loss (the others switched off)."""
    off = {t: o for t, o in SWITCH_OFF.items() if t != term}
    if term in ("cycle", "reverse"):  # "matched" needs the reconstruction term beside it: keep it, subtract it
        rec = "content" if term == "cycle" else "style"
        off.pop(rec)
        with_rec = _grads(merger, den, refs, dataclasses.replace(config, **{k: v for o in off.values() for k, v in o.items()}))
        only_rec = _grads(merger, den, refs, dataclasses.replace(
            config, **{k: v for o in off.values() for k, v in o.items()}, **SWITCH_OFF[term]))
        return with_rec - only_rec
    return _grads(merger, den, refs, dataclasses.replace(config, **{k: v for o in off.values() for k, v in o.items()}))


def test_matched_cycle_scale_pulls_as_hard_as_reconstruction(setup) -> None:
    merger, den, refs = setup
    matched = MergeConfig(cycle_scale="matched", lambda_cyc=1.0, lambda_rev=1.0, prior_loss=False,
                          constyle_iterations=1)
    fixed = dataclasses.replace(matched, cycle_scale="fixed", lambda_cyc=0.01, lambda_rev=0.01)
    ratios = {}
    for label, cfg in (("matched", matched), ("fixed", fixed)):
        rec = _term_grad(merger, den, refs, cfg, "content").norm()
        cyc = _term_grad(merger, den, refs, cfg, "cycle").norm()
        ratios[label] = float(cyc / rec)
    # The paper's fixed λ = 0.01 leaves the cycle term's pull hundreds of times below reconstruction (measured
    # here 0.0025; the issue measured ~1/100 on MiniBench); "matched" at λ = 1 brings it to the same order of
    # magnitude (measured 0.24: the two residuals project differently through the Jacobian, so √(L_rec/L_cyc)
    # matches the gradients to a factor, not exactly).
    assert ratios["fixed"] < 0.01, ratios
    assert 0.1 < ratios["matched"] < 10.0 and ratios["matched"] > 40 * ratios["fixed"], ratios
    # The reported values stay unscaled.
    _, t_matched = DuoLoRAObjective(merger, den, refs, matched)(3, torch.Generator().manual_seed(5))
    _, t_fixed = DuoLoRAObjective(merger, den, refs, fixed)(3, torch.Generator().manual_seed(5))
    assert t_matched["cycle"] == pytest.approx(t_fixed["cycle"], rel=1e-6)
