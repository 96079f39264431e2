"""MiniBench smoke test: a few steps of every stage, in a fresh process, so the bench code never rots.

The bench boots ComfyUI with its own node pack (bench/minibench/comfy_nodes); the session ``host`` fixture
boots without it, so the smoke run happens in a subprocess. The full benchmark is not run here.
"""

from __future__ import annotations

import itertools
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
                          capture_output=True, text=True, timeout=1500)
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
    names = ["minibench_content_star", "minibench_style_diagonal", "minibench_content_heart", "minibench_style_zigzag",
             "minibench_content_byo_glyph", "minibench_style_byo_a_circle_in_wavy_style"]
    paths = [smoke_dir / f"{n}.safetensors" for n in names[:4]]
    paths += sorted((smoke_dir / "results" / "byo").glob("*/loras/*.safetensors"))
    assert [p.stem for p in paths] == names
    for path in paths:
        lora = formats.load_lora(path, layout)
        assert lora.key_style == "kohya_ldm"
        assert len(lora.layers) == 88
        assert set(lora.ranks()) == {8}
    # The ceiling's LoRAs: one per pair, trained on renders of the target at the merged rank.
    for name in ("minibench_joint_star_diagonal", "minibench_joint_heart_zigzag"):
        lora = formats.load_lora(smoke_dir / f"{name}.safetensors", layout)
        assert len(lora.layers) == 88 and set(lora.ranks()) == {16}


SMOKE_ROWS = ["base (no LoRA)", "content LoRA only", "ceiling (LoRA trained on the target)", "tuned plain sum",
              "direct merge", "K-LoRA", "ZipRank", "DuoLoRA (shipped defaults)", "DuoLoRA + Constyle (matched λ 0.3)",
              "DuoLoRA, prior roles swapped", "fast: weights-only", "layer-wise + 10 % paper steps"]
# The grid the tuned plain sum is chosen from and the balance candidates run on the dev split only.
GRID_ROWS = [f"dev: two loaders, content {c:g}, style {s:g}" for c in (0.75, 1.0, 1.25) for s in (0.25, 0.5, 0.75, 1.0)]
BALANCE_ROWS = [f"dev: {name}, balance {b}" for name in ("DuoLoRA", "weights-only") for b in ("+0.25", "+0.5", "+0.75",
                                                                                          "+0.9")]
DEV_ROWS = SMOKE_ROWS + GRID_ROWS + BALANCE_ROWS + ["dev: DuoLoRA, balance -0.5"]


@pytest.mark.slow
def test_paired_comparison_through_the_executor(smoke_dir: Path) -> None:
    results = smoke_dir / "results"
    summary = json.loads((results / "summary.json").read_text())
    assert summary["dev"]["pairs"] == ["star×diagonal"] and summary["test"]["pairs"] == ["heart×zigzag"]
    for split in ("dev", "test"):
        rows = summary[split]["rows"]
        assert list(rows) == (DEV_ROWS if split == "dev" else SMOKE_ROWS)
        assert all(r["units"] == 2 for r in rows.values())  # 1 pair × 2 seeds
        for row, r in rows.items():
            for m in ("content_hit", "style_hit", "both_hit"):
                assert 0.0 <= r[m] <= 1.0
            assert -1.0 <= r["content_cos"] <= 1.0 and -1.0 <= r["style_cos"] <= 1.0
            for ref in ("tuned plain sum", "DuoLoRA (shipped defaults)"):
                if row != ref:
                    d = r[f"vs {ref}"]["both_hit"]
                    assert d["units"] == 2 and d["lo"] <= d["diff"] <= d["hi"]
        # ZipRank learns one mask entry per rank component and LoRA: 88 layers × (8 + 8).
        assert rows["DuoLoRA + Constyle (matched λ 0.3)"]["trainable_parameters"] == 88 * 16
        assert rows["direct merge"]["trainable_parameters"] == 0
        table = (results / f"{split}_table.md").read_text()
        assert [ln.split(" | ")[0] for ln in table.splitlines() if ln.startswith("| ") and " | 2 | " in ln] == [
            f"| {r}" for r in (DEV_ROWS if split == "dev" else SMOKE_ROWS)]
        assert "| method | Δ both % vs tuned plain sum |" in table
        assert (results / f"{split}_grid.png").stat().st_size > 1000


def _runs(folder: Path) -> dict[tuple[str, int], dict]:
    """(row, seed) → run record of one pair's cached runs (merge runs are stored under a hash of their widgets)."""
    recs = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    return {(r["row"], r["seed"]): r for r in recs}


