"""Engine tests of the fast merge modes (duolora.solver, .recording, .streaming): the Gram forms are exact,
the solver finds the minimiser, the stream equals the in-memory merge, and the layer-wise mode beats the
direct merge on a small real denoiser (engine_toys.ToyUNet; synthetic LoRAs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from engine_toys import ToyDenoiser, single_thread, toy_references, toy_setup  # noqa: F401 - autouse fixture
from fast_oracle import layer_objective, layer_prior
from torch import nn

from duolora import boxqp, engine, formats, recording, solver
from duolora.adapter import attach
from duolora.config import MergeConfig
from duolora.lora import LoRA, LowRank
from duolora.mergers import ZipRankMerger, build_merger, svd_refactor
from duolora.objective import DuoLoRAObjective
from duolora.priors import component_weights, kept_share, layer_prior_loss
from duolora.sdxl import CONTENT, STYLE, prior_role
from duolora.synthetic import synthetic_lora

Q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"  # style block under the "paper" preset
K = "middle_block.1.transformer_blocks.0.attn2.to_k"  # content block
CONV = "input_blocks.4.0.in_layers.2"


def random_pair(shape: tuple[int, ...], r_c: int, r_s: int, seed: int) -> tuple[LowRank, LowRank]:
    g = torch.Generator().manual_seed(seed)
    out_f, rest = shape[0], shape[1:]

    def layer(r: int) -> LowRank:
        up = torch.randn(out_f, r, *((1, 1) if len(shape) == 4 else ()), generator=g)
        return LowRank(up, torch.randn(r, *rest, generator=g) / math.sqrt(math.prod(rest)))

    return layer(r_c), layer(r_s)


def one_layer_merger(name: str, c: LowRank, s: LowRank, basis: str) -> ZipRankMerger:
    return ZipRankMerger(LoRA({name: c}, source="c.safetensors"), LoRA({name: s}, source="s.safetensors"),
                         basis=basis, scope="all")


def output_projector(lr: LowRank) -> torch.Tensor:
    """Π = B·B⁺ (out×out, float64): the orthogonal projector onto the LoRA's output space col(B)."""
    B = lr.B.double().reshape(lr.B.shape[0], -1)
    return B @ torch.linalg.pinv(B)


def dense_weights_loss(c: LowRank, s: LowRank, delta_m: torch.Tensor) -> tuple[float, float]:
    """‖Π_c·(ΔW_m − ΔW_c)·A'_cᵀ‖², ‖Π_s·(ΔW_m − ΔW_s)·A'_sᵀ‖² in float64 with dense out×in matrices."""
    out = []
    for lr in (c, s):
        a_svd = svd_refactor(lr.B, lr.A)[1].double()
        residual = output_projector(lr) @ (delta_m - lr.B.double() @ lr.A.double())
        out.append(float((residual @ a_svd.T).square().sum()))
    return out[0], out[1]


@pytest.mark.parametrize("basis", ["svd", "raw"])
@pytest.mark.parametrize("shape", [(40, 30), (24, 6, 3, 3)], ids=["linear", "conv"])
def test_weights_only_gram_loss_equals_the_dense_loss(basis: str, shape: tuple[int, ...]) -> None:
    c, s = random_pair(shape, 5, 7, seed=1)
    merger = one_layer_merger(Q if len(shape) == 2 else CONV, c, s, basis)
    layer = merger.layers[0]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.m_c.copy_(torch.rand(5, generator=g))
        layer.m_s.copy_(torch.rand(7, generator=g))
    quad = solver.weights_quadratic(layer, svd_basis=basis == "svd")
    gram = quad.losses(layer.m_c, layer.m_s)
    dense = dense_weights_loss(c, s, layer.delta().detach().double().reshape(shape[0], -1))
    for a, b in zip(gram, dense):
        assert abs(a - b) <= 1e-5 * b, (gram, dense)


