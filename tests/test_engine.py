"""Engine tests of ``duolora.engine.run_merge``, the one entry point of every mode, on a small real denoiser
(engine_toys.ToyUNet; synthetic LoRAs): each mode gives exactly what its parts give when called by hand, the
references a mode needs are named before any model work, and cancel and output behave as documented."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_toys import ToyDenoiser, ToyModel, single_thread, toy_references, toy_setup  # noqa: F401 - autouse fixture

from duolora import engine, formats
from duolora.adapter import attach
from duolora.config import MergeConfig
from duolora.mergers import build_merger
from duolora.optimize import optimize
from duolora.recording import record_activations
from duolora.solver import FastModeError, solve_layerwise, solve_weights


def inputs() -> engine.ReferenceInputs:
    refs = toy_references()
    return engine.ReferenceInputs(content_latents=torch.cat(refs.content), style_latents=torch.cat(refs.style),
                                  content_prompt=refs.p_c, style_prompt=refs.p_s, combined_prompt=refs.p_cs)


def masks(merger) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in merger.state_dict().items()}


def assert_same_masks(a, b) -> None:
    ma, mb = masks(a), masks(b)
    assert ma.keys() == mb.keys()
    assert [k for k in ma if not torch.equal(ma[k], mb[k])] == []


def by_hand(objective: str, content, style, model, config: MergeConfig):
    """The mode's parts called directly, as the node did before the engine had one entry point."""
    merger = build_merger(config.method, content, style, config)
    refs = toy_references()
    mods = model.lora_modules()
    if objective == "weights_only":
        return merger, solve_weights(merger, config)
    with attach(merger, mods) as adapter:
        den = ToyDenoiser(model, adapter)
        if objective == "paper":
            return merger, optimize(merger, den, refs, config)
        lw_refs = dataclasses.replace(refs, p_cs=refs.p_c)
        result = solve_layerwise(merger, record_activations(merger, den, mods, lw_refs, config), config)
        if objective == "layerwise_paper":
            paper = dataclasses.replace(config, objective="paper", prior_init=False)
            result = optimize(merger, den, refs, paper)
        return merger, result


@pytest.mark.parametrize("objective", ["weights_only", "layerwise", "paper", "layerwise_paper"])
def test_every_mode_is_exactly_its_parts(objective: str) -> None:
    model, content, style = toy_setup()
    # prior_init on, to check that layerwise+paper switches it off (its start is the layer-wise solve).
    config = MergeConfig(objective=objective, steps=2, prior_init=True)
    toy = ToyModel(model)
    result = engine.run_merge(content, style, config, open_denoiser=toy, references=inputs())
    expected_merger, expected = by_hand(objective, content, style, model, config)

    assert_same_masks(result.merger, expected_merger)
    assert result.history == expected.history and result.steps_done == expected.steps_done
    assert not result.cancelled
    # The model is opened with gradients only for paper steps, once per phase; never in weights-only mode.
    assert toy.opened == {"weights_only": [], "layerwise": [False], "paper": [True],
                          "layerwise_paper": [False, True]}[objective]
    assert result.config.prior_init is (objective != "layerwise_paper")
    # The export is the merger's, and the component count covers every layer before pruning.
    exported = expected_merger.export(config.prune_threshold)
    assert result.merged.layers.keys() == exported.layers.keys()
    assert all(torch.equal(result.merged.layers[n].up, lr.up) for n, lr in exported.layers.items())
    assert result.total_components == sum(lr.rank for lr in content.layers.values()) + sum(
        lr.rank for lr in style.layers.values())
    assert 0 < result.kept_components <= result.total_components
    assert result.layers == len(exported.layers)