@pytest.mark.slow
def test_every_method_of_a_unit_samples_from_the_same_noise(smoke_dir: Path) -> None:
    runs = _runs(smoke_dir / "results" / "runs" / "heart__zigzag")
    assert len(runs) == len(SMOKE_ROWS) * 2  # one run per row and seed, none lost to a key collision
    recs = [runs[(row, 1)] for row in ("base (no LoRA)", "ZipRank", "direct merge")]
    assert len({r["noise_seed"] for r in recs}) == 1
    other = _runs(smoke_dir / "results" / "runs" / "star__diagonal")[("ZipRank", 1)]
    assert other["noise_seed"] != recs[0]["noise_seed"]
    # The diagnostic row runs the paper preset with content and style exchanged, block for block.
    swapped = sdxl.parse_custom_preset(runs[("DuoLoRA, prior roles swapped", 0)]["merge_widgets"]["custom_prior"])
    paper = sdxl.PRESETS["paper"]
    assert set(swapped) == set(paper) and len(paper) == 11
    assert all(swapped[b] != paper[b] for b in paper)
    # 10 % of the smoke run's single paper step rounds up to one step after the layer-wise solve.
    lwp = runs[("layer-wise + 10 % paper steps", 0)]
    assert lwp["merge_steps_done"] == 1 and len(lwp["per_sample"]["content_hit"]) == 2
    # The K-LoRA row samples through Apply K-LoRA at the node's defaults, on the 88 attention projections.
    klora = runs[("K-LoRA", 0)]
    assert klora["klora_widgets"] == {"alpha": 1.5, "beta": 0.5, "timeline": "steps", "scope": "attention"}
    assert klora["klora_summary"].startswith("K-LoRA over 88 layers: γ = ") and "merge_widgets" not in klora
    # A merge run records every widget it ran with, the node's defaults included.
    assert runs[("ZipRank", 0)]["merge_widgets"]["prior_loss"] is False
    assert set(runs[("DuoLoRA + Constyle (matched λ 0.3)", 0)]["merge_widgets"]) >= {"prior_loss_kind", "margin", "cycle_scale"}


@pytest.mark.slow
def test_tuned_plain_sum_is_chosen_on_dev_by_the_written_rule(smoke_dir: Path) -> None:
    choice = json.loads((smoke_dir / "choices.json").read_text())["tuned_plain_sum"]
    assert choice["pairs"] == ["star×diagonal"] and choice["seeds"] == [0, 1]
    assert len(choice["both_hit"]) == 12
    chosen = choice["chosen"]
    best = max(choice["both_hit"].values())
    tied = {k: v for k, v in choice["both_hit"].items() if v >= best - 0.01}
    # The rule: the best dev both-hit; within 1 point, the point nearest to (1, 1), then the stronger style.
    key = f"content {chosen['content']:g}, style {chosen['style']:g}"
    assert key in tied
    dist = abs(chosen["content"] - 1) + abs(chosen["style"] - 1)
    for other in tied:
        c, s = (float(part.split()[1]) for part in other.split(", "))
        assert dist < abs(c - 1) + abs(s - 1) or (dist == abs(c - 1) + abs(s - 1) and chosen["style"] >= s)
    # The test split's tuned runs stack exactly the chosen strengths; their key names them.
    tuned = _runs(smoke_dir / "results" / "runs" / "heart__zigzag")[("tuned plain sum", 0)]
    assert tuned["pair"] == "heart×zigzag"
    path = next((smoke_dir / "results" / "runs" / "heart__zigzag").glob(
        f"stack_content{chosen['content']:g}_style{chosen['style']:g}_s0.json"))
    assert json.loads(path.read_text())["row"] == "tuned plain sum"


@pytest.mark.slow
def test_balance_is_chosen_on_dev_by_the_written_rule(smoke_dir: Path) -> None:
    choice = json.loads((smoke_dir / "choices.json").read_text())["balance"]
    assert choice["pairs"] == ["star×diagonal"] and choice["seeds"] == [0, 1]
    per_mode, mean = choice["both_hit"], choice["both_hit_mean"]
    assert sorted(mean) == sorted(["+0", "+0.25", "+0.5", "+0.75", "+0.9"]) and len(per_mode) == 10
    for b, v in mean.items():  # one value for both modes: the mean of paper's and weights-only's both-hit
        assert v == pytest.approx((per_mode[f"paper {b}"] + per_mode[f"weights {b}"]) / 2, abs=1e-4)
    # The rule: the best mean both-hit; within 2 points, the value nearest 0 (the paper's balance).
    best = max(mean.values())
    tied = [float(b) for b, v in mean.items() if v >= best - 0.02]
    assert choice["chosen"] == min(tied, key=abs)
    # The direction check reads paper mode at -0.5, 0 and the chosen value (+0.5 when 0 is chosen).
    points = choice["direction_check"]["paper"]
    assert list(points) == ["-0.5", "+0", f"{choice['chosen'] if choice['chosen'] else 0.5:+g}"]
    hits = list(points.values())
    monotone = all(x["content_hit"] <= y["content_hit"] and x["style_hit"] >= y["style_hit"]
                   for x, y in itertools.pairwise(hits))
    assert choice["direction_check"]["monotone"] is monotone


