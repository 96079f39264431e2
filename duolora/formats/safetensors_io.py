"""The safetensors container, read without trusting it: the header checked before any tensor is read (pickle
files refused by name and by magic bytes, so nothing is ever unpickled), tensors or shape-only ``meta`` tensors,
and NaN/Inf checks one tensor at a time."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import PICKLE_SUFFIXES, MissingFileError, NotSafetensorsError, PickleFileError, display_name
from .keys import patch_of

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """Validate the safetensors container without trusting it: (tensor entries, metadata).

    Refuses pickle files by name and by magic bytes before anything else, so nothing is ever unpickled.
    """
    p = Path(path)
    name = display_name(path)
    if not p.exists():
        raise MissingFileError(f"{name}: file not found ({p}). Check the path or the file name.", path)
    if p.is_dir():
        raise NotSafetensorsError(f"{name} is a folder, not a LoRA file. Pick a .safetensors file.", path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleFileError(_pickle_message(name), path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(9)
        # pickle protocol 2-5 starts with 0x80 <proto>; torch.save's zip container with "PK\x03\x04". A
        # safetensors file starts with its header length (u64, little-endian) and then "{": a 640-byte header
        # is 80 02 00 … — pickle's magic — so the length must not make a real header look like a pickle.
        # (Parsing JSON never runs code, so taking a pickle for a header would still unpickle nothing.)
        n_claimed = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
        header_like = head[8:9] == b"{" and 0 < n_claimed <= min(_MAX_HEADER, size - 8)
        if not header_like and ((len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
                                or head[:4] == b"PK\x03\x04"):
            raise PickleFileError(_pickle_message(name), path)
        head = head[:8]
        f.seek(8)
        if len(head) < 8:
            raise NotSafetensorsError(
                f"{name} is not a safetensors file: it has only {size} bytes. "
                "Re-download it or export it again as .safetensors.", path)
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER or n > size - 8:
            raise NotSafetensorsError(
                f"{name} is not a safetensors file (or is truncated/corrupt): its first 8 bytes announce a "
                f"{n}-byte header, but the file has {size} bytes. Re-download it or export it again as "
                ".safetensors.", path)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise TypeError("header is not a JSON object")
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise NotSafetensorsError(
            f"{name} is not a safetensors file (or is corrupt): its header is not valid JSON ({e}). "
            "Re-download it or export it again as .safetensors.", path) from None
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise NotSafetensorsError(f"{name} has a corrupt safetensors header: __metadata__ is not a mapping. "
                                  "Re-export the file.", path)
    not_strings = {k: v for k, v in meta.items() if not isinstance(v, str)}
    if not_strings:
        raise NotSafetensorsError(_metadata_not_strings_message(name, not_strings, len(meta)), path)
    end = 0
    for key, entry in header.items():
        try:
            begin, stop = (int(x) for x in entry["data_offsets"])
            shape = [int(x) for x in entry["shape"]]
            if "dtype" not in entry:
                raise KeyError("dtype")
        except (KeyError, TypeError, ValueError):
            raise NotSafetensorsError(
                f"{name} has a corrupt safetensors header (entry '{key}' lacks dtype/shape/offsets). "
                "Re-download it or export it again.", path) from None
        if stop < begin or any(s < 0 for s in shape):
            raise NotSafetensorsError(f"{name} has a corrupt safetensors header (entry '{key}'). "
                                      "Re-download it or export it again.", path)
        end = max(end, stop)
    available = size - 8 - n
    if end > available:
        raise NotSafetensorsError(
            f"{name} is truncated: its header describes {end} bytes of tensor data but only {available} "
            "are present. Re-download the file or export it again.", path)
    return header, {str(k): str(v) for k, v in meta.items()}


_JSON_KINDS = ((bool, "a boolean"), (int, "a number"), (float, "a number"), (list, "a list"), (dict, "an object"))


def _metadata_not_strings_message(name: str, not_strings: Mapping[str, object], total: int) -> str:
    key, value = next(iter(not_strings.items()))
    kind = "null" if value is None else next(k for t, k in _JSON_KINDS if isinstance(value, t))
    shown = json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:39] + "…"
    n = len(not_strings)
    return (f"{name}: {n} of the {total} metadata values in its header {'is' if n == 1 else 'are'} not a string "
            f"(e.g. '{key}': {shown}, {kind}). The safetensors format allows only strings there, so safetensors "
            "readers (ComfyUI's loader too) refuse the file; its tensors are intact. Re-saving it with every "
            "metadata value written as a string (\"16\", not 16) fixes it.")


def _pickle_message(name: str) -> str:
    return (f"{name} is a pickle-based PyTorch file (.ckpt/.pt/.pth/.bin). Loading such a file can run "
            "arbitrary code, so DuoLoRA never opens it. Convert it to .safetensors (in a trusted, isolated "
            "environment) and load the .safetensors file instead.")


def read_tensors(path: str | os.PathLike[str], header: dict[str, dict], lazy: bool) -> dict[str, torch.Tensor]:
    """Tensors of a validated file; ``lazy`` gives meta tensors (shape + dtype only) except alphas and the
    bias/norm differences (small, and inspect/merge report or carry their values)."""
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            for key, entry in header.items():
                if lazy and not key.endswith(".alpha") and patch_of(key, entry["shape"]) is None:
                    dtype = _ST_DTYPES.get(entry["dtype"], torch.float32)
                    out[key] = torch.empty(entry["shape"], dtype=dtype, device="meta")
                else:
                    out[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise NotSafetensorsError(
            f"{display_name(path)} could not be read as safetensors ({type(e).__name__}: {e}). "
            "Re-download it or export it again.", path) from None
    return out


def all_finite(t: torch.Tensor) -> bool:
    """True if ``t`` holds no NaN/Inf.

    A float64 sum is finite exactly when every element is (it cannot overflow for float32/16 data), and it
    is one cheap reduction instead of an elementwise mask: much faster on a busy CPU.
    """
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def non_finite_keys(path: str | os.PathLike[str]) -> list[str]:
    """Tensor keys of a file containing NaN or Inf, read one tensor at a time (low memory)."""
    header, _ = read_header(path)
    bad = []
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        for key in header:
            t = f.get_tensor(key)
            if t.is_floating_point() and not all_finite(t):
                bad.append(key)
    return bad
