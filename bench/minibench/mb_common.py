"""Shared plumbing for the MiniBench scripts: paths, ComfyUI boot, the noise schedule and training target, the
benchmark's sampler.

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
    """ᾱ_t (1000,) of the model's own ComfyUI schedule (SDXL's scaled-linear betas, rescaled to zero terminal
    SNR for a "v_zsnr" model): ᾱ = 1 / (1 + σ²)."""
    sig = model.model_sampling.sigmas.detach().double()
    return (1.0 / (1.0 + sig * sig)).float()


def noisy_and_target(model, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's input x_t = √ᾱ x0 + √(1−ᾱ) ε at timesteps ``t`` (B,) and its regression target: ε for an
    ε-model, v = √ᾱ ε − √(1−ᾱ) x0 for a v-model. Both are what ComfyUI's EPS / V_PREDICTION model sampling
    assumes (its input scaling 1/√(σ²+1) turns x0 + σε into x_t), so a trained model samples in ComfyUI as is."""
    from miniworld import model as mb_model

    ab = alphas_cumprod(model)[t].view(-1, *([1] * (x0.dim() - 1)))
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    if mb_model.prediction_of(model) == "eps":
        return xt, eps
    return xt, ab.sqrt() * eps - (1 - ab).sqrt() * x0


def adm(model, pooled: torch.Tensor) -> torch.Tensor:
    """SDXL's ``y`` for a 32×32 input: pooled (B, 32) + the constant size embedding → (B, 1568)."""
    from miniworld import model as mb_model

    return torch.cat([pooled, mb_model.size_embedding(model).expand(pooled.shape[0], -1)], dim=1)


# The benchmark's sampler (mb_compare, the demo and the base check): ComfyUI's KSampler settings.
SAMPLER = {"sampler_name": "euler", "scheduler": "normal", "steps": 20, "cfg": 2.0}


def comfy_sample(patcher, text, prompts: list[str], seed: int, per_prompt: int, steps: int = SAMPLER["steps"],
                 cfg: float = SAMPLER["cfg"]) -> torch.Tensor:
    """``per_prompt`` samples of each prompt with ComfyUI's own KSampler code (``nodes.common_ksampler``: euler,
    normal schedule, x0 clipped to [-1, 1] as MiniBenchCheckpoint sets it), the noise of prompt i drawn from seed
    ``seed + i``; returns (len(prompts) · per_prompt, 3, 32, 32) in [-1, 1], prompt-major."""
    import nodes

    out = []
    with torch.inference_mode(False), torch.no_grad():
        uctx, upooled = text.encode([""])
        negative = [[uctx, {"pooled_output": upooled}]]
        for i, prompt in enumerate(prompts):
            ctx, pooled = text.encode([prompt])
            latent = {"samples": torch.zeros(per_prompt, 3, 32, 32)}
            (res,) = nodes.common_ksampler(patcher, seed + i, steps, cfg, SAMPLER["sampler_name"],
                                           SAMPLER["scheduler"], [[ctx, {"pooled_output": pooled}]], negative, latent)
            out.append(res["samples"].float().clamp(-1, 1))
    return torch.cat(out)
