"""B2: one paper-mode optimisation step on the tiny SDXL-layout model in the real ComfyUI.

A step (docs/method.md §4, Constyle k = 1) evaluates the UNet 8 times: one no-grad call of batch 4 (the two
reconstruction targets and the two Constyle "add" hops), one no-grad call of batch 2 (the "remove" hops), one
call of batch 2 with gradient and its backward. Ratios, all measured in this run (medians of ``steps``
steps after one warm-up step):

* step ÷ the same calls on the same model with the same LoRA patched statically by ComfyUI's own LoRA code
  (``comfy.sd.load_lora_for_models``; the backward goes to the input latents) — the adapter's overhead;
* step ÷ one step of ComfyUI's TrainLoraNode (batch 2, same resolution, rank 8, fp32, Adam), timed as the
  difference between runs of 1 and 1 + ``steps`` steps, so its setup cancels;
* batched branches ÷ one UNet call per sample.

Gradient checkpointing is off in both the step and its static baseline (the ratio isolates the adapter);
its own cost is reported as a separate ratio.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch

from .common import median
from .tiny import TinySetup, bridge, references

OVERHEAD_TARGET = 1.15


class _Unbatched:
    """A Denoiser that sends every sample through the UNet on its own (for the batching ratio)."""

    def __init__(self, den) -> None:
        self.den = den

    def predict(self, x_t, sigma, cond, branches):
        return torch.cat([self.den.predict(x_t[i:i + 1], sigma.reshape(-1)[i:i + 1], [cond[i]], [branches[i]])
                          for i in range(x_t.shape[0])])

    def __getattr__(self, name: str):
        return getattr(self.den, name)


def _paper_step_times(t: TinySetup, steps: int, checkpointing: bool, unbatched: bool = False) -> list[float]:
    from duolora.config import MergeConfig
    from duolora.mergers import build_merger
    from duolora.optimize import optimize

    b = bridge()
    config = MergeConfig(steps=steps + 1, constyle_iterations=1)  # the 8-evaluation step (Constyle is off by default)
    merger = build_merger(config.method, t.content, t.style, config)
    stamps: list[float] = []
    with torch.inference_mode(False), b.ComfyDenoiser(t.model, merger, gradient_checkpointing=checkpointing) as den:
        refs = references(den, t)
        stamps.append(time.perf_counter())
        optimize(merger, _Unbatched(den) if unbatched else den, refs, config,
                 progress=lambda *_: stamps.append(time.perf_counter()))
    durations = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    return durations[1:]  # the first step warms caches up


def _static_times(t: TinySetup, steps: int) -> list[float]:
    """The same 3 UNet calls (+ backward to the latents) with the direct merge patched by ComfyUI itself."""
    import comfy.sd

    from duolora import formats
    from duolora.lora import LoRA
    from duolora.mergers import DirectMerger, build_merger

    b = bridge()
    direct = build_merger("direct", t.content, t.style).export()
    state = formats.lora_to_state_dict(direct, "kohya_ldm", dtype=torch.float32, layout=t.layout)
    patched, _ = comfy.sd.load_lora_for_models(t.model, None, state, 1.0, 0.0)
    empty = DirectMerger(LoRA(), LoRA())  # no layer: the adapter hooks nothing
    times = []
    with torch.inference_mode(False), b.ComfyDenoiser(patched, empty, gradient_checkpointing=False) as den:
        refs = references(den, t)
        x_c, x_s = refs.content[0], refs.style[0]
        g = torch.Generator().manual_seed(0)
        for _ in range(steps + 1):
            start = time.perf_counter()
            sigma = den.sample_sigma(g)
            eps = torch.randn(x_c.shape, generator=g)
            xc, xs = den.add_noise(x_c, eps, sigma), den.add_noise(x_s, eps, sigma)
            s4, s2 = sigma.reshape(1).expand(4), sigma.reshape(1).expand(2)
            with torch.no_grad():
                den.predict(torch.cat([xc, xs, xc, xs]), s4, [refs.p_c, refs.p_s, refs.p_cs, refs.p_cs], ["base"] * 4)
                den.predict(torch.cat([xc, xs]), s2, [refs.p_c, refs.p_s], ["base"] * 2)
            x = torch.cat([xc, xs]).requires_grad_(True)
            with torch.enable_grad():
                den.predict(x, s2, [refs.p_c, refs.p_s], ["base"] * 2).square().mean().backward()
            times.append(time.perf_counter() - start)
    return times[1:]


def _train_lora_step(t: TinySetup, steps: int) -> float:
    """Seconds per step of ComfyUI's TrainLoraNode at batch 2 and the same resolution (setup cancelled)."""
    import comfyhost

    host = t.host
    side = t.content_latents.shape[-1] * 8

    def prompt(n: int) -> dict:
        def node(cls: str, **inputs: Any) -> dict:
            spec = host.node_class_mappings[cls].INPUT_TYPES()
            defaults = {k: v[1]["default"] for sec in ("required", "optional") for k, v in spec.get(sec, {}).items()
                        if len(v) > 1 and isinstance(v[1], dict) and "default" in v[1]}
            return {"class_type": cls, "inputs": {**defaults, **inputs}}

        return {
            "1": node(comfyhost.TINY_CHECKPOINT_NODE, seed=0),
            "2": node("CLIPTextEncode", text="a photo of sks dog", clip=["1", 1]),
            "3": node("EmptyLatentImage", width=side, height=side, batch_size=2),
            # One LATENT per image: ComfyUI 0.3.75's TrainLoraNode fails on a single batched LATENT
            # ("multi_res" unbound); a list of two of the same size is concatenated back into batch 2.
            "6": node("RebatchLatents", latents=["3", 0], batch_size=1),
            "4": node("TrainLoraNode", model=["1", 0], latents=["6", 0], positive=["2", 0], batch_size=2, steps=n,
                      learning_rate=0.0005, rank=8, optimizer="Adam", training_dtype="fp32", lora_dtype="fp32",
                      gradient_checkpointing=False, seed=0),
            "5": node("PreviewAny", source=["4", 3]),
        }

    host.require_nodes("TrainLoraNode")
    runs = {}
    for n in (1, 1 + steps):
        start = time.perf_counter()
        host.execute(prompt(n))
        runs[n] = time.perf_counter() - start
    return (runs[1 + steps] - runs[1]) / steps


