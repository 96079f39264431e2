"""Shared plumbing for the MiniBench scripts: paths, ComfyUI boot, the noise schedule, a DDIM sampler.

Run the scripts by path (``python bench/minibench/<script>.py``): this folder and devtools/ go on sys.path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHECKPOINTS = HERE / "checkpoints"
RESULTS = HERE / "results"
# The shape/texture classifiers (mb_classify.save_classifiers).
CLASSIFIERS = CHECKPOINTS / "classifiers.safetensors"
# Seeds (units per pair) of each split: the ones whose runs are committed in results/runs/, so `make minibench`
# from a fresh clone only reports. They do NOT reach issue 12's interval widths (both ≤ 4 points, cosines
# ≤ 0.015 on the test split): the README's MiniBench section says what that would take (`--seeds 0 1 … 46`,
# hours on a CPU, minutes on a GPU; finished runs are cached, so more seeds only add runs).
SEEDS: dict[str, list[int]] = {"dev": [0, 1], "test": [0, 1, 2, 3, 4, 5, 6, 7]}

for p in (str(HERE), str(REPO / "devtools")):
    if p not in sys.path:
        sys.path.insert(0, p)
# The repository root must not be on sys.path (its nodes/ would shadow ComfyUI's nodes module).
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != str(REPO)]


def boot():
    """Boot the real in-process ComfyUI with the DuoLoRA pack, the tiny test pack and the MiniBench node pack
    (devtools/miniworld/comfy_nodes, moved there so that the demo loads it too); KSampler's bars off."""
    import miniworld

    return miniworld.boot()


def alphas_cumprod(model) -> torch.Tensor:
    """ᾱ_t (1000,) of the model's own ComfyUI schedule (SDXL's scaled-linear betas): ᾱ = 1 / (1 + σ²)."""
    sig = model.model_sampling.sigmas.detach().float()
    return 1.0 / (1.0 + sig * sig)


def adm(model, pooled: torch.Tensor) -> torch.Tensor:
    """SDXL's ``y`` for a 32×32 input: pooled (B, 32) + the constant size embedding → (B, 1568)."""
    from miniworld import model as mb_model

    return torch.cat([pooled, mb_model.size_embedding(model).expand(pooled.shape[0], -1)], dim=1)


@torch.no_grad()
def ddim_sample(unet: torch.nn.Module, model, ctx: torch.Tensor, pooled: torch.Tensor,
                uctx: torch.Tensor, upooled: torch.Tensor, seed: int, steps: int = 20,
                cfg: float = 2.0) -> torch.Tensor:
    """Deterministic DDIM (η = 0) with classifier-free guidance; returns (B, 3, 32, 32) in [-1, 1].

    Used for quick checks during development and classifier validation; the benchmark itself samples
    with ComfyUI's KSampler inside the executor.
    """
    b = ctx.shape[0]
    ab = alphas_cumprod(model)
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(b, 3, 32, 32, generator=g)
    ts = torch.linspace(999, 0, steps).round().long()
    y = adm(model, pooled)
    uy = adm(model, upooled.expand(b, -1))
    uc = uctx.expand(b, -1, -1)
    for i, t in enumerate(ts):
        tt = torch.full((2 * b,), float(t))
        eps = unet(torch.cat([x, x]), timesteps=tt, context=torch.cat([ctx, uc]), y=torch.cat([y, uy]))
        e_c, e_u = eps.chunk(2)
        e = e_u + cfg * (e_c - e_u)
        a = ab[t]
        x0 = ((x - (1 - a).sqrt() * e) / a.sqrt()).clamp(-1, 1)
        a_prev = ab[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
    return x.clamp(-1, 1)
