"""Engine tests of duolora.priors: seeded prior initialisation and the rank-constraint loss (docs/method.md §3).

LoRAs are synthetic (engine_toys.py).
"""

from __future__ import annotations

import pytest
import torch
from engine_toys import single_thread, toy_setup  # noqa: F401 - autouse fixture

from duolora.config import MergeConfig
from duolora.lora import LoRA
from duolora.mergers import ZipLoRAMerger, ZipRankMerger, build_merger
from duolora.priors import (
    component_weights,
    kept_share,
    layer_prior_loss,
    prior_init,
    prior_layers,
    prior_penalty,
)
from duolora.sdxl import preset_roles

PAPER = preset_roles("paper")


def toy_merger(scope: str = "all", rank_c: int = 8, rank_s: int = 6) -> ZipRankMerger:
    _, content, style = toy_setup(rank_c=rank_c, rank_s=rank_s)
    return build_merger("ziprank", content, style, MergeConfig(scope=scope))


def test_prior_penalty_is_the_written_formula_batched() -> None:
    dom, other = torch.tensor([0.5, 0.9, 0.2], dtype=torch.float64), torch.tensor([0.7, 0.1, 0.2],
                                                                                   dtype=torch.float64)
    l2_dom, l2_other = torch.tensor([1.0, 2.0, 3.0]).double(), torch.tensor([2.0, 1.0, 3.0]).double()
    share = prior_penalty("share_hinge", dom, other, kappa=5.0, nu=2.0, margin=0.1)
    assert share.tolist() == pytest.approx([2 * 0.3, 0.0, 2 * 0.1], abs=1e-15)  # κ unused; zero past the margin
    hinge = prior_penalty("hinge", dom, other, kappa=0.5, nu=2.0, margin=0.1)
    assert hinge.tolist() == pytest.approx([0.25 + 0.6, 0.45, 0.1 + 0.2], abs=1e-15)
    compat = prior_penalty("code_compat", dom, other, kappa=0.5, nu=2.0, margin=0.1, dom_l2=l2_dom,
                           other_l2=l2_other)
    assert compat.tolist() == pytest.approx([0.25 + 2.0, 0.45 - 2.0, 0.1], abs=1e-15)  # no hinge, no margin
    with pytest.raises(ValueError, match="prior loss kind 'l2' is not one of share_hinge, hinge, code_compat"):
        prior_penalty("l2", dom, other)


def test_prior_init_follows_the_thresholds_per_role() -> None:
    merger = toy_merger()
    n = prior_init(merger, PAPER, tau_c=0.75, tau_s=0.5, seed=0)
    roles = {layer.name: role for layer, role in prior_layers(merger, PAPER)}
    # scope "all" on the toy model: 4 blocks × 8 attention projections + 3 shared ff layers in prior
    # blocks (the 4th ff is content-less) + 2 conv layers outside any prior block. The paper preset gives
    # middle_block.1 / output_blocks.1.1 content and input_blocks.4.1 / output_blocks.3.1 style.
    assert len(merger.learned_layers()) == 37
    assert n == 35 and sum(r == "content" for r in roles.values()) == 18
    dom_kept = other_kept = 0
    for layer in merger.learned_layers():
        m_c, m_s = layer.m_c.detach(), layer.m_s.detach()
        role = roles.get(layer.name)
        if role is None:  # the two conv layers: no prior, all ones
            assert torch.equal(m_c, torch.ones_like(m_c)) and torch.equal(m_s, torch.ones_like(m_s))
            continue
        dom, other = (m_c, m_s) if role == "content" else (m_s, m_c)
        assert bool(((dom == 0) | (dom > 0.5)).all()) and bool(((other == 0) | (other > 0.75)).all())
        assert float(torch.cat([dom, other]).max()) <= 1.0
        # One v per layer: where both masks have an entry from the same v index, they agree, and an entry
        # above τ_c in the dominant mask is also present in the other mask.
        k = min(dom.numel(), other.numel())
        both = (dom[:k] != 0) & (other[:k] != 0)
        assert torch.equal(dom[:k][both], other[:k][both])
        assert torch.equal(dom[:k] > 0.75, other[:k] != 0)
        dom_kept += int((dom != 0).sum())
        other_kept += int((other != 0).sum())
        # Min–max normalisation: v spans [0, 1], so the largest v (≤ max length 8) shows up as 1.0.
        if role == "content":  # m_c has the full length 8 here
            assert float(m_c.max()) == 1.0
    assert dom_kept > 1.5 * other_kept  # the dominant LoRA keeps clearly more components


