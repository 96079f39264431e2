"""Engine tests of multi-concept merges: K content LoRAs and one style LoRA in one merged LoRA, on a small real
denoiser (engine_toys.ToyUNet; synthetic LoRAs). Every mode and every method that can hold several content
LoRAs exports one exact standard LoRA of rank Σ r_i; each content LoRA is reconstructed on its own references
and prompt; the priors pair each content LoRA with the style LoRA and never two content LoRAs; Constyle runs one
cycle per content LoRA; the fast modes' Gram forms stay exact with three LoRAs; bad inputs are refused by name.
(A one-pair merge is unchanged bit for bit: tests/test_golden_pair.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from engine_toys import ToyDenoiser, ToyModel, single_thread, synthetic_lora, toy_references, toy_setup  # noqa: F401 - autouse fixture
from fast_oracle import layer_objective

from duolora import boxqp, engine, formats, recording, solver
from duolora.adapter import MERGED, attach
from duolora.config import MergeConfig
from duolora.export import kept_components
from duolora.lora import LoRA, LowRank
from duolora.mergers import MergerError, ZipRankMerger, build_merger, svd_refactor
from duolora.objective import ContentReferences, DuoLoRAObjective, References
from duolora.priors import kept_share, layer_prior_loss, prior_init, prior_layers
from duolora.sdxl import CONTENT, SD15_LAYOUT, prior_role
from duolora.synthetic import synthetic_lora as layout_lora

SKIPPED_BY_C2 = "middle_block.1.transformer_blocks.0.attn2.to_k"  # learned between the first content and style
METHODS_K = ("ziprank", "ziplora_out", "ziplora_in", "direct")
OBJECTIVES = ("weights_only", "layerwise", "paper", "layerwise_paper")


def two_subjects():
    """(model, content, content2, style): toy_setup's pair and a second content LoRA (rank 5) that lacks one
    attention layer."""
    model, content, style = toy_setup()
    content2 = synthetic_lora(model.lora_modules(), 5, 7, skip=[SKIPPED_BY_C2], name="content2")
    return model, content, content2, style


def inputs(**more) -> engine.ReferenceInputs:
    """The first subject's references (toy_references seed 0) and the second's (seed 1), as a host holds them."""
    a, b = toy_references(0), toy_references(1)
    second = {"content_latents": torch.cat(b.content), "content_prompt": b.p_c, "combined_prompt": b.p_cs}
    second.update(more)
    return engine.ReferenceInputs(content_latents=torch.cat(a.content), style_latents=torch.cat(a.style),
                                  content_prompt=a.p_c, style_prompt=a.p_s, combined_prompt=a.p_cs,
                                  more_content=[engine.ContentInputs(**second)])


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("method", METHODS_K)
def test_two_subjects_and_a_style_merge_into_one_exact_lora(method: str, objective: str) -> None:
    model, c1, c2, s = two_subjects()
    config = MergeConfig(method=method, objective=objective, steps=2, prune_threshold=0.05,
                         constyle_iterations=1 if objective == "paper" else 0)
    run = lambda: engine.run_merge([c1, c2], s, config, open_denoiser=ToyModel(model), references=inputs())
    if method.startswith("ziplora") and objective != "paper":
        with pytest.raises(solver.FastModeError, match=f"method '{method}' learns per-feature masks"):
            run()
        return
    result = run()
    merger = result.merger
    assert merger.tags == ("c", "c2", "s") and merger.content_names == ["content.safetensors", "content2.safetensors"]
    learned = merger.learned_layers()
    if method != "direct":
        assert len(learned) == 32  # every attention projection of the toy's four blocks
        assert merger.layer(SKIPPED_BY_C2).present == ("c", "s")
        # One mask per LoRA per layer.
        assert merger.trainable_parameters() == sum(
            sum(layer.mask(t).numel() for t in layer.present) for layer in learned)
    assert result.total_components == sum(lr.rank for lo in (c1, c2, s) for lr in lo.layers.values())
    # The export is one exact standard LoRA: per layer the kept components of all three LoRAs.
    kept_total, worst = 0, 0.0
    with torch.no_grad():
        for name, layer in merger.items():
            kept = kept_components(layer, config.prune_threshold)
            reference = torch.zeros(layer.weight_shape).reshape(layer.out_features, -1)
            for t in layer.present:
                m = layer.mask(t).clone()
                m[(m.abs() < config.prune_threshold) | (m == 0)] = 0.0
                B, A = layer.masked_factors(t, m)
                reference += B @ A
            if sum(kept) == 0:
                assert name not in result.merged.layers
                continue
            exported = result.merged.layers[name]
            assert exported.rank == sum(kept), name
            kept_total += sum(kept)
            worst = max(worst, float((exported.delta().reshape(reference.shape) - reference).abs().max()
                                     / reference.abs().max()))
    assert worst <= 1e-5 and kept_total == result.kept_components
    assert result.merged.metadata["duolora_content"] == "content.safetensors + content2.safetensors"
    if method == "direct":
        # Nothing learned: the plain sum of the three LoRAs.
        name = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
        total = c1.layers[name].delta() + c2.layers[name].delta() + s.layers[name].delta()
        assert float((result.merged.layers[name].delta() - total).abs().max()) <= 1e-5 * float(total.abs().max())
        return
    expected = {"content", "content2", "style", "total"}
    if objective == "paper":
        expected |= {"cycle", "cycle2", "reverse", "reverse2", "prior"}
        assert all(len(v) == 2 for v in result.history.values())
    assert expected <= set(result.history), result.history.keys()


def test_each_content_lora_is_reconstructed_on_its_own_references_and_prompt() -> None:
    """At the direct merge (all masks 1) the step-0 term "content2" is exactly MSE(ε_merged, ε_content2) on the
    second subject's noised latent under its own prompt, and does not depend on the first subject's inputs."""
    model, c1, c2, s = two_subjects()
    config = MergeConfig(prior_loss=False)
    merger = build_merger("ziprank", [c1, c2], s, config)
    a, b = toy_references(0), toy_references(1)
    refs = References(content=a.content, style=a.style, p_c=a.p_c, p_s=a.p_s, p_cs=a.p_cs,
                      more_content=[ContentReferences(b.content, b.p_c, b.p_cs)])
    other = References(content=[x + 1.0 for x in b.content], style=a.style, p_c=b.p_cs, p_s=a.p_s, p_cs=a.p_c,
                       more_content=[ContentReferences(b.content, b.p_c, b.p_cs)])
    with attach(merger, model.lora_modules()) as adapter, torch.no_grad():
        den = ToyDenoiser(model, adapter)
        _, terms = DuoLoRAObjective(merger, den, refs, config)(0, torch.Generator().manual_seed(3))
        _, changed = DuoLoRAObjective(merger, den, other, config)(0, torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        sigma = den.sample_sigma(g)
        eps = torch.randn(b.content[0].shape, generator=g)
        x = den.add_noise(b.content[0], eps, sigma)
        sig = sigma.reshape(1)
        merged = den.predict(x, sig, [b.p_c], [MERGED])
        alone = den.predict(x, sig, [b.p_c], ["content2"])
    assert set(terms) == {"content", "content2", "style", "total"}
    assert terms["content2"] == pytest.approx(float(torch.nn.functional.mse_loss(merged, alone)), rel=1e-5)
    assert changed["content2"] == terms["content2"] and changed["content"] != terms["content"]


def test_priors_pair_each_content_lora_with_the_style_lora_and_never_two_content_loras() -> None:
    _, c1, c2, s = two_subjects()
    config = MergeConfig()
    merger = build_merger("ziprank", [c1, c2], s, config)
    roles = config.roles()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in merger.mask_parameters():
            p.copy_(torch.rand(p.shape, generator=g))
    loss = layer_prior_loss(merger, roles, "share_hinge", nu=1.0, margin=0.4, push="both")
    expected = []
    for layer, role in prior_layers(merger, roles):
        pairs = [(t, "s") if role == CONTENT else ("s", t) for t in layer.present if t != "s"]
        expected.append(sum(torch.relu(kept_share(layer, o) - kept_share(layer, d) + 0.4) for d, o in pairs))
    assert len(expected) == 32 and float(loss.detach()) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-6)
    # Only reconstruction decides between the two content LoRAs: their masks do not enter each other's term.
    layer = merger.layer("output_blocks.1.1.transformer_blocks.0.attn1.to_q")  # a content-prior layer
    assert prior_role(layer.name, roles) == CONTENT
    before = float(layer_prior_loss(merger, roles, "share_hinge", nu=1.0, margin=0.4))
    with torch.no_grad():
        # Moving content LoRA 2's share down to content LoRA 1's changes only its own pair with the style.
        layer.m_c2.mul_(0.5)
    after = float(layer_prior_loss(merger, roles, "share_hinge", nu=1.0, margin=0.4))
    rho = {t: float(kept_share(layer, t)) for t in layer.present}
    assert after - before == pytest.approx(
        (max(0.0, rho["s"] - rho["c2"] + 0.4) - max(0.0, rho["s"] - 2 * rho["c2"] + 0.4)) / 32, abs=1e-6)
    # The prior initialisation: in a content layer both content LoRAs are dominant (thresholded at τ_s), each
    # with its own draw; the style LoRA is thresholded at τ_c.
    prior_init(merger, roles, tau_c=0.75, tau_s=0.5, seed=0)
    kept = {t: layer.mask(t)[layer.mask(t) > 0] for t in layer.present}
    assert bool((kept["c"] > 0.5).all() and (kept["c2"] > 0.5).all() and (kept["s"] > 0.75).all())
    assert kept["c"].numel() > 0 and kept["c2"].numel() > 0
    assert not torch.equal(layer.m_c[:5], layer.m_c2)


def test_constyle_runs_one_cycle_per_content_lora() -> None:
    """Per step: one no-grad call with 3K + 1 evaluations (each content LoRA's target and add, the style target,
    each style add), one with 2K (the remove hop), one with gradient holding the K + 1 merged predictions."""
    model, c1, c2, s = two_subjects()
    toy = ToyModel(model)
    config = MergeConfig(steps=1, constyle_iterations=1)
    result = engine.run_merge([c1, c2], s, config, open_denoiser=toy, references=inputs())
    assert [(n, grad) for n, grad in toy.denoisers[0].calls] == [(7, False), (4, False), (3, True)]
    assert {"cycle", "cycle2", "reverse", "reverse2"} <= set(result.history)
    assert all(math.isfinite(v[0]) and v[0] > 0 for v in result.history.values())


# -- the fast modes with three LoRAs --------------------------------------------------------------------------

def _three(shape: tuple[int, ...], ranks: tuple[int, ...], seed: int) -> list[LowRank]:
    g = torch.Generator().manual_seed(seed)
    out_f, rest = shape[0], shape[1:]
    return [LowRank(torch.randn(out_f, r, *((1, 1) if len(shape) == 4 else ()), generator=g),
                    torch.randn(r, *rest, generator=g) / math.sqrt(math.prod(rest))) for r in ranks]


def _one_layer(name: str, layers: list[LowRank], basis: str) -> ZipRankMerger:
    contents = [LoRA({name: lr}, source=f"c{i}.safetensors") for i, lr in enumerate(layers[:-1])]
    return ZipRankMerger(contents, LoRA({name: layers[-1]}, source="s.safetensors"), basis=basis, scope="all")


def _projector(lr: LowRank) -> torch.Tensor:
    B = lr.B.double().reshape(lr.B.shape[0], -1)
    return B @ torch.linalg.pinv(B)


@pytest.mark.parametrize("basis", ["svd", "raw"])
@pytest.mark.parametrize("shape", [(40, 30), (24, 6, 3, 3)], ids=["linear", "conv"])
def test_weights_only_gram_loss_equals_the_dense_loss_with_three_loras(basis: str, shape: tuple[int, ...]) -> None:
    """L_i = ‖Π_i·(ΔW_m − ΔW_i)·A'_iᵀ‖² for each of three LoRAs, from the n×n Grams (n = 4 + 3 + 5)."""
    loras = _three(shape, (4, 3, 5), seed=1)
    name = "input_blocks.4.1.transformer_blocks.0.attn1.to_q" if len(shape) == 2 else "input_blocks.4.0.in_layers.2"
    layer = _one_layer(name, loras, basis).layers[0]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in layer.tags:
            layer.mask(t).copy_(torch.rand(layer.mask(t).shape, generator=g))
    quad = solver.weights_quadratic(layer, svd_basis=basis == "svd")
    gram = quad.losses(*(layer.mask(t) for t in layer.tags))
    delta_m = layer.delta().detach().double().reshape(shape[0], -1)
    for value, lr in zip(gram, loras):
        a_svd = svd_refactor(lr.B, lr.A)[1].double()
        dense = float((_projector(lr) @ (delta_m - lr.B.double() @ lr.A.double()) @ a_svd.T).square().sum())
        assert abs(value - dense) <= 1e-5 * dense, (value, dense)


