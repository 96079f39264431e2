"""The fast modes of ZipRank Merge in the real ComfyUI executor: ``weights`` needs no references and equals
the engine's weights-only merge; ``layerwise`` records the real tiny SDXL model's activations and lowers the
paper's reconstruction terms on held-out noise; ``layerwise+paper`` starts paper steps from the layer-wise
solve (synthetic LoRAs; see nodehelpers)."""

from __future__ import annotations

import comfyhost
import pytest
import torch
from nodehelpers import MERGE_ID, TEST_SUBDIR, merge_prompt, node, pack_module, read_tiny, tiny_pair

from duolora import solver
from duolora.config import MergeConfig
from duolora.mergers import build_merger
from duolora.objective import DuoLoRAObjective, References

SAVE_PREFIX = f"{TEST_SUBDIR}/fast/weights"


def test_weights_mode_needs_no_references_and_equals_the_engine(host: comfyhost.Host, tiny_layout) -> None:
    content, style = tiny_pair(host, tiny_layout, "fast_w")
    prompt = merge_prompt(host, content.name, style.name, references=False, mode="weights", lora_dtype="fp32")
    prompt["13"] = node(host, "DuoLoRA_SaveMergedLoRA", merged_lora=[MERGE_ID, 0], filename_prefix=SAVE_PREFIX)
    result = host.execute(prompt)
    stats = result["outputs"][MERGE_ID][1]
    assert stats.mode == "weights" and stats.config["objective"] == "weights_only"
    assert stats.steps_done == 0 and set(stats.history) >= {"total", "content", "style", "prior"}
    before, after = stats.history["total"]
    assert after < before

    config = MergeConfig.from_dict(stats.config)
    engine = solver.merge_weights_only(read_tiny(content.path, tiny_layout), read_tiny(style.path, tiny_layout), config)
    node_masks = stats.extra["masks"]
    engine_masks = engine.merger.state_dict()
    assert node_masks.keys() == engine_masks.keys()
    assert max(float((node_masks[k] - engine_masks[k]).abs().max()) for k in node_masks) <= 1e-6

    (saved_name,) = result["ui"]["13"]["text"]
    saved = read_tiny(host.loras_dir / saved_name, tiny_layout)
    expected = engine.merger.export()
    assert set(saved.layers) == set(expected.layers)
    worst = max(float((saved.layers[n].delta() - expected.layers[n].delta()).abs().max()
                      / expected.layers[n].delta().abs().max()) for n in expected.layers)
    assert worst <= 1e-6


def test_the_balance_widget_is_the_engine_knob(host: comfyhost.Host, tiny_layout) -> None:
    content, style = tiny_pair(host, tiny_layout, "fast_w")
    prompt = merge_prompt(host, content.name, style.name, references=False, mode="weights", balance=0.6)
    prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
    stats = host.execute(prompt)["outputs"][MERGE_ID][1]
    assert stats.config["balance"] == 0.6
    c, s = read_tiny(content.path, tiny_layout), read_tiny(style.path, tiny_layout)
    engine = solver.merge_weights_only(c, s, MergeConfig(objective="weights_only", balance=0.6)).merger.state_dict()
    neutral = solver.merge_weights_only(c, s, MergeConfig(objective="weights_only")).merger.state_dict()
    masks = stats.extra["masks"]
    assert max(float((masks[k] - engine[k]).abs().max()) for k in masks) <= 1e-6
    # Towards content: the content masks keep more and the style masks less than at the neutral balance.
    mean = {w: (sum(float(masks[k].sum()) for k in masks if k.endswith(w)),
                sum(float(neutral[k].sum()) for k in neutral if k.endswith(w))) for w in ("m_c", "m_s")}
    assert mean["m_c"][0] > mean["m_c"][1] and mean["m_s"][0] < mean["m_s"][1], mean


def test_layerwise_mode_names_the_missing_references(host: comfyhost.Host, tiny_layout) -> None:
    content, style = tiny_pair(host, tiny_layout, "fast_missing")
    prompt = merge_prompt(host, content.name, style.name, references=False, mode="layerwise")
    prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
    with pytest.raises(comfyhost.NodeExecutionError) as info:
        host.execute(prompt)
    assert ("ZipRank Merge in 'layerwise' mode records the model's activations on your references; connect "
            "content_latents, style_latents, content_prompt, style_prompt") in str(info.value)


def test_fast_modes_refuse_feature_masks(host: comfyhost.Host, tiny_layout) -> None:
    content, style = tiny_pair(host, tiny_layout, "fast_zip")
    prompt = merge_prompt(host, content.name, style.name, references=False, mode="weights", method="ziplora_in")
    prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
    with pytest.raises(comfyhost.NodeExecutionError) as info:
        host.execute(prompt)
    assert "method 'ziplora_in' learns per-feature masks" in str(info.value)


def held_out_reconstruction(model, merger, latents: tuple[torch.Tensor, torch.Tensor], prompts: tuple,
                            draws: int = 6) -> float:
    """Mean L_c + L_s of the paper objective over fixed (σ, ε) draws, through the pack's ComfyDenoiser."""
    bridge = pack_module("nodes.comfy_bridge")
    cfg = MergeConfig(constyle_iterations=0, prior_loss=False)
    total = 0.0
    with torch.inference_mode(False), torch.no_grad(), \
            bridge.ComfyDenoiser(model, merger, gradient_checkpointing=False) as den:
        refs = References(content=den.prepare_latents(latents[0]), style=den.prepare_latents(latents[1]),
                          p_c=prompts[0], p_s=prompts[1], p_cs=prompts[0])
        objective = DuoLoRAObjective(merger, den, refs, cfg)
        g = torch.Generator().manual_seed(4321)  # not the node's seed: held-out σ and ε
        for i in range(draws):
            terms = objective(i, g)[1]
            total += terms["content"] + terms["style"]
    return total / draws


