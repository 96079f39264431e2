"""bench/gpu.py (issue 11's one-run GPU measurement) rehearsed on the CPU with the tiny model, so it never rots.

The full run needs a CUDA machine and is run by hand (its docstring says how); this runs the same script end
to end, ``--tiny``, a few steps, as its own process (it boots its own ComfyUI), and checks that the JSON holds
every number the full run reports, each finite, and nothing skipped or failed. No timing is asserted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PHASE_STEPS = ("steps", "step_s", "wall_s", "setup_s", "for_100_steps_s", "peak_gib")
EXPECTED = {
    "setup_model_build_s", "setup_lora_files_s",
    *(f"paper_{k}" for k in PHASE_STEPS),
    *(f"paper_no_checkpointing_{k}" for k in PHASE_STEPS),
    *(f"ziplora_out_{k}" for k in PHASE_STEPS),
    "static_steps", "static_step_s", "static_peak_gib",
    "weights_wall_s", "weights_peak_gib", "layerwise_wall_s", "layerwise_peak_gib",
    "sample_steps", "sample_sample_step_s", "sample_apply_plus_sample_s", "sample_peak_gib",
    "paper_no_checkpointing_step_over_static", "paper_step_over_static", "checkpointing_on_over_off",
    "ziplora_out_step_over_paper_step", "total_s",
}


# With dynamic VRAM in the host: paper mode on the dynamic model (on a CPU through ComfyUI's non-dynamic delegate
# of dynamicvram's dynamic stand-in; the layer-wise pass on the dynamic model itself needs a GPU).
EXPECTED_DYNAMIC = {*(f"paper_dynamic_{k}" for k in PHASE_STEPS), "dynamic_step_over_paper_no_dynamic"}


@pytest.mark.slow
def test_gpu_bench_rehearsal_writes_every_number(tmp_path: Path, host) -> None:
    import dynamicvram

    dynamic = dynamicvram.dynamic_vram_available()
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--tiny", "--steps", "2", "--short-steps", "2",
         "--sample-steps", "2", "--budget", "3600", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["skipped"] == [] and result["errors"] == {}, (result["skipped"], result["errors"])
    numbers = result["numbers"]
    expected = EXPECTED | (EXPECTED_DYNAMIC if dynamic else set())
    assert set(numbers) == expected, sorted(set(numbers) ^ expected)
    bad = {k: v for k, v in numbers.items() if not (isinstance(v, float) and math.isfinite(v))}
    assert bad == {}
    # Every phase ran the steps asked for (progress messages of the real node and of KSampler).
    phases = ("paper", "paper_no_checkpointing", "ziplora_out", "static", "sample", *(("paper_dynamic",) * dynamic))
    assert [numbers[f"{p}_steps"] for p in phases] == [2.0] * len(phases)
    assert result["info"]["dynamic_vram"] == (
        "cpu stand-in (paper mode via the non-dynamic delegate)" if dynamic else "none")
    assert result["info"]["mode"] == "tiny" and result["info"]["latent"] == [1, 4, 8, 8]
    assert result["info"]["unet_parameters"] > 10**7
    assert "step ÷ floor" in proc.stdout and f"wrote {out}" in proc.stdout