def test_recorded_layerwise_loss_equals_the_dense_loss_with_three_loras() -> None:
    g = torch.Generator().manual_seed(3)
    module = torch.nn.Linear(20, 16)
    xs = {"content": torch.randn(3, 11, 20, generator=g), "content2": torch.randn(2, 5, 20, generator=g) * 3,
          "style": torch.randn(2, 7, 20, generator=g) * 2}
    loras = _three((16, 20), (4, 2, 3), seed=4)
    name = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    merger = _one_layer(name, loras, "svd")
    layer = merger.layers[0]
    with torch.no_grad():
        for t in layer.tags:
            layer.mask(t).copy_(torch.rand(layer.mask(t).shape, generator=g))
        with recording.ActivationRecorder(merger, {name: module}) as rec:
            for side, x in xs.items():
                rec.set_side(side)
                module(x)
    quad = solver.activation_quadratic(layer, rec.statistics()[name])
    gram = quad.losses(*(layer.mask(t) for t in layer.tags))
    delta_m = layer.delta().detach().double()
    for value, lr, x in zip(gram, loras, xs.values()):
        residual = _projector(lr) @ (delta_m - lr.delta().double())
        dense = float((x.double() @ residual.T).square().sum(-1).mean())
        assert abs(value - dense) <= 1e-5 * dense, (value, dense)


