"""The DuoLoRA nodes on a tiny Flux.1 (devtools/tinyflux.py) in ComfyUI's executor: Load Content/Style LoRA read
kohya and diffusers/PEFT Flux files, ZipRank Merge detects the family from the content LoRA and merges in mode
'weights', Merge Report names the family and the prior preset, Apply Merged LoRA patches the model through the
stock LoRA path; the modes that run the model, and SDXL's presets, are refused in one line. Nothing is mocked.
"""

from __future__ import annotations

from pathlib import Path

import comfyhost
import pytest
import tinyflux
import torch
from fluxfiles import MODEL_KEYS, diffusers_file, file_delta, fused_file, run_main
from nodehelpers import MERGE_ID, TEST_SUBDIR, node, patched_weights, snapshot

from duolora import formats

# As in test_host_flux.py: a few float32 roundings of weights below 1.
TOLERANCE = 2e-7
FOLDER = f"{TEST_SUBDIR}/flux"


@pytest.fixture(scope="module")
def loras(host: comfyhost.Host) -> dict[str, Path]:
    """A kohya content LoRA and a diffusers/PEFT style LoRA of the tiny Flux in the loras folder: name -> path."""
    folder = host.loras_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    return {f"{FOLDER}/content_kohya.safetensors": fused_file(folder / "content_kohya.safetensors", "lora_unet_", "_",
                                                               seed=1, rank=4, alpha=2.0),
            f"{FOLDER}/style_diffusers.safetensors": diffusers_file(folder / "style_diffusers.safetensors", seed=3,
                                                                    rank=3)}


def flux_prompt(host: comfyhost.Host, loras: dict[str, Path], save: str, **widgets) -> dict[str, dict]:
    """Tiny Flux "1" → Load Content "10" / Load Style "11" → ZipRank Merge → Merge Report "13", Apply Merged LoRA
    "14" (model only), Save Merged LoRA "16"."""
    content, style = loras
    return {
        "1": node(host, tinyflux.TINY_FLUX_NODE, seed=0),
        "10": node(host, "DuoLoRA_LoadContentLoRA", lora_name=content),
        "11": node(host, "DuoLoRA_LoadStyleLoRA", lora_name=style),
        MERGE_ID: node(host, "DuoLoRA_ZipRankMerge", model=["1", 0], content_lora=["10", 0], style_lora=["11", 0],
                       **{"mode": "weights", "lora_dtype": "fp32", **widgets}),
        "13": node(host, "DuoLoRA_MergeReport", stats=[MERGE_ID, 1]),
        "14": node(host, "DuoLoRA_ApplyMergedLoRA", model=["1", 0], merged_lora=[MERGE_ID, 0]),
        "15": node(host, "PreviewAny", source=["14", 0]),
        "16": node(host, "DuoLoRA_SaveMergedLoRA", merged_lora=[MERGE_ID, 0], filename_prefix=f"{FOLDER}/{save}"),
    }


def moved(result: dict) -> dict[str, torch.Tensor]:
    """How far Apply Merged LoRA moved each weight of the tiny Flux (float64)."""
    before = snapshot(result["outputs"]["1"][0].model)
    after = patched_weights(result["outputs"]["14"][0])
    return {k: after[k].to(torch.float64) - before[k].to(torch.float64) for k in before}


def test_a_direct_merge_on_flux_applies_the_sum_and_the_report_names_the_family(host, loras) -> None:
    result = host.execute(flux_prompt(host, loras, "direct", method="direct"))
    # diffusers' q/k/v (and proj_mlp) slices fuse into one layer of ComfyUI's of their summed rank: 3 × 3, 4 × 3
    assert [result["ui"][n]["text"][0] for n in ("10", "11")] == ["kohya_ldm · Flux.1 · 16 layers · rank 4",
                                                                     "diffusers_peft · Flux.1 · 16 layers · rank 3–12"]
    report = result["outputs"]["13"][1]
    assert report.splitlines()[0].startswith(
        f"DuoLoRA merge report - Flux.1 (from {FOLDER}/content_kohya.safetensors), prior preset none (auto) - "
        "method direct")
    assert result["outputs"][MERGE_ID][1].extra["family"] == "flux"
    c, s = (file_delta(p) for p in loras.values())
    got = moved(result)
    assert max(float((got[k] - c[k] - s[k]).abs().max()) for k in MODEL_KEYS) < TOLERANCE
    assert [k for k, v in got.items() if k not in MODEL_KEYS and bool(v.any())] == []


