"""B1: weights-only merge (``duolora merge``) of a full-size SDXL rank-64 attention LoRA pair.

The pair is generated (``duolora.synthetic``: seeded noise with SDXL's 560 real attention names and shapes,
decaying spectrum), written in fp16 kohya keys like most published LoRAs (~186 MB each). Measured in one
run, each a median of ``repeats``:

* merge wall time ÷ the time to just load both files with ``safetensors.torch.load_file`` (target ≤ 2.0);
  for context also ÷ the engine's own full read (``duolora.formats.load_lora``: float32, validated) and
  ÷ the I/O floor: ``load_file`` of both plus the durable write (``formats.save_state_dict``: temp file,
  fsync, rename — what every save of the pack does) of tensors of exactly the output's size, which any
  merge that writes its result must pay;
* peak RSS of a fresh process that only merges ÷ the two files' total size (target ≤ 2.5), next to the
  same process's RSS before merging (the interpreter with torch imported);
* whole processes, start-up included: ``python -m duolora merge`` ÷ a process that only ``load_file``s both
  (issue 11's measure, target ≤ 3.0), wall and CPU (user + system) seconds, run in alternating pairs so a
  machine whose speed drifts (other jobs) moves both alike; the ratio is the median of the pairs' ratios.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .common import REPO, mb, median, timed

RANK = 64
TIME_TARGET, RSS_TARGET, PROCESS_TARGET = 2.0, 2.5, 3.0

# Peak RSS from /proc/self/status (VmHWM): unlike getrusage's ru_maxrss, which Linux keeps across execve and
# so reports the forking parent's size, it starts afresh in the new process.
_HWM = r"""
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

_RSS_SCRIPT = _HWM + r"""
import json, sys, time
import torch
from duolora import engine
from duolora.config import MergeConfig
before = hwm()
start = time.perf_counter()
r = engine.merge_files(sys.argv[1], sys.argv[2], sys.argv[3], MergeConfig(), overwrite=True)
print(json.dumps({"baseline": before, "peak": hwm(), "seconds": time.perf_counter() - start}))
"""

_LOAD_RSS_SCRIPT = _HWM + r"""
import json, sys
import torch
from safetensors.torch import load_file
before = hwm()
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
print(json.dumps({"baseline": before, "peak": hwm()}))
"""


_LOAD_SCRIPT = r"""
import sys
from safetensors.torch import load_file
load_file(sys.argv[1]), load_file(sys.argv[2])
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _subprocess_json(script: str, *args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=_env(),
                         cwd=REPO, check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _process_seconds(argv: list[str]) -> tuple[float, float]:
    """(wall, CPU user + system) seconds of one whole child process, from its start to its exit."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, capture_output=True, env=_env(), cwd=REPO, check=True, timeout=900)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _whole_processes(c: str, s: str, out: Path, repeats: int) -> dict[str, Any]:
    """``duolora merge`` and a load-only process, each started ``repeats`` times, in alternating pairs."""
    merge = [sys.executable, "-m", "duolora", "merge", c, s, "-o", str(out), "--force", "--quiet"]
    load = [sys.executable, "-c", _LOAD_SCRIPT, c, s]
    _process_seconds(merge), _process_seconds(load)  # warm-up: page cache, bytecode caches
    pairs = [(_process_seconds(merge), _process_seconds(load)) for _ in range(repeats)]
    return {
        "process_merge_seconds": median([m[0] for m, _ in pairs]),
        "process_merge_cpu_seconds": median([m[1] for m, _ in pairs]),
        "process_load_seconds": median([ld[0] for _, ld in pairs]),
        "process_load_cpu_seconds": median([ld[1] for _, ld in pairs]),
        "process_time_ratio": median([m[0] / ld[0] for m, ld in pairs]),
        "process_cpu_ratio": median([m[1] / ld[1] for m, ld in pairs]),
        "process_pairs": pairs,
    }


