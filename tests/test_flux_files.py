"""Flux.1 LoRA files in the spellings people have them (kohya ``lora_unet_double_blocks_…``, diffusers/PEFT
``transformer.transformer_blocks.N.attn.to_q.lora_A``, ComfyUI ``diffusion_model.…``), read into ComfyUI's fused
layers, and merged weights-only by ``duolora merge``.

The oracle is written here from ComfyUI's key map (comfy/lora.py ``model_lora_keys_unet``, comfy/utils.py
``flux_to_diffusers``) as facts: a whole-layer key patches the fused weight; diffusers' to_q/to_k/to_v patch rows
[0, h), [h, 2h), [2h, 3h) of ``double_blocks.N.img_attn.qkv`` (add_q/k/v_proj the same of ``txt_attn.qkv``) and of
``single_blocks.N.linear1``, whose rows [3h, 7h) ``proj_mlp`` patches; ``proj_out`` is ``linear2``. Each slice adds
scale · up · down with scale = alpha / rank (1 without an alpha). The files hold a few layers of the full-size
FLUX.1-dev table (hidden width 3072) at rank 2, so they are small.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from lorafiles import write

from duolora import cli, formats
from duolora.families.flux import FLUX_LAYOUT

H = 3072
MLP = 4 * H
RANK = 2

# (ComfyUI weight, out rows, in width) of the layers the test files hold
FUSED = {
    "double_blocks.0.img_attn.qkv": (3 * H, H),
    "double_blocks.0.txt_attn.qkv": (3 * H, H),
    "double_blocks.0.img_attn.proj": (H, H),
    "single_blocks.0.linear1": (3 * H + MLP, H),
    "single_blocks.0.linear2": (H, H + MLP),
}
# diffusers module -> (ComfyUI weight, first row, rows), as flux_to_diffusers maps them
SLICES = {
    "transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv", 0, H),
    "transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv", H, H),
    "transformer_blocks.0.attn.to_v": ("double_blocks.0.img_attn.qkv", 2 * H, H),
    "transformer_blocks.0.attn.add_q_proj": ("double_blocks.0.txt_attn.qkv", 0, H),
    "transformer_blocks.0.attn.add_k_proj": ("double_blocks.0.txt_attn.qkv", H, H),
    "transformer_blocks.0.attn.add_v_proj": ("double_blocks.0.txt_attn.qkv", 2 * H, H),
    "transformer_blocks.0.attn.to_out.0": ("double_blocks.0.img_attn.proj", 0, H),
    "single_transformer_blocks.0.attn.to_q": ("single_blocks.0.linear1", 0, H),
    "single_transformer_blocks.0.attn.to_k": ("single_blocks.0.linear1", H, H),
    "single_transformer_blocks.0.attn.to_v": ("single_blocks.0.linear1", 2 * H, H),
    "single_transformer_blocks.0.proj_mlp": ("single_blocks.0.linear1", 3 * H, MLP),
    "single_transformer_blocks.0.proj_out": ("single_blocks.0.linear2", 0, H),
}


def _factors(g: torch.Generator, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, RANK, generator=g) * 0.1, torch.randn(RANK, width, generator=g) * 0.1


def fused_file(path: Path, prefix: str, sep: str, seed: int, alpha: float = 1.0) -> Path:
    """A kohya (``lora_unet_`` + underscores) or ComfyUI (``diffusion_model.``) file of the fused layers."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name, (rows, width) in FUSED.items():
        up, down = _factors(g, rows, width)
        module = prefix + name.replace(".", sep)
        t |= {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up,
              f"{module}.alpha": torch.tensor(alpha)}
    return write(path, t)