@pytest.mark.parametrize(("objective", "config", "given", "stage", "missing"), [
    ("paper", {"constyle_iterations": 1}, (), "paper",
     ["content_latents", "style_latents", "content_prompt", "style_prompt", "combined_prompt"]),
    ("paper", {}, (), "paper",  # Constyle is off by default: no combined_prompt
     ["content_latents", "style_latents", "content_prompt", "style_prompt"]),
    ("paper", {"constyle_iterations": 1}, ("content_prompt", "style_prompt", "content_latents", "style_latents"),
     "paper", ["combined_prompt"]),
    ("layerwise", {"constyle_iterations": 1}, ("combined_prompt",), "record",
     ["content_latents", "style_latents", "content_prompt", "style_prompt"]),
    # layerwise_paper asks for the Constyle prompt first, before the recording's references.
    ("layerwise_paper", {"constyle_iterations": 1}, (), "cycle", ["combined_prompt"]),
    ("layerwise_paper", {}, (), "record",
     ["content_latents", "style_latents", "content_prompt", "style_prompt"]),
    ("layerwise_paper", {"steps": 0}, (), "record",
     ["content_latents", "style_latents", "content_prompt", "style_prompt"]),
])
def test_missing_references_are_named_before_the_model_is_opened(objective, config, given, stage, missing) -> None:
    model, content, style = toy_setup()
    references = engine.ReferenceInputs(**{name: getattr(inputs(), name) for name in given})
    toy = ToyModel(model)
    with pytest.raises(engine.MissingReferencesError) as info:
        engine.run_merge(content, style, MergeConfig(objective=objective, **config), open_denoiser=toy,
                         references=references)
    assert (info.value.stage, info.value.missing, info.value.objective) == (stage, missing, objective)
    assert isinstance(info.value, ValueError)
    assert toy.opened == []


def test_what_needs_no_references_runs_without_them() -> None:
    _, content, style = toy_setup()
    # Paper mode with no step learns nothing (the masks stay at the direct merge: no prior initialisation).
    result = engine.run_merge(content, style, MergeConfig(steps=0))
    assert result.steps_done == 0 and all(float(p.detach().min()) == float(p.detach().max()) == 1.0
                                          for p in result.merger.mask_parameters())
    # Methods with nothing to learn need no model in any mode.
    for objective in ("paper", "layerwise", "layerwise_paper", "weights_only"):
        direct = engine.run_merge(content, style, MergeConfig(method="direct", objective=objective))
        assert direct.merger.mask_parameters() == [] and direct.steps_done == 0
    with pytest.raises(ValueError, match="^the 'layerwise' objective runs the diffusion model; pass open_denoiser"):
        engine.run_merge(content, style, MergeConfig(objective="layerwise"), references=inputs())


def test_feature_masks_are_refused_in_the_fast_modes_before_any_work() -> None:
    model, content, style = toy_setup()
    toy = ToyModel(model)
    for objective, mode in (("weights_only", "weights"), ("layerwise", "layerwise"), ("layerwise_paper", "layerwise")):
        with pytest.raises(FastModeError, match=f"^the '{mode}' mode solves ZipRank's rank masks; method "
                                                "'ziplora_out' learns per-feature masks"):
            engine.run_merge(content, style, MergeConfig(method="ziplora_out", objective=objective),
                             open_denoiser=toy, references=inputs())
    assert toy.opened == []


def test_cancel_stops_paper_steps_and_writes_nothing(tmp_path) -> None:
    model, content, style = toy_setup()
    seen: list[tuple[int, int]] = []
    out = tmp_path / "merged.safetensors"
    result = engine.run_merge(content, style, MergeConfig(steps=5), open_denoiser=ToyModel(model),
                              references=inputs(), progress=lambda done, total, terms: seen.append((done, total)),
                              should_cancel=lambda: len(seen) >= 2, output=engine.OutputFile(out))
    assert result.cancelled and result.steps_done == 2 and seen == [(1, 5), (2, 5)]
    assert result.path is None and not out.exists()
    # The export holds the masks reached so far.
    assert result.merged.layers.keys() == result.merger.export().layers.keys()


def test_an_existing_output_is_refused_before_anything_is_read(tmp_path) -> None:
    out = tmp_path / "taken.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(formats.OutputExistsError, match="^taken.safetensors already exists in"):
        engine.run_merge(tmp_path / "missing_c.safetensors", tmp_path / "missing_s.safetensors",
                         MergeConfig(objective="weights_only"), output=engine.OutputFile(out))
    assert out.read_bytes() == b"keep me"
    _, content, _ = toy_setup()
    with pytest.raises(TypeError, match="^run_merge takes LoRAs or file paths, not some of each$"):
        engine.run_merge(content, tmp_path / "s.safetensors", MergeConfig(objective="weights_only"))
