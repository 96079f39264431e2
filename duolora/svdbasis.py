"""The SVD basis of a LoRA layer (docs/method.md §2, basis decision): ΔW = B·A re-factored as B' = U·Σ^½,
A' = Σ^½·Vᵀ without forming the dense out×in product, one batched QR/SVD per factor shape.

ZipRank masks the SVD-basis factors by default (``ZipRankMerger(basis="svd")``), so a zero mask entry removes one
singular direction; the weights-only problem of a raw-basis merger takes its down factors A' from here
(``duolora.quadratics.weights_quadratics``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Factor pairs per batched QR/SVD call: bounds the stacked copies (64 pairs of SDXL's largest rank-64
# attention factors are about 40 MB) while leaving too few calls for their overhead to matter.
SVD_BATCH = 64


def svd_refactor(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-factor ΔW = B·A into its SVD basis: B' = U·Σ^½, A' = Σ^½·Vᵀ with B'·A' = B·A.

    B: (out, r), A: (r, n). Returns B' (out, k), A' (k, n) with k = min(r, out, n) (k = r on every real
    layer), columns ordered by decreasing singular value. Costs two thin QRs and one r×r SVD, never the
    dense out×n product (docs/method.md §2, basis decision). Returns float32; B'·A' = B·A to float32 rounding.
    ``svd_refactor_many`` does the same for many pairs with one batched call per shape.
    """
    return svd_refactor_many([(B, A)])[0]


def svd_refactor_many(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], batch: int = SVD_BATCH
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``svd_refactor`` of every (B, A) in ``pairs``, in order.

    Pairs of equal shapes (out, r), (r, n) on the same device are stacked, up to ``batch`` at a time, and
    share one batched QR of the B's, one of the Aᵀ's and one batched r×r SVD, instead of three LAPACK calls
    and a dozen small tensor operations per pair (SDXL: 1,120 pairs per merge, in 4 shapes). Each pair's
    result equals its own ``svd_refactor`` to float32 rounding (LAPACK factors every matrix of a batch on
    its own; only the final products may round differently). The results of one batch are views of one
    stacked tensor, so they live and die together.
    """
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(pairs)
    groups: dict[tuple, list[int]] = {}
    for i, (B, A) in enumerate(pairs):
        groups.setdefault((tuple(B.shape), tuple(A.shape), B.device), []).append(i)
    for (b_shape, a_shape, device), idx in groups.items():
        if device.type == "meta":
            # Shape-only factors (parameter counting on full SDXL shapes): nothing to compute.
            k = min(b_shape[1], b_shape[0], a_shape[1])
            for i in idx:
                out[i] = (torch.empty(b_shape[0], k, device="meta"), torch.empty(k, a_shape[1], device="meta"))
            continue
        for lo in range(0, len(idx), max(1, int(batch))):
            part = idx[lo:lo + max(1, int(batch))]
            for i, factors in zip(part, _svd_refactor_stacked(
                    torch.stack([pairs[i][0].detach().to(torch.float32) for i in part]),
                    torch.stack([pairs[i][1].detach().to(torch.float32) for i in part]))):
                out[i] = factors
    return out  # type: ignore[return-value]


def _svd_refactor_stacked(B: torch.Tensor, A: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The SVD basis of each B[i]·A[i]; B (L, out, r), A (L, r, n) float32."""
    # The thin QRs run in float32 (float64 LAPACK QR is several times slower on tall matrices, and the
    # result is float32 anyway); the small r×r core is factored in float64.
    qb, rb = torch.linalg.qr(B)  # B = Qb·Rb
    qa, ra = torch.linalg.qr(A.transpose(1, 2))  # Aᵀ = Qa·Ra, so A = Raᵀ·Qaᵀ
    u, s, vh = torch.linalg.svd(rb.double() @ ra.double().transpose(1, 2), full_matrices=False)
    root = s.clamp_min(0).sqrt()
    b_new = qb @ (u * root[:, None, :]).to(torch.float32)
    a_new = (root[:, :, None] * vh).to(torch.float32) @ qa.transpose(1, 2)
    return [(b_new[j], a_new[j]) for j in range(b_new.shape[0])]
