"""B3: fidelity of every merge mode on the tiny SDXL-layout model with generated content and style LoRAs.

The yardstick is the paper objective's two reconstruction terms, L_c = MSE(ε_m(x_c, p_c), ε_c(x_c, p_c)) and
L_s = MSE(ε_m(x_s, p_s), ε_s(x_s, p_s)), averaged over ``draws`` held-out (σ, ε) pairs that no method saw
(seed 9999; the methods use seed 0), through the real ComfyUI model. Methods: the direct merge, ZipLoRA
(``ziplora_out``, 100 steps, its λ_sim = 0.01, no priors, no Constyle), DuoLoRA paper mode (every default:
ZipRank, SVD basis, the share prior, Constyle off, 100 steps), layer-wise and weights-only (defaults), and
the layer-wise solve followed by 5 % or 10 % of paper mode's steps (the node's ``layerwise+paper`` mode).
Wall time per method runs from building its merger to its final masks (model hooks included).
Gap closed = (L_direct − L_method) ÷ (L_direct − L_paper).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from .tiny import TinySetup, bridge, references

GAP_TARGET, TIME_TARGET = 0.80, 0.10


def _held_out(t: TinySetup, merger, draws: int) -> tuple[float, float]:
    from duolora.config import MergeConfig
    from duolora.objective import DuoLoRAObjective

    cfg = MergeConfig(constyle_iterations=0, prior_loss=False)
    lc = ls = 0.0
    with torch.inference_mode(False), torch.no_grad(), \
            bridge().ComfyDenoiser(t.model, merger, gradient_checkpointing=False) as den:
        objective = DuoLoRAObjective(merger, den, references(den, t), cfg)
        g = torch.Generator().manual_seed(9999)
        for i in range(draws):
            terms = objective(i, g)[1]
            lc += terms["content"]
            ls += terms["style"]
    return lc / draws, ls / draws


def _method(t: TinySetup, name: str, steps: int):
    """(merger with its final masks, wall seconds)."""
    from duolora import recording, solver
    from duolora.config import MergeConfig
    from duolora.mergers import build_merger
    from duolora.optimize import optimize

    b = bridge()
    start = time.perf_counter()
    if name == "direct":
        merger = build_merger("direct", t.content, t.style)
    elif name in ("ziplora", "paper"):
        config = (MergeConfig(method="ziplora_out", prior_preset="none", constyle_iterations=0, steps=steps)
                  if name == "ziplora" else MergeConfig(steps=steps))
        merger = build_merger(config.method, t.content, t.style, config)
        with torch.inference_mode(False), b.ComfyDenoiser(t.model, merger, gradient_checkpointing=False) as den:
            optimize(merger, den, references(den, t), config)
    elif name.startswith("layerwise"):
        config = MergeConfig(prior_preset="none") if name.endswith("no priors") else MergeConfig()
        merger = build_merger(config.method, t.content, t.style, config)
        with torch.inference_mode(False), b.ComfyDenoiser(t.model, merger, gradient_checkpointing=False) as den:
            stats = recording.record_activations(merger, den, den.modules, references(den, t), config)
        solver.solve_layerwise(merger, stats, config)
        if name in REFINED:
            # The node's "layerwise+paper" mode: paper steps from the layer-wise masks (no prior initialisation).
            refine = dataclasses.replace(config, steps=max(1, round(steps * REFINED[name])), prior_init=False)
            with torch.inference_mode(False), b.ComfyDenoiser(t.model, merger, gradient_checkpointing=False) as den:
                optimize(merger, den, references(den, t), refine)
    elif name == "weights":
        config = MergeConfig()
        merger = build_merger(config.method, t.content, t.style, config)
        solver.solve_weights(merger, config)
    else:
        raise ValueError(name)
    return merger, time.perf_counter() - start


# The layer-wise start followed by this fraction of paper mode's steps.
REFINED = {"layerwise+paper, 5 % steps": 0.05, "layerwise+paper, 10 % steps": 0.10}
METHODS = ("direct", "ziplora", "paper", "layerwise", "layerwise, no priors", "weights", *REFINED)


def run(t: TinySetup, steps: int = 100, draws: int = 16) -> dict[str, Any]:
    rows = {}
    for name in METHODS:
        merger, seconds = _method(t, name, steps)
        lc, ls = _held_out(t, merger, draws)
        kept = sum(sum(v) for v in merger.kept_ranks().values())
        total = sum(layer.rank("c") + layer.rank("s") for layer in merger.layers)
        rows[name] = {"L_c": lc, "L_s": ls, "L": lc + ls, "seconds": seconds, "kept": kept, "total": total}
    d, p = rows["direct"]["L"], rows["paper"]["L"]
    for row in rows.values():
        row["gap_closed"] = (d - row["L"]) / (d - p) if d != p else float("nan")
        row["time_vs_paper"] = row["seconds"] / rows["paper"]["seconds"]
    return {"latent": list(t.content_latents.shape[-2:]), "rank": t.content.ranks(), "steps": steps,
            "draws": draws, "rows": rows}


def report(r: dict[str, Any]) -> str:
    from .common import table

    head = (f"B3  fidelity on the tiny model (latents 4×{r['latent'][0]}×{r['latent'][1]}, LoRA ranks "
            f"{r['rank'][0]} + {r['rank'][0]}, {r['draws']} held-out (σ, ε) draws; paper/ZipLoRA {r['steps']} steps)")
    lines = [head]
    rows = []
    for name, row in r["rows"].items():
        rows.append([name, f"{row['L_c']:.5f}", f"{row['L_s']:.5f}", f"{row['L']:.5f}",
                     "–" if name == "direct" else f"{100 * row['gap_closed']:.0f} %",
                     f"{row['seconds']:.2f} s", f"{100 * row['time_vs_paper']:.1f} %", f"{row['kept']}/{row['total']}"])
    lines.append(table(rows, ["method", "L_c", "L_s", "L_c + L_s", "gap closed", "wall time", "time ÷ paper",
                              "kept components"]))
    for name in ("layerwise", *REFINED):
        lw = r["rows"][name]
        met = lw["gap_closed"] >= GAP_TARGET and lw["time_vs_paper"] <= TIME_TARGET
        lines.append(f"    {name} closes {100 * lw['gap_closed']:.0f} % of the direct→paper gap in "
                     f"{100 * lw['time_vs_paper']:.1f} % of paper mode's time (target ≥ {100 * GAP_TARGET:.0f} % in ≤ "
                     f"{100 * TIME_TARGET:.0f} %: {'meets' if met else 'misses'})")
    return "\n".join(lines)
