"""Layer-prior presets on Flux.1: ``auto`` is the family's own (none on Flux.1, paper on SDXL), ``flux_splitflux``
gives single blocks 0-9 to the subject and 10-37 to the style, and another family's preset (or a custom prior
naming another family's blocks) is refused in one line that says what the merge takes.

The files are the tiny Flux's synthetic LoRAs (tests/fluxfiles.py); the merges run through ``duolora merge``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fluxfiles import diffusers_file, fused_file, run_main
from safetensors import safe_open

from duolora import formats
from duolora.synthetic import synthetic_lora


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("flux_priors")
    return (fused_file(folder / "content.safetensors", "lora_unet_", "_", seed=1, rank=4, alpha=2.0),
            diffusers_file(folder / "style.safetensors", seed=3, rank=3))


def merged_config(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["duolora_config"])


def merge(pair: tuple[Path, Path], out: Path, *options: str) -> tuple[int, str]:
    return run_main("merge", str(pair[0]), str(pair[1]), "-o", str(out), "--dtype", "fp32", "--quiet", *options)


def kept(merged: torch.Tensor, delta: torch.Tensor) -> float:
    """How much of one LoRA's ΔW a merged ΔW keeps: the projection coefficient ⟨M, ΔW⟩ / ⟨ΔW, ΔW⟩."""
    return float((merged * delta).sum() / (delta * delta).sum())


def test_auto_is_none_on_flux_and_paper_on_sdxl(pair: tuple[Path, Path], tmp_path: Path) -> None:
    code, err = merge(pair, tmp_path / "flux.safetensors")
    assert code == 0, err
    assert merged_config(tmp_path / "flux.safetensors")["prior_preset"] == "none"
    c, s = (formats.save_lora(synthetic_lora(rank=2, seed=i), tmp_path / f"sdxl_{i}.safetensors") for i in (1, 2))
    code, err = run_main("merge", str(c), str(s), "-o", str(tmp_path / "sdxl.safetensors"), "--quiet")
    assert code == 0, err
    assert merged_config(tmp_path / "sdxl.safetensors")["prior_preset"] == "paper"


def test_splitflux_keeps_the_subject_in_early_single_blocks_and_the_style_in_late_ones(
        pair: tuple[Path, Path], tmp_path: Path) -> None:
    """Against the merge without a prior: in single block 0 (content) the merge keeps 5 points more of the content
    LoRA than of the style LoRA, in single block 11 (style) 5 points more of the style LoRA; the double blocks
    (no role) merge exactly as without a prior."""
    merged = {}
    for preset in ("none", "flux_splitflux"):
        out = tmp_path / f"{preset}.safetensors"
        code, err = merge(pair, out, "--priors", preset)
        assert code == 0, err
        assert merged_config(out)["prior_preset"] == preset
        merged[preset] = formats.load_lora(out, formats.merge_layout(out))
    layout = formats.merge_layout(*pair)
    content, style = (formats.load_lora(p, layout) for p in pair)
    lead = {}  # layer -> (content kept − style kept) without a prior, with SplitFlux
    for name in ("single_blocks.0.linear1", "single_blocks.0.linear2", "single_blocks.11.linear1",
                 "single_blocks.11.linear2"):
        dc, ds = content.layers[name].delta(), style.layers[name].delta()
        lead[name] = tuple(kept(merged[p].layers[name].delta(), dc) - kept(merged[p].layers[name].delta(), ds)
                           for p in ("none", "flux_splitflux"))
    assert [n for n, (none, split) in lead.items() if ".0." in n and split < none + 0.05] == []
    assert [n for n, (none, split) in lead.items() if ".11." in n and split > none - 0.05] == []
    double = [n for n in merged["none"].layers if n.startswith("double_blocks.")]
    assert len(double) == 12
    assert max(float((merged["none"].layers[n].delta() - merged["flux_splitflux"].layers[n].delta()).abs().max())
               for n in double) < 1e-6


@pytest.mark.parametrize(("options", "message"), [
    (("--priors", "paper"), ("error: prior preset 'paper' names SDXL blocks, but this merge is for Flux.1 "
                            "(content.safetensors): choose one of auto, flux_splitflux, none, custom")),
    (("--priors", "custom", "--custom-prior", "content: in7; style: out3"),
     ("error: custom prior block 'in7' is not a Flux.1 block; choose from double_blocks.0-18, single_blocks.0-37; "
      "this merge is for Flux.1 (content.safetensors)")),
])
def test_an_sdxl_prior_on_a_flux_merge_is_refused_in_one_line(pair: tuple[Path, Path], tmp_path: Path,
                                                              options: tuple[str, ...], message: str) -> None:
    code, err = merge(pair, tmp_path / "m.safetensors", *options)
    assert code != 0
    assert err.splitlines() == [message]
    assert not (tmp_path / "m.safetensors").exists()


def test_the_splitflux_preset_on_an_sdxl_merge_is_refused_in_one_line(tmp_path: Path) -> None:
    c, s = (formats.save_lora(synthetic_lora(rank=2, seed=i), tmp_path / f"sdxl_{i}.safetensors") for i in (1, 2))
    code, err = run_main("merge", str(c), str(s), "-o", str(tmp_path / "m.safetensors"), "--priors", "flux_splitflux")
    assert code != 0
    assert err.splitlines() == [
        ("error: prior preset 'flux_splitflux' names Flux.1 blocks, but this merge is for SDXL (sdxl_1.safetensors): "
         "choose one of auto, paper, code_literal, b_lora, none, custom")]


def test_b_lora_is_refused_on_flux_in_one_line(pair: tuple[Path, Path], tmp_path: Path) -> None:
    code, err = merge(pair, tmp_path / "m.safetensors", "--method", "b_lora")
    assert code != 0
    assert err.splitlines() == [("error: method 'b_lora' merges SDXL's two B-LoRA blocks, which Flux.1 "
                                 "(content.safetensors) does not have: choose ziprank or direct")]