def test_three_loras_writing_disjoint_outputs_keep_every_mask_at_one() -> None:
    """Three LoRAs reading the same inputs and writing disjoint output coordinates do not interfere."""
    g = torch.Generator().manual_seed(9)
    a = torch.randn(4, 20, generator=g)
    ups = [torch.zeros(18, 4) for _ in range(3)]
    for i, up in enumerate(ups):
        up[6 * i:6 * (i + 1)] = torch.randn(6, 4, generator=g)
    merger = _one_layer("input_blocks.4.1.transformer_blocks.0.attn1.to_q",
                        [LowRank(up, a.clone()) for up in ups], "raw")
    solver.solve_weights(merger, MergeConfig(prior_preset="none"))
    layer = merger.layers[0]
    assert min(float(layer.mask(t).min()) for t in layer.tags) > 1 - 1e-5


@pytest.mark.parametrize("kind", ["share_hinge", "hinge"])
def test_two_prior_pairs_the_solution_is_a_minimum_of_the_full_objective(kind: str) -> None:
    """With two content LoRAs a prior layer has two hinges (each content LoRA against the style LoRA): no small
    perturbation inside the box lowers the layer's fast objective at the solver's masks."""
    content, content2, style = (layout_lora(rank=r, seed=sd, decay=0.8) for r, sd in ((6, 3), (4, 5), (6, 4)))
    config = MergeConfig(lambda_prior=0.5, prior_loss_kind=kind, margin=0.3)
    roles = config.roles()
    names = [n for n in content.layers if prior_role(n, roles) is not None][:12]
    loras = [LoRA({n: lo.layers[n] for n in names}, source=f"{i}.safetensors")
             for i, lo in enumerate((content, content2, style))]
    merger = build_merger("ziprank", loras[:2], loras[2], config)
    solver.solve_weights(merger, config)
    terms = boxqp.FastTerms.from_config(config)
    g = torch.Generator().manual_seed(9)
    improved, binding = 0, 0
    for layer in merger.learned_layers():
        quad = solver.weights_quadratic(layer)
        role = prior_role(layer.name, roles)
        masks = [layer.mask(t).detach() for t in layer.tags]
        base = layer_objective(quad, role, masks, terms)
        binding += base["prior"] > 0
        for _ in range(20):
            trial = [(m + 1e-3 * torch.randn(m.shape, generator=g)).clamp(0, 1) for m in masks]
            improved += layer_objective(quad, role, trial, terms)["total"] < base["total"] - 1e-7 * abs(base["total"])
    assert improved == 0


