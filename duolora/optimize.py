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

    @property
    def layers(self) -> int:
        """Layers of the exported LoRA (0 before the export)."""
        return 0 if self.merged is None else len(self.merged.layers)

    @property
    def kept_components(self) -> int:
        """Rank components the export kept, summed over its layers (the adaptive rank, METHOD.md §2)."""
        return 0 if self.merged is None else sum(lr.rank for lr in self.merged.layers.values())


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
        for step in range(int(config.steps)):
            if should_cancel is not None and should_cancel():
                result.cancelled = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss, terms = objective(step, generator)
            if loss.requires_grad:
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
            for name, value in terms.items():
                result.history.setdefault(name, []).append(value)
            result.steps_done = step + 1
            if progress is not None:
                progress(step + 1, int(config.steps), terms)
    result.wall_seconds = time.perf_counter() - start
    return result