def test_own_output_projector_is_exact_for_an_ill_conditioned_raw_up_factor() -> None:
    """Raw basis, content up factor with singular values 1 … 1e-5 (all above the projector's 1e-6 cut): the
    Gram form still equals the dense projected loss and P stays positive semidefinite (float32 Grams gave an
    indefinite P here)."""
    g = torch.Generator().manual_seed(11)
    u, _ = torch.linalg.qr(torch.randn(16, 4, generator=g))
    v, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    b_c = u @ torch.diag(torch.tensor([1.0, 1e-2, 1e-4, 1e-5])) @ v.T
    c = LowRank(b_c, torch.randn(4, 12, generator=g) / 3)
    s = LowRank(torch.randn(16, 3, generator=g), torch.randn(3, 12, generator=g) / 3)
    merger = one_layer_merger(Q, c, s, "raw")
    layer = merger.layers[0]
    with torch.no_grad():
        layer.m_c.copy_(torch.rand(4, generator=g))
        layer.m_s.copy_(torch.rand(3, generator=g))
    quad = solver.weights_quadratic(layer, svd_basis=False)
    for P in (quad.P_c, quad.P_s):
        eig = torch.linalg.eigvalsh(P)
        assert float(eig.min()) >= -1e-9 * float(eig.max()), eig
    gram = quad.losses(layer.m_c, layer.m_s)
    dense = dense_weights_loss(c, s, layer.delta().detach().double())
    for a, b in zip(gram, dense):
        assert abs(a - b) <= 1e-5 * b, (gram, dense)


def dense_activation_loss(module: nn.Module, delta: torch.Tensor, x: torch.Tensor) -> float:
    """Mean over output positions of ‖Δ·x_position‖², Δ applied as the module would apply a weight."""
    if isinstance(module, nn.Conv2d):
        y = F.conv2d(x.double(), delta, None, module.stride, module.padding, module.dilation)
        return float(y.square().sum(1).mean())
    return float((x.double() @ delta.T).square().sum(-1).mean())


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_recorded_layerwise_loss_equals_the_dense_loss(kind: str) -> None:
    g = torch.Generator().manual_seed(3)
    if kind == "linear":
        module, shape, name = nn.Linear(20, 16), (16, 20), Q
        x_c, x_s = torch.randn(3, 11, 20, generator=g), torch.randn(2, 7, 20, generator=g) * 2
    else:
        module, shape, name = nn.Conv2d(6, 8, 3, stride=2, padding=1), (8, 6, 3, 3), CONV
        x_c, x_s = torch.randn(2, 6, 9, 9, generator=g), torch.randn(1, 6, 7, 7, generator=g)
    c, s = random_pair(shape, 4, 3, seed=4)
    merger = one_layer_merger(name, c, s, "svd")
    layer = merger.layers[0]
    with torch.no_grad():
        layer.m_c.copy_(torch.rand(4, generator=g))
        layer.m_s.copy_(torch.rand(3, generator=g))
        with recording.ActivationRecorder(merger, {name: module}) as rec:
            rec.set_side("content")
            module(x_c[:1])
            module(x_c[1:])  # two passes accumulate
            rec.set_side("style")
            module(x_s)
    quad = solver.activation_quadratic(layer, rec.statistics()[name])
    gram = quad.losses(layer.m_c, layer.m_s)
    delta_m = layer.delta().detach().double()
    def own(lr: LowRank) -> torch.Tensor:  # Π·(ΔW_m − ΔW), in the module's weight shape
        residual = (delta_m - lr.delta().double()).reshape(shape[0], -1)
        return (output_projector(lr) @ residual).reshape(shape)

    dense = (dense_activation_loss(module, own(c), x_c), dense_activation_loss(module, own(s), x_s))
    for a, b in zip(gram, dense):
        assert abs(a - b) <= 1e-5 * b, (gram, dense)


