"""B2 at full SDXL size: the adapter's overhead on SDXL's own 560 attention projections.

B2 proper runs on the tiny model, whose projections are 32–128 wide, so a rank 8 + 8 low-rank path adds
25–100 % to each projection's own work. SDXL's projections are 640–1280 wide and its LoRAs rank 64 + 64;
running the whole 2.6 B-parameter UNet 8 times per step is out of reach on this CPU, so this part times the
layers the adapter touches, at their real shapes and token counts:

* every distinct (in, out, tokens) class of SDXL's attention projections at a ``image``-pixel image
  (1024: 4,096 tokens in the 640-wide blocks, 1,024 in the 1280-wide ones, 77 context tokens for the
  cross-attention keys and values), weighted by how many of the 560 layers it has;
* per class, one paper-mode step's calls (docs/method.md §4, as ``duolora.objective``: a no-grad call of batch 4
  with branches content, content, style, style; a no-grad call of batch 2; a call of batch 2 on the merged
  branch with gradient, and its backward) through an ``nn.Linear`` with the ZipRank adapter of a rank-64
  synthetic pair attached, against the same calls on the bare ``nn.Linear`` (what a static weight patch
  costs: ΔW folded into W).

The ratio Σ count·adapter ÷ Σ count·static is the overhead on the projections alone. Everything else in a
UNet step (convolutions, attention scores, feed-forwards, norms) costs the same in both, so the whole-step
overhead on SDXL is below it. ``blocks=True`` also times ComfyUI's own ``BasicTransformerBlock`` at SDXL's
two widths (640 with 10 heads at 4,096 tokens, 1280 with 20 heads at 1,024 tokens, context 77×2048, seeded
weights) with the adapter on its eight projections against the bare block, weighted 10 : 60 like SDXL's 70
transformer blocks: the overhead on every transformer block, a tighter bound (the ResNet blocks and
convolutions outside them are still left out).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import torch
from torch import nn

from .common import median

CONTEXT_TOKENS = 77
# The four calls of one step, as (batch, branches, with gradient) (see duolora.objective).
STEP_CALLS = ((4, ("content", "content", "style", "style"), False),
              (2, ("style", "content"), False),
              (2, ("merged", "merged"), True))


def _classes(image: int) -> tuple[Counter, dict[tuple[int, int, int], str]]:
    """Counter of (in, out, tokens) over SDXL's attention projections and one layer name per class."""
    from duolora.sdxl import SDXL_LAYOUT, is_attention_projection

    latent = image // 8
    counts: Counter = Counter()
    names: dict[tuple[int, int, int], str] = {}
    for name, layer in SDXL_LAYOUT.unet_layers().items():
        if not is_attention_projection(name):
            continue
        out_f, in_f = layer.shape[0], layer.shape[1]
        cross_kv = ".attn2.to_k" in name or ".attn2.to_v" in name
        side = layer.resolution * latent // 128  # resolution is the side at a 128-latent (1024 px)
        key = (in_f, out_f, CONTEXT_TOKENS if cross_kv else side * side)
        counts[key] += 1
        names.setdefault(key, name)
    return counts, names


def _step(module: nn.Module, x: dict[int, torch.Tensor], adapter: Any,
          context: dict[int, torch.Tensor] | None = None) -> None:
    """One step's calls (STEP_CALLS) through ``module``: inputs ``x[batch]`` (and ``context=context[batch]``
    for a transformer block), the branches set on ``adapter`` when there is one."""
    for batch, branches, grad in STEP_CALLS:
        if adapter is not None:
            adapter.set_branches(list(branches))
        kwargs = {} if context is None else {"context": context[batch]}
        if not grad:
            with torch.no_grad():
                module(x[batch], **kwargs)
            continue
        out = module(x[batch].detach().requires_grad_(True), **kwargs)
        out.backward(torch.ones_like(out))


def _merger(wanted: set[str], rank: int) -> Any:
    """The ZipRank merger of a seeded synthetic rank-``rank`` pair, restricted to the ``wanted`` layers."""
    from duolora.lora import LoRA
    from duolora.mergers import build_merger
    from duolora.synthetic import synthetic_lora

    pair = []
    for seed in (1, 2):
        full = synthetic_lora(rank=rank, seed=seed, decay=0.97)
        pair.append(LoRA(layers={n: lr for n, lr in full.layers.items() if n in wanted}, source=f"synthetic-{seed}"))
        del full
    return build_merger("ziprank", *pair)


def _paired(step: Any, make_adapter: Any, merger: Any, repeats: int) -> dict[str, float]:
    """Median seconds of ``step(None)`` (static) and ``step(adapter)``, interleaved run by run so that slow
    drifts of a shared machine hit both alike; one warm-up of each first."""
    runs: dict[str, list[float]] = {"static": [], "adapter": []}
    for i in range(repeats + 1):
        for label, times in runs.items():
            # A fresh adapter per run: its factor cache costs microseconds here (one concatenation per layer).
            adapter = make_adapter().attach() if label == "adapter" else None
            try:
                t0 = time.perf_counter()
                step(adapter)
                if i:  # the first round warms caches up
                    times.append(time.perf_counter() - t0)
            finally:
                if adapter is not None:
                    adapter.remove()
                merger.zero_grad(set_to_none=True)
    return {label: median(v) for label, v in runs.items()}