def test_streamed_three_file_merge_equals_the_in_memory_merge(tmp_path, tiny_layout) -> None:
    loras = [layout_lora(tiny_layout, rank=r, seed=sd, std=0.2) for r, sd in ((4, 11), (3, 13), (6, 12))]
    del loras[1].layers["output_blocks.5.1.transformer_blocks.0.attn1.to_q"]
    paths = [formats.save_lora(lo, tmp_path / f"{n}.safetensors", dtype=torch.float32, layout=tiny_layout)
             for lo, n in zip(loras, ("a", "b", "s"))]
    config = MergeConfig(prune_threshold=0.05, prior_loss_kind="hinge", margin=0.0)
    out = engine.merge_files(paths[:2], paths[2], tmp_path / "m.safetensors", config, layout=tiny_layout,
                             chunk_layers=150)
    streamed = formats.read_lora(out.path, layouts=(tiny_layout,))
    read = [formats.read_lora(p, layouts=(tiny_layout,)) for p in paths]
    merger = build_merger("ziprank", read[:2], read[2], config)
    solver.solve_weights(merger, config)
    memory = merger.export()
    assert set(streamed.layers) == set(memory.layers)
    # Relative to each layer's update: the solver batches the layers of a chunk, and stops a batch (its projected
    # steps, its sweeps over the two prior pairs) when nothing in it moves any more, so a chunk's solve may stop
    # a little earlier or later than the whole merge's.
    worst = max(float((streamed.layers[n].delta() - memory.layers[n].delta()).abs().max()
                      / memory.layers[n].delta().abs().max()) for n in memory.layers)
    assert worst < 5e-5
    assert out.total_components == sum(lr.rank for lo in loras for lr in lo.layers.values())
    assert streamed.metadata["duolora_content"] == "a.safetensors + b.safetensors"


