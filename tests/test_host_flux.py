"""Flux.1 LoRAs merged by ``duolora merge`` apply exactly with ComfyUI's stock LoRA loader, on a tiny Flux built
from ComfyUI's own classes (devtools/tinyflux.py: hidden size 32, 2 double and 12 single blocks).

The content and style files are synthetic, in the three spellings people have (tests/fluxfiles.py: kohya,
ComfyUI, and diffusers/PEFT, whose separate q/k/v and ``proj_mlp`` patch row slices of ComfyUI's fused ``qkv`` and
``linear1``). The oracle is the ΔW each file means, computed from its tensors and the slice placement written
there as facts (comfy/utils.py ``flux_to_diffusers``); it is first checked against ComfyUI's own loader on every
input file. Then each merged
file is read by ``comfy.utils.load_torch_file``, applied by ``comfy.sd.load_lora_for_models`` — what the stock
LoraLoaderModelOnly node does — and patched the way samplers do (``load_models_gpu``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import tinyflux
import torch
from fluxfiles import ATTENTION, FUSED, MODEL_KEYS, H, diffusers_file, file_delta, fused_file, run_main
from nodehelpers import TEST_SUBDIR, node, patched_weights, snapshot

from duolora import formats

# How far a weight the stock loader patched may be from W + ΔW: a few float32 roundings of weights below 1
# (measured: at most 3.7e-8).
TOLERANCE = 2e-7


def stock_delta(model, path: Path, caplog: pytest.LogCaptureFixture) -> dict[str, torch.Tensor]:
    """ΔW (float64) of every weight ComfyUI's stock loader patches when it applies ``path`` at strength 1; fails
    when it leaves a key of the file unloaded."""
    import comfy.sd
    import comfy.utils

    before = snapshot(model.model)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(path), safe_load=True),
                                                   1.0, 0.0)
    unloaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage()]
    assert unloaded == []
    after = patched_weights(patched)
    return {k: after[k].to(torch.float64) - before[k].to(torch.float64) for k in patched.patches}


def max_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert sorted(got) == sorted(want)
    return max(float((got[k] - want[k]).abs().max()) for k in want)


@pytest.fixture(scope="module")
def flux(host):
    """One seeded tiny Flux ``ModelPatcher`` (the stock loader clones it; patches never reach it)."""
    return tinyflux.build_tiny_flux(seed=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny_flux_loras")
    return {"kohya": fused_file(folder / "kohya.safetensors", "lora_unet_", "_", seed=1, rank=4, alpha=2.0),
            "comfyui": fused_file(folder / "comfyui.safetensors", "diffusion_model.", ".", seed=2, rank=2, alpha=4.0),
            "diffusers": diffusers_file(folder / "diffusers.safetensors", seed=3, rank=3)}


@pytest.mark.parametrize("spelling", ["kohya", "comfyui", "diffusers"])
def test_the_oracle_is_what_the_stock_loader_applies(flux, files, caplog, spelling: str) -> None:
    """Each input file moves exactly the weights the oracle says, by its ΔW (the fused qkv/linear1 slices too)."""
    got = stock_delta(flux, files[spelling], caplog)
    assert sorted(got) == MODEL_KEYS
    assert max_error(got, file_delta(files[spelling])) < TOLERANCE


@pytest.mark.parametrize(("content", "style", "key_style"), [
    ("kohya", "diffusers", "kohya_ldm"), ("diffusers", "comfyui", "comfyui"), ("comfyui", "kohya", "kohya_ldm"),
    ("diffusers", "diffusers", "comfyui")])
def test_a_direct_merge_applies_as_the_sum_of_the_inputs(flux, files, tmp_path, caplog, content: str, style: str,
                                                         key_style: str) -> None:
    """``duolora merge --method direct``: the stock loader moves every weight by ΔW_c + ΔW_s."""
    style_path = files[style]
    if style == content:  # two different LoRAs in one spelling
        style_path = diffusers_file(tmp_path / "style.safetensors", seed=4, rank=2)
    out = tmp_path / "merged.safetensors"
    code, err = run_main("merge", str(files[content]), str(style_path), "-o", str(out), "--method", "direct",
                         "--dtype", "fp32", "--key-style", key_style, "--quiet")
    assert code == 0, err
    c, s = file_delta(files[content]), file_delta(style_path)
    want = {k: c[k] + s[k] for k in MODEL_KEYS}
    assert max_error(stock_delta(flux, out, caplog), want) < TOLERANCE


@pytest.mark.parametrize("key_style", ["kohya_ldm", "comfyui"])
def test_a_weights_mode_merge_applies_as_duolora_reads_it(flux, files, tmp_path, caplog, key_style: str) -> None:
    """ZipRank in weights mode: the stock loader applies exactly the ΔW duolora reads back from the merged file;
    the layers it does not learn on (the MLPs) add ΔW_c + ΔW_s, and the attention layers it learns on differ
    from the plain sum."""
    out = tmp_path / "merged.safetensors"
    code, err = run_main("merge", str(files["kohya"]), str(files["diffusers"]), "-o", str(out), "--dtype", "fp32",
                         "--key-style", key_style, "--quiet")
    assert code == 0, err
    layout = formats.merge_layout(out)
    assert (layout.family, layout.config.hidden_size) == ("flux", H)
    merged = formats.load_lora(out, layout)
    read = {f"diffusion_model.{n}.weight": lr.delta().to(torch.float64) for n, lr in merged.layers.items()}
    got = stock_delta(flux, out, caplog)
    assert max_error(got, read) < TOLERANCE
    c, s = file_delta(files["kohya"]), file_delta(files["diffusers"])
    mlp = [f"diffusion_model.{n}.weight" for n in FUSED if n not in ATTENTION]
    assert max(float((got[k] - c[k] - s[k]).abs().max()) for k in mlp) < TOLERANCE
    moved = sorted(float((got[k] - c[k] - s[k]).norm() / (c[k] + s[k]).norm())
                   for k in (f"diffusion_model.{n}.weight" for n in ATTENTION))
    assert moved[len(moved) // 2] > 1e-2, moved  # the median learned layer is 1 % or more from the plain sum


def test_the_stock_lora_node_applies_a_merge_in_the_real_executor(host, flux, files, tmp_path) -> None:
    """Tiny Flux → LoraLoaderModelOnly (the merged file) → ModelSave, run by ComfyUI's executor: the saved
    weights are W + ΔW_c + ΔW_s (a diffusers content LoRA and a ComfyUI-spelled style LoRA merged directly)."""
    from safetensors.torch import load_file

    name = f"{TEST_SUBDIR}/flux_direct.safetensors"
    out = host.loras_dir / name
    out.parent.mkdir(parents=True, exist_ok=True)
    code, err = run_main("merge", str(files["diffusers"]), str(files["comfyui"]), "-o", str(out), "--method",
                         "direct", "--dtype", "fp32", "--force", "--quiet")
    assert code == 0, err
    prefix = f"{TEST_SUBDIR}/flux_direct_model"
    host.execute({
        "1": node(host, tinyflux.TINY_FLUX_NODE, seed=0),
        "2": node(host, "LoraLoaderModelOnly", model=["1", 0], lora_name=name, strength_model=1.0),
        "3": node(host, "ModelSave", model=["2", 0], filename_prefix=prefix)})
    saved = max((host.output_dir / TEST_SUBDIR).glob("flux_direct_model_*.safetensors"))
    weights = load_file(str(saved))
    before = snapshot(flux.model)
    c, s = file_delta(files["diffusers"]), file_delta(files["comfyui"])
    moved = {k: weights[f"model.{k}"].to(torch.float64) - before[k].to(torch.float64) for k in MODEL_KEYS}
    assert max_error(moved, {k: c[k] + s[k] for k in MODEL_KEYS}) < TOLERANCE
    untouched = [k for k in before if k.endswith(".weight") and k not in MODEL_KEYS]
    assert len(untouched) > 40  # the embedders, modulations, other MLP layers, the final layer
    assert all(torch.equal(weights[f"model.{k}"], before[k]) for k in untouched)