def run(t: TinySetup, steps: int = 5) -> dict[str, Any]:
    torch.manual_seed(0)
    paper = median(_paper_step_times(t, steps, checkpointing=False))
    static = median(_static_times(t, steps))
    checkpointed = median(_paper_step_times(t, steps, checkpointing=True))
    unbatched = median(_paper_step_times(t, steps, checkpointing=False, unbatched=True))
    train = _train_lora_step(t, steps)
    return {
        "latent": list(t.content_latents.shape[-2:]),
        "steps": steps,
        "paper_step": paper,
        "static_step": static,
        "overhead_ratio": paper / static,
        "train_lora_step": train,
        "train_lora_ratio": paper / train,
        "checkpointed_step": checkpointed,
        "checkpointing_ratio": checkpointed / paper,
        "unbatched_step": unbatched,
        "batched_ratio": paper / unbatched,
    }


def report(r: dict[str, Any]) -> str:
    h, w = r["latent"]
    met = "meets" if r["overhead_ratio"] <= OVERHEAD_TARGET else "misses"
    head = (f"B2  paper-mode step, tiny SDXL-layout model in ComfyUI 0.3.75, latents 4×{h}×{w}, median of "
            f"{r['steps']} steps")
    overhead = (f"    step {r['paper_step']:.3f} s · static ComfyUI LoRA patch, same 8 forwards + 2 backwards "
                f"{r['static_step']:.3f} s → adapter overhead {r['overhead_ratio']:.2f} (target ≤ {OVERHEAD_TARGET}: "
                f"{met})")
    train = (f"    TrainLoraNode step (batch 2, rank 8, fp32) {r['train_lora_step']:.3f} s → step ÷ TrainLoraNode "
             f"{r['train_lora_ratio']:.2f}")
    batching = (f"    batched branches ÷ one call per sample = {r['batched_ratio']:.2f} ({r['unbatched_step']:.3f} s "
                f"unbatched); gradient checkpointing on ÷ off = {r['checkpointing_ratio']:.2f}")
    return f"{head}\n{overhead}\n{train}\n{batching}"
