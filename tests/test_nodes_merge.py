"""One real DuoLoRA merge in ComfyUI's executor on the tiny SDXL model, checked against ComfyUI's own paths.

A single prompt (module fixture) runs: tiny checkpoint → CLIP Text Encode ×3, 64×64 images → VAE Encode →
Load Content / Load Style LoRA → ZipRank Merge (paper mode, 3 steps, fp32 LoRA) → Apply Merged LoRA
(0.8 / 1.0), Save Merged LoRA, the core Load LoRA Model and Save LoRA Weights nodes on the merge's
LORA_MODEL, and Load Content LoRA fed by that LORA_MODEL. A second prompt loads the saved file with the
stock LoraLoader. No part of ComfyUI is mocked.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import comfyhost
import pytest
import torch
from nodehelpers import (
    MERGE_ID,
    N_ATTENTION,
    RANK_C,
    RANK_S,
    TEST_SUBDIR,
    merge_prompt,
    node,
    patched_weights,
    read_tiny,
    tiny_pair,
)
from safetensors import safe_open
from safetensors.torch import load_file

import duolora
from duolora.config import MergeConfig
from duolora.export import kept_components
from duolora.mergers import build_merger

STEPS = 3
STRENGTH_MODEL, STRENGTH_CLIP = 0.8, 1.0
# Above the default (1e-3) so that some prior-initialised zeros, moved by at most ~3·lr, are pruned and
# the adaptive-rank arithmetic is exercised.
PRUNE = 0.02
SAVE_PREFIX = f"{TEST_SUBDIR}/merge/main"
CORE_SAVE_PREFIX = f"{TEST_SUBDIR}/core_save/lora"


@dataclasses.dataclass
class MergeRun:
    result: dict
    content: object  # nodehelpers.LoRAFile
    style: object
    saved_name: str
    saved_path: Path

    def out(self, node_id: str, slot: int = 0):
        return self.result["outputs"][node_id][slot]


@pytest.fixture(scope="module")
def run(host: comfyhost.Host, tiny_layout) -> MergeRun:
    content, style = tiny_pair(host, tiny_layout, "merge")
    # prior_init on (docs/method.md §3's thresholded start; the default starts at all ones): it zeroes components, so
    # the pruning and adaptive-rank arithmetic below is exercised. Constyle on (off by default): every loss
    # term runs through the real model.
    prompt = merge_prompt(host, content.name, style.name, steps=STEPS, lora_dtype="fp32",
                          prune_threshold=PRUNE, prior_init=True, constyle_iterations=1)
    prompt.update({
        "13": node(host, "DuoLoRA_ApplyMergedLoRA", model=["1", 0], clip=["1", 1], merged_lora=[MERGE_ID, 0],
                   strength_model=STRENGTH_MODEL, strength_clip=STRENGTH_CLIP),
        "14": node(host, "DuoLoRA_SaveMergedLoRA", merged_lora=[MERGE_ID, 0], filename_prefix=SAVE_PREFIX),
        "15": node(host, "LoraModelLoader", model=["1", 0], lora=[MERGE_ID, 2], strength_model=STRENGTH_MODEL),
        "16": node(host, "SaveLoRA", lora=[MERGE_ID, 2], prefix=CORE_SAVE_PREFIX),
        "17": node(host, "PreviewAny", source=["13", 0]),
        "18": node(host, "PreviewAny", source=["15", 0]),
        "19": node(host, "DuoLoRA_LoadStyleLoRA", lora_name=style.name, lora_model=[MERGE_ID, 2]),
        "20": node(host, "PreviewAny", source=["19", 1]),
    })
    result = host.execute(prompt)
    (saved_name,) = result["ui"]["14"]["text"]
    return MergeRun(result, content, style, saved_name, host.loras_dir / saved_name)


def test_saved_name_and_stock_loader_bit_identical(host: comfyhost.Host, run: MergeRun) -> None:
    """Apply Merged LoRA patches exactly what the stock LoraLoader patches from the saved file."""
    assert run.saved_name == f"{SAVE_PREFIX}_00001_.safetensors"
    stock = host.execute({
        "1": node(host, comfyhost.TINY_CHECKPOINT_NODE, seed=0),
        "2": node(host, "LoraLoader", model=["1", 0], clip=["1", 1], lora_name=run.saved_name,
                  strength_model=STRENGTH_MODEL, strength_clip=STRENGTH_CLIP),
        "3": node(host, "PreviewAny", source=["2", 0]),
        "4": node(host, "PreviewAny", source=["2", 1]),
    })
    ours_model, ours_clip = run.out("13", 0), run.out("13", 1)
    stock_model, stock_clip = stock["outputs"]["2"][0], stock["outputs"]["2"][1]
    base = run.out("1", 0)

    ours_unet, stock_unet = patched_weights(ours_model), patched_weights(stock_model)
    unpatched_unet = {k: v.clone() for k, v in base.model.state_dict().items()}
    assert ours_unet.keys() == stock_unet.keys()
    differing = [k for k in ours_unet if not torch.equal(ours_unet[k], stock_unet[k])]
    assert differing == []
    changed = [k for k in ours_unet if not torch.equal(ours_unet[k], unpatched_unet[k])]
    # Every attention projection the merge kept is patched (the merge has no other UNet layer).
    assert len(changed) == N_ATTENTION

    ours_te, stock_te = patched_weights(ours_clip.patcher), patched_weights(stock_clip.patcher)
    unpatched_te = {k: v.clone() for k, v in run.out("1", 1).cond_stage_model.state_dict().items()}
    assert [k for k in ours_te if not torch.equal(ours_te[k], stock_te[k])] == []
    te_changed = [k for k in ours_te if not torch.equal(ours_te[k], unpatched_te[k])]
    # Both tiny text encoders' LoRA layers (CLIP-L 12 layers, CLIP-G 32 layers; 6 linears each).
    assert len(te_changed) == 6 * (12 + 32)


def _saved_and_reference(run: MergeRun, tiny_layout):
    """The saved LoRA and the merger rebuilt from the two source files with the node's trained masks."""
    stats = run.out(MERGE_ID, 1)
    saved = read_tiny(run.saved_path, tiny_layout)
    content = read_tiny(run.content.path, tiny_layout)
    style = read_tiny(run.style.path, tiny_layout)
    config = MergeConfig.from_dict(stats.config)
    merger = build_merger(config.method, content, style, config)
    merger.load_state_dict(stats.extra["masks"])
    return saved, merger, config