def run(image: int = 1024, rank: int = 64, repeats: int = 5) -> dict[str, Any]:
    from duolora.adapter import Adapter

    torch.manual_seed(0)
    counts, names = _classes(image)
    wanted = set(names.values())
    merger = _merger(wanted, rank)
    rows = []
    for key, count in sorted(counts.items()):
        in_f, out_f, tokens = key
        linear = nn.Linear(in_f, out_f).requires_grad_(False)
        x = {b: torch.randn(b, tokens, in_f) for b in (2, 4)}
        times = _paired(lambda adapter, linear=linear, x=x: _step(linear, x, adapter),
                        lambda key=key, linear=linear: Adapter(merger, {names[key]: linear}), merger, repeats)
        rows.append({"in": in_f, "out": out_f, "tokens": tokens, "count": count, **times,
                     "ratio": times["adapter"] / times["static"]})
    static = sum(r["count"] * r["static"] for r in rows)
    adapted = sum(r["count"] * r["adapter"] for r in rows)
    return {"image": image, "rank": rank, "repeats": repeats, "layers": sum(counts.values()), "classes": rows,
            "static_seconds": static, "adapter_seconds": adapted, "overhead_ratio": adapted / static}


def _block_prefix(width: int) -> str:
    from duolora.sdxl import SDXL_LAYOUT

    for name, layer in SDXL_LAYOUT.unet_layers().items():
        if name.endswith(".attn1.to_q") and layer.shape[0] == width:
            return name[: -len(".attn1.to_q")]
    raise LookupError(f"no SDXL transformer block of width {width}")


def run_blocks(image: int = 1024, rank: int = 64, repeats: int = 3) -> dict[str, Any]:
    """Whole transformer blocks (ComfyUI's class, booted host required): see the module docstring."""
    import comfy.ops
    from comfy.ldm.modules.attention import BasicTransformerBlock

    from duolora.adapter import Adapter
    from duolora.sdxl import ATTENTION_PROJECTIONS

    from .tiny import bridge

    foldable = bridge().foldable
    latent = image // 8
    # (width, tokens, how many of SDXL's 70 transformer blocks): 2 × 5 at 640, 10 × 6 at 1280.
    levels = ((640, (latent // 2) ** 2, 10), (1280, (latent // 4) ** 2, 60))
    prefixes = {w: _block_prefix(w) for w, _, _ in levels}
    wanted = {f"{prefixes[w]}.attn{i}.{proj}" for w, _, _ in levels for i in (1, 2) for proj in ATTENTION_PROJECTIONS}
    merger = _merger(wanted, rank)
    g = torch.Generator().manual_seed(0)
    rows = []
    for width, tokens, count in levels:
        block = BasicTransformerBlock(width, width // 64, 64, context_dim=2048, checkpoint=False,
                                      operations=comfy.ops.disable_weight_init).requires_grad_(False)
        with torch.no_grad():
            for t in block.parameters():
                t.copy_(torch.randn(t.shape, generator=g) * (0.02 if t.dim() > 1 else 1.0))
        modules = {f"{prefixes[width]}.attn{i}.{proj}": block.get_submodule(f"attn{i}.{proj}")
                   for i in (1, 2) for proj in ATTENTION_PROJECTIONS}
        x = {b: torch.randn(b, tokens, width, generator=g) for b in (2, 4)}
        ctx = {b: torch.randn(b, CONTEXT_TOKENS, 2048, generator=g) for b in (2, 4)}
        # The bridge's test of ComfyUI's ops: these blocks' projections may have ΔW folded in (as in a merge).
        times = _paired(lambda adapter, block=block, x=x, ctx=ctx: _step(block, x, adapter, ctx),
                        lambda modules=modules: Adapter(merger, modules, foldable=foldable), merger, repeats)
        rows.append({"width": width, "tokens": tokens, "count": count, **times,
                     "ratio": times["adapter"] / times["static"]})
    static = sum(r["count"] * r["static"] for r in rows)
    adapted = sum(r["count"] * r["adapter"] for r in rows)
    return {"image": image, "rank": rank, "repeats": repeats, "levels": rows, "static_seconds": static,
            "adapter_seconds": adapted, "overhead_ratio": adapted / static}


def report_blocks(r: dict[str, Any]) -> str:
    lines = [(f"B2+ adapter overhead on whole SDXL transformer blocks (ComfyUI BasicTransformerBlock, rank {r['rank']} + "
             f"{r['rank']}, {r['image']} px, one step's calls; median of {r['repeats']})")]
    for c in r["levels"]:
        lines.append(f"    {c['count']:>3} × width {c['width']} at {c['tokens']} tokens: static {c['static']:.2f} s, "
                     f"adapter {c['adapter']:.2f} s, ratio {c['ratio']:.2f}")
    lines.append(f"    all 70 transformer blocks: static {r['static_seconds']:.1f} s, adapter {r['adapter_seconds']:.1f} s → "
                 f"overhead {r['overhead_ratio']:.2f} (ResNet blocks and convolutions, unaffected, not included)")
    return "\n".join(lines)


def report(r: dict[str, Any]) -> str:
    head = (f"B2+ adapter overhead on full-size SDXL attention projections ({r['layers']} layers, rank {r['rank']} + "
            f"{r['rank']}, {r['image']} px, one step's calls per layer; median of {r['repeats']})")
    lines = [head]
    for c in r["classes"]:
        lines.append(f"    {c['count']:>3} × {c['in']}→{c['out']} at {c['tokens']} tokens: static {c['static'] * 1e3:.1f} ms, "
                     f"adapter {c['adapter'] * 1e3:.1f} ms, ratio {c['ratio']:.2f}")
    lines.append(f"    all 560 projections: static {r['static_seconds']:.2f} s, adapter {r['adapter_seconds']:.2f} s → "
                 f"overhead on the projections {r['overhead_ratio']:.2f} (an upper bound for the whole SDXL step)")
    return "\n".join(lines)