# -- bad input ---------------------------------------------------------------------------------------------------

def test_the_same_file_given_twice_is_refused_by_name(tmp_path, tiny_layout) -> None:
    a, s = (layout_lora(tiny_layout, rank=4, seed=sd) for sd in (1, 2))
    pa = formats.save_lora(a, tmp_path / "dog.safetensors", layout=tiny_layout)
    ps = formats.save_lora(s, tmp_path / "ink.safetensors", layout=tiny_layout)
    weights = MergeConfig(objective="weights_only")
    with pytest.raises(engine.SameFileError) as info:
        engine.run_merge([pa, tmp_path / "." / "dog.safetensors"], ps, weights, layout=tiny_layout)
    assert str(info.value) == (f"content LoRA 1 'dog.safetensors' and content LoRA 2 'dog.safetensors' are the "
                               f"same file ({pa.resolve()}): give each LoRA once (to make a LoRA stronger, raise "
                               "its strength instead)")
    # The same file as content and style is merged (the CLI and the node warn about it): a plain doubling.
    doubled = engine.run_merge(ps, ps, MergeConfig(method="direct", objective="weights_only"), layout=tiny_layout)
    assert doubled.merged is not None and doubled.layers > 0
    # In memory: the same object, or two LoRAs read from one file (e.g. at two strengths).
    read = formats.read_lora(pa, layouts=(tiny_layout,))
    with pytest.raises(engine.SameFileError, match="^content LoRA 1 'dog.safetensors' and content LoRA 2 "
                                                   "'dog.safetensors' are the same file"):
        engine.run_merge([read, read.scaled(0.5)], s, weights)
    with pytest.raises(engine.SameFileError) as info:
        engine.run_merge([a, a], s, weights)
    assert str(info.value) == ("content LoRA 1 '<in-memory LoRA>' and content LoRA 2 '<in-memory LoRA>' are the "
                               "same LoRA: give each LoRA once (to make a LoRA stronger, raise its strength instead)")