def run(repeats: int = 3) -> dict[str, Any]:
    from safetensors.torch import load_file

    from duolora import engine, formats
    from duolora.config import MergeConfig
    from duolora.synthetic import synthetic_lora

    with tempfile.TemporaryDirectory(prefix="duolora_b1_") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        paths = []
        for seed, name in ((1, "content"), (2, "style")):
            lora = synthetic_lora(rank=RANK, seed=seed, dtype=torch.float16, decay=0.97)
            paths.append(formats.save_lora(lora, folder / f"{name}.safetensors"))
            del lora
        generate = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in paths)
        out = folder / "merged.safetensors"
        c, s = (str(p) for p in paths)

        # Warm the page cache once so every timing below reads the same way.
        load_file(c), load_file(s)
        t_load, load_runs, _ = timed(lambda: (load_file(c), load_file(s)), repeats)
        t_engine_load, _, _ = timed(lambda: (formats.load_lora(c), formats.load_lora(s)), repeats)
        t_merge, merge_runs, result = timed(
            lambda: engine.merge_files(c, s, out, MergeConfig(), overwrite=True), repeats)
        written = load_file(str(out))
        floor_out = folder / "floor.safetensors"
        t_floor, _, _ = timed(lambda: (load_file(c), load_file(s),
                                       formats.save_state_dict(written, floor_out, overwrite=True)), repeats)
        written.clear()

        rss = [_subprocess_json(_RSS_SCRIPT, c, s, str(out)) for _ in range(repeats)]
        load_rss = _subprocess_json(_LOAD_RSS_SCRIPT, c, s)
        processes = _whole_processes(c, s, out, repeats)
        peak = median([r["peak"] for r in rss])
        baseline = median([r["baseline"] for r in rss])
        return {
            "layers": result.layers,
            "rank": RANK,
            "files_bytes": size,
            "output_bytes": out.stat().st_size,
            "generate_seconds": generate,
            "load_file_seconds": t_load,
            "load_file_runs": load_runs,
            "engine_load_seconds": t_engine_load,
            "merge_seconds": t_merge,
            "merge_runs": merge_runs,
            "kept_components": result.kept_components,
            "total_components": result.total_components,
            "objective": result.history.get("total"),
            "time_ratio": t_merge / t_load,
            "time_ratio_engine_load": t_merge / t_engine_load,
            "io_floor_seconds": t_floor,
            "io_floor_ratio": t_floor / t_load,
            "time_ratio_io_floor": t_merge / t_floor,
            "peak_rss": peak,
            "baseline_rss": baseline,
            "rss_ratio": peak / size,
            "rss_above_baseline_ratio": (peak - baseline) / size,
            "load_only_peak_rss": load_rss["peak"],
            "load_only_rss_ratio": load_rss["peak"] / size,
            "repeats": repeats,
            **processes,
        }


def report(r: dict[str, Any]) -> str:
    def ok(value: float, target: float) -> str:
        return "meets" if value <= target else "misses"

    head = (f"B1  weights-only merge, full-size SDXL, {r['layers']} attention layers, rank {r['rank']} + {r['rank']}, "
            f"fp16 ({mb(r['files_bytes'])} in two files; output {mb(r['output_bytes'])}, kept "
            f"{r['kept_components']:,} of {r['total_components']:,} components); median of {r['repeats']}")
    times = (f"    merge {r['merge_seconds']:.2f} s · safetensors load_file of both {r['load_file_seconds']:.3f} s · "
             f"engine load_lora of both {r['engine_load_seconds']:.2f} s · I/O floor (load both + durable write of "
             f"the output's bytes) {r['io_floor_seconds']:.2f} s")
    ratio = (f"    time ratio merge ÷ load_file = {r['time_ratio']:.1f} (target ≤ {TIME_TARGET}: "
             f"{ok(r['time_ratio'], TIME_TARGET)}; the I/O floor alone is {r['io_floor_ratio']:.1f}); "
             f"merge ÷ engine load = {r['time_ratio_engine_load']:.1f}; merge ÷ I/O floor = "
             f"{r['time_ratio_io_floor']:.1f}")
    rss = (f"    peak RSS {mb(r['peak_rss'])} (process before merging: {mb(r['baseline_rss'])}) ÷ files "
           f"{mb(r['files_bytes'])} = {r['rss_ratio']:.2f} (target ≤ {RSS_TARGET}: {ok(r['rss_ratio'], RSS_TARGET)}); "
           f"above the baseline {r['rss_above_baseline_ratio']:.2f}; a process that only load_files both: "
           f"{r['load_only_rss_ratio']:.2f}")
    processes = (f"    whole processes, median of {r['repeats']} alternating pairs: duolora merge "
                 f"{r['process_merge_seconds']:.2f} s (CPU {r['process_merge_cpu_seconds']:.2f} s) ÷ a process that "
                 f"only load_files both "
                 f"{r['process_load_seconds']:.2f} s (CPU {r['process_load_cpu_seconds']:.2f} s) = "
                 f"{r['process_time_ratio']:.2f} wall, {r['process_cpu_ratio']:.2f} CPU (target ≤ {PROCESS_TARGET}: "
                 f"{ok(r['process_time_ratio'], PROCESS_TARGET)})")
    return f"{head}\n{times}\n{ratio}\n{rss}\n{processes}"
