"""The LoRA data model shared by the whole engine.

A LoRA is a mapping from canonical layer names to low-rank factors plus the file's metadata.

Canonical names (every family's table in ``duolora.families`` uses them):
  * UNet layers: the LDM/ComfyUI module path without ``diffusion_model.`` and ``.weight``,
    e.g. ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``.
  * Text encoders: ``te1.`` / ``te2.`` followed by the CLIP module path,
    e.g. ``te1.text_model.encoder.layers.0.self_attn.q_proj``.

The scale alpha/rank is folded into ``up`` at load time, so ``delta() == up @ down`` is the whole
weight update (docs/method.md §1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

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
        """down as a 2-D (r, in·kh·kw) matrix (the width spelled out: reshape cannot infer it for rank 0)."""
        return self.down.reshape(self.down.shape[0], math.prod(self.down.shape[1:]))

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
        """The same ΔW with factors in ``dtype`` on ``device``.

        Casting to a narrow-range float (float8 e4m3/e5m2 always; float16 when a factor's largest entry is
        below 2⁻⁷ or above 2¹⁴) first moves a power of two between up and down so both have about the same
        largest entry: ΔW = up·down is unchanged before rounding (a power-of-two scale is exact), and
        neither factor falls into the dtype's subnormal range or overflows. A file written with alpha = rank
        (scale folded into up) needs this: alpha 1 at rank 128 makes up 128× smaller than the trainer stored it.
        """
        up, down = self.up, self.down
        if dtype is not None and up.dtype != dtype and _needs_balance(up, down, dtype):
            up, down = _balanced(up, down)
        return LowRank(up.to(device=device, dtype=dtype), down.to(device=device, dtype=dtype))


# The float8 dtypes of this torch build (e4m3/e5m2 and their fnuz variants): narrow-range storage formats.
FLOAT8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                      if hasattr(torch, n))


def _needs_balance(up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> bool:
    if dtype in FLOAT8_DTYPES:
        return up.numel() > 0 and down.numel() > 0 and up.device.type != "meta"
    if dtype != torch.float16 or up.numel() == 0 or down.numel() == 0 or up.device.type == "meta":
        return False
    big = [float(t.detach().abs().max()) for t in (up, down)]
    return min(big) < 2.0 ** -7 or max(big) > 2.0 ** 14


def _balanced(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(up·2^k, down·2^-k) with 2^k ≈ √(max|down| / max|up|): exact, same ΔW, equal largest entries."""
    mu, md = float(up.detach().abs().max()), float(down.detach().abs().max())
    if mu == 0.0 or md == 0.0 or not math.isfinite(mu * md):
        return up, down
    k = round(0.5 * math.log2(md / mu))
    if k == 0:
        return up, down
    return torch.ldexp(up, torch.tensor(k)), torch.ldexp(down, torch.tensor(-k))


@dataclass
class SkippedKey:
    key: str
    reason: str
    # "ignored": harmless and reported (e.g. an embedded token); "unknown_layer": a LoRA layer the target
    # model does not have; "unknown_spelling": a known layer behind a prefix no reader knows (both are left
    # out, and load_lora refuses the file when they are a large part of it); "unknown_key": a tensor name no
    # reader understands (load_lora refuses it).
    kind: str = "ignored"
    # the module (key without its LoRA suffix) the key belongs to, for reports that count modules
    module: str = ""


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
    # The alpha each layer had in its file (None: none), for reporting; ``up`` already carries the scale,
    # so nothing numeric depends on this.
    alphas: dict[str, float | None] = field(default_factory=dict)
    # The scale folded into each layer's up (alpha/rank, lora_alpha/r, …) and where the file keeps it:
    # "alpha_tensor", "peft_metadata" (the header's lora_adapter_metadata) or "none" (scale 1).
    scales: dict[str, float] = field(default_factory=dict)
    scale_sources: dict[str, str] = field(default_factory=dict)
    # Dense differences ComfyUI adds to a parameter that is not a low-rank layer: canonical parameter
    # name (``input_blocks.4.1.norm.bias``, ``te1.text_model.final_layer_norm.weight``) -> float32 tensor of
    # that parameter's shape (files spell them ``.diff_b``, 1-D ``.diff``, LyCORIS ``.w_norm``/``.b_norm``).
    patches: dict[str, torch.Tensor] = field(default_factory=dict)

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

    def without_empty_layers(self) -> LoRA:
        """This LoRA without its rank-0 layers (ΔW = 0, nothing to merge); itself when it has none."""
        if all(lr.rank for lr in self.layers.values()):
            return self
        keep = {k: v for k, v in self.layers.items() if v.rank}
        return replace(self, layers=keep, alphas={k: v for k, v in self.alphas.items() if k in keep},
                       scales={k: v for k, v in self.scales.items() if k in keep},
                       scale_sources={k: v for k, v in self.scale_sources.items() if k in keep})

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
            scales=dict(self.scales),
            scale_sources=dict(self.scale_sources),
            patches={k: v * factor for k, v in self.patches.items()},
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
    if alpha is None or down.shape[0] == 0:  # rank 0: ΔW = 0 whatever the scale
        return up
    rank = down.shape[0]
    scale = float(alpha) / rank
    if math.isclose(scale, 1.0):
        return up
    return up * scale


def merge_patches(content: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
                  style: Mapping[str, torch.Tensor], w_c: float = 1.0, w_s: float = 1.0) -> dict[str, torch.Tensor]:
    """Bias/norm differences of a merge: w_c·d_c + w_s·d_s where several LoRAs patch a parameter (w_c on each
    content LoRA's when ``content`` is a sequence of them), the one difference unchanged where only one
    does — the rule every merger applies to layers outside its learned scope (docs/method.md §2), so a merged file
    patches what its sources patched."""
    contents = [content] if isinstance(content, Mapping) else list(content)
    sources = [(float(w_c), c) for c in contents] + [(float(w_s), style)]
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set().union(*(d for _, d in sources))):
        present = [(w, d[name]) for w, d in sources if name in d]
        if len(present) == 1:
            out[name] = present[0][1].float().clone()
            continue
        total = present[0][0] * present[0][1].float() + present[1][0] * present[1][1].float()
        for w, d in present[2:]:
            total = total + w * d.float()
        out[name] = total
    return out
