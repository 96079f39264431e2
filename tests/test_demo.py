"""`make demo` (scripts/demo.py) at tiny step counts, in a fresh process, so the demo never rots.

The demo boots ComfyUI with the MiniBench node pack (devtools/miniworld/comfy_nodes); the session ``host``
fixture boots without it, so the demo runs in a subprocess. It uses the committed MiniBench checkpoints (the
trained base, the star and diagonal-stripes LoRAs, the classifiers); only the step counts and the number of
samples are lowered here. The previous demo (--workflow) is tested in tests/test_workflows.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import comfyhost
import miniworld
import objectinfo
import pytest
from PIL import Image

from duolora import formats

REPO = Path(__file__).resolve().parents[1]
SAMPLES = 3
ROWS = ["base model", "content LoRA (star)", "style LoRA (diagonal)", "plain sum (direct)", "DuoLoRA merge"]
# The grid: a 300 px label column, a 34 px prompt band, then 5 rows × 8 columns of 32×32 samples upscaled 3×
# with 2 px (6 px upscaled) between and around tiles: (8·34 + 2)·3 = 822 px wide, (5·34 + 2)·3 = 516 px high.
GRID_SIZE = (300 + 822, 34 + 516)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, list[str]]:
    out = tmp_path_factory.mktemp("demo") / "out"
    cmd = [sys.executable, str(REPO / "scripts" / "demo.py"), "--steps", "2", "--sampler-steps", "2",
           "--samples", str(SAMPLES), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600, cwd=out.parent)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, run, cmd


@pytest.mark.slow
def test_demo_grid_has_five_labelled_rows_of_eight_tiles(demo_run) -> None:
    out, _, _ = demo_run
    with Image.open(out / "grid.png") as img:
        assert img.format == "PNG" and img.size == GRID_SIZE
        rgb = img.convert("RGB")
    row_px, pad = 34 * 3, 2 * 3
    for r in range(5):
        top = 34 + pad + r * row_px
        # The label: dark text pixels left of the tiles, within the row's band.
        label = rgb.crop((0, top, 300, top + 96)).convert("L")
        assert sum(label.histogram()[:128]) > 100, f"row {r} has no label"
        for c in range(8):
            tile = rgb.crop((300 + pad + c * row_px, top, 300 + pad + c * row_px + 96, top + 96))
            lo, hi = zip(*tile.getextrema(), strict=True)
            if c < SAMPLES:
                assert max(hi) - min(lo) > 30, f"row {r} column {c}: a sample, not a blank tile"
            else:
                assert min(lo) == 255, f"row {r} column {c}: only {SAMPLES} samples, the rest is white"


@pytest.mark.slow
def test_demo_summary_has_hit_rates_for_every_row(demo_run) -> None:
    out, run, _ = demo_run
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["prompt"] == "a star in diagonal style"
    assert [r["row"] for r in summary["rows"]] == ROWS
    for r in summary["rows"]:
        for key in ("content_hit", "style_hit", "both_hit"):
            assert 0.0 <= r[key] <= 1.0, (r["row"], key, r[key])
        assert r["both_hit"] <= min(r["content_hit"], r["style_hit"])
        assert len(r["per_sample"]["content_hit"]) == len(r["per_sample"]["style_hit"]) == SAMPLES
        # The rates are the per-sample classifier hits, averaged.
        assert r["content_hit"] == pytest.approx(sum(r["per_sample"]["content_hit"]) / SAMPLES)
        assert -1.0 <= r["content_cos"] <= 1.0 and -1.0 <= r["style_cos"] <= 1.0
        assert r["wall_s"] > 0 and r["cpu_s"] > 0
    # Every row samples from the same initial noise.
    assert len({r["ksampler_seed"] for r in summary["rows"]}) == 1
    assert summary["sampler"]["steps"] == 2 and summary["samples_per_row"] == SAMPLES
    t = summary["timings"]
    assert t["wall_s"] > t["comfyui_boot_wall_s"] > 0 and t["cpu_s"] > 0 and t["torch_threads"] == 1
    assert set(summary["files"]) == {"grid.png", "report.png", "merged_lora.safetensors", "summary.json"}
    for name, path in summary["files"].items():
        assert Path(path) == (out / name).resolve() and Path(path).is_file()
    default = summary["merge"]["node_default_steps"]
    assert f"demo: merge steps lowered to 2 for time (the node's default is {default};" in run.stdout


@pytest.mark.slow
def test_demo_merges_with_the_nodes_defaults(demo_run, host: comfyhost.Host) -> None:
    """The DuoLoRA row runs every ZipRankMerge widget at the node's default but the steps; the plain sum
    changes only the method. The defaults come from the live node, so the demo follows them when they change."""
    out, _, _ = demo_run
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    defaults = {k: v for k, v in objectinfo.widget_defaults(host, "DuoLoRA_ZipRankMerge").items()
                if not isinstance(v, list)}
    rows = {r["row"]: r for r in summary["rows"]}
    assert rows["DuoLoRA merge"]["merge_settings"] == {**defaults, "steps": 2, "seed": 0}
    assert rows["plain sum (direct)"]["merge_settings"] == {**defaults, "steps": 2, "seed": 0, "method": "direct"}
    assert all(rows[r]["merge_settings"] is None for r in ROWS[:3])
    assert summary["merge"]["node_default_steps"] == defaults["steps"] and summary["merge"]["steps"] == 2
    duo = rows["DuoLoRA merge"]["merge"]
    # 88 attention projections (11 SDXL attention blocks × 8) × one mask entry per rank component of two
    # rank-8 LoRAs; the plain sum learns nothing and runs no step.
    assert duo["steps_done"] == 2 and duo["trainable_parameters"] == 88 * 16
    assert rows["plain sum (direct)"]["merge"]["steps_done"] == 0
    assert len(duo["kept_rank_by_block"]) == 11
    # From the all-ones start, 2 Adam steps at lr 0.01 move each mask entry by about 0.02 at most (the prior may
    # raise the block's own LoRA above 1).
    assert all(0.95 <= m <= 1.05 for m in duo["mean_mask"].values()), duo["mean_mask"]
    with Image.open(out / "report.png") as img:
        assert img.width >= 600 and img.height >= 400


@pytest.mark.slow
def test_demo_merged_lora_loads_with_the_stock_lora_loader(demo_run, host: comfyhost.Host,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """The saved merged LoRA goes through ComfyUI's own LoraLoaderModelOnly onto the MiniBench model: every
    layer of the file becomes a patch, and ComfyUI reports no key it could not place."""
    from miniworld import model as mini_model

    import nodes

    out, _, _ = demo_run
    path = out / "merged_lora.safetensors"
    lora = formats.read_lora(path)
    assert lora.metadata["duolora_method"] == "ziprank" and lora.metadata["duolora_steps_done"] == "2"
    assert len(lora.layers) == 88
    name = "test_demo_merged.safetensors"
    shutil.copyfile(path, host.loras_dir / name)
    base, _ = mini_model.load_checkpoint(str(miniworld.BASE))
    patcher = mini_model.build_patcher(base)
    with caplog.at_level(logging.WARNING):
        (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, name, 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(patched.patches) == len(lora.layers) == 88
    assert all(k.startswith("diffusion_model.") and k.endswith(".weight") for k in patched.patches)


@pytest.mark.slow
def test_demo_refuses_to_overwrite_without_force(demo_run) -> None:
    out, _, cmd = demo_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    again = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 2
    assert again.stderr.strip() == (
        f"demo: {out}/ already holds grid.png, report.png, merged_lora.safetensors, summary.json; "
        "use --force to replace them or --out to choose another folder")


@pytest.mark.parametrize("value", ["star", "star:plaid", "circle:zigzag", "moon:zigzag:grid"])
def test_demo_pair_must_be_a_held_out_pair(value: str) -> None:
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--pair", value], check=False,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "demo.py: error: --pair must be SHAPE:TEXTURE with SHAPE one of star, heart, moon and TEXTURE one of "
        f"diagonal, zigzag, grid, not {value!r}")


def test_demo_pairs_are_the_worlds_held_out_concepts() -> None:
    from miniworld import world

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import demo
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert (demo.HELD_OUT_SHAPES, demo.HELD_OUT_TEXTURES) == (world.HELD_OUT_SHAPES, world.HELD_OUT_TEXTURES)
