"""What the engine needs from a diffusion model: the ``Denoiser`` protocol, a discrete ε-prediction σ schedule
for denoisers to reuse, and ``predict_batched``, which evaluates many (latent, σ, prompt, branch) items with one
``predict`` call per latent shape.

The engine talks to the model only through this protocol, so the same merge runs against ComfyUI
(``nodes/comfy_bridge.py``), a test double built from real torch modules, or diffusers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from .adapter import Branch


@runtime_checkable
class Denoiser(Protocol):
    """What the merge loop needs from a diffusion model with a merger attached.

    Latents are (n, C, H, W); ``sigma`` is (n,) in the σ-parameterisation ComfyUI and k-diffusion use.
    ``cond`` is a sequence of n opaque per-sample conditionings (whatever the reference conditionings
    are: a ComfyUI CONDITIONING, a tensor of text embeddings, …); the denoiser batches them itself.
    ``branches`` holds one ``duolora.adapter`` branch per sample ("merged", "content", "style", "base" or a
    pair (w_c, w_s)); the denoiser passes them to its adapter before the forward pass.
    Latents, σ and predictions live on the model's device. Optional attribute ``activation_dtype``: the
    dtype the model computes in (float16 turns on loss scaling in ``duolora.optimize``).
    """

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Sequence[Any],
                branches: Sequence[Branch]) -> torch.Tensor:
        """ε predicted for each sample, shape of ``x_t``. Must be differentiable in the merger's masks."""
        ...

    def sample_sigma(self, generator: torch.Generator) -> torch.Tensor:
        """One σ drawn uniformly over the model's training timesteps (0-d tensor), using ``generator``."""
        ...

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The noisy latent x_t for clean latent x0, noise ε and σ ((n,) or 0-d)."""
        ...

    def x0_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The clean-latent estimate x̂0 from x_t and predicted ε."""
        ...


def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    return sigma.reshape(-1, *([1] * (x.dim() - 1))) if sigma.dim() else sigma


class DiscreteSchedule:
    """σ schedule of a discrete ε-prediction model (SD/SDXL), for denoisers to reuse.

    x_t = x0 + σ·ε and x̂0 = x_t − σ·ε (the variance-exploding form ComfyUI's EPS models use; the model
    scales its input by 1/√(σ²+1) internally). ``sigmas``: (T,) ascending, one per training timestep.
    """

    def __init__(self, sigmas: torch.Tensor) -> None:
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten()

    @classmethod
    def scaled_linear(cls, steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> DiscreteSchedule:
        """SD/SDXL's training schedule: β linear in √β from ``beta_start`` to ``beta_end``."""
        betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        return cls(((1 - alphas_cumprod) / alphas_cumprod).sqrt())

    def sample_sigma(self, generator: torch.Generator) -> torch.Tensor:
        i = int(torch.randint(0, self.sigmas.numel(), (1,), generator=generator))
        return self.sigmas[i].clone()

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x0 + _bcast(sigma, x0) * eps

    def x0_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x_t - _bcast(sigma, x_t) * eps


def predict_batched(
    denoiser: Denoiser, items: Sequence[tuple[torch.Tensor, torch.Tensor, Any, Branch]]
) -> list[torch.Tensor]:
    """Evaluate (x_t (1,C,H,W), σ (0-d), cond, branch) items with one ``predict`` per latent shape.

    Returns one (1, C, H, W) prediction per item, in order.
    """
    groups: dict[tuple, list[int]] = {}
    for i, (x, _, _, _) in enumerate(items):
        groups.setdefault((tuple(x.shape), x.dtype, x.device), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(items)
    for idx in groups.values():
        x = torch.cat([items[i][0] for i in idx])
        sigma = torch.stack([torch.as_tensor(items[i][1], dtype=torch.float32).reshape(()) for i in idx])
        eps = denoiser.predict(x, sigma.to(x.device), [items[i][2] for i in idx], [items[i][3] for i in idx])
        for j, i in enumerate(idx):
            out[i] = eps[j : j + 1]
    return out  # type: ignore[return-value]
