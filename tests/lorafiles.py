"""Helpers that make LoRA files (good and malformed) for the format, fixture and inspect tests.

Every SDXL LoRA made here is SYNTHETIC (seeded noise with SDXL's real layer names and shapes): no real SDXL
LoRA is small enough to ship (shared/fixtures/SOURCES.md).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures" / "loras"

# One SDXL attention layer in every spelling (shape (640, 2048): attn2.to_k of input_blocks.4.1).
SDXL_TO_K = "input_blocks.4.1.transformer_blocks.0.attn2.to_k"
SDXL_TO_K_KOHYA = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
SDXL_TO_Q_KOHYA = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as a safetensors file (contiguous copies) and return the path."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(path), metadata=metadata)
    return path


def kohya_layer(module: str, out_f: int, in_f: int, rank: int, alpha: float | None = None,
                seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """lora_down (rank, in), lora_up (out, rank) [+ alpha] tensors of one kohya-style linear layer."""
    g = torch.Generator().manual_seed(seed)
    t = {
        f"{module}.lora_down.weight": torch.randn(rank, in_f, generator=g).to(dtype),
        f"{module}.lora_up.weight": torch.randn(out_f, rank, generator=g).to(dtype),
    }
    if alpha is not None:
        t[f"{module}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return t


def random_bytes(path: Path, n: int = 4096, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(data)
    return path


def truncated_copy(src: Path, dst: Path, keep: float = 0.7) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def header_length(path: Path) -> int:
    """The safetensors header length field (first 8 bytes, little-endian u64)."""
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def checkpoint_like(path: Path) -> Path:
    """A small safetensors file spelled like a full SD checkpoint (no LoRA tensors)."""
    return write(path, {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "model.diffusion_model.input_blocks.0.0.bias": torch.zeros(8),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
    })


class Tripwire:
    """Unpickling this object creates ``marker``: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def pickle_with_tripwire(path: Path, marker: Path, zip_container: bool = True) -> Path:
    """A torch.save file whose unpickling touches ``marker`` (zip container, or the legacy bare pickle)."""
    torch.save({"state_dict": {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, "t": Tripwire(marker)},
               os.fspath(path), _use_new_zipfile_serialization=zip_container)
    return path
