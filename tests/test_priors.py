"""Engine tests of duolora.priors: seeded prior initialisation and the rank-constraint loss (METHOD.md §3).

LoRAs are synthetic (engine_toys.py).
"""

from __future__ import annotations

import pytest
import torch
from engine_toys import single_thread, toy_setup  # noqa: F401 - autouse fixture

from duolora.config import MergeConfig
from duolora.lora import LoRA
from duolora.mergers import ZipLoRAMerger, ZipRankMerger, build_merger
from duolora.priors import layer_prior_loss, prior_init, prior_layers
from duolora.sdxl import preset_roles

PAPER = preset_roles("paper")


def toy_merger(scope: str = "all", rank_c: int = 8, rank_s: int = 6) -> ZipRankMerger:
    _, content, style = toy_setup(rank_c=rank_c, rank_s=rank_s)
    return build_merger("ziprank", content, style, MergeConfig(scope=scope))


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
    with pytest.raises(ValueError, match="prior loss kind 'l3' is not one of hinge, code_compat"):
        layer_prior_loss(merger, PAPER, "l3")


def test_no_prior_layers_gives_zero_without_gradient() -> None:
    merger = _two_layer_merger()
    loss = layer_prior_loss(merger, preset_roles("none"))
    assert float(loss) == 0.0 and not loss.requires_grad
    custom = preset_roles("custom", "style: middle_block.1")
    # the former content layer is now a style layer: κ‖m_s‖₁ + ν·max(0, ‖m_c‖₁ − ‖m_s‖₁) = 0.3 + 1.2
    assert layer_prior_loss(merger, custom).item() == pytest.approx(1.5, abs=1e-6)


def test_priors_apply_to_feature_masks_too() -> None:
    _, content, style = toy_setup()
    merger = ZipLoRAMerger(content, style, side="out")
    n = prior_init(merger, PAPER, seed=0)
    assert n == 32
    layer = merger.layer("middle_block.1.transformer_blocks.0.attn1.to_q")
    assert layer.m_c.numel() == 32 and int((layer.m_c != 0).sum()) > int((layer.m_s != 0).sum())
    assert layer_prior_loss(merger, PAPER).item() > 0
