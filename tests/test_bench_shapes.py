"""The full-size SDXL part of benchmark B2 (bench/b2_sdxl.py) measures the right layers.

The benchmark itself is not run by the tests (``make bench``); these check its inventory of SDXL's attention
projections and one paired timing round on a small layer, so the bench code never rots.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from duolora.adapter import Adapter
from duolora.lora import LoRA, LowRank
from duolora.mergers import build_merger

REPO = Path(__file__).resolve().parents[1]


def _bench_module(name: str):
    """bench.<name> without putting the repository root on sys.path (its nodes/ would shadow ComfyUI's)."""
    if "bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench", REPO / "bench" / "__init__.py",
                                                      submodule_search_locations=[str(REPO / "bench")])
        package = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"bench.{name}")


b2_sdxl = _bench_module("b2_sdxl")


def test_projection_classes_cover_sdxls_560_layers_at_their_token_counts() -> None:
    counts, names = b2_sdxl._classes(1024)
    assert sum(counts.values()) == 560
    # 640-wide blocks at 64×64 latent positions, 1280-wide at 32×32, cross-attention k/v on 77 text tokens.
    assert dict(counts) == {(640, 640, 4096): 60, (2048, 640, 77): 20, (1280, 1280, 1024): 360,
                            (2048, 1280, 77): 120}
    assert names[(2048, 640, 77)].endswith((".attn2.to_k", ".attn2.to_v"))
    # Half the image side, a quarter of the tokens.
    assert set(b2_sdxl._classes(512)[0]) == {(640, 640, 1024), (2048, 640, 77), (1280, 1280, 256),
                                             (2048, 1280, 77)}


def test_paired_timing_runs_both_sides_and_leaves_the_module_unhooked() -> None:
    name = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    g = torch.Generator().manual_seed(0)

    def lora() -> LoRA:
        return LoRA(layers={name: LowRank(torch.randn(16, 4, generator=g), torch.randn(4, 16, generator=g))})

    merger = build_merger("ziprank", lora(), lora())
    linear = nn.Linear(16, 16).requires_grad_(False)
    x = {b: torch.randn(b, 3, 16, generator=g) for b in (2, 4)}
    calls = {"static": 0, "adapter": 0}

    def step(adapter: Adapter | None) -> None:
        calls["adapter" if adapter is not None else "static"] += 1
        b2_sdxl._step(linear, x, adapter)

    times = b2_sdxl._paired(step, lambda: Adapter(merger, {name: linear}), merger, repeats=2)
    assert set(times) == {"static", "adapter"} and all(t > 0 for t in times.values())
    assert calls == {"static": 3, "adapter": 3}  # one warm-up round + two timed, interleaved
    assert not linear._forward_hooks and "forward" not in vars(linear)
    assert all(p.grad is None for p in merger.parameters())