@pytest.mark.slow
def test_runs_record_the_world_they_ran_in(smoke_dir: Path) -> None:
    runs = _runs(smoke_dir / "results" / "runs" / "heart__zigzag")
    worlds = {row: {runs[(row, seed)]["world"] for seed in (0, 1)} for row in SMOKE_ROWS}
    # One world per row across seeds; rows that read other LoRA files run in other worlds.
    assert all(len(w) == 1 and len(next(iter(w))) == 12 for w in worlds.values())
    assert worlds["base (no LoRA)"] != worlds["content LoRA only"] != worlds["direct merge"]
    # Both read the base, the classifiers and the pair's LoRAs (so does K-LoRA).
    assert worlds["direct merge"] == worlds["ZipRank"] == worlds["K-LoRA"]
    assert worlds["ceiling (LoRA trained on the target)"] != worlds["content LoRA only"]


@pytest.mark.slow
def test_worker_processes_compute_what_one_process_computes(smoke_dir: Path) -> None:
    parallel = _runs(smoke_dir / "results" / "runs" / "heart__zigzag")  # the smoke run's 2 workers
    serial = _runs(smoke_dir / "serial" / "runs" / "heart__zigzag")
    assert len(serial) == len(SMOKE_ROWS) * 2
    for key, rec in serial.items():
        assert parallel[key]["per_sample"] == rec["per_sample"], key


@pytest.mark.slow
def test_bring_your_own_pair(smoke_dir: Path) -> None:
    (out,) = (smoke_dir / "results" / "byo").iterdir()
    summary = json.loads((out / "summary.json").read_text())
    # Captions: the content folder's captions.txt, the style folder's name; unseen words are scored open-set.
    assert summary["pair"]["pairs"] == ["crescent×wavy"]
    assert list(summary["pair"]["rows"]) == ["base (no LoRA)", "direct merge", "ZipRank"]
    assert summary["pair"]["rows"]["ZipRank"]["units"] == 2
    assert (out / "pair_table.md").read_text().count("| ZipRank | 2 |") == 1


@pytest.mark.slow
def test_classifiers_are_a_plain_safetensors_file(smoke_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(smoke_dir / "classifiers.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"format": "minibench-classifiers"}
        # One class per shape / texture of MiniBench 2's world: 6 base + 3 held out each.
        assert f.get_slice("shape.head.weight").get_shape()[0] == 9
        assert f.get_slice("texture.head.weight").get_shape()[0] == 9
    kinds = {k.split(".", 1)[0] for k in keys}
    assert kinds == {"shape", "texture"}
    # The same network twice (9 classes each): equal key sets under each prefix.
    assert sorted(k[len("shape."):] for k in keys if k.startswith("shape.")) == sorted(
        k[len("texture."):] for k in keys if k.startswith("texture."))


@pytest.mark.slow
def test_mask_statistics_of_a_merge_row(smoke_dir: Path) -> None:
    (rec,) = json.loads((smoke_dir / "masks.json").read_text())
    assert rec["method"] == "DuoLoRA (shipped defaults)" and rec["seed"] == 0 and rec["pair"] == "star×diagonal"
    for which in ("m_c", "m_s"):
        # Masks start at 1 (prior_init off) and one Adam step of lr 0.01 moves each entry by at most lr.
        assert abs(rec[f"{which}_mean"] - 1.0) <= 0.0101, rec
        assert 0.0 <= rec[f"{which}_pruned"] <= rec[f"{which}_pruned"] + rec[f"{which}_above_half"] <= 1.0
    # One entry per attention block (11), each with the mean kept rank of both rank-8 LoRAs.
    assert len(rec["kept_rank_by_block"]) == 11
    assert all(0.0 <= c <= 8.0 and 0.0 <= s <= 8.0 for c, s in rec["kept_rank_by_block"].values())