def test_saved_file_is_the_exact_merge(run: MergeRun, tiny_layout) -> None:
    saved, merger, config = _saved_and_reference(run, tiny_layout)
    assert {v.dtype for v in load_file(run.saved_path).values()} == {torch.float32}
    pruned_total = 0
    worst = 0.0
    with torch.no_grad():
        for name, layer in merger.items():
            pruned = 0
            for which in ("c", "s"):
                m = layer.mask(which)
                if m is None:
                    continue
                drop = (m.abs() < config.prune_threshold) | (m == 0)
                pruned += int(drop.sum())
                m[drop] = 0.0  # what the export promises: pruned components contribute nothing
            expected_rank = layer.rank("c") + layer.rank("s") - pruned
            pruned_total += pruned
            if expected_rank == 0:
                assert name not in saved.layers
                continue
            assert saved.layers[name].rank == expected_rank, name
            reference = merger.delta(name)
            error = float((saved.layers[name].delta() - reference).abs().max() / reference.abs().max())
            worst = max(worst, error)
    assert worst <= 1e-5
    # The prior initialisation zeroed components and 3 Adam steps moved them less than PRUNE.
    assert pruned_total > 0
    assert set(saved.layers) == {n for n, layer in merger.items() if sum(kept_components(layer, PRUNE)) > 0}


def test_merge_used_the_real_model(run: MergeRun) -> None:
    stats = run.out(MERGE_ID, 1)
    assert stats.steps_done == STEPS
    assert set(stats.history) >= {"total", "content", "style", "cycle", "reverse", "prior"}
    for term, values in stats.history.items():
        assert len(values) == STEPS, term
        assert all(math.isfinite(v) for v in values), term
    # Reconstruction losses through the real UNet are positive (a model that ignored the input: 0 or NaN).
    assert min(stats.history["content"]) > 0 and min(stats.history["style"]) > 0
    assert stats.trainable_parameters == N_ATTENTION * (RANK_C + RANK_S)
    assert [u.value for u in run.result["progress"] if u.node_id == MERGE_ID] == [1, 2, 3]


def test_saved_metadata_records_the_merge(run: MergeRun) -> None:
    stats = run.out(MERGE_ID, 1)
    with safe_open(str(run.saved_path), framework="pt") as f:
        meta = f.metadata()
    assert meta["duolora_version"] == duolora.__version__
    assert meta["duolora_method"] == "ziprank"
    assert meta["duolora_mode"] == "paper"
    config = json.loads(meta["duolora_config"])
    assert config == stats.config
    assert set(config) == {f.name for f in dataclasses.fields(MergeConfig)}
    assert (config["steps"], config["prune_threshold"], config["method"]) == (STEPS, PRUNE, "ziprank")
    assert meta["duolora_content"] == run.content.name
    assert meta["duolora_style"] == run.style.name
    assert meta["duolora_content_sha256"] == run.content.sha256()
    assert meta["duolora_style_sha256"] == run.style.sha256()
    assert json.loads(meta["duolora_kept_rank"]) == stats.kept_rank_by_block
    assert meta["duolora_trainable_parameters"] == str(N_ATTENTION * (RANK_C + RANK_S))
    assert meta["duolora_steps_done"] == str(STEPS)


def test_lora_model_output_works_with_core_nodes(host: comfyhost.Host, run: MergeRun, tiny_layout) -> None:
    merged = run.out(MERGE_ID, 0)
    lora_model = run.out(MERGE_ID, 2)
    # Core "Load LoRA Model" patches the UNet exactly as Apply Merged LoRA does.
    core_unet, ours_unet = patched_weights(run.out("15", 0)), patched_weights(run.out("13", 0))
    assert [k for k in ours_unet if not torch.equal(ours_unet[k], core_unet[k])] == []
    # Core "Save LoRA Weights" writes exactly the merged tensors.
    (core_file,) = (host.output_dir / TEST_SUBDIR / "core_save").glob("lora_*_.safetensors")
    written = load_file(core_file)
    assert written.keys() == merged.state_dict.keys() == lora_model.keys()
    assert [k for k in written if not torch.equal(written[k], merged.state_dict[k])] == []
    # A LORA_MODEL from an upstream node loads in Load Style LoRA, as the same LoRA.
    loaded = run.out("19", 0)
    assert loaded.name == "LORA_MODEL (upstream node)"
    assert loaded.sha256 is None
    assert set(loaded.lora.layers) == set(merged.lora.layers)
    worst = max(float((loaded.lora.layers[n].delta() - lr.delta()).abs().max())
                for n, lr in merged.lora.layers.items())
    assert worst <= 1e-6
    assert run.out("19", 1) == loaded.summary
