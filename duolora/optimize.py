"""The merge loop: one ``MergeConfig``, Adam on the masks, gradient clipping, progress and cancel hooks.

Cancellation: ``should_cancel()`` is asked before every step; when it returns True the loop stops and
``optimize`` RETURNS a ``MergeResult`` with ``cancelled=True`` and the masks reached so far (no exception
of ours; an exception raised by the callback itself, e.g. a host's interrupt, propagates unchanged).
The input LoRAs are never modified: the merger copies their factors at construction.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .mergers import BASES, DEFAULT_PRUNE_THRESHOLD, METHODS, SCOPES, Merger
from .objective import Denoiser, DuoLoRAObjective, References
from .priors import PRIOR_LOSS_KINDS, prior_init
from .sdxl import PRESET_NAMES, preset_roles

# "layerwise_paper": the layer-wise solve (duolora.fast) as the starting point of ``steps`` paper steps.
OBJECTIVES: tuple[str, ...] = ("paper", "layerwise", "weights_only", "layerwise_paper")

ProgressCallback = Callable[[int, int, dict[str, float]], None]


@dataclass
class MergeConfig:
    """Every knob of a merge, with the defaults of METHOD.md (§2–§4).

    ``lambda_sim`` None means the method's default: 0 for ZipRank/DuoLoRA, 0.01 for ZipLoRA.
    ``lambda_content``/``lambda_style`` weight the reconstruction terms (1 in the paper; 0 switches one off).
    ``objective`` names the objective; ``optimize`` runs "paper" (the others belong to ``duolora.fast``).
    """

    method: str = "ziprank"
    basis: str = "svd"
    scope: str = "attention"
    objective: str = "paper"
    steps: int = 100
    lr: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    prior_preset: str = "paper"
    custom_prior: str = ""
    prior_init: bool = True
    prior_loss: bool = True
    prior_loss_kind: str = "hinge"
    tau_c: float = 0.75
    tau_s: float = 0.5
    kappa: float = 1.0
    nu: float = 1.0
    margin: float = 0.0
    constyle_iterations: int = 1
    lambda_content: float = 1.0
    lambda_style: float = 1.0
    lambda_cyc: float = 0.01
    lambda_rev: float = 0.01
    lambda_prior: float = 0.1
    lambda_sim: float | None = None
    prune_threshold: float = DEFAULT_PRUNE_THRESHOLD
    w_c: float = 1.0
    w_s: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and what is allowed."""
        choices = {
            "method": METHODS, "basis": BASES, "scope": SCOPES, "objective": OBJECTIVES,
            "prior_preset": PRESET_NAMES, "prior_loss_kind": PRIOR_LOSS_KINDS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"MergeConfig.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("steps", "constyle_iterations"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"MergeConfig.{name} must be ≥ 0, got {getattr(self, name)}")
        for name in ("lr", "grad_clip", "prune_threshold"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"MergeConfig.{name} must be ≥ 0, got {getattr(self, name)}")
        if self.prior_preset == "custom":
            preset_roles("custom", self.custom_prior)  # raises ValueError on a malformed block list

    @property
    def effective_lambda_sim(self) -> float:
        if self.lambda_sim is not None:
            return float(self.lambda_sim)
        return 0.01 if self.method.startswith("ziplora") else 0.0

    def roles(self) -> dict[str, str]:
        """Block -> "content"/"style" for the chosen prior preset."""
        return preset_roles(self.prior_preset, self.custom_prior)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MergeConfig:
        """Inverse of ``to_dict``; unknown keys are an error (a misspelt knob must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MergeConfig key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**data)


@dataclass
class MergeResult:
    """What ``optimize`` returns: the trained merger, per-step loss terms, and how the run ended."""

    merger: Merger
    history: dict[str, list[float]] = field(default_factory=dict)
    steps_done: int = 0
    cancelled: bool = False
    wall_seconds: float = 0.0
    # fp16 models only (loss scaling): steps whose scaled gradients overflowed and were skipped.
    skipped_steps: int = 0


def loss_scaler(denoiser: Denoiser, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling when the denoiser computes in float16 (its optional ``activation_dtype``).

    The loss's gradient w.r.t. one predicted value is 2·λ·(ε_m − ε_target)/N, N the number of latent
    values (131,072 for a 1024-px pair): about 1e-8 for a 1e-3 residual, below float16's smallest
    subnormal (2⁻²⁴ ≈ 6e-8). Backpropagated in float16 through the UNet it flushes to zero before it
    reaches the float32 masks. Scaling the loss by 2¹⁶ (dynamic, as ``torch.amp.GradScaler``: halved and
    the step skipped on inf/NaN) keeps it representable; the mask gradients are unscaled before clipping.
    bfloat16 has float32's exponent range and needs none; disabled, the scaler changes nothing.
    """
    fp16 = getattr(denoiser, "activation_dtype", None) == torch.float16
    return torch.amp.GradScaler(device.type, enabled=fp16)


def optimize(
    merger: Merger,
    denoiser: Denoiser,
    references: References,
    config: MergeConfig,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> MergeResult:
    """Learn the merger's masks with the paper objective (METHOD.md §4): Adam (no weight decay),
    gradient-norm clipping, ``config.steps`` steps, seeded by ``config.seed``.

    Prior initialisation (``config.prior_init``) runs first. A merger with nothing to learn (direct,
    B-LoRA) returns at once with ``steps_done = 0``. ``progress(step, total, terms)`` is called after every
    step (step counts from 1) with that step's unweighted loss terms and "total". See the module
    docstring for cancellation.
    """
    if config.objective != "paper":
        raise ValueError(f"optimize runs the 'paper' objective; {config.objective!r} is solved by duolora.fast")
    start = time.perf_counter()
    result = MergeResult(merger=merger)
    params = merger.mask_parameters()
    if not params:
        result.wall_seconds = time.perf_counter() - start
        return result
    roles = config.roles()
    objective = DuoLoRAObjective(merger, denoiser, references, config, roles)
    generator = torch.Generator().manual_seed(int(config.seed))
    # Hosts may run nodes under inference mode or no_grad; the masks need autograd here.
    with torch.inference_mode(False), torch.enable_grad():
        if config.prior_init:
            prior_init(merger, roles, config.tau_c, config.tau_s, config.seed)
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=0.0)
        scaler = loss_scaler(denoiser, params[0].device)
        for step in range(int(config.steps)):
            if should_cancel is not None and should_cancel():
                result.cancelled = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss, terms = objective(step, generator)
            if loss.requires_grad:
                # Disabled (every model but fp16) each scaler call is the plain call: backward, step.
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                scale = scaler.get_scale() if scaler.is_enabled() else None
                scaler.step(optimizer)
                scaler.update()
                if scale is not None and scaler.get_scale() < scale:
                    result.skipped_steps += 1  # inf/NaN in the scaled gradients: this step was skipped
            for name, value in terms.items():
                result.history.setdefault(name, []).append(value)
            result.steps_done = step + 1
            if progress is not None:
                progress(step + 1, int(config.steps), terms)
    result.wall_seconds = time.perf_counter() - start
    return result