def diffusers_file(path: Path, seed: int) -> Path:
    """A diffusers/PEFT file: ``transformer.`` + the diffusers path, ``lora_A``/``lora_B``, no alpha (scale 1)."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for module, (target, _, rows) in SLICES.items():
        up, down = _factors(g, rows, FUSED[target][1])
        t |= {f"transformer.{module}.lora_A.weight": down, f"transformer.{module}.lora_B.weight": up}
    return write(path, t)


# ΔW is compared through its product with a fixed probe (ΔW @ P, P of width × 8): a full fused ΔW of FLUX.1-dev is
# hundreds of MB in float64, its product a few hundred kB, and two products agree only when the ΔW do (P has full
# column rank with probability 1).
PROBES = {name: torch.randn(width, 8, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
          for i, (name, (_, width)) in enumerate(FUSED.items())}


def applied_delta(path: Path) -> dict[str, torch.Tensor]:
    """ΔW @ PROBES of every fused weight as ComfyUI's key map applies the file (float64)."""
    from safetensors.torch import load_file

    sd = {k: v.to(torch.float64) for k, v in load_file(str(path)).items()}
    modules = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in sd}
    out = {name: torch.zeros(rows, 8, dtype=torch.float64) for name, (rows, _) in FUSED.items()}
    for module in modules:
        if f"{module}.lora_A.weight" in sd:
            up, down = sd[f"{module}.lora_B.weight"], sd[f"{module}.lora_A.weight"]
        else:
            up, down = sd[f"{module}.lora_up.weight"], sd[f"{module}.lora_down.weight"]
        alpha = sd.get(f"{module}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        if module.startswith("transformer."):
            target, start, rows = SLICES[module[len("transformer."):]]
        else:
            path_ = module.removeprefix("diffusion_model.")
            if module.startswith("lora_unet_"):
                path_ = next(n for n in FUSED if "lora_unet_" + n.replace(".", "_") == module)
            target, start, rows = path_, 0, FUSED[path_][0]
        out[target][start:start + rows] += scale * (up @ (down @ PROBES[target]))
    return out


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("flux_files")
    return {"kohya": fused_file(folder / "kohya.safetensors", "lora_unet_", "_", seed=1, alpha=1.0),
            "comfyui": fused_file(folder / "comfyui.safetensors", "diffusion_model.", ".", seed=2, alpha=4.0),
            "diffusers": diffusers_file(folder / "diffusers.safetensors", seed=3)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("spelling", ["kohya", "comfyui", "diffusers"])
def test_each_spelling_reads_into_the_fused_layers(files: dict[str, Path], spelling: str) -> None:
    lora = formats.load_lora(files[spelling], FLUX_LAYOUT)
    assert lora.base == "flux"
    assert sorted(lora.layers) == sorted(FUSED)
    want = applied_delta(files[spelling])
    for name, lr in lora.layers.items():
        assert tuple(lr.up.shape[:1]) + tuple(lr.down.shape[1:]) == FUSED[name]
        got = lr.up.to(torch.float64) @ (lr.down.to(torch.float64) @ PROBES[name])
        assert _rel(got, want[name]) < 1e-6, name


@pytest.mark.parametrize(("content", "style", "key_style"), [
    ("kohya", "diffusers", "kohya_ldm"), ("diffusers", "comfyui", "comfyui"), ("comfyui", "kohya", "kohya_ldm")])
def test_merge_direct_applies_as_the_sum_of_the_inputs(files: dict[str, Path], tmp_path: Path, content: str,
                                                       style: str, key_style: str) -> None:
    out = tmp_path / "merged.safetensors"
    code, _, err = run_main("merge", str(files[content]), str(files[style]), "-o", str(out), "--method", "direct",
                            "--dtype", "fp32", "--key-style", key_style)
    assert code == 0, err
    got, c, s = applied_delta(out), applied_delta(files[content]), applied_delta(files[style])
    for name in FUSED:
        assert _rel(got[name], c[name] + s[name]) < 1e-6, name


@pytest.mark.parametrize("key_style", ["diffusers_peft", "kohya_ldm", "comfyui"])
def test_written_in_a_key_style_a_flux_lora_applies_as_read(files: dict[str, Path], tmp_path: Path,
                                                           key_style: str) -> None:
    """Written split (diffusers' to_q/to_k/to_v and proj_mlp slices) or fused, a LoRA applies as the one read."""
    lora = formats.load_lora(files["diffusers"], FLUX_LAYOUT)
    path = tmp_path / f"{key_style}.safetensors"
    formats.save_state_dict(formats.lora_to_state_dict(lora, key_style, dtype=torch.float32, layout=FLUX_LAYOUT),
                            path)
    got, want = applied_delta(path), applied_delta(files["diffusers"])
    for name in FUSED:
        assert _rel(got[name], want[name]) < 1e-6, name


def test_ziprank_merge_keeps_every_layer(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    code, _, err = run_main("merge", str(files["kohya"]), str(files["diffusers"]), "-o", str(out))
    assert code == 0, err
    merged = formats.load_lora(out, FLUX_LAYOUT)
    assert sorted(merged.layers) == sorted(FUSED)
    content, style = (formats.load_lora(files[k], FLUX_LAYOUT) for k in ("kohya", "diffusers"))
    assert [(n, merged.layers[n].rank <= content.layers[n].rank + style.layers[n].rank) for n in FUSED] == [
        (n, True) for n in FUSED]


def test_a_flux_lora_with_an_sdxl_lora_is_refused_in_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    from duolora.synthetic import synthetic_lora

    sdxl = formats.save_lora(synthetic_lora(rank=2, seed=1), tmp_path / "sdxl.safetensors")
    code, _, err = run_main("merge", str(files["kohya"]), str(sdxl), "-o", str(tmp_path / "m.safetensors"))
    assert code != 0
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: sdxl.safetensors: this LoRA is for SDXL, not Flux.1"), err


def _small_file(path: Path, shapes: dict[str, tuple[int, int]], seed: int) -> Path:
    """A kohya file of the layers ``shapes`` (ComfyUI name -> (rows, width)) at rank 2."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name, (rows, width) in shapes.items():
        up, down = _factors(g, rows, width)
        t |= {f"lora_unet_{name.replace('.', '_')}.lora_down.weight": down,
              f"lora_unet_{name.replace('.', '_')}.lora_up.weight": up}
    return write(path, t)


# A model built like Flux.1 at hidden size 32 (MLP 128, 12 single blocks): a small test or benchmark model.
SMALL = {"double_blocks.0.img_attn.qkv": (96, 32), "double_blocks.1.txt_mlp.2": (32, 128),
         "single_blocks.11.linear1": (224, 32), "single_blocks.3.linear2": (32, 160), "img_in": (32, 64)}


def test_a_flux_lora_at_other_widths_is_read_with_the_table_at_its_widths(tmp_path: Path) -> None:
    content = _small_file(tmp_path / "small_c.safetensors", SMALL, seed=1)
    style = _small_file(tmp_path / "small_s.safetensors", dict(list(SMALL.items())[:3]), seed=2)
    layout = formats.merge_layout(content, style)
    cfg = layout.config
    assert (layout.family, cfg.hidden_size, cfg.mlp_hidden, cfg.in_channels, cfg.depth_single_blocks) == (
        "flux", 32, 128, 16, 38)
    code, out, err = run_main("inspect", str(content))
    assert code == 0, out + err
    assert "base model:          Flux.1" in out and "for a merge:         usable" in out
    merged = tmp_path / "merged.safetensors"
    code, _, err = run_main("merge", str(content), str(style), "-o", str(merged), "--method", "direct")
    assert code == 0, err
    assert sorted(formats.load_lora(merged, formats.merge_layout(merged)).layers) == sorted(SMALL)


def test_a_flux_lora_whose_widths_disagree_is_refused_in_one_line(tmp_path: Path) -> None:
    bad = _small_file(tmp_path / "bad.safetensors", {**SMALL, "single_blocks.3.linear2": (32, 200)}, seed=3)
    good = _small_file(tmp_path / "good.safetensors", SMALL, seed=4)
    code, _, err = run_main("merge", str(good), str(bad), "-o", str(tmp_path / "m.safetensors"))
    assert code != 0
    assert err.strip().splitlines() == [
        ("error: bad.safetensors: 1 layer does not match Flux.1: 'single_blocks.3.linear2' is (32, 200) in the "
         "file but (32, 160) in Flux.1. This LoRA was made for a different model.")]