def test_layerwise_mode_lowers_the_held_out_reconstruction(host: comfyhost.Host, tiny_layout) -> None:
    content, style = tiny_pair(host, tiny_layout, "fast_lw")
    prompt = merge_prompt(host, content.name, style.name, mode="layerwise", lora_dtype="fp32")
    for extra in (MERGE_ID, "2", "3", "7", "8"):  # and the prompts and latents, to evaluate on them
        prompt[f"9{extra}"] = node(host, "PreviewAny", source=[extra, 0])
    result = host.execute(prompt)
    stats = result["outputs"][MERGE_ID][1]
    assert stats.mode == "layerwise" and stats.config["objective"] == "layerwise"
    before, after = stats.history["total"]
    assert after < before

    out = result["outputs"]
    model = out["1"][0]
    latents, prompts = (out["7"][0]["samples"], out["8"][0]["samples"]), (out["2"][0], out["3"][0])
    config = MergeConfig.from_dict(stats.config)
    lc, ls = read_tiny(content.path, tiny_layout), read_tiny(style.path, tiny_layout)
    direct = build_merger(config.method, lc, ls, config)  # masks 1: the direct merge
    learned = build_merger(config.method, lc, ls, config)
    learned.load_state_dict(stats.extra["masks"])
    masks = torch.cat([p.detach().flatten() for p in learned.mask_parameters()])
    assert 0.0 <= float(masks.min()) and float(masks.max()) <= 1.0 and float(masks.mean()) < 0.99
    r_direct = held_out_reconstruction(model, direct, latents, prompts)
    r_learned = held_out_reconstruction(model, learned, latents, prompts)
    # Measured (these seeds, 6 held-out draws): direct 0.0551 -> layer-wise 0.0461, 1.19×. The paper's
    # reconstruction also counts each LoRA's action on the other's references as error; the layer-wise
    # solve deliberately does not (duolora.solver: own output spaces), so it lowers it less than a solve of
    # the full-output form did (2.03×, which lost the style on MiniBench 2). Demand 1.1×.
    assert r_direct / r_learned >= 1.1, (r_direct, r_learned)


def test_layerwise_plus_paper_starts_from_the_layerwise_solve(host: comfyhost.Host, tiny_layout) -> None:
    content, style = tiny_pair(host, tiny_layout, "fast_lwp")
    runs = {}
    for mode, steps in (("layerwise", 100), ("layerwise+paper", 0), ("layerwise+paper", 3)):
        prompt = merge_prompt(host, content.name, style.name, mode=mode, steps=steps, lora_dtype="fp32",
                              gradient_checkpointing=False)
        for extra in (MERGE_ID, "2", "3", "7", "8"):
            prompt[f"9{extra}"] = node(host, "PreviewAny", source=[extra, 0])
        runs[(mode, steps)] = host.execute(prompt)["outputs"]
    lw, start, refined = (runs[k][MERGE_ID][1] for k in runs)
    # With no paper step the result IS the layer-wise solve, mask for mask.
    assert start.steps_done == 0
    assert max(float((start.extra["masks"][k] - lw.extra["masks"][k]).abs().max()) for k in lw.extra["masks"]) == 0.0
    # The refinement: paper steps from there, with the prior initialisation switched off (it would overwrite it).
    assert refined.mode == "layerwise+paper" and refined.config["objective"] == "layerwise_paper"
    assert refined.config["prior_init"] is False and refined.steps_done == 3
    assert len(refined.history["total"]) == 3

    out = runs[("layerwise", 100)]
    model = out["1"][0]
    latents, prompts = (out["7"][0]["samples"], out["8"][0]["samples"]), (out["2"][0], out["3"][0])
    config = MergeConfig.from_dict(lw.config)
    lc, ls = read_tiny(content.path, tiny_layout), read_tiny(style.path, tiny_layout)
    held_out = {}
    for label, stats in (("layerwise", lw), ("refined", refined)):
        merger = build_merger(config.method, lc, ls, config)
        merger.load_state_dict(stats.extra["masks"])
        held_out[label] = held_out_reconstruction(model, merger, latents, prompts)
    # Three paper steps from the layer-wise start lower the held-out reconstruction further. Measured (these
    # seeds, 6 held-out draws): layer-wise 0.0272 -> refined 0.0205, 1.32×. Demand 1.1×.
    assert held_out["layerwise"] / held_out["refined"] >= 1.1, held_out


def test_layerwise_plus_paper_names_the_missing_combined_prompt(host: comfyhost.Host, tiny_layout) -> None:
    content, style = tiny_pair(host, tiny_layout, "fast_lwp_missing")
    prompt = merge_prompt(host, content.name, style.name, mode="layerwise+paper", steps=2, constyle_iterations=1)
    del prompt[MERGE_ID]["inputs"]["combined_prompt"]
    prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
    with pytest.raises(comfyhost.NodeExecutionError) as info:
        host.execute(prompt)
    assert info.value.exception_message == (
        "ZipRank Merge in 'layerwise+paper' mode with the Constyle cycle loss on (constyle_iterations 1) needs "
        "combined_prompt; connect combined_prompt (CLIP Text Encode of your subject in your style, e.g. 'a sks "
        "dog in zwz style'), or set constyle_iterations to 0.\n")