def test_content_loras_of_different_base_models_are_refused_by_name(tmp_path, tiny_layout) -> None:
    _, c1, c2, s = two_subjects()
    c1.base = s.base = "sdxl"
    c2.base = "sd1"
    with pytest.raises(formats.WrongBaseModelError) as info:
        engine.run_merge([c1, c2], s, MergeConfig(objective="weights_only"))
    assert str(info.value) == ("content LoRA 2 'content2.safetensors' is made for SD1.x but content LoRA 1 "
                               "'content.safetensors' for SDXL; all LoRAs of a merge must be made for the same "
                               "base model")
    # From files each one is checked against the model family: the SD1 file is named.
    sd1 = formats.save_lora(layout_lora(SD15_LAYOUT, rank=2, seed=1), tmp_path / "sd15_cat.safetensors",
                            layout=SD15_LAYOUT)
    sdxl = [formats.save_lora(layout_lora(rank=2, seed=sd), tmp_path / f"{n}.safetensors")
            for sd, n in ((2, "dog"), (3, "style"))]
    with pytest.raises(formats.WrongBaseModelError, match="^sd15_cat.safetensors: this LoRA is for SD1.x, not SDXL"):
        engine.run_merge([sdxl[0], sd1], sdxl[1], MergeConfig(objective="weights_only"))


def test_a_merged_rank_above_every_layers_width_is_refused() -> None:
    model, _, style = toy_setup(rank_s=12)
    modules = model.lora_modules()
    contents = [synthetic_lora(modules, 12, 20 + i, name=f"subject{i}") for i in range(3)]
    with pytest.raises(engine.RankWidthError) as info:
        engine.run_merge(contents, style, MergeConfig(objective="weights_only"))
    assert str(info.value) == (
        "3 content LoRAs and a style LoRA (ranks subject0.safetensors 12, subject1.safetensors 12, "
        "subject2.safetensors 12, style.safetensors 12) would give a merged LoRA of rank 48 or more in every layer, "
        "above every layer's width (at most 32): merge fewer LoRAs, or set max_rank so that the LoRAs together "
        "keep at most a layer's width")
    # A rank budget that fits the learned layers: 4 LoRAs × 8 = 32 components at most; the layers outside the
    # learned scope (the toy's ff and conv layers) are summed and keep all 48, exactly.
    result = engine.run_merge(contents, style, MergeConfig(objective="weights_only", max_rank=8))
    ranks = {name: lr.rank for name, lr in result.merged.layers.items()}
    assert {ranks[layer.name] for layer in result.merger.learned_layers()} <= set(range(33))
    assert {r for name, r in ranks.items() if not result.merger.layer(name).learned} == {48}


