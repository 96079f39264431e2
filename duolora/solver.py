"""The per-layer solver of the fast merge modes (docs/method.md §5): ZipRank masks without the paper's 100 steps.

Both modes choose, layer by layer, the rank masks m = [m_c; m_s] (n = r_c + r_s entries) of the merged update
ΔW_m = B_c·diag(m_c)·A_c + B_s·diag(m_s)·A_s by minimising a per-layer version of the paper's two
reconstruction terms, each seen through its own LoRA's output space,

    L_c(m) = ‖Π_c·(ΔW_m − ΔW_c)·X_c‖²,    L_s(m) = ‖Π_s·(ΔW_m − ΔW_s)·X_s‖²,

where Π_c, Π_s project onto col(B_c), col(B_s) (the directions each LoRA writes) and X_c, X_s are the layer's
inputs on the content and on the style side:

* ``weights`` (no model, no images): X_c = A'_cᵀ, the content LoRA's own input subspace, weighted by its
  singular values (A'_c = Σ_c^½·V_cᵀ is the SVD-basis down factor, so X_c·X_cᵀ = (ΔW_cᵀΔW_c)^½ does not
  depend on how a file happens to factor ΔW_c); likewise X_s = A'_sᵀ.
* ``layerwise`` (activation-aware): X_c holds the inputs the layer really sees when the content-only model
  denoises the content references at a few noise levels, X_s the inputs under the style-only model on the
  style references — exactly the target branches of L_c and L_s in paper mode, so to first order in ΔW the
  paper's ε-space reconstruction error is a positive combination of these per-layer terms. One forward pass
  (no backward) per reference records, per layer, only the r×r projections K = A·E[x xᵀ]·Aᵀ with
  A = [A_c; A_s] (``duolora.recording``).

**Why this objective [decided, measured].** A pure self-reconstruction ‖ΔW_m − ΔW_c‖_F² + ‖ΔW_m − ΔW_s‖_F² is
minimised at ΔW_m = (ΔW_c + ΔW_s)/2: it halves both LoRAs even where they never meet. Restricting each term
to its LoRA's own inputs (X_c, X_s) is not enough: the style LoRA acting on the content inputs is exactly
what a merge is for (the subject drawn in the style), yet ‖(ΔW_m − ΔW_c)·X_c‖² counts all of it as error,
and where both LoRAs read similar inputs (every layer of a real model, and both sides of the layer-wise
mode) the minimiser sits near m = ½ — both LoRAs at half strength; on MiniBench 2 that full-output form
lost the style (layer-wise style hit 14.8 % vs the direct merge's 41.1 %, test split, 2026-11-30). Seen
through its own output space, each term counts only what the other LoRA writes INTO the directions this
LoRA writes — real interference. L_c + L_s is then zero at the direct merge (all masks 1) whenever the two
LoRAs write disjoint output spaces or read disjoint input spaces, and the minimiser trades off, per
singular direction, only where they collide in both.

Where the parts live: ``duolora.quadratics`` builds the per-layer problems (the Gram form, and why the fast
modes solve rank masks only); ``duolora.boxqp`` weighs the priors against them and solves every layer at once;
this module runs either mode on a merger (``solve_weights``, ``solve_layerwise``) and describes the result;
``duolora.recording`` records the layer-wise mode's statistics with forward hooks; ``duolora.streaming`` runs the
weights-only mode over two files a chunk of layers at a time; ``duolora.engine.run_merge`` chooses between them
and paper mode.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch

from .boxqp import SOLVER_ITERATIONS, FastTerms, mean_objective, solve_quadratics
from .config import MergeConfig
from .lora import LoRA
from .mergedlayer import MergedLayer
from .mergers import Merger, build_merger
from .optimize import MergeResult
from .priors import prior_role
from .quadratics import (
    FastModeError,
    LayerActivations,
    LayerQuadratic,
    activation_quadratic,
    check_method,
    own_output_grams,
    weights_quadratic,
    weights_quadratics,
)

# Names other modules and hosts import from here (the per-layer problems live in ``duolora.quadratics``, their
# batched solve in ``duolora.boxqp``).
__all__ = [
    "SOLVER_ITERATIONS", "FastModeError", "LayerActivations", "LayerQuadratic", "activation_quadratic",
    "check_method", "describe", "merge_weights_only", "own_output_grams", "solve_layerwise", "solve_weights",
    "weights_quadratic", "weights_quadratics",
]


# ---------------------------------------------------------------------------------------------------------
# Solving a merger in place
# ---------------------------------------------------------------------------------------------------------

def _learned_rank_layers(merger: Merger, mode: str) -> list[MergedLayer]:
    check_method(merger.method, mode)
    return merger.learned_layers()


def _apply(merger: Merger, problems: list[LayerQuadratic], config: MergeConfig, start: float,
           iterations: int) -> MergeResult:
    """Solve, write the masks into the merger, and return a MergeResult with the objective at the direct
    merge (all masks 1) and after the solve as a two-point history."""
    roles_map = config.roles()
    roles = [prior_role(p.name, roles_map) for p in problems]
    masks = solve_quadratics(problems, roles, config, iterations)
    terms = FastTerms.from_config(config)
    ones = [tuple(torch.ones(r) for r in p.ranks) for p in problems]
    with torch.no_grad():
        before, after = mean_objective(problems, roles, ones, terms), mean_objective(problems, roles, masks, terms)
        for p, layer_masks in zip(problems, masks):
            layer = merger.layer(p.name)
            for tag, m in zip(p.tags, layer_masks):
                target = layer.mask(tag)
                target.copy_(m.to(target.device))
    history = {k: [before[k], after[k]] for k in after}
    return MergeResult(merger=merger, history=history, steps_done=0, cancelled=False,
                       wall_seconds=time.perf_counter() - start)


def solve_weights(merger: Merger, config: MergeConfig, iterations: int = SOLVER_ITERATIONS) -> MergeResult:
    """Weights-only mode on a built merger: set every learned mask from the two LoRAs alone.

    ``history`` holds each term of the fast objective (mean over learned layers) at the direct merge and
    after the solve. A merger with nothing to learn (direct, B-LoRA) is returned unchanged.
    """
    start = time.perf_counter()
    layers = _learned_rank_layers(merger, "weights")
    svd_basis = getattr(merger, "basis", "svd") == "svd"
    with torch.no_grad():
        problems = weights_quadratics(layers, svd_basis)
    return _apply(merger, problems, config, start, iterations)


def merge_weights_only(content: LoRA | Sequence[LoRA], style: LoRA, config: MergeConfig | None = None) -> MergeResult:
    """build_merger + solve_weights: the weights-only merge of in-memory LoRAs (one content LoRA or several)."""
    config = config or MergeConfig()
    check_method(config.method, "weights")
    merger = build_merger(config.method, content, style, config)
    return solve_weights(merger, config)


def solve_layerwise(merger: Merger, stats: Mapping[str, LayerActivations], config: MergeConfig,
                    iterations: int = SOLVER_ITERATIONS) -> MergeResult:
    """Layer-wise mode on a built merger from recorded statistics; same result shape as ``solve_weights``."""
    start = time.perf_counter()
    layers = _learned_rank_layers(merger, "layerwise")
    with torch.no_grad():
        problems = [activation_quadratic(layer, stats[layer.name]) for layer in layers]
    return _apply(merger, problems, config, start, iterations)


def _percent(fraction: float) -> str:
    return f"{100.0 * fraction:.2g} %"


def describe(result: MergeResult) -> str:
    """What the solve did, in terms a user can judge: the share of each LoRA's own effect that the merge gives up
    (the reconstruction terms of the fast objective, mean over learned layers: "content", "content2", …,
    "style"), then the same for the plain sum it starts from and why the two differ. One or two lines."""
    h = result.history
    if "content" not in h or "style" not in h:
        return "nothing to learn (the method fixes every mask)"
    terms = [k for k in h if k.startswith("content")] + ["style"]
    after = ", ".join(f"{k} {_percent(h[k][1])}" for k in terms)
    pair = len(terms) == 2
    text = (f"given up by the merge: {after} of the {'two ' if pair else ''}LoRAs' own effect "
            "(mean over the learned layers; 0 % = kept exactly)")
    if any(h[k][1] > h[k][0] for k in terms):
        before = " and ".join(_percent(h[k][0]) for k in terms) if pair else ", ".join(
            f"{k} {_percent(h[k][0])}" for k in terms)
        text += (f"\nthe plain sum gives up {before}, keeping {'both' if pair else 'every'} LoRA"
                 f"{'s' if pair else ''} at full strength in every block; the layer priors weaken each LoRA in the "
                 f"blocks they give to {'the other' if pair else 'another'}")
    return text
