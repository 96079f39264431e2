"""The multi-concept MiniBench comparison at tiny step counts, in a fresh process (bench/minibench/mb_multi.py
smoke): the triple split follows the pair split's rule, every row runs through the real executor with DuoLoRA's
own nodes, each subject is sampled from its pair's noise and scored on its own, and the summary holds both-hit
per subject with paired intervals against the plain sum and the stacked pairwise merges. The full comparison
is not run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "bench" / "minibench" / "mb_multi.py"
ROWS = ["plain sum (all three)", "tuned plain sum (all three)", "multi-concept DuoLoRA", "stacked pairwise DuoLoRA",
        "single-subject DuoLoRA (reference)"]


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minibench_multi")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(DRIVER), "smoke", "--out", str(out)], cwd=str(out), env=env,
                          check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_triples_follow_the_pair_split(smoke_dir: Path) -> None:
    split = json.loads((smoke_dir / "triples.json").read_text())
    pairs = json.loads((REPO / "bench" / "minibench" / "splits.json").read_text())
    assert len(split["dev"]) + len(split["test"]) == 9  # 3 shape pairs × 3 textures
    for name in split["test"]:  # a test triple uses test pairs only
        shapes, texture = name.split("×")
        assert all(f"{s}×{texture}" in pairs["test"] for s in shapes.split("+")), name
    for name in split["dev"]:
        shapes, texture = name.split("×")
        assert any(f"{s}×{texture}" in pairs["dev"] for s in shapes.split("+")), name
    assert sorted(split["test"]) == ["heart+moon×diagonal", "star+heart×zigzag", "star+moon×grid"]


@pytest.mark.slow
def test_every_row_scores_each_subject_on_its_own(smoke_dir: Path) -> None:
    summary = json.loads((smoke_dir / "results" / "summary.json").read_text())
    test = summary["test"]
    assert test["triples"] == ["star+heart×zigzag"] and test["seeds"] == [0, 1]
    assert list(test["rows"]) == ROWS
    for row, r in test["rows"].items():
        assert r["units"] == 2 and len(r["subjects"]) == 2
        for sub in r["subjects"]:
            assert all(0.0 <= sub[m] <= 1.0 for m in ("content_hit", "style_hit", "both_hit"))
            for ref in ("plain sum (all three)", "stacked pairwise DuoLoRA"):
                if ref == row:
                    assert f"vs {ref}" not in sub
                    continue
                d = sub[f"vs {ref}"]["both_hit"]
                assert d["units"] == 2 and d["lo"] <= d["diff"] <= d["hi"]
        assert r["both_hit"] == pytest.approx((r["subjects"][0]["both_hit"] + r["subjects"][1]["both_hit"]) / 2)
    table = (smoke_dir / "results" / "test_table.md").read_text()
    assert [ln.split(" | ")[0] for ln in table.splitlines() if ln.startswith("| ") and " | 2 | " in ln] == [
        f"| {r}" for r in ROWS]


@pytest.mark.slow
def test_runs_record_how_each_row_merged(smoke_dir: Path) -> None:
    runs = {}
    for path in (smoke_dir / "results" / "runs" / "star__heart__zigzag").glob("*.json"):
        rec = json.loads(path.read_text())
        runs[(rec["row"], rec["seed"])] = rec
    assert len(runs) == len(ROWS) * 2
    # The mini UNet: 88 attention layers; three rank-8 LoRAs merged at once, or two pairs of them.
    assert runs[("plain sum (all three)", 0)]["trainable_parameters"] == [0]
    # The tuned plain sum stacks three loaders at the chosen strengths (the smoke run's fixed choice).
    assert runs[("tuned plain sum (all three)", 0)]["trainable_parameters"] == []
    assert runs[("tuned plain sum (all three)", 0)]["strengths"] == {"content": 1.0, "style": 0.5}
    # Every run records the world it ran in: the same base, classifiers and LoRA files for all.
    assert len({rec["world"] for rec in runs.values()}) == 1
    assert runs[("multi-concept DuoLoRA", 0)]["trainable_parameters"] == [88 * 24]
    assert runs[("stacked pairwise DuoLoRA", 0)]["trainable_parameters"] == [88 * 16, 88 * 16]
    assert runs[("single-subject DuoLoRA (reference)", 0)]["trainable_parameters"] == [88 * 16, 88 * 16]
    # Each subject samples its own target from its pair's noise, the same in every row of a unit.
    for seed in (0, 1):
        seeds = {tuple(s["noise_seed"] for s in runs[(row, seed)]["subjects"]) for row in ROWS}
        assert len(seeds) == 1
        (pair_seeds,) = seeds
        assert pair_seeds[0] != pair_seeds[1]
    assert [s["pair"] for s in runs[("multi-concept DuoLoRA", 0)]["subjects"]] == ["star×zigzag", "heart×zigzag"]
    assert all(len(s["per_sample"]["content_hit"]) == 2 for rec in runs.values() for s in rec["subjects"])
