"""The merge loop: one ``MergeConfig``, Adam on the masks, gradient clipping, progress and cancel hooks.

Cancellation: ``should_cancel()`` is asked before every step; when it returns True the loop stops and
``optimize`` RETURNS a ``MergeResult`` with ``cancelled=True`` and the masks reached so far (no exception
of ours; an exception raised by the callback itself, e.g. a host's interrupt, propagates unchanged).
The input LoRAs are never modified: the merger copies their factors at construction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import MergeConfig
from .lora import LoRA
from .mergers import Merger
from .objective import Denoiser, DuoLoRAObjective, References
from .priors import prior_init

ProgressCallback = Callable[[int, int, dict[str, float]], None]


@dataclass
class MergeResult:
    """What a merge returns: the trained merger, per-step loss terms, and how the run ended.

    ``optimize`` and the fast-mode solvers fill the first five fields; ``duolora.engine.run_merge`` also
    sets ``config`` (the one the merge ran with), ``merged`` (the exported LoRA, None when cancelled),
    ``total_components`` (r_c + r_s summed over every layer, before pruning) and ``path`` (the file it
    wrote, if any). ``merger`` is None after a streamed file merge, whose layers are never all in memory.
    """

    merger: Merger | None
    history: dict[str, list[float]] = field(default_factory=dict)
    steps_done: int = 0
    cancelled: bool = False
    wall_seconds: float = 0.0
    config: MergeConfig | None = None
    merged: LoRA | None = None
    total_components: int = 0
    path: Path | None = None
    # fp16 models only (loss scaling): steps whose scaled gradients overflowed and were skipped.
    skipped_steps: int = 0

    @property
    def layers(self) -> int:
        """Layers of the exported LoRA (0 before the export)."""
        return 0 if self.merged is None else len(self.merged.layers)

    @property
    def kept_components(self) -> int:
        """Rank components the export kept, summed over its layers (the adaptive rank, docs/method.md §2)."""
        return 0 if self.merged is None else sum(lr.rank for lr in self.merged.layers.values())


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
    """Learn the merger's masks with the paper objective (docs/method.md §4): Adam (no weight decay),
    gradient-norm clipping, ``config.steps`` steps, seeded by ``config.seed``.

    Prior initialisation (``config.prior_init``) runs first. A merger with nothing to learn (direct,
    B-LoRA) returns at once with ``steps_done = 0``. ``progress(step, total, terms)`` is called after every
    step (step counts from 1) with that step's unweighted loss terms and "total". See the module
    docstring for cancellation.
    """
    if config.objective != "paper":
        raise ValueError(f"optimize runs the 'paper' objective; {config.objective!r} is run by duolora.engine.run_merge")
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