def test_weights_mode_with_splitflux_is_the_cli_merge_and_loads_with_the_stock_loader(host, loras, tmp_path) -> None:
    """The node's merge is ``duolora merge``'s (one engine), and Apply Merged LoRA patches what the stock
    LoraLoaderModelOnly patches from the saved file."""
    result = host.execute(flux_prompt(host, loras, "splitflux", prior_preset="flux_splitflux"))
    assert "prior preset flux_splitflux - method ziprank" in result["outputs"]["13"][1].splitlines()[0]
    saved = host.loras_dir / result["ui"]["16"]["text"][0]
    cli_out = tmp_path / "cli.safetensors"
    code, err = run_main("merge", *map(str, loras.values()), "-o", str(cli_out), "--priors", "flux_splitflux",
                         "--dtype", "fp32", "--quiet")
    assert code == 0, err
    ours, theirs = (formats.load_lora(p, formats.merge_layout(p)) for p in (saved, cli_out))
    assert sorted(ours.layers) == sorted(theirs.layers)
    assert max(float((ours.layers[n].delta() - theirs.layers[n].delta()).abs().max()) for n in ours.layers) < 1e-6
    stock = host.execute({
        "1": node(host, tinyflux.TINY_FLUX_NODE, seed=0),
        "2": node(host, "LoraLoaderModelOnly", model=["1", 0], lora_name=result["ui"]["16"]["text"][0],
                  strength_model=1.0),
        "3": node(host, "PreviewAny", source=["2", 0])})
    applied, loaded = patched_weights(result["outputs"]["14"][0]), patched_weights(stock["outputs"]["2"][0])
    assert [k for k in applied if not torch.equal(applied[k], loaded[k])] == []


@pytest.mark.parametrize("mode", ["paper", "layerwise", "layerwise+paper"])
def test_a_mode_that_runs_the_model_is_refused_on_flux_in_one_line(host, loras, mode: str) -> None:
    with pytest.raises(comfyhost.NodeExecutionError) as info:
        host.execute(flux_prompt(host, loras, "refused", mode=mode))
    assert (info.value.node_id, info.value.exception_type) == (MERGE_ID, "ValueError")
    assert info.value.exception_message == (
        f"mode '{mode}' runs the model with an ε-prediction objective, but content_kohya.safetensors is a Flux.1 "
        "LoRA (flow matching): on Flux.1, choose mode 'weights'\n")


def test_an_sdxl_preset_is_refused_on_flux_in_one_line(host, loras) -> None:
    with pytest.raises(comfyhost.NodeExecutionError) as info:
        host.execute(flux_prompt(host, loras, "refused", prior_preset="paper"))
    assert info.value.exception_message == (
        "prior preset 'paper' names SDXL blocks, but this merge is for Flux.1 (content_kohya.safetensors): choose "
        "one of auto, flux_splitflux, none, custom\n")


def test_k_lora_is_refused_on_flux_in_one_line(host, loras) -> None:
    content, style = loras
    with pytest.raises(comfyhost.NodeExecutionError) as info:
        host.execute({
            "1": node(host, tinyflux.TINY_FLUX_NODE, seed=0),
            "10": node(host, "DuoLoRA_LoadContentLoRA", lora_name=content),
            "11": node(host, "DuoLoRA_LoadStyleLoRA", lora_name=style),
            "12": node(host, "DuoLoRA_ApplyKLoRA", model=["1", 0], content_lora=["10", 0], style_lora=["11", 0]),
            "13": node(host, "PreviewAny", source=["12", 1])})
    assert info.value.exception_message == (
        "Apply K-LoRA runs on SDXL models; on Flux.1, merge the two LoRAs with ZipRank Merge in mode 'weights'\n")
