"""Synthetic LoRAs with the exact layer names and shapes of a layout (default: SDXL).

These are NOT trained LoRAs: their factors are seeded Gaussian noise. They exist because no real SDXL LoRA
is small enough to ship with the tests (shared/fixtures/SOURCES.md); tests, the demo and the benchmarks use
them to exercise every code path (file formats, mergers, exports) on realistic shapes.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping

import torch

from .lora import LoRA, LowRank
from .sdxl import SDXL_LAYOUT, Layout

RankSpec = int | Mapping[str, int] | Callable[[str], int]


def _rank_of(rank: RankSpec, name: str) -> int:
    if isinstance(rank, int):
        return rank
    if callable(rank):
        return int(rank(name))
    return int(rank[name])


def synthetic_lora(
    layout: Layout = SDXL_LAYOUT,
    rank: RankSpec = 64,
    scope: str = "attention",
    text_encoder: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    alpha: float | None = None,
    std: float = 0.02,
    decay: float | None = None,
) -> LoRA:
    """A seeded, deterministic synthetic LoRA over ``layout`` (not a trained LoRA; see the module docstring).

    Layers: the UNet attention projections (``scope="attention"``, 560 on SDXL) or every LoRA-able UNet
    layer (``scope="all"``, convolutions included), plus both text encoders if ``text_encoder``.
    ``rank`` is one int, or a per-layer mapping / function of the canonical name.
    Factors: down (r, in[, kh, kw]) ~ N(0, 1/fan_in), up (out, r[, 1, 1]) ~ N(0, std²/r), so ΔW·x has about
    ``std`` times the scale of x. ``decay`` (e.g. 0.9) scales component i of up by decay**i, giving a
    decaying spectrum. Each layer has its own generator seeded from ``seed`` and its name, so a layer's
    factors do not depend on which other layers are present. Values are rounded to ``dtype`` and stored as
    float32 (exactly what reading a ``dtype`` file gives); ``LoRA.dtype`` is ``dtype``.
    ``alpha`` is recorded as every layer's file alpha (default: the rank), for reporting only.
    """
    if scope == "attention":
        names = list(layout.attention_layers())
    elif scope == "all":
        names = list(layout.unet_layers())
    else:
        raise ValueError(f"scope must be 'attention' or 'all', not {scope!r}")
    if text_encoder:
        names += list(layout.text_encoder_layers())

    layers: dict[str, LowRank] = {}
    alphas: dict[str, float | None] = {}
    for name in names:
        layer = layout[name]
        r = _rank_of(rank, name)
        if r < 1:
            raise ValueError(f"rank of {name} must be at least 1, not {r}")
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        out_f, in_f = layer.shape[0], layer.shape[1]
        kernel = tuple(layer.shape[2:])
        fan_in = in_f * math.prod(kernel)
        # in-place sampling: a full SDXL rank-64 LoRA is ~93 M values, extra passes would double the time
        down = torch.empty((r, in_f, *kernel)).normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
        up = torch.empty((out_f, r, *((1, 1) if kernel else ()))).normal_(0.0, std / math.sqrt(r), generator=gen)
        if decay is not None:
            up.mul_((decay ** torch.arange(r, dtype=torch.float32)).reshape(1, r, *((1, 1) if kernel else ())))
        if dtype != torch.float32:
            up, down = up.to(dtype).to(torch.float32), down.to(dtype).to(torch.float32)
        layers[name] = LowRank(up, down)
        alphas[name] = float(alpha) if alpha is not None else float(r)

    return LoRA(
        layers=layers,
        metadata={"duolora_synthetic": "true", "duolora_synthetic_seed": str(seed)},
        source=None,
        key_style="synthetic",
        base=layout.base,
        dtype=dtype,
        alphas=alphas,
    )