def orthogonal_pair(r: int = 4, width: int = 24) -> tuple[LowRank, LowRank]:
    """Two LoRAs that read disjoint input coordinates (A_c·A_sᵀ = 0) but write overlapping outputs."""
    g = torch.Generator().manual_seed(5)
    a_c = torch.zeros(r, width)
    a_s = torch.zeros(r, width)
    a_c[:, : width // 2] = torch.randn(r, width // 2, generator=g)
    a_s[:, width // 2:] = torch.randn(r, width // 2, generator=g)
    return LowRank(torch.randn(16, r, generator=g), a_c), LowRank(torch.randn(16, r, generator=g), a_s)


def test_non_interfering_loras_keep_every_mask_at_one() -> None:
    c, s = orthogonal_pair()
    merger = one_layer_merger(Q, c, s, "svd")
    result = solver.solve_weights(merger, MergeConfig(prior_preset="none"))
    layer = merger.layers[0]
    assert torch.allclose(layer.m_c, torch.ones(4), atol=1e-6)
    assert torch.allclose(layer.m_s, torch.ones(4), atol=1e-6)
    assert result.history["total"][0] <= 1e-12 and result.history["total"][1] <= 1e-12


@pytest.mark.parametrize("padding", [0, 3])
def test_loras_writing_disjoint_outputs_keep_every_mask_at_one(padding: int) -> None:
    """Both LoRAs read the SAME inputs but write disjoint output coordinates: each one's action on the other's
    inputs is the merge's purpose (the style applied to the subject), not an error, so nothing is cut — also
    when the content file pads its rank with zero components. (Measured before the own-output projection:
    masks ≈ 0.5, the "half strength" of both LoRAs.)"""
    g = torch.Generator().manual_seed(9)
    a = torch.randn(4, 20, generator=g)
    b_c, b_s = torch.zeros(16, 4 + padding), torch.zeros(16, 4)
    b_c[:8, :4] = torch.randn(8, 4, generator=g)
    b_s[8:] = torch.randn(8, 4, generator=g)
    a_c = torch.cat([a, torch.zeros(padding, 20)])
    merger = one_layer_merger(Q, LowRank(b_c, a_c), LowRank(b_s, a.clone()), "raw")
    solver.solve_weights(merger, MergeConfig(prior_preset="none"))
    layer = merger.layers[0]
    assert float(layer.m_c[:4].min()) > 1 - 1e-5 and float(layer.m_s.min()) > 1 - 1e-5, (layer.m_c, layer.m_s)


def box_kkt_violation(quad: solver.LayerQuadratic, m: torch.Tensor) -> float:
    """Largest violation of the box-QP optimality conditions of (m − e_c)ᵀP_c(m − e_c) + (m − e_s)ᵀP_s(m − e_s)
    on [0, 1], relative to the gradient's size at the direct merge (m = 1)."""
    e_c, e_s = quad.targets()

    def grad(x: torch.Tensor) -> torch.Tensor:
        return 2 * quad.P_c @ (x - e_c) + 2 * quad.P_s @ (x - e_s)

    g = grad(m)
    free = (m > 1e-6) & (m < 1 - 1e-6)
    bad = torch.cat([g[free].abs(), (-g[m <= 1e-6]).clamp_min(0), g[m >= 1 - 1e-6].clamp_min(0)])
    return float(bad.max() / grad(torch.ones_like(m)).abs().max())


def test_interfering_loras_the_solver_reaches_the_box_minimum() -> None:
    c, s = random_pair((12, 10), 6, 5, seed=6)  # 11 directions in 10 inputs: the subspaces must overlap
    merger = one_layer_merger(Q, c, s, "svd")
    result = solver.solve_weights(merger, MergeConfig(prior_preset="none"))
    layer = merger.layers[0]
    quad = solver.weights_quadratic(layer)
    m = torch.cat([layer.m_c, layer.m_s]).detach().double()
    assert box_kkt_violation(quad, m) < 1e-4
    before, after = result.history["total"]
    assert after < 0.8 * before, (before, after)
    assert 0.0 <= float(m.min()) and float(m.max()) <= 1.0


def test_prior_terms_match_the_priors_module() -> None:
    content, style = (synthetic_lora(rank=r, seed=sd) for r, sd in ((4, 1), (3, 2)))
    keep = [Q, K, "output_blocks.3.1.transformer_blocks.1.attn1.to_v", "input_blocks.7.1.transformer_blocks.0.attn2.to_q"]
    content = LoRA({n: content.layers[n] for n in keep}, source="c.safetensors")
    style = LoRA({n: style.layers[n] for n in keep}, source="s.safetensors")
    merger = build_merger("ziprank", content, style)
    roles = MergeConfig().roles()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in merger.mask_parameters():
            p.copy_(torch.rand(p.shape, generator=g))
    for kind in ("share_hinge", "hinge", "code_compat"):
        per_layer = []
        for layer in merger.learned_layers():
            role = prior_role(layer.name, roles)
            dom, other = (layer.m_c, layer.m_s) if role == CONTENT else (layer.m_s, layer.m_c)
            w = {k: component_weights(layer, k) / component_weights(layer, k).sum() for k in "cs"}
            w_dom, w_other = (w["c"], w["s"]) if role == CONTENT else (w["s"], w["c"])
            per_layer.append(float(layer_prior(dom.detach(), other.detach(), kind, 1.0, 0.7, 0.3,
                                                      w_dom, w_other)))
        expected = float(layer_prior_loss(merger, roles, kind, 1.0, 0.7, 0.3).detach())
        assert abs(sum(per_layer) / len(per_layer) - expected) < 1e-6


def test_hinge_prior_holds_the_other_mask_below_the_dominant_one() -> None:
    c, s = random_pair((12, 10), 3, 8, seed=8)
    sums = {}
    for nu in (0.0, 50.0):
        merger = one_layer_merger(K, c, s, "svd")  # a content layer: m_c dominant
        cfg = MergeConfig(lambda_prior=1.0, kappa=0.0, nu=nu, margin=0.5)
        solver.solve_weights(merger, cfg)
        layer = merger.layers[0]
        sums[nu] = (float(layer.m_c.detach().sum()), float(layer.m_s.detach().sum()))
    # Without the hinge the style mask keeps more than the content mask on this pair…
    assert sums[0.0][1] > sums[0.0][0] + 0.5
    # …with a heavy hinge ‖m_s‖₁ ≤ ‖m_c‖₁ − margin holds (to the solver's tolerance).
    assert sums[50.0][1] <= sums[50.0][0] - 0.5 + 1e-3, sums


def test_hinge_solution_is_a_minimum_of_the_full_objective() -> None:
    content, style = (synthetic_lora(rank=r, seed=sd, decay=0.8) for r, sd in ((8, 3), (8, 4)))
    names = [n for n in content.layers if prior_role(n, MergeConfig().roles()) in (CONTENT, STYLE)][:24]
    merger = build_merger("ziprank", LoRA({n: content.layers[n] for n in names}, source="c.safetensors"),
                          LoRA({n: style.layers[n] for n in names}, source="s.safetensors"))
    config = MergeConfig(lambda_prior=0.5)
    solver.solve_weights(merger, config)
    terms = boxqp.FastTerms.from_config(config)
    roles = config.roles()
    g = torch.Generator().manual_seed(9)
    improved = 0
    for layer in merger.learned_layers():
        quad = solver.weights_quadratic(layer)
        role = prior_role(layer.name, roles)
        base = layer_objective(quad, role, (layer.m_c, layer.m_s), terms)["total"]
        for _ in range(20):
            dc = 1e-3 * torch.randn(layer.m_c.shape, generator=g)
            ds = 1e-3 * torch.randn(layer.m_s.shape, generator=g)
            trial = layer_objective(quad, role, ((layer.m_c + dc).clamp(0, 1), (layer.m_s + ds).clamp(0, 1)),
                                         terms)["total"]
            improved += trial < base - 1e-7 * abs(base)
    assert improved == 0


def test_feature_mask_methods_are_refused_with_a_pointer_to_paper_mode() -> None:
    content, style = (synthetic_lora(rank=2, seed=sd) for sd in (1, 2))
    with pytest.raises(solver.FastModeError, match="method 'ziplora_out' learns per-feature masks.*mode 'paper'"):
        solver.merge_weights_only(content, style, MergeConfig(method="ziplora_out"))


def test_streamed_file_merge_equals_the_in_memory_merge(tmp_path, tiny_layout) -> None:
    c = synthetic_lora(tiny_layout, rank=4, seed=11, std=0.2, text_encoder=True)
    s = synthetic_lora(tiny_layout, rank=6, seed=12, std=0.2)
    only_c = "output_blocks.5.1.transformer_blocks.0.attn1.to_q"
    del s.layers[only_c]  # a layer only the content file has: passes through unchanged
    pc = formats.save_lora(c, tmp_path / "c.safetensors", dtype=torch.float32, layout=tiny_layout)
    ps = formats.save_lora(s, tmp_path / "s.safetensors", dtype=torch.float32, layout=tiny_layout)
    # The literal L1 prior prunes components at this threshold, so the comparison covers the pruned export too.
    config = MergeConfig(prune_threshold=0.05, prior_loss_kind="hinge", margin=0.0)
    out = engine.merge_files(pc, ps, tmp_path / "m.safetensors", config, layout=tiny_layout, chunk_layers=150)
    streamed = formats.read_lora(out.path, layouts=(tiny_layout,))

    lc, ls = (formats.read_lora(p, layouts=(tiny_layout,)) for p in (pc, ps))
    merger = build_merger("ziprank", lc, ls, config)
    solver.solve_weights(merger, config)
    memory = merger.export()
    assert set(streamed.layers) == set(memory.layers)
    assert len(streamed.layers) == len(c.layers)
    assert out.kept_components == sum(lr.rank for lr in memory.layers.values()) < out.total_components
    worst = max(float((streamed.layers[n].delta() - memory.layers[n].delta()).abs().max()) for n in memory.layers)
    assert worst < 1e-6
    assert torch.equal(streamed.layers[only_c].delta(), c.layers[only_c].delta())
    assert streamed.metadata["duolora_mode"] == "weights" and streamed.metadata["duolora_method"] == "ziprank"
    with pytest.raises(formats.OutputExistsError, match="m.safetensors already exists"):
        engine.merge_files(pc, ps, tmp_path / "m.safetensors", config, layout=tiny_layout)


def test_layerwise_mode_beats_the_direct_merge_on_a_real_denoiser() -> None:
    model, content, style = toy_setup()
    refs = toy_references()
    config = MergeConfig()
    merger = build_merger("ziprank", content, style, config)
    mods = model.lora_modules()
    eval_cfg = MergeConfig(constyle_iterations=0, prior_loss=False)

    def reconstruction(den: ToyDenoiser) -> float:
        obj = DuoLoRAObjective(merger, den, refs, eval_cfg)
        g = torch.Generator().manual_seed(1234)  # held-out σ and ε, not the recording's
        with torch.no_grad():
            return sum(sum(obj(i, g)[1][k] for k in ("content", "style")) for i in range(16)) / 16

    with attach(merger, mods) as adapter:
        den = ToyDenoiser(model, adapter)
        direct = reconstruction(den)
        den.calls.clear()
        stats = recording.record_activations(merger, den, mods, refs, config)
        # One no-grad forward per reference, each batching LAYERWISE_TIMESTEPS noise levels.
        assert den.calls == [(recording.LAYERWISE_TIMESTEPS, False)] * (len(refs.content) + len(refs.style))
        solver.solve_layerwise(merger, stats, config)
        merged = reconstruction(den)
    # Measured (seed 0): direct 0.0580 -> layer-wise 0.0262 (paper mode, 100 steps: 0.0177). Demand 1.8×.
    assert direct / merged >= 1.8, (direct, merged)


def test_share_prior_and_keep_term_in_the_fast_solver() -> None:
    c, s = random_pair((12, 10), 4, 4, seed=8)
    results = {}
    for label, cfg in (("none", MergeConfig(prior_loss=False)),
                       ("share", MergeConfig(prior_loss_kind="share_hinge", lambda_prior=50.0, margin=0.3)),
                       ("keep", MergeConfig(prior_loss=False, fast_keep=50.0))):
        merger = one_layer_merger(K, c, s, "svd")  # a content layer: m_c dominant
        solver.solve_weights(merger, cfg)
        layer = merger.layers[0]
        results[label] = (float(kept_share(layer, "c").detach()), float(kept_share(layer, "s").detach()))
    # A heavy share hinge holds ρ_s ≤ ρ_c − margin (to the solver's tolerance).
    assert results["share"][1] <= results["share"][0] - 0.3 + 1e-3, results
    # Without priors the per-layer solve shrinks both LoRAs (12 outputs, 4 + 4 directions: their output spaces
    # overlap; measured 0.941 / 0.947); a heavy keep term holds both near full strength.
    assert max(results["none"]) < 0.96 and min(results["keep"]) > 0.995, results


@pytest.mark.parametrize("basis", ["svd", "raw"])
def test_batched_weights_quadratics_equal_the_per_layer_ones(basis: str, tiny_layout) -> None:
    content, style = (synthetic_lora(tiny_layout, rank=r, seed=sd, std=0.2) for r, sd in ((5, 21), (3, 22)))
    config = MergeConfig(basis=basis)
    merger = build_merger("ziprank", content, style, config)
    layers = merger.learned_layers()
    batched = solver.weights_quadratics(layers, basis == "svd", batch=7)  # groups split across batches too
    worst = 0.0
    for layer, q in zip(layers, batched):
        single = solver.weights_quadratic(layer, basis == "svd")
        assert (q.name, q.r_c, q.r_s) == (layer.name, 5, 3)
        for a, b in ((q.P_c, single.P_c), (q.P_s, single.P_s)):
            worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    # Float32 products, batched or not: equal to float32 rounding.
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("kind", ["hinge", "code_compat"])
def test_solver_history_is_the_mean_of_the_per_layer_objective(kind: str, tiny_layout) -> None:
    content, style = (synthetic_lora(tiny_layout, rank=r, seed=sd, std=0.2) for r, sd in ((4, 31), (6, 32)))
    config = MergeConfig(prior_loss_kind=kind, margin=0.3, lambda_sim=0.05, prior_preset="code_literal")
    merger = build_merger("ziprank", content, style, config)
    result = solver.solve_weights(merger, config)
    terms = boxqp.FastTerms.from_config(config)
    roles = config.roles()
    per_layer: dict[str, list[list[float]]] = {}
    for layer in merger.learned_layers():
        quad = solver.weights_quadratic(layer)
        role = prior_role(layer.name, roles)
        for point, masks in enumerate(((torch.ones(4), torch.ones(6)), (layer.m_c, layer.m_s))):
            for k, v in layer_objective(quad, role, masks, terms).items():
                per_layer.setdefault(k, [[], []])[point].append(v)
    assert set(result.history) == set(per_layer) == {"content", "style", "prior", "similarity", "keep", "total"}
    # Both prior layers and layers without a role are in the mean.
    assert 0 < sum(v > 0 for v in per_layer["prior"][1]) < len(per_layer["prior"][1])
    for k, (before, after) in per_layer.items():
        expected = [sum(before) / len(before), sum(after) / len(after)]
        assert result.history[k] == pytest.approx(expected, rel=1e-10, abs=1e-14), k


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_recorder_keeps_its_sums_on_the_models_device_until_the_pass_ends(kind: str) -> None:
    """No host transfer per layer and call: on the ``meta`` device (where a copy to the CPU is impossible, so
    any per-call ``.cpu()`` raises) the hooks run and every sum stays on the model's device; ``statistics``
    then brings all sums to the CPU at once, equal to the sums of the per-call projections."""
    if kind == "linear":
        module, shape, name, x = nn.Linear(20, 16), (16, 20), Q, torch.randn(3, 11, 20)
    else:
        module, shape, name, x = nn.Conv2d(6, 8, 3, stride=2, padding=1), (8, 6, 3, 3), CONV, torch.randn(2, 6, 9, 9)
    c, s = random_pair(shape, 4, 3, seed=4)
    merger = one_layer_merger(name, c, s, "svd")
    with torch.no_grad(), recording.ActivationRecorder(merger, {name: module.to("meta")}) as rec:
        for side in ("content", "style", "content"):
            rec.set_side(side)
            module(x.to("meta"))
    assert {t.device.type for acc in rec.sums.values() for t in acc.values()} == {"meta"}
    assert rec.tokens[name] == {"content": 2 * rec.tokens[name]["style"], "style": rec.tokens[name]["style"]}

    module.to_empty(device="cpu")
    torch.nn.init.normal_(module.weight)
    g = torch.Generator().manual_seed(5)
    calls = [(side, torch.randn(x.shape, generator=g)) for side in ("content", "style", "content")]
    with torch.no_grad(), recording.ActivationRecorder(merger, {name: module}) as rec:
        for side, xi in calls:
            rec.set_side(side)
            module(xi)
    stats = rec.statistics()[name]
    assert stats.K_c.device.type == "cpu" and stats.K_c.dtype == torch.float64
    # The same projections summed call by call (what the recorder kept on the CPU before): bit for bit.
    A = torch.cat([merger.layers[0].A_c, merger.layers[0].A_s])
    expected: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for side, xi in calls:
            if kind == "linear":
                h = F.linear(xi, A).reshape(-1, A.shape[0])
            else:
                h = F.conv2d(xi, A.reshape(A.shape[0], 6, 3, 3), None, 2, 1).permute(0, 2, 3, 1).reshape(-1, 7)
            k = (h.T @ h).double()
            expected[side] = expected[side] + k if side in expected else k
    assert torch.equal(stats.K_c, expected["content"] / stats.tokens_c)
    assert torch.equal(stats.K_s, expected["style"] / stats.tokens_s)