@pytest.mark.parametrize(("objective", "config", "drop", "stage", "missing"), [
    ("paper", {}, ("content_prompt",), "paper", ["content_prompt"]),
    ("paper", {"constyle_iterations": 1}, ("content_latents", "combined_prompt"), "paper",
     ["content_latents", "combined_prompt"]),
    ("layerwise", {"constyle_iterations": 1}, ("content_latents", "combined_prompt"), "record", ["content_latents"]),
    ("layerwise_paper", {"constyle_iterations": 1}, ("combined_prompt",), "cycle", ["combined_prompt"]),
])
def test_a_content_lora_without_references_is_named(objective, config, drop, stage, missing) -> None:
    model, c1, c2, s = two_subjects()
    toy = ToyModel(model)
    with pytest.raises(engine.MissingReferencesError) as info:
        engine.run_merge([c1, c2], s, MergeConfig(objective=objective, **config), open_denoiser=toy,
                         references=inputs(**dict.fromkeys(drop)))
    e = info.value
    assert (e.stage, e.missing, e.content_index, e.lora) == (stage, missing, 2, "content2.safetensors")
    assert str(e) == (f"the {objective!r} objective needs {', '.join(missing)} of content LoRA 2 "
                      f"'content2.safetensors' ({stage})")
    assert toy.denoisers == []
    # No entry at all for the second subject names it too.
    with pytest.raises(engine.MissingReferencesError, match="of content LoRA 2 'content2.safetensors'"):
        engine.run_merge([c1, c2], s, MergeConfig(objective=objective, **config), open_denoiser=toy,
                         references=engine.ReferenceInputs(**{k: v for k, v in vars(inputs()).items()
                                                              if k != "more_content"}))


def test_b_lora_says_it_merges_one_content_lora(tmp_path, tiny_layout) -> None:
    _, c1, c2, s = two_subjects()
    message = ("method 'b_lora' merges exactly one content LoRA (B-LoRA keeps output_blocks.0.1 for the content "
               "and output_blocks.1.1 for the style), but 2 content LoRAs were given ('content.safetensors', "
               "'content2.safetensors'); use method 'ziprank', 'ziplora_out', 'ziplora_in', 'direct' for a "
               "multi-concept merge")
    for objective in OBJECTIVES:
        with pytest.raises(MergerError) as info:
            engine.run_merge([c1, c2], s, MergeConfig(method="b_lora", objective=objective))
        assert str(info.value) == message
    paths = [formats.save_lora(layout_lora(tiny_layout, rank=2, seed=sd), tmp_path / n, layout=tiny_layout)
             for sd, n in ((1, "content.safetensors"), (2, "content2.safetensors"), (3, "s.safetensors"))]
    with pytest.raises(MergerError) as info:
        engine.merge_files(paths[:2], paths[2], tmp_path / "m.safetensors", MergeConfig(method="b_lora"),
                           layout=tiny_layout)
    assert str(info.value) == message and not (tmp_path / "m.safetensors").exists()


def test_the_report_shows_every_lora() -> None:
    """Masks set by hand on a two-subject merger: the report's text names all three LoRAs and counts each one's
    kept components; the figure draws one histogram per LoRA."""
    import io

    from PIL import Image

    from duolora.report import build_report

    _, c1, c2, s = two_subjects()
    merger = build_merger("ziprank", [c1, c2], s, MergeConfig())
    with torch.no_grad():
        for layer in merger.learned_layers():
            layer.m_c[2:] = 0.0  # content 1 keeps 2 of 8
            if layer.m_c2 is not None:
                layer.m_c2[1:] = 0.0  # content 2 keeps 1 of 5
    report = build_report(merger)
    text = report.text()
    assert "LoRAs: content 1 content.safetensors, content 2 content2.safetensors, style style.safetensors" in text
    # 32 learned layers; content 2 lacks one of them: 31 × 5 components, 31 kept.
    assert "32 learned layers: content 1 kept 64/256 components, content 2 kept 31/155, style kept 192/192" in text
    assert "per prior group (mean kept rank content 1 / content 2 / style):" in text
    assert all(r.kept == exported.rank for r in report.layers
               for exported in [merger.export().layers.get(r.name)] if exported is not None)
    png = Image.open(io.BytesIO(report.figure_png()))
    assert png.size == (1200, 860)