def test_prior_init_is_seeded_and_per_layer() -> None:
    a, b, c = toy_merger(), toy_merger(), toy_merger()
    prior_init(a, PAPER, seed=3)
    prior_init(b, PAPER, seed=3)
    prior_init(c, PAPER, seed=4)
    pa, pb, pc = (torch.cat([p.detach() for p in m.mask_parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    # A layer's draw does not depend on which other layers have a prior.
    d = toy_merger()
    prior_init(d, {"middle_block.1": "content"}, seed=3)
    name = "middle_block.1.transformer_blocks.0.attn2.to_v"
    assert torch.equal(d.layer(name).m_c.detach(), a.layer(name).m_c.detach())
    assert torch.equal(d.layer("input_blocks.4.1.transformer_blocks.0.attn1.to_q").m_c.detach(), torch.ones(8))


def _two_layer_merger() -> ZipRankMerger:
    _, content, style = toy_setup(rank_c=4, rank_s=4)
    keep = ["middle_block.1.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"]
    c = LoRA(layers={k: content.layers[k] for k in keep})
    s = LoRA(layers={k: style.layers[k] for k in keep})
    merger = ZipRankMerger(c, s, basis="raw")
    with torch.no_grad():
        content_layer, style_layer = merger.layer(keep[0]), merger.layer(keep[1])
        content_layer.m_c.copy_(torch.tensor([1.0, 0.5, 0.0, 0.0]))  # ‖·‖₁ 1.5, ‖·‖₂ √1.25
        content_layer.m_s.copy_(torch.tensor([0.2, -0.1, 0.0, 0.0]))  # ‖·‖₁ 0.3, ‖·‖₂ √0.05
        style_layer.m_c.copy_(torch.tensor([0.6, 0.6, 0.6, 0.6]))  # ‖·‖₁ 2.4, ‖·‖₂ 1.2
        style_layer.m_s.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # ‖·‖₁ 1.0, ‖·‖₂ 1.0
    return merger


def test_hinge_prior_loss_values_and_which_mask_is_penalised() -> None:
    merger = _two_layer_merger()
    # content layer: κ‖m_c‖₁ + ν·max(0, ‖m_s‖₁ − ‖m_c‖₁ + margin) = 1.5 + max(0, 0.3 − 1.5) = 1.5
    # style layer:   κ‖m_s‖₁ + ν·max(0, ‖m_c‖₁ − ‖m_s‖₁ + margin) = 1.0 + (2.4 − 1.0) = 2.4
    loss = layer_prior_loss(merger, PAPER, "hinge", kappa=1.0, nu=1.0, margin=0.0)
    assert loss.item() == pytest.approx((1.5 + 2.4) / 2, abs=1e-6)
    loss.backward()
    cl = merger.layer("middle_block.1.transformer_blocks.0.attn1.to_q")
    sl = merger.layer("input_blocks.4.1.transformer_blocks.0.attn1.to_q")
    # Content layer, hinge inactive: only κ‖m_c‖₁ acts (gradient κ·sign(m_c)/2), the style mask is free.
    assert torch.allclose(cl.m_c.grad, torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert torch.equal(cl.m_s.grad, torch.zeros(4))
    # Style layer, hinge active: m_s gets (κ − ν)·sign/2 = 0, m_c gets ν·sign/2.
    assert torch.allclose(sl.m_s.grad, torch.zeros(4)) and torch.allclose(sl.m_c.grad, torch.full((4,), 0.5))
    with_margin = layer_prior_loss(merger, PAPER, "hinge", kappa=2.0, nu=0.5, margin=2.0)
    # content: 2·1.5 + 0.5·(0.3 − 1.5 + 2) = 3.4; style: 2·1.0 + 0.5·(2.4 − 1.0 + 2) = 3.7
    assert with_margin.item() == pytest.approx((3.4 + 3.7) / 2, abs=1e-6)


def test_code_compat_prior_loss_is_l2_without_hinge() -> None:
    merger = _two_layer_merger()
    loss = layer_prior_loss(merger, PAPER, "code_compat", kappa=1.0, nu=1.0)
    content = 1.5 + (0.05**0.5 - 1.25**0.5)  # κ‖m_c‖₁ + ν(‖m_s‖₂ − ‖m_c‖₂), negative difference kept
    style = 1.0 + (1.2 - 1.0)
    assert loss.item() == pytest.approx((content + style) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="prior loss kind 'l3' is not one of share_hinge, hinge, code_compat"):
        layer_prior_loss(merger, PAPER, "l3")


def test_no_prior_layers_gives_zero_without_gradient() -> None:
    merger = _two_layer_merger()
    for kind in ("share_hinge", "hinge", "code_compat"):
        loss = layer_prior_loss(merger, preset_roles("none"), kind)
        assert float(loss) == 0.0 and not loss.requires_grad
    custom = preset_roles("custom", "style: middle_block.1")
    # the former content layer is now a style layer: κ‖m_s‖₁ + ν·max(0, ‖m_c‖₁ − ‖m_s‖₁) = 0.3 + 1.2
    assert layer_prior_loss(merger, custom, "hinge", margin=0.0).item() == pytest.approx(1.5, abs=1e-6)


def test_priors_apply_to_feature_masks_too() -> None:
    _, content, style = toy_setup()
    merger = ZipLoRAMerger(content, style, side="out")
    n = prior_init(merger, PAPER, seed=0)
    assert n == 32
    layer = merger.layer("middle_block.1.transformer_blocks.0.attn1.to_q")
    assert layer.m_c.numel() == 32 and int((layer.m_c != 0).sum()) > int((layer.m_s != 0).sum())
    assert layer_prior_loss(merger, PAPER, "hinge").item() > 0
    # Share form on feature masks: at m = 1 every layer keeps all of both LoRAs, so each prior layer pays
    # exactly ν·margin.
    ones = ZipLoRAMerger(content, style, side="in")
    assert layer_prior_loss(ones, PAPER, "share_hinge", nu=1.0, margin=0.2).item() == pytest.approx(0.2, abs=1e-6)


def test_share_hinge_values_and_gradients() -> None:
    merger = _two_layer_merger()
    cl = merger.layer("middle_block.1.transformer_blocks.0.attn1.to_q")
    sl = merger.layer("input_blocks.4.1.transformer_blocks.0.attn1.to_q")
    w = {(name, which): component_weights(layer, which) for name, layer in (("c", cl), ("s", sl)) for which in "cs"}
    rho = {k: float((v * getattr(cl if k[0] == "c" else sl, f"m_{k[1]}").detach().abs()).sum() / v.sum())
           for k, v in w.items()}
    # Content layer: ν·max(0, ρ_s − ρ_c + δ); style layer: ν·max(0, ρ_c − ρ_s + δ); mean over the two.
    expected = (max(0.0, rho[("c", "s")] - rho[("c", "c")] + 0.2) + max(0.0, rho[("s", "c")] - rho[("s", "s")] + 0.2)) / 2
    loss = layer_prior_loss(merger, PAPER, "share_hinge", nu=1.0, margin=0.2, push="both")
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected > 0
    loss.backward()
    # Where a hinge is active, its gradient is ν/2 · w/Σw · sign(m): down on the other mask, up on the dominant.
    for layer, dom, other, key in ((cl, "c", "s", "c"), (sl, "s", "c", "s")):
        active = rho[(key, other)] - rho[(key, dom)] + 0.2 > 0
        g_dom, g_other = getattr(layer, f"m_{dom}").grad, getattr(layer, f"m_{other}").grad
        if active:
            wd, wo = w[(key, dom)], w[(key, other)]
            md, mo = getattr(layer, f"m_{dom}").detach(), getattr(layer, f"m_{other}").detach()
            assert torch.allclose(g_dom, -0.5 * wd / wd.sum() * torch.sign(md), atol=1e-6)
            assert torch.allclose(g_other, 0.5 * wo / wo.sum() * torch.sign(mo), atol=1e-6)
        else:
            assert torch.equal(g_dom, torch.zeros_like(g_dom)) and torch.equal(g_other, torch.zeros_like(g_other))


def test_component_weights_are_the_singular_values_in_the_svd_basis() -> None:
    _, content, style = toy_setup(rank_c=5, rank_s=3)
    merger = build_merger("ziprank", content, style, MergeConfig(scope="attention"))
    for layer in merger.learned_layers()[:6]:
        for which, lora in (("c", content), ("s", style)):
            sigma = torch.linalg.svdvals(lora.layers[layer.name].delta().reshape(layer.out_features, -1).double())
            k = component_weights(layer, which).numel()
            assert torch.allclose(component_weights(layer, which).double(), sigma[:k], rtol=1e-4, atol=1e-7)


SHARE = {"prior_loss_kind": "share_hinge", "margin": 0.2, "prior_init": False, "constyle_iterations": 0}


def _train(content, style, steps: int = 30, **overrides):
    from engine_toys import ToyDenoiser, toy_references

    from duolora.adapter import attach
    from duolora.optimize import optimize

    model, _, _ = toy_setup()
    config = MergeConfig(steps=steps, **{**SHARE, **overrides})
    merger = build_merger("ziprank", content, style, config)
    with attach(merger, model.lora_modules()) as adapter:
        result = optimize(merger, ToyDenoiser(model, adapter), toy_references(), config)
    return merger, result


def _refactored(lora: LoRA, how: str) -> LoRA:
    """The same ΔW in every layer, factored differently: rank doubled with zero components, or every
    component split into two halves."""
    from duolora.lora import LowRank

    layers = {}
    for name, lr in lora.layers.items():
        B, A = lr.B, lr.A
        if how == "pad":
            B2, A2 = torch.cat([B, torch.zeros_like(B)], 1), torch.cat([A, torch.zeros_like(A)], 0)
        else:
            B2, A2 = torch.cat([B / 2, B / 2], 1), torch.cat([A, A], 0)
        layers[name] = LowRank(B2.reshape(B.shape[0], -1, *lr.up.shape[2:]), A2.reshape(-1, *lr.down.shape[1:]))
    return LoRA(layers=layers, source=lora.source, key_style=lora.key_style, base=lora.base)


@pytest.mark.parametrize("how", ["pad", "split"])
def test_share_prior_is_invariant_to_how_a_file_factors_delta_w(how: str) -> None:
    _, content, style = toy_setup(rank_c=4, rank_s=3)
    ref, ref_result = _train(content, style)
    other, other_result = _train(_refactored(content, how), _refactored(style, how))
    assert other.layer(next(iter(content.layers))).rank("c") == 8  # the factoring really differs
    for step in range(len(ref_result.history["prior"])):
        assert other_result.history["prior"][step] == pytest.approx(ref_result.history["prior"][step], abs=1e-5)
        assert other_result.history["total"][step] == pytest.approx(ref_result.history["total"][step], rel=1e-4)
    with torch.no_grad():
        worst = max(float((other.delta(n) - ref.delta(n)).abs().max() / ref.delta(n).abs().max()) for n in ref.names)
    assert worst <= 2e-3  # measured 4.2e-4 (pad) and 3.3e-4 (split): float32 re-factoring, 30 Adam steps


def test_share_prior_gives_each_block_its_own_lora() -> None:
    _, content, style = toy_setup()
    merger, result = _train(content, style, steps=100)
    gaps = []
    for layer, role in prior_layers(merger, PAPER):
        dom, other = ("c", "s") if role == "content" else ("s", "c")
        gaps.append(float((kept_share(layer, dom) - kept_share(layer, other)).detach()))
    # 32 prior layers (4 blocks × 8 projections): in every one the layer's own LoRA keeps more of its nuclear norm than the other.
    assert len(gaps) == 32 and min(gaps) > 0.1, sorted(gaps)[:3]
    # No collapse: the dominant LoRAs keep (about) all of themselves.
    dominant = [float(kept_share(layer, "c" if role == "content" else "s").detach())
                for layer, role in prior_layers(merger, PAPER)]
    assert sum(dominant) / len(dominant) > 0.9
    assert result.history["prior"][-1] < result.history["prior"][0] / 2


def test_share_prior_pushing_only_the_dominant_lora_leaves_the_other_alone() -> None:
    merger = _two_layer_merger()
    loss = layer_prior_loss(merger, PAPER, "share_hinge", nu=1.0, margin=0.9, push="dominant")
    both = layer_prior_loss(_two_layer_merger(), PAPER, "share_hinge", nu=1.0, margin=0.9, push="both")
    assert loss.item() == pytest.approx(both.item(), abs=1e-7) and loss.item() > 0  # same value, other gradient
    loss.backward()
    cl = merger.layer("middle_block.1.transformer_blocks.0.attn1.to_q")
    sl = merger.layer("input_blocks.4.1.transformer_blocks.0.attn1.to_q")
    # Only the block's own LoRA moves (content in the content layer, style in the style layer), upwards.
    assert cl.m_s.grad is None and sl.m_c.grad is None  # not even in the graph
    assert float(cl.m_c.grad.sum()) < 0 and float(sl.m_s.grad.sum()) < 0
    with pytest.raises(ValueError, match="prior push 'up' is not one of both, dominant"):
        layer_prior_loss(merger, PAPER, "share_hinge", push="up")
