"""The LoRA data model shared by the whole engine.

A LoRA is a mapping from canonical layer names to low-rank factors plus the file's metadata.

Canonical names (shared/docs/ARCHITECTURE.md):
  * UNet layers: the LDM/ComfyUI module path without ``diffusion_model.`` and ``.weight``,
    e.g. ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``.
  * Text encoders: ``te1.`` / ``te2.`` followed by the CLIP module path,
    e.g. ``te1.text_model.encoder.layers.0.self_attn.q_proj``.

The scale alpha/rank is folded into ``up`` at load time, so ``delta() == up @ down`` is the whole
weight update (METHOD.md §1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

TEXT_ENCODER_PREFIXES = ("te1.", "te2.")


@dataclass
class LowRank:
    """One LoRA layer: ΔW = up @ down.

    Linear: up is (out, r), down is (r, in).
    Conv:   up is (out, r, 1, 1) (or (out, r, kh, kw) never occurs in practice), down is (r, in, kh, kw).
    The alpha/rank scale is already folded into ``up``.
    """

    up: torch.Tensor
    down: torch.Tensor

    def __post_init__(self) -> None:
        if self.up.shape[1] != self.down.shape[0]:
            raise ValueError(
                f"up has rank {self.up.shape[1]} but down has rank {self.down.shape[0]}"
            )

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_features(self) -> int:
        """Input channels (for conv: channels, not channels·k·k)."""
        return int(self.down.shape[1])

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (int(self.down.shape[2]), int(self.down.shape[3])) if self.is_conv else (1, 1)

    @property
    def B(self) -> torch.Tensor:
        """up as a 2-D (out, r) matrix."""
        return self.up.reshape(self.up.shape[0], self.up.shape[1])

    @property
    def A(self) -> torch.Tensor:
        """down as a 2-D (r, in·kh·kw) matrix."""
        return self.down.reshape(self.down.shape[0], -1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the weight this layer patches: (out, in) or (out, in, kh, kw)."""
        if self.is_conv:
            return (self.out_features, self.in_features, *self.kernel_size)
        return (self.out_features, self.in_features)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ΔW with the shape of the patched weight. For tests and small layers only."""
        d = self.B.to(dtype) @ self.A.to(dtype)
        return d.reshape(self.weight_shape)

    def with_factors(self, B: torch.Tensor, A: torch.Tensor) -> LowRank:
        """A layer of the same kind (linear/conv, kernel) from 2-D factors B (out, r), A (r, in·k·k)."""
        r = A.shape[0]
        if self.is_conv:
            kh, kw = self.kernel_size
            return LowRank(B.reshape(B.shape[0], r, 1, 1), A.reshape(r, self.in_features, kh, kw))
        return LowRank(B, A)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LowRank:
        return LowRank(self.up.to(device=device, dtype=dtype), self.down.to(device=device, dtype=dtype))


@dataclass
class SkippedKey:
    key: str
    reason: str
    # "ignored": harmless and reported (e.g. an embedded token); "unknown_layer": a LoRA layer the target
    # model does not have; "unknown_key": a tensor name no reader understands (load_lora refuses both).
    kind: str = "ignored"


@dataclass
class LoRA:
    """A whole LoRA file in canonical form.

    ``layers`` holds UNet and text-encoder layers alike; text-encoder names start with ``te1.``/``te2.``.
    ``source`` is the file it came from (for error messages and provenance), ``key_style`` the detected
    key spelling, ``base`` the detected base model ("sdxl", "sd1", "unknown"), ``skipped`` every key that
    was not loaded, with the reason (never silently dropped).
    """

    layers: dict[str, LowRank] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source: str | None = None
    key_style: str = "unknown"
    base: str = "unknown"
    skipped: list[SkippedKey] = field(default_factory=list)
    dtype: torch.dtype | None = None
    # The alpha each layer had in its file (None: no alpha key), for reporting; ``up`` already carries
    # alpha/rank, so nothing numeric depends on this.
    alphas: dict[str, float | None] = field(default_factory=dict)

    @property
    def name(self) -> str:
        import os

        return os.path.basename(self.source) if self.source else "<in-memory LoRA>"

    def unet_layers(self) -> dict[str, LowRank]:
        return {k: v for k, v in self.layers.items() if not k.startswith(TEXT_ENCODER_PREFIXES)}

    def text_encoder_layers(self) -> dict[str, LowRank]:
        return {k: v for k, v in self.layers.items() if k.startswith(TEXT_ENCODER_PREFIXES)}

    def ranks(self) -> list[int]:
        return sorted({lr.rank for lr in self.layers.values()})

    def num_parameters(self) -> int:
        return sum(lr.up.numel() + lr.down.numel() for lr in self.layers.values())

    def scaled(self, factor: float) -> LoRA:
        """The same LoRA with every ΔW multiplied by ``factor`` (folded into up)."""
        return LoRA(
            layers={k: LowRank(v.up * factor, v.down) for k, v in self.layers.items()},
            metadata=dict(self.metadata),
            source=self.source,
            key_style=self.key_style,
            base=self.base,
            skipped=list(self.skipped),
            dtype=self.dtype,
            alphas=dict(self.alphas),
        )

    def validate_finite(self) -> list[str]:
        """Names of layers containing NaN or Inf."""
        bad = []
        for k, v in self.layers.items():
            if not (torch.isfinite(v.up).all() and torch.isfinite(v.down).all()):
                bad.append(k)
        return bad


def fold_alpha(up: torch.Tensor, down: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """Return ``up`` scaled by alpha/rank (kohya/ComfyUI convention; scale 1 when there is no alpha)."""
    if alpha is None:
        return up
    rank = down.shape[0]
    scale = float(alpha) / rank
    if math.isclose(scale, 1.0):
        return up
    return up * scale
