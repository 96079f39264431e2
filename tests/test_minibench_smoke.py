"""MiniBench smoke test: a few steps of every stage, in a fresh process, so the bench code never rots.

The bench boots ComfyUI with its own node pack (bench/minibench/comfy_nodes); the session ``host`` fixture
boots without it, so the smoke run happens in a subprocess. The full benchmark is not run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from duolora import formats, sdxl

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "bench" / "minibench" / "minibench.py"


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minibench")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(DRIVER), "smoke", "--out", str(out)], cwd=str(out), env=env, check=False,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_base_training_resumes_and_writes_manifest(smoke_dir: Path) -> None:
    manifest = json.loads((smoke_dir / "MANIFEST.json").read_text())
    # Two steps, the same command with --steps 3 resumed from the checkpoint, then (resume state deleted)
    # a fourth step continued from the exported EMA weights, which the manifest's history records.
    assert manifest["steps_done"] == 4
    assert manifest["seed"] == 0
    assert manifest["history"][-1].startswith("step 3: continued from these steps' EMA weights")
    assert "--init-from" in manifest["command"]
    assert (smoke_dir / "base_ema.safetensors").stat().st_size < 20 * 2**20


@pytest.mark.slow
def test_mini_unet_keeps_sdxl_block_layout(smoke_dir: Path) -> None:
    cfg = json.loads((smoke_dir / "MANIFEST.json").read_text())["unet_config"]
    layout = sdxl.layout_for(sdxl.UNetConfig.from_comfy(cfg))
    blocks = {sdxl.block_of(n) for n in layout.attention_layers()}
    # Every block of the paper preset exists: the 11 SDXL attention blocks, depth 1 → 8 projections each.
    assert blocks == set(sdxl.ATTENTION_BLOCKS)
    assert set(sdxl.PRESETS["paper"]) <= blocks
    assert len(list(layout.attention_layers())) == 11 * 8


@pytest.mark.slow
def test_loras_are_ordinary_kohya_files(smoke_dir: Path) -> None:
    cfg = json.loads((smoke_dir / "MANIFEST.json").read_text())["unet_config"]
    layout = sdxl.layout_for(sdxl.UNetConfig.from_comfy(cfg))
    for name in ("minibench_content_star", "minibench_style_diagonal"):
        lora = formats.load_lora(smoke_dir / f"{name}.safetensors", layout)
        assert lora.key_style == "kohya_ldm"
        assert len(lora.layers) == 88
        assert set(lora.ranks()) == {8}


@pytest.mark.slow
def test_comparison_table_through_the_executor(smoke_dir: Path) -> None:
    summary = json.loads((smoke_dir / "results" / "summary.json").read_text())
    assert set(summary) == {"base (no LoRA)", "direct merge", "DuoLoRA (+ Constyle)", "DuoLoRA, prior roles swapped",
                            "fast: weights-only", "layer-wise + 10 % paper steps"}
    # 10 % of the smoke run's single paper step rounds up to one step after the layer-wise solve.
    assert summary["layer-wise + 10 % paper steps"]["merge_steps_done"] == [1]
    # ZipRank learns one mask entry per rank component and LoRA: 88 layers × (8 + 8).
    assert summary["DuoLoRA (+ Constyle)"]["trainable_parameters"] == [88 * 16]
    # The diagnostic row runs the paper preset with content and style exchanged, block for block.
    swapped = sdxl.parse_custom_preset(summary["DuoLoRA, prior roles swapped"]["merge_widgets"][0]["custom_prior"])
    paper = sdxl.PRESETS["paper"]
    assert set(swapped) == set(paper) and len(paper) == 11
    assert all(swapped[b] != paper[b] for b in paper)
    assert summary["direct merge"]["trainable_parameters"] == [0]
    for rec in summary.values():
        for key in ("target_content_hit", "target_style_hit", "target_both_hit"):
            assert all(0.0 <= v <= 1.0 for v in rec[key])
        assert all(-1.0 <= v <= 1.0 for v in rec["content_cos"])
    table = (smoke_dir / "results" / "table.md").read_text()
    rows = table.strip().splitlines()[2:]  # after the header and the separator
    assert [r.split(" | ")[0] for r in rows] == [
        "| base (no LoRA)", "| direct merge", "| DuoLoRA (+ Constyle)", "| DuoLoRA, prior roles swapped",
        "| fast: weights-only", "| layer-wise + 10 % paper steps"]
    assert (smoke_dir / "results" / "grid.png").stat().st_size > 1000


@pytest.mark.slow
def test_classifiers_are_a_plain_safetensors_file(smoke_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(smoke_dir / "classifiers.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"format": "minibench-classifiers"}
    kinds = {k.split(".", 1)[0] for k in keys}
    assert kinds == {"shape", "texture"}
    # The same network twice (7 classes each): equal key sets under each prefix.
    assert sorted(k[len("shape."):] for k in keys if k.startswith("shape.")) == sorted(
        k[len("texture."):] for k in keys if k.startswith("texture."))


@pytest.mark.slow
def test_mask_statistics_of_a_merge_row(smoke_dir: Path) -> None:
    (rec,) = json.loads((smoke_dir / "masks.json").read_text())
    assert rec["method"] == "ZipRank + priors" and rec["seed"] == 0
    for which in ("m_c", "m_s"):
        assert 0.0 <= rec[f"{which}_mean"] <= 1.0
        assert 0.0 <= rec[f"{which}_pruned"] <= rec[f"{which}_pruned"] + rec[f"{which}_above_half"] <= 1.0
    # One entry per attention block (11), each with the mean kept rank of both rank-8 LoRAs.
    assert len(rec["kept_rank_by_block"]) == 11
    assert all(0.0 <= c <= 8.0 and 0.0 <= s <= 8.0 for c, s in rec["kept_rank_by_block"].values())
