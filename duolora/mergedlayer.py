"""One layer of a merger (docs/method.md §2): the frozen factors of each LoRA that patches it and one mask per
LoRA, in one of three mask kinds (written for one content LoRA; every further content LoRA adds its own term):

* ``rank`` masks (ZipRank, the direct merge, B-LoRA):  ΔW = B_c·diag(m_c)·A_c + B_s·diag(m_s)·A_s,
  m_c ∈ R^{r_c}, m_s ∈ R^{r_s};
* ``out`` masks (ZipLoRA as DuoLoRA reads it):          ΔW = diag(m_c)·ΔW_c + diag(m_s)·ΔW_s, m ∈ R^{out};
* ``in`` masks (ZipLoRA's own paper):                    ΔW = ΔW_c·diag(m_c) + ΔW_s·diag(m_s), m ∈ R^{in}
  (conv layers: one entry per input channel, shared by the kernel taps).

A layer's factors and mask of LoRA ``t`` (its tag, ``duolora.mergers.content_tag``) are its buffers ``B_t``,
``A_t``, ``m_t``. ``component_weights`` gives each mask entry's weight in its LoRA's nuclear norm (the layer
priors' shares, the rank budget of the export). The merger that builds these layers is ``duolora.mergers``; the
export that prunes and concatenates them is ``duolora.export``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .lora import LowRank

RANK, OUT, IN = "rank", "out", "in"
MASK_KINDS: tuple[str, ...] = (RANK, OUT, IN)


def _ordinary(t: torch.Tensor) -> torch.Tensor:
    """float32, detached, and not an inference tensor (shares storage with ``t`` when it already is)."""
    t = t.detach().to(torch.float32)
    return t.clone() if t.is_inference() else t


class MergedLayer(nn.Module):
    """One layer of a merger: frozen factors of each LoRA and their masks.

    ``parts``: tag -> ((B, A), mask) or None when that file has no such layer, in the merger's tag order
    (content tags, then "s"). Buffers ``B_<tag>`` (out, r), ``A_<tag>`` (r, in·kh·kw), float32 (``None``
    when the file lacks the layer); masks ``m_<tag>``: parameters when ``learned`` else buffers, of length r
    (kind "rank"), out (kind "out") or in channels (kind "in").
    """

    def __init__(
        self,
        name: str,
        template: LowRank,
        kind: str,
        parts: Mapping[str, tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor] | None],
        learned: bool,
    ) -> None:
        super().__init__()
        if kind not in MASK_KINDS:
            raise ValueError(f"mask kind {kind!r} is not one of {MASK_KINDS}")
        self.name = name
        self.kind = kind
        self.learned = learned
        self.tags: tuple[str, ...] = tuple(parts)
        # Shape-only copy of a file layer, so the export can rebuild the same layer kind (linear/conv).
        self.template = LowRank(torch.empty(template.up.shape, device="meta"),
                                torch.empty(template.down.shape, device="meta"))
        self.is_conv = template.is_conv
        self.kernel_size = template.kernel_size
        self.out_features = template.out_features
        self.in_channels = template.in_features
        # Hosts build mergers under torch.inference_mode(); inference tensors cannot take part in the
        # autograd graph of the optimisation, so every tensor kept here is an ordinary one.
        with torch.inference_mode(False):
            for tag, part in parts.items():
                B, A = part[0] if part is not None else (None, None)
                # Factors are not part of state_dict(): it holds just the masks (a small, savable result).
                self.register_buffer(f"B_{tag}", None if B is None else _ordinary(B), persistent=False)
                self.register_buffer(f"A_{tag}", None if A is None else _ordinary(A), persistent=False)
                if part is None:
                    self.register_buffer(f"m_{tag}", None)
                elif learned:
                    setattr(self, f"m_{tag}", nn.Parameter(part[1].detach().to(torch.float32).clone()))
                else:
                    self.register_buffer(f"m_{tag}", part[1].detach().to(torch.float32).clone())

    @property
    def present(self) -> tuple[str, ...]:
        """The tags of the LoRAs that patch this layer, in order."""
        return tuple(t for t in self.tags if getattr(self, f"B_{t}") is not None)

    # -- shapes --------------------------------------------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.is_conv:
            return (self.out_features, self.in_channels, *self.kernel_size)
        return (self.out_features, self.in_channels)

    def factors(self, which: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, A) of LoRA ``which`` (a tag: "c", "c2", …, "s") as 2-D tensors, or None when that file lacks
        the layer."""
        B = getattr(self, f"B_{which}")
        return None if B is None else (B, getattr(self, f"A_{which}"))

    def mask(self, which: str) -> torch.Tensor | None:
        return getattr(self, f"m_{which}")

    def rank(self, which: str) -> int:
        f = self.factors(which)
        return 0 if f is None else int(f[1].shape[0])

    # -- the update ------------------------------------------------------------------------------------
    def masked_factors(
        self, which: str, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B_eff, A_eff) with the mask (default: this layer's own) folded into one factor.

        B_eff·A_eff is this LoRA's contribution to ΔW, as (out, r) and (r, in·kh·kw) matrices.
        """
        f = self.factors(which)
        if f is None:
            return None
        B, A = f
        m = self.mask(which) if mask is None else mask
        if self.kind == RANK:
            return B * m[None, :], A
        if self.kind == OUT:
            return B * m[:, None], A
        taps = self.kernel_size[0] * self.kernel_size[1]
        # A's columns are (channel, kh, kw) flattened: one channel's entry covers its kh·kw taps.
        return B, A * m.repeat_interleave(taps)[None, :]

    def delta(self) -> torch.Tensor:
        """Dense ΔW with the patched weight's shape. For tests and tiny layers only."""
        total = torch.zeros(self.out_features, self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        total = total.to(device=self._device())
        for which in self.tags:
            mf = self.masked_factors(which)
            if mf is not None:
                total = total + mf[0] @ mf[1]
        return total.reshape(self.weight_shape)

    def _device(self) -> torch.device:
        for tag in self.present:
            return getattr(self, f"B_{tag}").device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        ranks = ", ".join(f"r_{t}={self.rank(t)}" for t in self.tags)
        return f"{self.name}, kind={self.kind}, {ranks}, learned={self.learned}"


def component_weights(layer: MergedLayer, which: str) -> torch.Tensor:
    """Weight of each mask entry of ``which`` ("c"/"s") in that LoRA's nuclear norm, shape of the mask.

    Rank masks: wᵢ = ‖B[:, i]‖·‖A[i, :]‖. In the SVD basis (B' = U·Σ^½, A' = Σ^½·Vᵀ, the default) that is exactly
    σᵢ, the i-th singular value of the layer's ΔW, so Σᵢ wᵢ·|mᵢ| = ‖B'·diag(m)·A'‖_* (the nuclear norm of the
    masked update); in the raw basis it is the upper bound the triangle inequality gives. Zero-padded or
    duplicated components change nothing: a zero component weighs 0, and the SVD re-factoring turns split
    components back into the same σᵢ. Feature masks (ZipLoRA): the norm of the row (out) or of the input
    channel's columns (in) of ΔW that the entry scales. Detached; cached per device (the factors are frozen).
    """
    cache = layer.__dict__.setdefault("_prior_weights", {})
    B, A = layer.factors(which)
    key = (which, B.device)
    w = cache.get(key)
    if w is None:
        # Ordinary tensors even when a host calls this under inference mode: w is saved for backward.
        with torch.inference_mode(False), torch.no_grad():
            if layer.kind == RANK:
                w = B.norm(dim=0) * A.norm(dim=1)
            elif layer.kind == OUT:
                # ‖row j of B·A‖ = √(B_j·(A·Aᵀ)·B_jᵀ), without the dense product.
                w = ((B @ (A @ A.T)) * B).sum(1).clamp_min(0).sqrt()
            else:
                col = ((A.T @ (B.T @ B)) * A.T).sum(1).clamp_min(0)  # ‖column of ΔW‖² per (channel, tap)
                w = col.reshape(layer.in_channels, -1).sum(1).sqrt()
            w = w.detach().float()
        cache[key] = w
    return w
