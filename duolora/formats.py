"""Reading and writing LoRA files in every common key style; every validation error lives here.

Key styles (``LoRA.key_style``), shown for SDXL's ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``:

==========================  ==========================================================================
``kohya_ldm``               ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight``
                            (+ ``.lora_up.weight``, ``.alpha``; text encoders ``lora_te1_…``/``lora_te2_…``,
                            SD1.x ``lora_te_…``)
``kohya_diffusers``         ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down…``
``diffusers_peft``          ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``
                            (+ ``lora_B``; also without ``unet.``, with ``base_model.model.``;
                            text encoders ``text_encoder.…`` / ``text_encoder_2.…``)
``diffusers``               ``unet.down_blocks.….attn1.to_q.lora.down.weight`` (+ ``.lora.up.weight``;
                            text encoders ``….q_proj.lora_linear_layer.down.weight``)
``diffusers_attn_procs``    ``down_blocks.….attn1.processor.to_q_lora.down.weight`` (legacy; ``to_out_lora``)
``comfyui``                 ``diffusion_model.input_blocks.4.1.….attn1.to_q.lora_down.weight`` (+ lora_up,
                            alpha; text encoders ``text_encoders.clip_l.transformer.…``)
==========================  ==========================================================================

These are the styles written. Reading accepts every combination of a known prefix (``unet.``, ``lora_unet_``,
``diffusion_model.``, ``model.diffusion_model.``, ``base_model.model.``, the text-encoder equivalents), path
style (LDM or diffusers) and suffix (``lora_down/up``, ``lora_A/B``, ``lora.down/up``): ``duolora.sdxl``'s
aliases; other combinations get labels such as ``unet.<ldm>.lora_down`` (OneTrainer).

Inside the engine every layer has its canonical name (shared/docs/ARCHITECTURE.md) and ``up`` carries the
scale (docs/method.md §1), so ΔW = up @ down; the scale is read where the file's writer keeps it (``.alpha``
tensors, PEFT ``lora_adapter_metadata``: ``_layer_scale``). Bias/norm differences ComfyUI applies are
``LoRA.patches``. Files are never unpickled: only safetensors is read.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import re
import stat
import struct
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .families import BASE_LABELS, BASE_LAYOUTS, KNOWN_LAYOUTS, STANDARD_LAYOUTS, family_of
from .families.sdxl import SDXL_LAYOUT, attn_procs_spelling
from .layout import (
    ALIAS_ATTN_PROCS,
    ALIAS_COMFYUI,
    ALIAS_KOHYA_DIFFUSERS,
    ALIAS_KOHYA_LDM,
    ALIAS_KOHYA_TE,
    ALIAS_XLABS,
    Layer,
    Layout,
    is_attention_projection,
)
from .lora import FLOAT8_DTYPES, TEXT_ENCODER_PREFIXES, LoRA, LowRank, SkippedKey

KEY_STYLES: tuple[str, ...] = (
    "kohya_ldm",
    "kohya_diffusers",
    "diffusers_peft",
    "diffusers",
    "diffusers_attn_procs",
    "comfyui",
)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


# --------------------------------------------------------------------------------------------- errors
class LoRAError(Exception):
    """A LoRA file (or an in-memory LoRA) that cannot be used, with a message for the user.

    Every message names the file, says what is wrong and what to do. ``path`` is the file (or None).
    """

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = os.fspath(path) if path is not None else None

    def __str__(self) -> str:
        return self.message


class MissingFileError(LoRAError, FileNotFoundError):
    """The path does not exist."""


class NotSafetensorsError(LoRAError):
    """Not a safetensors file, truncated, or with a corrupt header."""


class PickleFileError(LoRAError):
    """A pickle-based PyTorch file (.ckpt/.pt/.bin/.pth): refused without unpickling."""


class NotALoRAError(LoRAError):
    """A valid safetensors file that is not a LoRA (a checkpoint, a VAE, an embedding, …)."""


class UnknownKeyStyleError(LoRAError):
    """Tensor names that no supported LoRA key style explains (``base``: detected from shapes, if any)."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, base: str = "unknown") -> None:
        super().__init__(message, path)
        self.base = base


class UnsupportedAdapterError(LoRAError):
    """A LyCORIS/PEFT adapter that is not a low-rank LoRA (LoHa, LoKr, DoRA, …)."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, algorithm: str = "",
                 base: str = "unknown") -> None:
        super().__init__(message, path)
        self.algorithm = algorithm
        self.base = base


class WrongBaseModelError(LoRAError):
    """A LoRA made for another base model (SD1.x, SD2.x, or none we know)."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, base: str = "unknown",
                 expected: str = "sdxl") -> None:
        super().__init__(message, path)
        self.base = base
        self.expected = expected


class LayerMismatchError(LoRAError):
    """Layers missing from the target layout or with the wrong shape."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None,
                 layers: list[str] | None = None) -> None:
        super().__init__(message, path)
        self.layers = layers or []


class RankMismatchError(LoRAError):
    """lora_up and lora_down of one layer disagree on the rank."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, layer: str = "") -> None:
        super().__init__(message, path)
        self.layer = layer


class MalformedLoRAError(LoRAError):
    """A layer with a missing factor, impossible tensor shapes, or a layer spelled twice."""


class NonFiniteError(LoRAError):
    """NaN or Inf in a layer."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None,
                 layers: list[str] | None = None) -> None:
        super().__init__(message, path)
        self.layers = layers or []


class EmptyLoRAError(LoRAError):
    """No tensors, or no LoRA layers."""


class OutputExistsError(LoRAError, FileExistsError):
    """save_lora would overwrite an existing file."""


class OutputNameError(LoRAError, ValueError):
    """An output file name that does not end in .safetensors (the only format written)."""


def refuse_output_name(path: str | os.PathLike[str]) -> None:
    """Raise OutputNameError unless ``path`` ends in .safetensors: what is written is always safetensors, and
    loaders go by the name."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        why = (f"ComfyUI would refuse a {p.suffix} file as pickle-based" if p.suffix.lower() in PICKLE_SUFFIXES
               else "ComfyUI lists LoRA files by their extension")
        raise OutputNameError(
            f"{p.name}: the merged LoRA is written in the safetensors format, so its name must end in "
            f".safetensors ({why}); use {p.stem}.safetensors.", p)


def _display(path: str | os.PathLike[str] | None) -> str:
    return os.path.basename(os.fspath(path)) if path is not None else "<in-memory LoRA>"


def _examples(items: Iterable[str], n: int = 3) -> str:
    items = list(items)
    shown = ", ".join(f"'{x}'" for x in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


# --------------------------------------------------------------------------------- safetensors access
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)


def _read_header(path: str | os.PathLike[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """Validate the safetensors container without trusting it: (tensor entries, metadata).

    Refuses pickle files by name and by magic bytes before anything else, so nothing is ever unpickled.
    """
    p = Path(path)
    name = _display(path)
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


def _load_tensors(path: str | os.PathLike[str], header: dict[str, dict], lazy: bool) -> dict[str, torch.Tensor]:
    """Tensors of a validated file; ``lazy`` gives meta tensors (shape + dtype only) except alphas and the
    bias/norm differences (small, and inspect/merge report or carry their values)."""
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            for key, entry in header.items():
                if lazy and not key.endswith(".alpha") and _patch_of(key, entry["shape"]) is None:
                    dtype = _ST_DTYPES.get(entry["dtype"], torch.float32)
                    out[key] = torch.empty(entry["shape"], dtype=dtype, device="meta")
                else:
                    out[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise NotSafetensorsError(
            f"{_display(path)} could not be read as safetensors ({type(e).__name__}: {e}). "
            "Re-download it or export it again.", path) from None
    return out


def _all_finite(t: torch.Tensor) -> bool:
    """True if ``t`` holds no NaN/Inf.

    A float64 sum is finite exactly when every element is (it cannot overflow for float32/16 data), and it
    is one cheap reduction instead of an elementwise mask: much faster on a busy CPU.
    """
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def non_finite_keys(path: str | os.PathLike[str]) -> list[str]:
    """Tensor keys of a file containing NaN or Inf, read one tensor at a time (low memory)."""
    header, _ = _read_header(path)
    bad = []
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        for key in header:
            t = f.get_tensor(key)
            if t.is_floating_point() and not _all_finite(t):
                bad.append(key)
    return bad


# ------------------------------------------------------------------------------------ key grammar
# (suffix, part, suffix family); longest match first.
_LORA_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_linear_layer.down.weight", "down", "diffusers"),
    (".lora_linear_layer.up.weight", "up", "diffusers"),
    (".lora_A.default.weight", "down", "peft"),
    (".lora_B.default.weight", "up", "peft"),
    (".lora_down.weight", "down", "kohya"),
    (".lora_up.weight", "up", "kohya"),
    # LyCORIS LoCon with use_tucker: lora_down (r, in, 1, 1) → lora_mid (r, r, kh, kw) → lora_up (out, r, 1, 1)
    (".lora_mid.weight", "mid", "kohya"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    ("_lora.down.weight", "down", "procs"),
    ("_lora.up.weight", "up", "procs"),
    (".lora.down.weight", "down", "diffusers"),
    (".lora.up.weight", "up", "diffusers"),
    # lora_A/lora_B without ".weight" (Mochi's trainer; ComfyUI's LoRAAdapter reads them)
    (".lora_A", "down", "peft"),
    (".lora_B", "up", "peft"),
    (".alpha", "alpha", ""),
)
# How each suffix family is written, for key-style labels of spellings outside KEY_STYLES.
_FAMILY_SUFFIX = {"kohya": ".lora_down", "peft": ".lora_A", "diffusers": ".lora.down", "procs": "_lora.down"}
# Adapters that are not low-rank LoRAs: suffix -> algorithm.
_ADAPTER_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".hada_w1_a", "LoHa"), (".hada_w1_b", "LoHa"), (".hada_w2_a", "LoHa"), (".hada_w2_b", "LoHa"),
    (".hada_t1", "LoHa"), (".hada_t2", "LoHa"),
    (".lokr_w1", "LoKr"), (".lokr_w1_a", "LoKr"), (".lokr_w1_b", "LoKr"), (".lokr_w2", "LoKr"),
    (".lokr_w2_a", "LoKr"), (".lokr_w2_b", "LoKr"), (".lokr_t2", "LoKr"),
    # DoRA's magnitude vector in every spelling: LyCORIS/kohya/ComfyUI ".dora_scale"; PEFT/diffusers
    # ".lora_magnitude_vector" (PEFT's state dict drops the ".weight" and the adapter name, in-memory
    # models keep them; diffusers' kohya conversion keeps the PEFT name on kohya modules)
    (".dora_scale", "DoRA"), (".lora_magnitude_vector", "DoRA"), (".lora_magnitude_vector.weight", "DoRA"),
    (".lora_magnitude_vector.default", "DoRA"), (".lora_magnitude_vector.default.weight", "DoRA"),
    (".oft_blocks", "OFT"), (".oft_diag", "OFT"), (".rescale", "OFT"),
    (".a1.weight", "GLoRA"), (".a2.weight", "GLoRA"), (".b1.weight", "GLoRA"), (".b2.weight", "GLoRA"),
    (".on_input", "IA3"), (".diff", "full"), (".set_weight", "set"),
)
_ADAPTER_NAMES = {
    "LoHa": "a LyCORIS LoHa (Hadamard-product) file",
    "LoKr": "a LyCORIS LoKr (Kronecker-product) file",
    "DoRA": "a DoRA (weight-decomposed LoRA) file",
    "OFT": "an OFT/BOFT (orthogonal fine-tuning) file",
    "GLoRA": "a LyCORIS GLoRA file",
    "IA3": "a LyCORIS (IA)^3 file",
    "full": "a full weight-difference file (LyCORIS 'full' / .diff)",
    "set": "a weight-replacement file (set_weight)",
}
# Dense differences ComfyUI adds to a parameter (comfy/lora.py load_lora): suffix -> parameter. A 1-D
# ".diff" (ComfyUI's LoRA training and extraction write one per norm weight) is the weight's difference too;
# a ".diff" of 2 or more dimensions replaces a low-rank layer by a full one and is refused ("full" above).
_PATCH_SUFFIXES: tuple[tuple[str, str], ...] = ((".diff_b", "bias"), (".b_norm", "bias"), (".w_norm", "weight"))
EMBEDDING_REASON = ("embedded textual-inversion token: not merged (ComfyUI's LoRA loader does not apply it "
                    "either; use the original file as an embedding for its token)")
_EMBEDDING_RE = re.compile(r"^(bundle_emb\..*|emb_params|string_to_param\..*|string_to_token\..*|clip_[lgh])$")
_CLONEOFSIMO_RE = re.compile(r"^(unet|text_encoder):\d+:(up|down)$")


# XLabs' Flux LoRA processors: double_blocks.N.processor.qkv_lora1.down.weight (lora1: the image stream, lora2:
# the text stream); their single-block qkv_lora/proj_lora end like diffusers' processors ("_lora.down.weight").
_XLABS_RE = re.compile(r"^(.+\.processor\.(?:qkv|proj)_lora[12])\.(down|up)\.weight$")


def split_key(key: str) -> tuple[str, str, str] | None:
    """(module, part, suffix family) for a LoRA tensor key, or None."""
    xlabs = _XLABS_RE.match(key)
    if xlabs is not None:
        return xlabs.group(1), xlabs.group(2), "xlabs"
    for suffix, part, family in _LORA_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], part, family
    return None


def _adapter_of(key: str) -> tuple[str, str] | None:
    """(module, algorithm) for a non-LoRA adapter tensor, or None."""
    for suffix, algo in _ADAPTER_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], algo
    return None


def _patch_of(key: str, shape: Iterable[int]) -> tuple[str, str] | None:
    """(module, "weight"/"bias") for a bias/norm difference tensor, or None."""
    for suffix, param in _PATCH_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], param
    if key.endswith(".diff") and len(key) > 5 and len(tuple(shape)) <= 1:
        module = key[:-5]
        # ComfyUI's UNet key map also names a bias by its own key (comfy/lora.py: "generic lora format for
        # not .weight"), so "<module>.bias.diff" patches that bias
        if module.endswith(".bias") and len(module) > 5:
            return module[:-5], "bias"
        return module, "weight"
    return None


def _syntactic_style(module: str, family: str) -> str:
    """The key style a module spelling suggests when no layout knows the layer."""
    if module.startswith(("lora_unet_", "lora_te")):
        return "kohya_diffusers" if re.match(r"lora_unet_(down|up)_blocks_|lora_unet_mid_block_", module) \
            else "kohya_ldm"
    if module.startswith(("diffusion_model.", "text_encoders.")):
        return "comfyui"
    return {"peft": "diffusers_peft", "procs": "diffusers_attn_procs"}.get(family, "diffusers")


def _style_of(alias_kind: str, family: str) -> str:
    """Key style of one resolved module from how its name and its suffix are spelled.

    The spellings of KEY_STYLES get their names; any other prefix/path/suffix combination is labelled by
    its parts, e.g. "unet.<ldm>.lora_down" (OneTrainer's SDXL UNet keys).
    """
    if alias_kind == ALIAS_KOHYA_LDM:
        return "kohya_ldm"
    if alias_kind == ALIAS_KOHYA_DIFFUSERS:
        return "kohya_diffusers"
    if alias_kind == ALIAS_KOHYA_TE:
        return "kohya"  # text encoders are spelled alike in both kohya styles
    if alias_kind == ALIAS_COMFYUI:
        return "comfyui"
    if alias_kind == ALIAS_XLABS:
        return "xlabs"
    if alias_kind == ALIAS_ATTN_PROCS or family == "procs":
        return "diffusers_attn_procs"
    if "<" in alias_kind:  # a combination outside KEY_STYLES: "<prefix><path>" + the suffix family
        return alias_kind + _FAMILY_SUFFIX.get(family, "")
    if family == "peft":
        return "diffusers_peft"
    if family == "kohya":
        return "comfyui"  # bare LDM/diffusers names with lora_down/lora_up
    return "diffusers"


# ----------------------------------------------------------------------------------- base detection
def _shapes_match(file_shape: tuple[int, ...], layer_shape: tuple[int, ...]) -> bool:
    if tuple(file_shape) == tuple(layer_shape):
        return True
    # a 1×1 conv and a linear layer of the same width are interchangeable (SD1.x proj_in/proj_out)
    a, b = tuple(file_shape), tuple(layer_shape)
    if len(a) != len(b) and {len(a), len(b)} == {2, 4}:
        four = a if len(a) == 4 else b
        return four[2:] == (1, 1) and a[:2] == b[:2]
    return False


def _base_hint(metadata: Mapping[str, str], modules: Iterable[str]) -> str | None:
    """The base a file's metadata or text-encoder prefixes claim (used only to break ties)."""
    version = metadata.get("ss_base_model_version", "").lower()
    arch = metadata.get("modelspec.architecture", "").lower()
    if version.startswith("sdxl") or "stable-diffusion-xl" in arch:
        return "sdxl"
    if version.startswith("sd_v2") or "stable-diffusion-v2" in arch or metadata.get("ss_v2") == "True":
        return "sd2"
    if version.startswith("sd_v1") or "stable-diffusion-v1" in arch:
        return "sd1"
    # kohya's sd-scripts writes "flux1" (and modelspec "flux-1-dev/lora"); Black Forest Labs' names say flux-1
    if version.startswith("flux1") or arch.startswith(("flux-1", "flux.1")):
        return "flux"
    mods = list(modules)
    if any(m.startswith("lora_te_") for m in mods) and not any(m.startswith("lora_te2_") for m in mods):
        return "sd1"  # kohya writes lora_te_ only for single-text-encoder models
    return None


def _expected_shape(layout: Layout, module: str) -> tuple[int, ...] | None:
    """The weight shape ``module`` patches in ``layout`` (a slice's rows for a Part of a fused layer), or None."""
    hit = layout.resolve_part(module)
    if hit is None:
        return None
    layer, _, index = hit
    if index is None:
        return layer.shape
    return (layer.parts[index].rows, *layer.shape[1:])


def _detect(shapes: Mapping[str, tuple[int, ...]], layouts: tuple[Layout, ...], hint: str | None
            ) -> tuple[Layout, int]:
    """The layout that explains most modules by name and shape: (layout, number of exact matches)."""
    best: tuple[tuple[int, int, int, int], Layout] | None = None
    for i, layout in enumerate(layouts):
        named = matched = 0
        for module, shape in shapes.items():
            expected = _expected_shape(layout, module)
            if expected is None:
                continue
            named += 1
            matched += _shapes_match(shape, expected)
        score = (matched, named, int(hint == layout.base), -i)
        if best is None or score > best[0]:
            best = (score, layout)
    assert best is not None
    return best[1], best[0][0]


def _context_width_base(widths: Iterable[int]) -> str | None:
    for w in widths:
        for layout in STANDARD_LAYOUTS:  # the UNet bases: their cross-attention reads the text embeddings
            if w == layout.config.context_dim:
                return layout.base
    return None


# ------------------------------------------------------------------------------------- scales
PEFT_METADATA_KEY = "lora_adapter_metadata"
# diffusers' save_lora_weights prefixes each component's LoraConfig with its pipeline attribute name
# (loaders/lora_base.py _pack_dict_with_prefix); a config without prefixes covers every module.
_PEFT_COMPONENTS = (("unet.", "unet"), ("transformer.", "unet"), ("text_encoder.", "te1"),
                    ("text_encoder_2.", "te2"))
_PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}  # peft.LoraConfig's own defaults
# PEFT's save_pretrained writes a folder: the tensors as adapter_model.safetensors (keys
# base_model.model.<module>.lora_A/lora_B.weight, no alpha) and the LoraConfig as adapter_config.json beside
# them, which PeftModel.from_pretrained reads for the scale (peft utils/constants.py SAFETENSORS_WEIGHTS_NAME,
# CONFIG_NAME; tuners/lora/layer.py update_layer).
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
# Module prefixes PEFT's state dict gives a model it wraps: a file spelled so and holding no scale of its
# own is likely a save_pretrained adapter whose scale stayed in its adapter_config.json.
_PEFT_WRAPPED_PREFIXES = ("base_model.model.", "unet.base_model.model.", "transformer.base_model.model.",
                          "text_encoder.base_model.model.", "text_encoder_2.base_model.model.")
SCALE_SOURCES = {
    "alpha_tensor": ".alpha tensors",
    "peft_metadata": "the header's lora_adapter_metadata (PEFT lora_alpha / r)",
    "peft_config": "the adapter_config.json beside the file (PEFT save_pretrained: lora_alpha / r)",
    "none": "nothing (no .alpha tensor, no lora_adapter_metadata): scale 1",
    "peft_config_missing": ("nothing, but the file looks like a PEFT adapter whose adapter_config.json "
                            "(lora_alpha / r) is not beside it: scale 1, which may be wrong"),
}
PEFT_CONFIG_MISSING_NOTE = (
    "it looks like a PEFT adapter (base_model.model.… lora_A/lora_B keys or the name adapter_model.safetensors, "
    "no .alpha tensors), whose scale lora_alpha / r PEFT keeps in an adapter_config.json beside it; none is "
    "there, so it is read at scale 1, which may be wrong. Keep the folder save_pretrained wrote "
    "(adapter_model.safetensors with its adapter_config.json) together")


@functools.lru_cache(maxsize=32)
def _cached_metadata(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, str], ...]:
    return tuple(_read_header(path)[1].items())


def _file_metadata(source: str | os.PathLike[str] | None) -> dict[str, str]:
    """The header metadata of ``source`` when it names a readable safetensors file, else {}."""
    if source is None:
        return {}
    try:
        st = os.stat(source)
        return dict(_cached_metadata(os.path.abspath(source), st.st_mtime_ns, st.st_size))
    except (OSError, ValueError, LoRAError):
        return {}


def peft_sidecar(source: str | os.PathLike[str] | None) -> Path | None:
    """The adapter_config.json beside ``source`` when ``source`` is a PEFT adapter_model.safetensors, else None.

    Only PEFT's own pair of names counts: a loras folder may hold one adapter_config.json beside many files,
    and only the adapter_model.safetensors save_pretrained wrote with it is described by it.
    """
    if source is None:
        return None
    p = Path(source)
    if p.name != PEFT_WEIGHTS_NAME:
        return None
    config = p.with_name(PEFT_CONFIG_NAME)
    return config if config.is_file() else None


def _sidecar_configs(source: str | None, name: str) -> dict[str, dict] | None:
    """The LoraConfig of the adapter_config.json beside ``source`` as {"*": config}, or None."""
    path = peft_sidecar(source)
    if path is None:
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise TypeError(f"a JSON {type(config).__name__}, not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise MalformedLoRAError(
            f"{name}: the {PEFT_CONFIG_NAME} beside it is not a JSON object ({e}), so the scale its writer meant "
            f"(PEFT lora_alpha / r) cannot be read. Save the adapter again with save_pretrained.", source) from None
    return {"*": config}


def _peft_configs(metadata: Mapping[str, str], name: str, source: str | None) -> dict[str, dict] | None:
    """The LoraConfig of each component ("unet", "te1", "te2") in ``lora_adapter_metadata``, or None.

    diffusers (≥ 0.35) writes it with ``save_lora_weights`` and builds ``peft.LoraConfig(**config)`` from it
    when loading (utils/peft_utils.py ``_create_lora_config``), so it decides the scale lora_alpha / r.
    """
    raw = metadata.get(PEFT_METADATA_KEY)
    if raw is None:
        return None
    try:
        config = json.loads(raw)
        if not isinstance(config, dict):
            raise TypeError(f"a JSON {type(config).__name__}, not an object")
    except (json.JSONDecodeError, TypeError) as e:
        raise MalformedLoRAError(
            f"{name}: its header's {PEFT_METADATA_KEY} is not a JSON object ({e}), so the scale its writer "
            "meant (PEFT lora_alpha / r) cannot be read. Re-export the LoRA.", source) from None
    parts: dict[str, dict] = {}
    bare: dict = {}
    for key, value in config.items():
        for prefix, component in _PEFT_COMPONENTS:
            if key.startswith(prefix):
                parts.setdefault(component, {})[key[len(prefix):]] = value
                break
        else:
            bare[key] = value
    if not parts and bare:
        parts = {"*": bare}
    return parts


def _looks_like_peft_adapter(source: str | None, modules: Iterable[str], families: Mapping[str, str]) -> bool:
    """True when a file without a scale of its own looks like a PEFT save_pretrained adapter: PEFT's file name,
    or lora_A/lora_B keys of a model PEFT wrapped (``base_model.model.…``)."""
    if source is not None and Path(source).name == PEFT_WEIGHTS_NAME:
        return True
    return any(m.startswith(_PEFT_WRAPPED_PREFIXES) and families.get(m) == "peft" for m in modules)


def _pattern_key(patterns: Mapping[str, object], module: str) -> str | None:
    """PEFT's get_pattern_key: the first pattern p (in order) with re.match(rf"(.*\\.)?({p})$", module)."""
    for p in patterns:
        try:
            hit = re.match(rf"(.*\.)?({p})$", module)
        except re.error:
            hit = re.match(rf"(.*\.)?({re.escape(p)})$", module)
        if hit:
            return p
    return None


def _peft_module_name(layer: Layer, part: int | None = None) -> str:
    """The module name PEFT matches rank_pattern/alpha_pattern against: the diffusers path in its model (of the
    slice ``part`` of a fused layer)."""
    if layer.is_text_encoder:
        return layer.diffusers.split(".", 1)[1]
    return layer.parts[part].path if part is not None else layer.diffusers


# Where a LoraConfig was found, as messages name it, and the reader that would refuse a contradiction.
_PEFT_PLACES = {"peft_metadata": (f"its header's {PEFT_METADATA_KEY}", "diffusers"),
                "peft_config": (f"the {PEFT_CONFIG_NAME} beside it", "PEFT")}


def _peft_scale(config: Mapping, layer: Layer, rank: int, module: str, name: str,
                source: str | None, place: str = "peft_metadata", part: int | None = None) -> tuple[float, float, str]:
    """(alpha, scale, detail) of one layer under a component's LoraConfig, as peft's LoraLayer sets it:
    scale = lora_alpha / r (lora_alpha / √r with use_rslora), r and lora_alpha from rank_pattern/alpha_pattern
    where a pattern matches. ``place``: where the config was found (a key of ``_PEFT_PLACES``)."""
    where, reader = _PEFT_PLACES[place]
    peft_name = _peft_module_name(layer, part)
    try:
        r = config.get("r", _PEFT_DEFAULTS["r"])
        alpha = config.get("lora_alpha", _PEFT_DEFAULTS["lora_alpha"])
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        via = []
        key = _pattern_key(rank_pattern, peft_name)
        if key is not None:
            r = rank_pattern[key]
            via.append(f"rank_pattern['{key}']")
        key = _pattern_key(alpha_pattern, peft_name)
        if key is not None:
            alpha = alpha_pattern[key]
            via.append(f"alpha_pattern['{key}']")
        r, alpha = int(r), float(alpha)
        rslora = bool(config.get("use_rslora", False))
    except (TypeError, ValueError, AttributeError) as e:
        raise MalformedLoRAError(
            f"{name}: {where} has a value that is not a number or a pattern mapping "
            f"({e}), so the scale its writer meant cannot be read. Re-export the LoRA.", source) from None
    if r != rank:
        raise MalformedLoRAError(
            f"{name}: layer '{module}' has rank {rank}, but {where} says r = {r} for it, "
            f"so {reader} could not load this file either and its scale is unknown. Re-export the LoRA.", source)
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    detail = f"lora_alpha {alpha:g} / {'√' if rslora else ''}r {r}" + (f" ({', '.join(via)})" if via else "")
    return alpha, scale, detail


def _layer_scale(layer: Layer, module: str, rank: int, alpha_tensor: torch.Tensor | None,
                 peft: dict[str, dict] | None, name: str, source: str | None,
                 sidecar: dict[str, dict] | None = None, part: int | None = None) -> tuple[float | None, float, str]:
    """(alpha, scale, source) of one layer, applied as the writer's own loader applies it.

    kohya (networks/lora.py), ComfyUI (comfy/weight_adapter/lora.py) and diffusers' kohya conversion all read a
    per-module ``.alpha`` tensor as scale alpha/rank and use scale 1 without one — kohya's loader sets
    alpha = rank for modules without alpha, so a file's ``ss_network_alpha`` metadata is NOT applied. diffusers'
    own files keep the scale in ``lora_adapter_metadata`` instead, PEFT's save_pretrained folders in the
    ``adapter_config.json`` beside the file (``sidecar``). A file whose places disagree is ambiguous (each
    reader applies only its own: diffusers refuses it, ComfyUI applies only the tensor) and is refused unless
    they all give the same scale.
    """
    alpha = None
    if alpha_tensor is not None:
        if alpha_tensor.numel() != 1:
            raise MalformedLoRAError(
                f"{name}: the .alpha of '{module}' should hold one number but has shape "
                f"{tuple(alpha_tensor.shape)} (ComfyUI and kohya cannot read it either). Re-export the file.",
                source)
        if alpha_tensor.device.type != "meta":
            alpha = float(alpha_tensor.detach().to(torch.float64).item())
    # (source, alpha, scale, how a message states it), in the order that names the result
    found: list[tuple[str, float | None, float, str]] = []
    if alpha is not None:
        found.append(("alpha_tensor", alpha, alpha / rank, f"an .alpha tensor ({alpha:g}, scale {alpha / rank:g})"))
    component = "te1" if layer.name.startswith("te1.") else "te2" if layer.name.startswith("te2.") else "unet"
    for place, parts in (("peft_metadata", peft), ("peft_config", sidecar)):
        config = None if parts is None else parts.get(component, parts.get("*"))
        if config is not None:
            p_alpha, p_scale, detail = _peft_scale(config, layer, rank, module, name, source, place, part)
            found.append((place, p_alpha, p_scale, f"{_PEFT_PLACES[place][0]} says {detail} (scale {p_scale:g})"))
    if len(found) > 1 and not all(math.isclose(f[2], found[0][2], rel_tol=1e-6) for f in found[1:]):
        a, b = found[0], next(f for f in found[1:] if not math.isclose(f[2], found[0][2], rel_tol=1e-6))
        why = {("alpha_tensor", "peft_metadata"): "diffusers refuses a file with both and ComfyUI applies only "
                                                   "the tensor",
               ("alpha_tensor", "peft_config"): "PEFT ignores the tensor and ComfyUI applies only the tensor",
               ("peft_metadata", "peft_config"): "diffusers applies the header's and PEFT the adapter_config.json's"
               }[(a[0], b[0])]
        raise MalformedLoRAError(
            f"{name}: layer '{module}' has {a[3]} and {b[3]}. {why}, so what the file means is ambiguous. "
            "Re-export the LoRA.", source)
    if found:
        return found[0][1], found[0][2], found[0][0]
    return None, 1.0, "none"


# ------------------------------------------------------------------------------------------ reading
# A file whose unknown modules are at least this share of its modules is refused as made for another
# model; below it the SDXL part loads and the rest is named as skipped. An SDXL LoRA's modules are all
# SDXL layers; a few extra ones come from tools that also train something else. A quarter or more is no
# longer "a few": the merge would drop much of what the file does, and the file is likely for a model
# that only shares some names with SDXL.
UNKNOWN_SHARE_REFUSED = 0.25
UNKNOWN_LAYER_REASON = "layer that does not exist in {label}: left out of the merge"
UNKNOWN_SPELLING_REASON = "layer spelled with a prefix DuoLoRA does not recognise: left out of the merge"
UNKNOWN_PATCH_REASON = ("bias/norm difference of a parameter {label} does not have (ComfyUI does not apply it "
                        "either): left out of the merge")
RANK_ZERO_REASON = ("rank-0 layer (lora_down (0, in), lora_up (out, 0): a tool pruned all of its components): its "
                    "ΔW is zero, so it is left out")
ALPHA_ONLY_REASON = ("alpha without its layer's lora_down/lora_up (a tool removed the factors, e.g. the text "
                     "encoder's): an alpha alone does nothing in any loader, so it is ignored")


def state_dict_to_lora(
    sd: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    source: str | None = None,
    *,
    layouts: tuple[Layout, ...] | None = None,
) -> LoRA:
    """Parse a LoRA state dict in any supported key style into a LoRA (float32, scale folded into up).

    Detects the key style and the base model ("sdxl", "sd1", "sd2", "unknown") but does not refuse a
    wrong base: that is load_lora's job. Raises LoRAError subclasses for inputs that are not low-rank
    LoRAs or are malformed. Every key that is not loaded is listed in ``LoRA.skipped`` with a reason:
    rank-0 layers (ΔW = 0) and alphas without factors are left out this way, not refused.
    ``layouts`` are the candidate bases, tried in order (default: SDXL, SD1.x, SD2.x, Flux.1, Z-Image,
    Qwen-Image). Slices of a fused layer (diffusers' to_q/to_k/to_v of Flux's qkv) are fused (``_fuse``).

    The scale of each layer comes from where its writer keeps it (``_layer_scale``): ``.alpha`` tensors, the
    header's PEFT ``lora_adapter_metadata``, or the ``adapter_config.json`` PEFT's save_pretrained writes beside
    an ``adapter_model.safetensors``. Without ``metadata``, a ``source`` naming a safetensors file has its
    header's metadata read, so a caller passing some of a file's tensors gets the file's scale.
    LyCORIS Tucker convs (``lora_mid``) are folded into plain conv layers (``_fold_tucker``).
    Bias/norm differences (``.diff_b``, 1-D ``.diff``, ``.w_norm``, ``.b_norm``) become ``LoRA.patches``.
    """
    metadata = dict(metadata or {}) or _file_metadata(source)
    layouts = layouts or KNOWN_LAYOUTS
    name = _display(source)
    if not sd:
        raise EmptyLoRAError(f"{name} contains no tensors at all. Pick a LoRA file that has layers.", source)

    keys = list(sd)
    if any(_CLONEOFSIMO_RE.match(k) for k in keys):
        raise _cloneofsimo_error(sd, source)

    groups: dict[str, dict[str, str]] = {}
    families: dict[str, str] = {}
    adapters: dict[str, str] = {}
    patch_keys: list[tuple[str, str, str]] = []
    skipped: list[SkippedKey] = []
    for key in keys:
        split = split_key(key)
        if split is not None:
            module, part, family = split
            groups.setdefault(module, {})[part] = key
            if family:
                families[module] = family
            continue
        patch = _patch_of(key, sd[key].shape)
        if patch is not None:
            patch_keys.append((key, *patch))
            continue
        adapter = _adapter_of(key)
        if adapter is not None:
            adapters[adapter[0]] = adapter[1]
            continue
        if _EMBEDDING_RE.match(key):
            skipped.append(SkippedKey(key, EMBEDDING_REASON, "ignored", module=key))
        else:
            skipped.append(SkippedKey(key, "not a LoRA tensor name DuoLoRA knows", "unknown_key", module=key))

    if adapters:
        raise _adapter_error(sd, adapters, groups, metadata, layouts, source)
    peft = _peft_configs(metadata, name, source)
    if peft is not None and any(bool(c.get("use_dora")) for c in peft.values()):
        raise _adapter_error(sd, dict.fromkeys(m for m, g in groups.items() if "down" in g), groups, metadata,
                             layouts, source, algorithm="DoRA", evidence=f"its {PEFT_METADATA_KEY} says use_dora")
    sidecar = _sidecar_configs(source, name)
    if sidecar is not None:
        _check_sidecar_type(sidecar["*"], sd, groups, metadata, layouts, source)

    lora_modules = {m: g for m, g in groups.items() if g.keys() & {"up", "down", "mid"}}
    alpha_only = [m for m in groups if m not in lora_modules]
    if not lora_modules:
        if patch_keys:
            raise EmptyLoRAError(
                f"{name} holds only bias/norm differences ({len(patch_keys)} tensors, e.g. "
                f"{_examples(sorted(k for k, _, _ in patch_keys))}) and no low-rank layer, so there is nothing "
                "to merge. Pick a LoRA file that has layers.", source)
        if alpha_only and not skipped:
            raise EmptyLoRAError(
                f"{name} holds only .alpha tensors ({len(alpha_only)}, e.g. "
                f"{_examples(sorted(groups[m]['alpha'] for m in alpha_only))}) and no lora_down/lora_up factors: "
                "an alpha alone does nothing, so there is nothing to merge. Pick a LoRA file that has layers.",
                source)
        raise _not_lora_error(keys, source)
    for module in alpha_only:
        skipped.append(SkippedKey(groups[module]["alpha"], ALPHA_ONLY_REASON, "ignored", module=module))

    # shapes and ranks first (they decide the base), values later
    shapes: dict[str, tuple[int, ...]] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    empty: set[str] = set()
    for module, g in lora_modules.items():
        if "up" not in g or "down" not in g:
            have = [p for p in ("down", "mid", "up") if p in g]
            miss = [p for p in ("down", "up") if p not in g]
            raise MalformedLoRAError(
                f"{name}: layer '{module}' has a {' and a '.join(have)} tensor but no {' or '.join(miss)} tensor, "
                "so the file is incomplete. Re-download it or export it again.", source)
        up, down = sd[g["up"]], sd[g["down"]]
        rank = int(down.shape[0]) if down.dim() else -1
        if "mid" in g:
            mid = sd[g["mid"]]
            down = _fold_tucker(module, mid, down, name, source)
            rank = min(rank, *(int(x) for x in mid.shape[:2]))
        shapes[module] = _weight_shape(module, up, down, name, source)
        factors[module] = (up, down)
        if rank == 0 or int(down.shape[0]) == 0:
            empty.add(module)

    hint = _base_hint(metadata, lora_modules)
    layout, matched = _detect(shapes, layouts, hint)
    base = layout.base if matched > 0 else "unknown"

    layers: dict[str, LowRank] = {}
    alphas: dict[str, float | None] = {}
    scales: dict[str, float] = {}
    sources: dict[str, str] = {}
    spelled: dict[str, str] = {}
    styles: Counter[str] = Counter()
    te_styles: Counter[str] = Counter()
    dtypes: Counter[torch.dtype] = Counter()
    slices: dict[str, list[tuple[int, str, torch.Tensor, torch.Tensor]]] = {}
    for module, g in lora_modules.items():
        if module in empty:
            skipped.extend(SkippedKey(key, RANK_ZERO_REASON, "ignored", module=module) for key in g.values())
            continue
        hit = layout.resolve_part(module)
        family = families.get(module, "")
        if hit is None:
            styles[_syntactic_style(module, family)] += 1
            kind, reason = _unknown_module(module, layout, layouts)
            skipped.extend(SkippedKey(key, reason, kind, module=module) for key in g.values())
            continue
        layer, alias_kind, part = hit
        earlier = spelled.get(layer.name)
        if earlier is not None and (part is None or layer.name not in slices):
            raise MalformedLoRAError(
                f"{name}: layer '{layer.name}' appears twice (as '{earlier}' and '{module}'). "
                "A LoRA file must hold each layer once; re-export it.", source)
        spelled.setdefault(layer.name, module)
        (te_styles if layer.is_text_encoder else styles)[_style_of(alias_kind, family)] += 1
        up, down = factors[module]
        dtypes[sd[g["down"]].dtype] += 1
        # the scale's rank is the file's lora_down rank, as every loader divides by it (for a Tucker layer
        # also lora_mid's, which is square)
        alpha, scale, scale_source = _layer_scale(layer, module, int(sd[g["down"]].shape[0]),
                                                  sd[g["alpha"]] if "alpha" in g else None, peft, name, source,
                                                  sidecar, part)
        up32, down32 = up.to(torch.float32), down.to(torch.float32)
        if down32.dim() == 4 and up32.dim() == 2:
            up32 = up32.reshape(*up32.shape, 1, 1)
        elif down32.dim() == 2 and up32.dim() == 4:
            up32 = up32.reshape(up32.shape[0], up32.shape[1])
        if scale != 1.0 and up32.device.type != "meta":
            up32 = up32 * scale
        if part is not None:
            slices.setdefault(layer.name, []).append((part, module, up32, down32))
        else:
            layers[layer.name] = LowRank(up32.contiguous(), down32.contiguous())
        alphas.setdefault(layer.name, alpha)
        scales.setdefault(layer.name, scale)
        sources.setdefault(layer.name, scale_source)
    for lname, found in slices.items():
        layers[lname] = _fuse(layout[lname], found, name, source)
    if sidecar is None and peft is None and "none" in sources.values() and _looks_like_peft_adapter(
            source, lora_modules, families):
        sources = {k: "peft_config_missing" if v == "none" else v for k, v in sources.items()}

    patches: dict[str, torch.Tensor] = {}
    patched_by: dict[str, str] = {}
    for key, module, param in patch_keys:
        hit = layout.resolve_module(module)  # by name, as layers are (load_lora checks the shapes)
        target = f"{hit[0].name}.{param}" if hit is not None else None
        if target is None or layout.param_shape(target) is None:
            skipped.append(SkippedKey(key, UNKNOWN_PATCH_REASON.format(label=layout.label), "ignored",
                                      module=module))
            continue
        if target in patches:
            raise MalformedLoRAError(
                f"{name}: the {param} of '{target}' is patched twice (by '{patched_by[target]}' and '{key}'). "
                "A LoRA file must hold each difference once; re-export it.", source)
        patches[target] = sd[key].to(torch.float32)
        patched_by[target] = key

    # layout (module) order, not the file's alphabetical key order: stable reports and messages
    order = layout.order()
    layers = dict(sorted(layers.items(), key=lambda kv: order[kv[0]]))
    return LoRA(
        layers=layers,
        metadata=metadata,
        source=source,
        key_style=_file_style(styles, te_styles),
        base=base,
        skipped=skipped,
        dtype=dtypes.most_common(1)[0][0] if dtypes else None,
        alphas={k: alphas[k] for k in layers},
        scales={k: scales[k] for k in layers},
        scale_sources={k: sources[k] for k in layers},
        patches=patches,
    )


def _fuse(layer: Layer, found: list[tuple[int, str, torch.Tensor, torch.Tensor]], name: str,
          source: str | None) -> LowRank:
    """One low-rank layer from a file's slices of a fused layer (``Part``s: diffusers' to_q/to_k/to_v of
    Flux's fused qkv), each (part index, module, up with its scale folded in, down), exactly as ComfyUI applies
    them: slice i adds up_i·down_i to rows start_i:start_i + rows_i, so the fused ΔW is
    blockdiag-placed up · [down_1; down_2; …] (rank Σ r_i; rows no slice patches stay zero).

    A file for a model of another width than the table's (a width-shrunk test model) gets the table's slice
    geometry scaled by the ratio of the input widths (every slice is a whole multiple of the hidden width).
    """
    widths = {int(down.shape[1]) for _, _, _, down in found}
    if len(widths) != 1:
        raise MalformedLoRAError(
            f"{name}: the slices of layer '{layer.name}' ({_examples([m for _, m, _, _ in found])}) read inputs of "
            f"different widths {sorted(widths)}; they patch one weight and must read the same input. Re-export "
            "the file.", source)
    width = widths.pop()
    ratio = width / layer.shape[1]
    rows_total = layer.shape[0] * ratio
    taken: list[tuple[int, int, str]] = []
    placed = []
    for index, module, up, down in sorted(found, key=lambda f: (layer.parts[f[0]].start, f[0])):
        part = layer.parts[index]
        start, rows = part.start * ratio, part.rows * ratio
        if int(up.shape[0]) != rows or not float(start).is_integer() or not float(rows).is_integer():
            raise MalformedLoRAError(
                f"{name}: '{module}' patches {int(up.shape[0])} rows of '{layer.name}', but that slice has "
                f"{rows:g} rows for an input width of {width}; the file does not fit the model's layout. "
                "Re-export the LoRA.", source)
        start, rows = int(start), int(rows)
        for other_start, other_rows, other in taken:
            if start < other_start + other_rows and other_start < start + rows:
                raise MalformedLoRAError(
                    f"{name}: '{module}' and '{other}' both patch rows of '{layer.name}' (rows {start}–"
                    f"{start + rows - 1} and {other_start}–{other_start + other_rows - 1}); a LoRA file must hold "
                    "each layer once. Re-export it.", source)
        taken.append((start, rows, module))
        if part.swap_halves and up.device.type != "meta":
            half = int(up.shape[0]) // 2
            up = torch.cat([up[half:], up[:half]])
        placed.append((start, rows, up, down))
    rank = sum(int(down.shape[0]) for _, _, _, down in placed)
    device = placed[0][3].device
    up_full = torch.zeros((int(rows_total), rank, *placed[0][2].shape[2:]), dtype=torch.float32, device=device)
    col = 0
    for start, rows, up, down in placed:
        r = int(down.shape[0])
        if device.type != "meta":
            up_full[start:start + rows, col:col + r] = up
        col += r
    down_full = torch.cat([down for _, _, _, down in placed])
    return LowRank(up_full.contiguous(), down_full.contiguous())


def _unknown_module(module: str, layout: Layout, layouts: tuple[Layout, ...]) -> tuple[str, str]:
    """(SkippedKey kind, reason) for a module no layout resolves: a known path behind a prefix no reader
    knows ("unknown_spelling"), or a layer the detected base model does not have ("unknown_layer")."""
    for candidate in (layout, *layouts):
        if candidate.find_known_path(module) is not None:
            return "unknown_spelling", UNKNOWN_SPELLING_REASON
    return "unknown_layer", UNKNOWN_LAYER_REASON.format(label=layout.label)


# Names some other model families give their layers: enough to say what a file probably is.
_FAMILY_HINTS: tuple[tuple[str, str], ...] = (
    (r"double_blocks|single_blocks|single_transformer_blocks", "Flux"),
    (r"joint_blocks|context_block", "Stable Diffusion 3"),
    (r"^lora_prior_", "Stable Cascade"),
    (r"adaln_single", "PixArt"),
    (r"blocks[._]\d+[._](cross_attn|self_attn)", "Wan (video)"),
)


def _family_hint(modules: Iterable[str]) -> str | None:
    """The model family a file's unknown module names suggest, or None."""
    votes: Counter[str] = Counter()
    for m in modules:
        for pattern, family in _FAMILY_HINTS:
            if re.search(pattern, m):
                votes[family] += 1
                break
    return votes.most_common(1)[0][0] if votes else None


def _fold_tucker(module: str, mid: torch.Tensor, down: torch.Tensor, name: str, source: str | None) -> torch.Tensor:
    """The down factor of a LyCORIS Tucker conv folded into a plain conv LoRA: down' = mid ∘ down.

    LyCORIS (``use_tucker``) writes lora_down (r, in, 1, 1), lora_mid (r, r, kh, kw) and lora_up (out, r, 1, 1): a
    1×1 conv into r channels, the kh×kw conv among them, a 1×1 conv out. Their composition is one kh×kw conv
    with down'[a, i, h, w] = Σ_b mid[a, b, h, w]·down[b, i], so up·down' is exactly the ΔW that LyCORIS, A1111
    and ComfyUI (comfy/weight_adapter/lora.py) apply, and the layer merges like any conv LoRA. Folded in
    float64, returned in float32; a ``meta`` (header-only) read gets a meta tensor of the folded shape.
    """
    if not (mid.is_floating_point() and down.is_floating_point()):
        raise MalformedLoRAError(
            f"{name}: layer '{module}' stores {down.dtype}/{mid.dtype} factors; LoRA factors must be "
            "floating point. Re-export the file.", source)
    if mid.dim() != 4 or down.dim() not in (2, 4) or (down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)):
        raise MalformedLoRAError(
            f"{name}: layer '{module}' has a lora_mid of shape {tuple(mid.shape)} with a lora_down of shape "
            f"{tuple(down.shape)}; a LyCORIS Tucker layer needs lora_down (rank, in, 1, 1) and lora_mid (rank, "
            "rank, kh, kw). Re-export the file.", source)
    if mid.shape[1] != down.shape[0]:
        raise RankMismatchError(
            f"{name}: layer '{module}' has a lora_mid of shape {tuple(mid.shape)} but a lora_down of rank "
            f"{down.shape[0]} {tuple(down.shape)}; lora_mid's second dimension must be lora_down's rank. The "
            "file is damaged; re-download or re-export it.", source, layer=module)
    shape = (int(mid.shape[0]), int(down.shape[1]), int(mid.shape[2]), int(mid.shape[3]))
    if mid.device.type == "meta" or down.device.type == "meta":
        return torch.empty(shape, dtype=torch.float32, device="meta")
    d = down.reshape(down.shape[0], down.shape[1]).to(torch.float64)
    return torch.einsum("abhw,bi->aihw", mid.to(torch.float64), d).to(torch.float32)


def _weight_shape(module: str, up: torch.Tensor, down: torch.Tensor, name: str,
                  source: str | None) -> tuple[int, ...]:
    """Shape of the weight a (up, down) pair patches; raises on impossible factor shapes or ranks."""
    if not (up.is_floating_point() and down.is_floating_point()):
        raise MalformedLoRAError(
            f"{name}: layer '{module}' stores {up.dtype}/{down.dtype} factors; LoRA factors must be "
            "floating point. Re-export the file.", source)
    if down.dim() not in (2, 4) or up.dim() not in (2, 4) or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise MalformedLoRAError(
            f"{name}: layer '{module}' has factors of shape up {tuple(up.shape)} / down {tuple(down.shape)}; "
            "a LoRA layer needs up (out, rank[, 1, 1]) and down (rank, in[, kh, kw]). Re-export the file.",
            source)
    if up.shape[1] != down.shape[0]:
        raise RankMismatchError(
            f"{name}: layer '{module}' has an up factor of rank {up.shape[1]} {tuple(up.shape)} but a down "
            f"factor of rank {down.shape[0]} {tuple(down.shape)}; both factors of a LoRA layer must have the "
            "same rank. The file is damaged; re-download or re-export it.", source, layer=module)
    return (int(up.shape[0]), *(int(s) for s in down.shape[1:]))


def _file_style(unet: Counter[str], te: Counter[str]) -> str:
    """The file's key style: the UNet keys' spelling (text-encoder keys decide only a text-encoder-only file).

    Styles spell text encoders alike in places (kohya_ldm and kohya_diffusers; diffusers and attention
    processors), so they do not vote when UNet keys exist. Mixed UNet spellings give "a+b".
    """
    styles = unet or te
    if not styles:
        return "unknown"
    if "kohya" in styles:
        styles["kohya_ldm"] += styles.pop("kohya")
    ranked = sorted(styles)
    return ranked[0] if len(ranked) == 1 else "+".join(ranked)


def _not_lora_error(keys: list[str], source: str | None) -> LoRAError:
    name = _display(source)
    keys = sorted(keys, key=lambda k: (not k.endswith(".weight"), k))  # show a weight as the example
    example = next((k for k in keys if k.startswith("model.diffusion_model.")), None)
    if example:
        return NotALoRAError(
            f"{name} is not a LoRA: it is a full Stable Diffusion checkpoint (e.g. key '{example}'). "
            "Load it with a checkpoint loader (Load Checkpoint) and pick LoRA files for DuoLoRA.", source)
    checks = (
        (("first_stage_model.", "encoder.down.", "decoder.up.", "quant_conv."), "a VAE", "Load VAE"),
        (("conditioner.embedders.", "cond_stage_model.", "text_model.", "clip_l.", "clip_g."),
         "a text-encoder checkpoint", "Load CLIP"),
        (("input_blocks.", "down_blocks.", "diffusion_model.", "model.diffusion_model", "conv_in."),
         "a diffusion-model (UNet) checkpoint", "Load Diffusion Model"),
    )
    for prefixes, what, loader in checks:
        example = next((k for k in keys if k.startswith(prefixes)), None)
        if example:
            return NotALoRAError(
                f"{name} is not a LoRA: it looks like {what} (e.g. key '{example}'). Load it with "
                f"{loader} and pick LoRA files for DuoLoRA.", source)
    if all(_EMBEDDING_RE.match(k) for k in keys):
        return NotALoRAError(
            f"{name} is not a LoRA: it is a textual-inversion embedding (keys {_examples(keys)}). "
            "Use it in the prompt as an embedding and pick LoRA files for DuoLoRA.", source)
    return UnknownKeyStyleError(
        f"{name}: no LoRA layers found; its tensor names match no known LoRA key style "
        f"(e.g. {_examples(sorted(keys))}). Supported: kohya (lora_unet_…), diffusers/PEFT (…lora_A/"
        "lora_B, ….lora.down), diffusers attention processors, ComfyUI (diffusion_model.…lora_up).", source)


def _adapter_error(sd: Mapping[str, torch.Tensor], adapters: dict[str, str | None],
                   groups: dict[str, dict[str, str]], metadata: Mapping[str, str], layouts: tuple[Layout, ...],
                   source: str | None, *, algorithm: str | None = None, evidence: str = "") -> UnsupportedAdapterError:
    name = _display(source)
    algos = Counter(a for a in adapters.values() if a) or Counter({algorithm or "DoRA": len(adapters)})
    algo = algorithm or ("DoRA" if "DoRA" in algos else algos.most_common(1)[0][0])
    # the base model, for the message: from the adapters' effective shapes and any plain LoRA pairs (DoRA)
    shapes = {m: s for m in adapters if (s := _adapter_shape(sd, m)) is not None}
    for module, g in groups.items():
        up, down = sd.get(g.get("up", "")), sd.get(g.get("down", ""))
        if up is not None and down is not None and up.dim() >= 2 and down.dim() >= 2:
            shapes.setdefault(module, (int(up.shape[0]), *(int(x) for x in down.shape[1:])))
    base = "unknown"
    if shapes:
        layout, matched = _detect(shapes, layouts, _base_hint(metadata, shapes))
        base = layout.base if matched > 0 else "unknown"
    what = _ADAPTER_NAMES[algo]
    if len(algos) > 1:
        what += " (also " + ", ".join(a for a in algos if a != algo) + ")"
    made_for = f", made for {BASE_LABELS[base]}" if base != "unknown" else ""
    # the file's modules: the adapters' and the plain LoRA layers beside them (a DoRA module is both)
    total = len(set(adapters) | {m for m, g in groups.items() if g.keys() & {"up", "down", "mid"}})
    if total > len(adapters):
        head = (f"{name} is {what}{made_for}, not a low-rank LoRA: {len(adapters)} of its {total} modules are "
                f"{algo} modules (the other {total - len(adapters)} are low-rank LoRA layers).")
    else:
        head = f"{name} is {what} with {len(adapters)} modules{made_for}, not a low-rank LoRA."
    if algo == "DoRA":
        suffixes = sorted({"dora_scale" if k.endswith(".dora_scale") else "lora_magnitude_vector"
                           for k in sd if (hit := _adapter_of(k)) is not None and hit[1] == "DoRA"})
        spelled = evidence or "its " + " and ".join(suffixes) + " tensors"
        return UnsupportedAdapterError(
            f"{head} Besides its low-rank factors it stores a magnitude per output channel ({spelled}) that "
            "rescales every patched weight after the low-rank update, so its effect is not a low-rank ΔW and "
            "DuoLoRA cannot merge it. Use the same subject or style as a plain LoRA (trained with DoRA off) "
            "instead. Do not delete the magnitude tensors to make it load: without them the file is a "
            "different LoRA.", source, algorithm=algo, base=base)
    return UnsupportedAdapterError(
        f"{head} DuoLoRA merges only low-rank LoRA layers (lora_down/lora_up or lora_A/lora_B): use a "
        f"standard LoRA, or convert this {algo} to one first.", source, algorithm=algo, base=base)


def _check_sidecar_type(config: Mapping, sd: Mapping[str, torch.Tensor], groups: dict[str, dict[str, str]],
                        metadata: Mapping[str, str], layouts: tuple[Layout, ...], source: str | None) -> None:
    """Refuse a PEFT adapter whose adapter_config.json says it is not a plain LoRA (DoRA, another peft_type)."""
    where = f"the {PEFT_CONFIG_NAME} beside it"
    if config.get("use_dora"):
        raise _adapter_error(sd, dict.fromkeys(m for m, g in groups.items() if "down" in g), groups, metadata,
                             layouts, source, algorithm="DoRA", evidence=f"{where} says use_dora")
    peft_type = config.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(
            f"{_display(source)}: {where} says peft_type '{peft_type}', a PEFT adapter that is not a LoRA, so "
            "its tensors do not mean ΔW = lora_B·lora_A. DuoLoRA merges only low-rank LoRA layers: use a LoRA "
            "adapter (peft_type LORA) instead.", source, algorithm=str(peft_type))


def _adapter_shape(sd: Mapping[str, torch.Tensor], module: str) -> tuple[int, ...] | None:
    """The weight shape a LoKr/LoHa module patches (for naming its base model in the error)."""
    def factor(prefix: str) -> tuple[int, ...] | None:
        if f"{module}.{prefix}" in sd:
            return tuple(sd[f"{module}.{prefix}"].shape)
        a, b = sd.get(f"{module}.{prefix}_a"), sd.get(f"{module}.{prefix}_b")
        if a is not None and b is not None:
            return (int(a.shape[0]), *(int(x) for x in b.shape[1:]))
        return None

    w1, w2 = factor("lokr_w1"), factor("lokr_w2")
    if w1 is not None and w2 is not None and len(w1) == 2:
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    h1 = factor("hada_w1")
    if h1 is not None:
        return h1
    return None


def _cloneofsimo_error(sd: Mapping[str, torch.Tensor], source: str | None) -> UnknownKeyStyleError:
    """cloneofsimo/lora's positional format: name it and, from shapes, the base model."""
    name = _display(source)
    unet_in = {int(t.shape[1]) for k, t in sd.items() if k.startswith("unet:") and k.endswith(":down")}
    unet_out = {int(t.shape[0]) for k, t in sd.items() if k.startswith("unet:") and k.endswith(":up")}
    # the cross-attention k/v inputs are the only UNet input widths that are no layer's output width
    context = [w for w in sorted(unet_in - unet_out) if _context_width_base([w])]
    base = _context_width_base(context) or "unknown"
    tokens = [k for k in sd if not _CLONEOFSIMO_RE.match(k)]
    made_for = ""
    if base != "unknown":
        made_for = (f", made for {BASE_LABELS[base]} (its cross-attention layers read {context[0]}-wide "
                    "text embeddings)")
    extra = f", with embedded tokens {_examples(tokens)}" if tokens else ""
    n = sum(1 for k in sd if _CLONEOFSIMO_RE.match(k) and k.endswith(":up"))
    return UnknownKeyStyleError(
        f"{name} is in cloneofsimo/lora's own format ('unet:0:up' keys: {n} layers numbered by position, "
        f"not named){made_for}{extra}. Its layers cannot be matched to model layers by name, so DuoLoRA "
        "cannot read it; convert it to a kohya or diffusers LoRA with the tool that made it.", source,
        base=base)


def read_lora(path: str | os.PathLike[str], *, load_tensors: bool = True,
              layouts: tuple[Layout, ...] | None = None) -> LoRA:
    """Read a .safetensors LoRA in any supported key style (no base-model check; see load_lora).

    ``load_tensors=False`` reads only the header, the alphas and the (small) bias/norm differences: layers
    hold ``meta`` tensors with the right shapes (fast, for inspect). Raises a LoRAError subclass with a
    user-facing message.
    """
    header, metadata = _read_header(path)
    tensors = _load_tensors(path, header, lazy=not load_tensors)
    lora = state_dict_to_lora(tensors, metadata, os.fspath(path), layouts=layouts)
    return lora


def load_lora(path: str | os.PathLike[str], layout: Layout = SDXL_LAYOUT) -> LoRA:
    """read_lora + validation against ``layout``: base model, layer names and shapes, finiteness.

    Returns the LoRA with ``base`` set to ``layout.base``. Raises WrongBaseModelError, UnknownKeyStyleError,
    LayerMismatchError, NonFiniteError or EmptyLoRAError (besides read_lora's errors).
    """
    candidates = (layout, *(x for x in KNOWN_LAYOUTS if x is not layout))
    lora = read_lora(path, layouts=candidates)
    validate_lora(lora, layout)
    lora.base = layout.base
    return lora


def unknown_modules(lora: LoRA) -> list[str]:
    """The file's LoRA modules that are no layer of its base model (skipped), in file order, each once."""
    return list(dict.fromkeys(s.module or _module_of(s.key) for s in lora.skipped
                              if s.kind in ("unknown_layer", "unknown_spelling")))


def validate_lora(lora: LoRA, layout: Layout = SDXL_LAYOUT, *, text_encoders: bool = True) -> None:
    """Check a parsed LoRA against ``layout``; raises the first problem as a typed LoRAError.

    Modules that are no layer of ``layout`` (``LoRA.skipped``, kinds unknown_layer / unknown_spelling) are
    left out and reported; the file is refused only when they are ``UNKNOWN_SHARE_REFUSED`` or more of its
    modules, or when nothing else is left. ``text_encoders=False`` checks only the UNet part (for a model
    whose text encoders are not known).
    """
    name, src = lora.name, lora.source
    if lora.base != layout.base and lora.base != "unknown":
        raise WrongBaseModelError(
            f"{name}: this LoRA is for {BASE_LABELS.get(lora.base, lora.base)}, not {layout.label} "
            f"({_base_evidence(lora, layout)}). Pick a LoRA trained for {layout.label}.",
            src, base=lora.base, expected=layout.base)
    unknown = unknown_modules(lora)
    if not lora.layers and unknown:
        raise _nothing_resolved_error(lora, layout, unknown)
    if lora.base == "unknown" and lora.layers and all(layout.get(n) is None for n in lora.layers):
        owner = next((k for k in KNOWN_LAYOUTS if k.family != layout.family
                      and all(k.get(n) is not None for n in lora.layers)), None)
        if owner is not None:
            label = family_of(owner).label
            raise WrongBaseModelError(
                f"{name}: this LoRA is for {label}, not {layout.label}: its {len(lora.layers)} layers are {label} "
                f"layers (e.g. {_examples(list(lora.layers), 2)}), none of which exists in {layout.label}. Pick a "
                f"LoRA trained for {layout.label}.", src, base=owner.base, expected=layout.base)
    unknown_keys = [s.key for s in lora.skipped if s.kind == "unknown_key"]
    if unknown_keys:
        n = len(unknown_keys)
        these = "tensor name is not a LoRA tensor" if n == 1 else "tensor names are not LoRA tensors"
        raise UnknownKeyStyleError(
            f"{name}: {n} {these} DuoLoRA can read (e.g. {_examples(sorted(unknown_keys))}). What "
            f"{'it does' if n == 1 else 'they do'} to the model is unknown, so DuoLoRA refuses the file rather "
            f"than merge it without {'it' if n == 1 else 'them'}. Export the LoRA again as a plain kohya or "
            "diffusers LoRA.", src)
    total = len(lora.layers) + len(unknown)
    if unknown and len(unknown) >= UNKNOWN_SHARE_REFUSED * total:
        spelling = sum(1 for m in unknown if _spelling_of(m) is not None)
        if spelling * 2 > len(unknown):
            what = "are spelled with a prefix DuoLoRA does not recognise"
            advice = ("Export the LoRA again in kohya (lora_unet_…) or diffusers (unet.…) format; the README's "
                      "'LoRA files it reads' lists every spelling DuoLoRA reads.")
        else:
            family = _family_hint(unknown)
            what = f"do not exist in {layout.label}"
            advice = (f"A LoRA with this many unknown layers was made for a different model"
                      f"{f' (its layer names look like {family} ones)' if family else ''}. Pick a LoRA trained "
                      f"for {layout.label}.")
        raise LayerMismatchError(
            f"{name}: {len(unknown)} of its {total} layers {what} (e.g. {_examples(unknown)}). {advice}",
            src, layers=unknown)
    problems: list[str] = []
    bad: list[str] = []
    order = layout.order()
    for lname, lr in sorted(lora.layers.items(), key=lambda kv: order.get(kv[0], len(order))):
        if not text_encoders and lname.startswith(TEXT_ENCODER_PREFIXES):
            continue
        target = layout.get(lname)
        if target is None:
            bad.append(lname)
            problems.append(f"'{lname}' does not exist in {layout.label}")
        elif not _shapes_match(lr.weight_shape, target.shape):
            bad.append(lname)
            problems.append(f"'{lname}' is {tuple(lr.weight_shape)} in the file but {tuple(target.shape)} "
                            f"in {layout.label}")
    for param, diff in lora.patches.items():
        if not text_encoders and param.startswith(TEXT_ENCODER_PREFIXES):
            continue
        shape = layout.param_shape(param)
        if shape is None:
            bad.append(param)
            problems.append(f"'{param}' does not exist in {layout.label}")
        elif tuple(diff.shape) != tuple(shape):
            bad.append(param)
            problems.append(f"the difference of '{param}' is {tuple(diff.shape)} in the file but {tuple(shape)} "
                            f"in {layout.label}")
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise LayerMismatchError(
            f"{name}: {len(problems)} {'layer does' if len(problems) == 1 else 'layers do'} not match {layout.label}: "
            f"{'; '.join(problems[:3])}{more}. This LoRA was made for a different model.", src, layers=bad)
    nonfinite = [k for k, v in lora.layers.items() if v.down.device.type != "meta"
                 and not (_all_finite(v.up) and _all_finite(v.down))]
    nonfinite += [k for k, v in lora.patches.items() if v.device.type != "meta" and not _all_finite(v)]
    if nonfinite:
        raise non_finite_error(name, src, nonfinite)
    if not lora.layers:
        empty = list(dict.fromkeys(s.module for s in lora.skipped if s.reason == RANK_ZERO_REASON))
        if empty:
            raise EmptyLoRAError(
                f"{name}: all {len(empty)} of its layers have rank 0 (lora_down (0, in), lora_up (out, 0), e.g. "
                f"{_examples(empty, 2)}), so it changes nothing and there is nothing to merge. Pick a LoRA file "
                "that has layers (a tool that pruned this one removed every component).", src)
        raise EmptyLoRAError(f"{name} contains no LoRA layers. Pick a LoRA file that has layers.", src)


def non_finite_error(name: str, source: str | None, layers: list[str]) -> NonFiniteError:
    """The refusal of a file with NaN/Inf in ``layers`` (canonical layer or parameter names), naming how many:
    the same message from inspect, ``duolora merge`` and the nodes."""
    if len(layers) == 1:
        what = f"layer '{layers[0]}' contains"
    else:
        what = f"{len(layers)} layers ({_examples(layers, 2)}) contain"
    return NonFiniteError(
        f"{name}: {what} NaN or Inf values. The file is damaged (often a training run that diverged); use "
        "another epoch or export.", source, layers=layers)


def non_finite_layers(path: str | os.PathLike[str], layout: Layout = SDXL_LAYOUT) -> list[str]:
    """The layers and bias/norm differences a merge reads from ``path`` that hold NaN or Inf, one tensor at a
    time: canonical names in ``layout``'s order. A NaN alpha counts for its layer (it scales the whole ΔW);
    tensors no merge reads (unknown layers, embedded tokens) do not count."""
    header, _ = _read_header(path)
    order = layout.order()
    found: dict[str, None] = {}
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        for key in header:
            split = split_key(key)
            patch = None if split is not None else _patch_of(key, header[key]["shape"])
            if split is not None:
                hit = layout.resolve_part(split[0])
            else:
                hit = layout.resolve_module(patch[0]) if patch is not None else None
            if hit is None:
                continue
            t = f.get_tensor(key)
            if t.is_floating_point() and not _all_finite(t):
                found[hit[0].name if patch is None else f"{hit[0].name}.{patch[1]}"] = None
    return sorted(found, key=lambda n: (n not in order, order.get(n, 0), n))


def _spelling_of(module: str) -> tuple[str, str, Layout] | None:
    """(unrecognised prefix, canonical layer, layout) when ``module`` is a known layer behind a foreign prefix."""
    for layout in KNOWN_LAYOUTS:
        found = layout.find_known_path(module)
        if found is not None:
            return found[0], found[1], layout
    return None


def _nothing_resolved_error(lora: LoRA, layout: Layout, unknown: list[str]) -> LoRAError:
    """The error for a file none of whose modules is a layer DuoLoRA resolves: name the spelling that was
    not recognised when the names hold known layers or the metadata claims ``layout``'s base; otherwise the
    file is for another model family."""
    name, src = lora.name, lora.source
    n = len(unknown)
    claimed = _base_hint(lora.metadata, ())
    for module in unknown:
        found = _spelling_of(module)
        if found is not None:
            prefix, canonical, known = found
            return UnknownKeyStyleError(
                f"{name}: none of its {n} layers is spelled in a way DuoLoRA reads: e.g. '{module}' is "
                f"{known.label}'s layer '{canonical}' behind the prefix '{prefix}', which DuoLoRA does not "
                "recognise. Export the LoRA again in kohya (lora_unet_…) or diffusers (unet.…) format; the "
                "README's 'LoRA files it reads' lists every spelling DuoLoRA reads.", src,
                base=claimed or known.base)
    if claimed == layout.base:
        return UnknownKeyStyleError(
            f"{name}: its metadata says it is for {layout.label}, but none of its {n} layer names (e.g. "
            f"{_examples(unknown, 2)}) is a spelling of a {layout.label} layer DuoLoRA recognises. Export the "
            "LoRA again in kohya (lora_unet_…) or diffusers (unet.…) format; the README's 'LoRA files it "
            "reads' lists every spelling DuoLoRA reads.", src, base=claimed)
    family = _family_hint(unknown)
    looks = f" (its layer names look like {family} ones)" if family else ""
    known = "SDXL, SD1.x or SD2.x" if layout.family == "sdxl" else layout.label
    return WrongBaseModelError(
        f"{name}: this LoRA is not for {layout.label}: none of its {n} layers (e.g. {_examples(unknown, 2)}) "
        f"exists in {known}; it was probably made for another model family{looks}. Pick a LoRA "
        f"trained for {layout.label}.", src, base="unknown", expected=layout.base)


def _module_of(key: str) -> str:
    split = split_key(key)
    return split[0] if split else key


def _base_evidence(lora: LoRA, layout: Layout) -> str:
    for lname, lr in lora.layers.items():
        if lname.endswith(".attn2.to_k") and not lr.is_conv and hasattr(layout.config, "context_dim"):
            return (f"its cross-attention layers read {lr.in_features}-wide text embeddings; "
                    f"{layout.label}'s read {layout.config.context_dim}")
    for lname, lr in lora.layers.items():
        target = layout.get(lname)
        if target is None:
            return f"e.g. its layer '{lname}' does not exist in {layout.label}"
        if not _shapes_match(lr.weight_shape, target.shape):
            return f"e.g. its layer '{lname}' is {tuple(lr.weight_shape)}, in {layout.label} {tuple(target.shape)}"
    # same names and shapes in both (e.g. a CLIP-L-only LoRA): the metadata or the kohya prefix decided
    return "its metadata or its single-text-encoder key prefix lora_te_ say so"


# ------------------------------------------------------------------------------------------ writing
def _layout_for_base(base: str) -> Layout:
    return BASE_LAYOUTS.get(base, SDXL_LAYOUT)


def merge_layout(path: str | os.PathLike[str]) -> Layout:
    """The layout a merge of the LoRA file at ``path`` is checked against: its family's full-size layout when its
    header is detected as a diffusion transformer's (Flux.1, Z-Image, Qwen-Image), else SDXL's (a file for
    SD1.x/SD2.x or an unknown model is then refused with SDXL's messages, as the merge always did)."""
    base = read_lora(path, load_tensors=False, layouts=KNOWN_LAYOUTS).base
    layout = BASE_LAYOUTS.get(base)
    return layout if layout is not None and layout.family != "sdxl" else SDXL_LAYOUT


def lora_to_state_dict(
    lora: LoRA,
    key_style: str = "kohya_ldm",
    dtype: torch.dtype | None = None,
    alpha: float | None = None,
    *,
    layout: Layout | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of ``lora`` spelled in ``key_style`` (one of KEY_STYLES).

    Written alpha = rank (the scale is already folded into up) for kohya and ComfyUI styles; diffusers
    styles write no alpha (scale 1). With ``alpha`` given, every layer gets that alpha and up is divided by
    alpha/rank, so the file still means the same ΔW. ``dtype`` defaults to ``lora.dtype`` (float32 if unset).
    Factors are cast with ``LowRank.to`` (balanced for narrow-range dtypes); every alpha is stored exactly —
    in ``dtype`` when it holds the value (bf16 does not hold 257, float8 e4m3 not 17), else in float32 — so
    a loader's alpha/rank is exactly 1. Bias/norm differences (``lora.patches``) are written as ``.diff``
    (1-D weights) and ``.diff_b`` (biases), spelled as ComfyUI's key map reads them.
    Names come from ``layout`` (default: the layout of ``lora.base``; spellings depend only on structure).
    Rank-0 layers (ΔW = 0) are not written.
    """
    if key_style not in KEY_STYLES:
        raise ValueError(f"unknown key style {key_style!r}; choose one of {', '.join(KEY_STYLES)}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha must be positive, not {alpha!r}")
    layout = layout or _layout_for_base(lora.base)
    family = family_of(layout)
    if key_style not in family.key_styles:
        raise ValueError(f"{family.label} LoRAs are not written in key style {key_style!r}; choose one of "
                         f"{', '.join(family.key_styles)}")
    prefix = _diffusers_prefix(layout)
    dtype = dtype or lora.dtype or torch.float32
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def own(t: torch.Tensor) -> torch.Tensor:
        # safetensors refuses tensors that share memory (a merger may reuse one factor for two layers)
        t = t.to(dtype).contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        return t

    for lname, lr in lora.layers.items():
        if lr.rank == 0:
            continue  # ΔW = 0; written with alpha = rank = 0 it would make loaders divide by zero
        layer = layout.get(lname)
        if layer is None:
            raise LayerMismatchError(
                f"{lora.name}: cannot write layer '{lname}': {layout.label} has no such layer.",
                lora.source, layers=[lname])
        te = layer.is_text_encoder
        if layer.parts and key_style in _SPLIT_STYLES:
            out.update(_split_state_dict(layer, lr, key_style, prefix, dtype, alpha, own))
            continue
        if key_style == "kohya_ldm":
            module, down_s, up_s = layer.kohya, ".lora_down.weight", ".lora_up.weight"
        elif key_style == "kohya_diffusers":
            module, down_s, up_s = layer.kohya_diffusers, ".lora_down.weight", ".lora_up.weight"
        elif key_style == "comfyui":
            module, down_s, up_s = layer.comfyui, ".lora_down.weight", ".lora_up.weight"
        elif key_style == "diffusers_peft":
            module = layer.diffusers if te else prefix + layer.diffusers
            down_s, up_s = ".lora_A.weight", ".lora_B.weight"
        elif key_style == "diffusers":
            module = layer.diffusers if te else prefix + layer.diffusers
            down_s, up_s = ((".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight") if te
                            else (".lora.down.weight", ".lora.up.weight"))
        else:  # diffusers_attn_procs
            if te:
                module = layer.diffusers
                down_s, up_s = ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"
            else:
                module = attn_procs_spelling(layer.diffusers) or layer.diffusers
                down_s, up_s = "_lora.down.weight", "_lora.up.weight"
        if alpha is not None:
            lr = LowRank(lr.up * (lr.rank / float(alpha)), lr.down)
        cast = lr.to(dtype=dtype)
        out[module + down_s] = own(cast.down)
        out[module + up_s] = own(cast.up)
        if alpha is not None or key_style in ("kohya_ldm", "kohya_diffusers", "comfyui"):
            out[module + ".alpha"] = exact_scalar(float(alpha if alpha is not None else lr.rank), dtype)
    for param, diff in lora.patches.items():
        module_name, _, kind = param.rpartition(".")
        target = layout.module(module_name)
        if target is None or layout.param_shape(param) is None:
            raise LayerMismatchError(
                f"{lora.name}: cannot write the difference of '{param}': {layout.label} has no such parameter.",
                lora.source, layers=[param])
        if target.parts and key_style in _SPLIT_STYLES:
            raise LayerMismatchError(
                f"{lora.name}: the difference of '{param}' cannot be written in key style {key_style!r}, which "
                f"splits the layer; write {family.label} LoRAs with bias differences in kohya_ldm or comfyui keys.",
                lora.source, layers=[param])
        out[_patch_spelling(target, key_style, prefix) + (".diff" if kind == "weight" else ".diff_b")] = own(diff)
    return out


# Key styles that spell a fused layer by its diffusers slices (Flux's to_q/to_k/to_v instead of qkv).
_SPLIT_STYLES = ("kohya_diffusers", "diffusers_peft", "diffusers")
_SPLIT_SUFFIXES = {"kohya_diffusers": (".lora_down.weight", ".lora_up.weight"),
                   "diffusers_peft": (".lora_A.weight", ".lora_B.weight"),
                   "diffusers": (".lora.down.weight", ".lora.up.weight")}


def _diffusers_prefix(layout: Layout) -> str:
    """What diffusers puts before the denoiser's module paths: ``unet.`` for a UNet, ``transformer.`` for a DiT."""
    return "unet." if layout.family == "sdxl" else "transformer."


def _split_state_dict(layer: Layer, lr: LowRank, key_style: str, prefix: str, dtype: torch.dtype,
                      alpha: float | None, own) -> dict[str, torch.Tensor]:
    """A fused layer written as its diffusers slices (``Part``s with a path): each slice gets the layer's down
    factor and the rows of its up factor (halves swapped where the writer orders them so), so the slices ComfyUI
    applies at their row offsets add up to exactly the fused ΔW."""
    parts = [p for p in layer.parts if p.path]
    covered = sorted((p.start, p.start + p.rows) for p in parts)
    if covered[0][0] != 0 or covered[-1][1] != layer.shape[0] or any(
            a[1] != b[0] for a, b in itertools.pairwise(covered)):
        raise ValueError(f"the diffusers slices of '{layer.name}' do not cover its rows exactly")
    if int(lr.up.shape[0]) != layer.shape[0]:
        raise ValueError(f"'{layer.name}' has {int(lr.up.shape[0])} rows in the LoRA but {layer.shape[0]} in the "
                         "layout it is written with; pass the model's own layout")
    if alpha is not None:
        lr = LowRank(lr.up * (lr.rank / float(alpha)), lr.down)
    cast = lr.to(dtype=dtype)
    down_s, up_s = _SPLIT_SUFFIXES[key_style]
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        rows = cast.up[part.start:part.start + part.rows]
        if part.swap_halves:
            half = int(rows.shape[0]) // 2
            rows = torch.cat([rows[half:], rows[:half]])
        if key_style == "kohya_diffusers":
            module = "lora_transformer_" + part.path.replace(".", "_")
        else:
            module = prefix + part.path
        out[module + down_s] = own(cast.down)
        out[module + up_s] = own(rows)
        if alpha is not None or key_style == "kohya_diffusers":
            out[module + ".alpha"] = exact_scalar(float(alpha if alpha is not None else lr.rank), dtype)
    return out


def output_dtype(requested: torch.dtype | None, content: torch.dtype | None) -> torch.dtype:
    """The dtype a merge writes: ``requested``, else the content file's, else float16 — but never float8.

    A merged file stores alpha = rank, so each layer's scale sits in its factors. float8 e4m3 has no
    number below 2⁻⁹: for a typical SDXL LoRA (alpha 1 at rank 128, ΔW entries ~1e-5) even balanced
    factors (LowRank.to) fall below it and the merged ΔW rounds to zero. A float8 input therefore gets a
    bfloat16 output (float32's range, half its size); an explicit float8 request is kept.
    """
    if requested is not None:
        return requested
    if content is None:
        return torch.float16
    return torch.bfloat16 if content in FLOAT8_DTYPES else content


def _patch_spelling(layer: Layer, key_style: str, prefix: str = "unet.") -> str:
    """The module spelling of a bias/norm difference: one ComfyUI's key maps read (comfy/lora.py)."""
    if key_style == "kohya_ldm":
        return layer.kohya  # lora_unet_… for the UNet; text_encoders.… for CLIP norms (see sdxl._te_module)
    if key_style == "kohya_diffusers":
        return layer.kohya_diffusers
    if key_style == "comfyui":
        return layer.comfyui
    return layer.diffusers if layer.is_text_encoder else prefix + layer.diffusers


def exact_scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-d tensor holding ``value`` exactly: in ``dtype`` when it can, else float32, else float64.

    A loader reads alpha as one number (``tensor.item()``), whatever its dtype; storing it in a dtype that
    rounds it (bf16: 257 -> 256; float8 e4m3: 17 -> 16) would scale every ΔW of the layer by the error.
    """
    for dt in (dtype, torch.float32, torch.float64):
        t = torch.tensor(value, dtype=torch.float64).to(dt)
        if t.to(torch.float64).item() == value:
            return t
    return torch.tensor(value, dtype=torch.float64)


def save_lora(
    lora: LoRA,
    path: str | os.PathLike[str],
    key_style: str = "kohya_ldm",
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    *,
    alpha: float | None = None,
    layout: Layout | None = None,
) -> Path:
    """Write ``lora`` as .safetensors atomically (temp file in the same folder, fsync, os.replace).

    ``metadata`` is merged over ``lora.metadata``; every key and value must be a string. Refuses an existing
    path with OutputExistsError unless ``overwrite``. Returns the written path.
    """
    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputExistsError(
            f"{p.name} already exists in {p.parent}; choose another file name or allow overwriting.", p)
    if not any(lr.rank for lr in lora.layers.values()):
        raise EmptyLoRAError(f"{lora.name} has no layers of rank 1 or more; nothing to save to {p.name}.",
                             lora.source)
    md = {**lora.metadata, **(metadata or {})}
    tensors = lora_to_state_dict(lora, key_style, dtype, alpha, layout=layout)
    return save_state_dict(tensors, p, metadata=md, overwrite=overwrite)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def same_file_contents(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when two paths name the same file or two files with identical bytes."""
    if os.path.samefile(a, b):
        return True
    return os.path.getsize(a) == os.path.getsize(b) and file_sha256(a) == file_sha256(b)


def new_file_beside(p: Path) -> tuple[str, int]:
    """Create an empty, hidden, uniquely named file in ``p``'s folder: (its path, its permission bits).

    It is created as ``open()`` creates a file, so its mode is what a plain write gives here (0o666 less the
    process umask): the mode every file the pack writes must end with (a saved LoRA, a merge-cache entry),
    readable by whoever may read the user's other files (another account, a service or a container sharing
    models/loras).
    """
    for _ in range(100):
        tmp = p.with_name(f".{p.name}.{os.urandom(6).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        return os.fspath(tmp), mode
    raise FileExistsError(f"could not create a temporary file beside {p.name} in {p.parent}")


def save_state_dict(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write LoRA tensors as .safetensors atomically: a temp file in the same folder, fsync, then a rename.

    Without ``overwrite`` the final step is a hard link, which fails instead of replacing a file that
    appeared meanwhile (another save with the same name); a failed or interrupted save leaves no file.
    """
    p = Path(path)
    refuse_output_name(p)
    if p.exists() and not overwrite:
        raise OutputExistsError(
            f"{p.name} already exists in {p.parent}; choose another file name or allow overwriting.", p)
    md = dict(metadata or {})
    for k, v in md.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"safetensors metadata must map strings to strings; {k!r} -> {type(v).__name__}")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = new_file_beside(p)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=md)
        # safetensors writes through a temporary file of its own, created 0o600, and renames it over ``tmp``.
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, p)
        else:
            try:
                os.link(tmp, p)
            except FileExistsError:
                raise OutputExistsError(
                    f"{p.name} appeared in {p.parent} while saving; choose another file name.", p) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


# ----------------------------------------------------------------------------------------- summaries
_METADATA_SHOWN = ("ss_output_name", "ss_base_model_version", "ss_sd_model_name", "ss_network_module",
                   "ss_network_dim", "ss_network_alpha", "ss_network_args", "modelspec.architecture",
                   "modelspec.title", "format", "duolora_method", PEFT_METADATA_KEY)
# Short words for the one-line summary, by SkippedKey reason where a reason has its own, else by kind (the
# reason gives the long form).
_SHORT_BY_REASON = {EMBEDDING_REASON: ("embedded token", "embedded tokens"),
                    RANK_ZERO_REASON: ("rank-0 layer", "rank-0 layers"),
                    ALPHA_ONLY_REASON: ("alpha without factors", "alphas without factors")}
_SHORT = {"ignored": ("key", "keys"), "unknown_layer": ("layer not in the base model", "layers not in the base model"),
          "unknown_spelling": ("layer with an unrecognised prefix", "layers with an unrecognised prefix"),
          "unknown_key": ("unknown tensor", "unknown tensors")}


def not_merged(lora: LoRA) -> list[dict]:
    """What the file holds that no merge carries, grouped by reason: [{"reason", "kind", "count", "examples"}].

    ``count`` counts modules (a layer's down, up and alpha keys are one), ``examples`` the first three.
    inspect, ``duolora merge`` and the loader nodes all report this list.
    """
    groups: dict[str, dict] = {}
    for s in lora.skipped:
        g = groups.setdefault(s.reason, {"reason": s.reason, "kind": s.kind, "modules": {}})
        g["modules"].setdefault(s.module or s.key, None)
    out = []
    for g in groups.values():
        modules = list(g.pop("modules"))
        out.append({**g, "count": len(modules), "examples": modules[:3]})
    return sorted(out, key=lambda g: -g["count"])


def scale_note(lora: LoRA) -> str | None:
    """What a user should know about the scale beyond its value, or None: a scale the metadata mentions that
    is not applied (kohya ``ss_network_alpha`` on modules without ``.alpha``), or a PEFT adapter read
    without the adapter_config.json that holds its scale."""
    notes = []
    without = sum(1 for s in lora.scale_sources.values() if s == "none")
    value = lora.metadata.get("ss_network_alpha")
    if without and value is not None:
        notes.append(f"the metadata's ss_network_alpha {value} is not applied to the {without} layers without "
                     ".alpha: kohya's and ComfyUI's loaders use scale 1 (alpha = rank) for them")
    if "peft_config_missing" in lora.scale_sources.values():
        notes.append(PEFT_CONFIG_MISSING_NOTE)
    return "; ".join(notes) or None


def scale_origin(lora: LoRA) -> str | None:
    """Where a scale kept outside the file came from, for the merge's notes: "scale 2 from the
    adapter_config.json beside it (lora_alpha 32 / r 16)", or None when the file holds its own scale."""
    if "peft_config" not in lora.scale_sources.values():
        return None
    scales = sorted({round(s, 9) for k, s in lora.scales.items() if lora.scale_sources[k] == "peft_config"})
    details = _peft_details(lora, "peft_config")
    return (f"scale {', '.join(f'{s:g}' for s in scales)} from the {PEFT_CONFIG_NAME} beside it "
            f"({'; '.join(details)}), as PEFT applies it")


def summary(lora: LoRA) -> dict:
    """A JSON-able description: key style, base, layer counts, ranks, alphas and scales with their source,
    dtype, metadata, bias/norm differences and what is not merged."""
    unet = lora.unet_layers()
    attention = [k for k in unet if is_attention_projection(k)]
    ranks = Counter(lr.rank for lr in lora.layers.values())
    alpha_values = sorted({a for a in lora.alphas.values() if a is not None})
    reasons = Counter(s.reason for s in lora.skipped)
    patch_kinds = Counter("bias" if k.endswith(".bias") else "weight" for k in lora.patches)
    unknown = unknown_modules(lora)
    return {
        "file": lora.name,
        "key_style": lora.key_style,
        "base": lora.base,
        "base_label": BASE_LABELS.get(lora.base, lora.base),
        "layers": len(lora.layers),
        "counts": {
            "unet_attention": len(attention),
            "unet_other": len(unet) - len(attention),
            "te1": sum(1 for k in lora.layers if k.startswith("te1.")),
            "te2": sum(1 for k in lora.layers if k.startswith("te2.")),
        },
        "conv_layers": sum(1 for lr in lora.layers.values() if lr.is_conv),
        "ranks": sorted(ranks),
        "rank_counts": {str(r): n for r, n in sorted(ranks.items())},
        "alphas": alpha_values,
        "layers_without_alpha": sum(1 for a in lora.alphas.values() if a is None),
        "scales": sorted({round(s, 9) for s in lora.scales.values()}),
        "scale_sources": dict(Counter(lora.scale_sources.values()).most_common()),
        "scale_details": _peft_details(lora),
        "scale_config": _peft_details(lora, "peft_config"),
        "scale_note": scale_note(lora),
        "scale_origin": scale_origin(lora),
        "dtype": str(lora.dtype).replace("torch.", "") if lora.dtype is not None else None,
        "parameters": lora.num_parameters(),
        "patches": {"bias": patch_kinds["bias"], "norm_weight": patch_kinds["weight"]},
        "metadata_keys": sorted(lora.metadata),
        "metadata": {k: _clip(lora.metadata[k]) for k in _METADATA_SHOWN if k in lora.metadata},
        "skipped": len(lora.skipped),
        "skipped_reasons": dict(reasons.most_common()),
        "skipped_examples": [s.key for s in lora.skipped[:5]],
        "not_merged": not_merged(lora),
        "unknown_layers": len(unknown),
        "family_hint": _family_hint(unknown) if unknown else None,
        "unrecognised_spelling": _spelling_example(unknown),
    }


def _peft_details(lora: LoRA, place: str = "peft_metadata") -> list[str]:
    """The LoraConfig entries that decided scales, e.g. ["unet: lora_alpha 64 / r 16"]: of the header's
    lora_adapter_metadata (``place`` "peft_metadata") or of the adapter_config.json beside the file
    ("peft_config", one config: ["lora_alpha 32 / r 16"])."""
    if place not in lora.scale_sources.values():
        return []
    try:
        parts = (_peft_configs(lora.metadata, lora.name, lora.source) if place == "peft_metadata"
                 else _sidecar_configs(lora.source, lora.name)) or {}
    except LoRAError:
        return []
    out = []
    for component, config in parts.items():
        r = config.get("r", _PEFT_DEFAULTS["r"])
        alpha = config.get("lora_alpha", _PEFT_DEFAULTS["lora_alpha"])
        text = (("" if place == "peft_config" else f"{'all' if component == '*' else component}: ")
                + f"lora_alpha {alpha} / {'√' if config.get('use_rslora') else ''}r {r}")
        patterns = [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)]
        if patterns:
            text += " (with " + " and ".join(f"{len(config[k])} {k} entries" for k in patterns) + ")"
        out.append(text)
    return out


def _spelling_example(unknown: list[str]) -> dict | None:
    for module in unknown:
        found = _spelling_of(module)
        if found is not None:
            return {"module": module, "prefix": found[0], "layer": found[1], "base": found[2].base}
    return None


def scale_text(info: Mapping) -> str:
    """The "alpha" line of inspect: the alphas, where the scale came from, and any scale not applied."""
    sources = info["scale_sources"]
    alphas = ", ".join(f"{a:g}" for a in info["alphas"])
    scales = ", ".join(f"{s:g}" for s in info["scales"])
    parts = []
    if sources.get("alpha_tensor"):
        parts.append(f"{alphas} from .alpha tensors" + (f" ({sources['alpha_tensor']} layers)"
                                                        if len(sources) > 1 else ""))
    if sources.get("peft_metadata"):
        detail = "; ".join(info["scale_details"])
        parts.append(f"from the header's lora_adapter_metadata ({detail})" + (
            f" ({sources['peft_metadata']} layers)" if len(sources) > 1 else ""))
    if sources.get("peft_config"):
        detail = "; ".join(info["scale_config"])
        parts.append(f"from the {PEFT_CONFIG_NAME} beside the file ({detail})" + (
            f" ({sources['peft_config']} layers)" if len(sources) > 1 else ""))
    if sources.get("none"):
        parts.append("none" + (f" ({sources['none']} layers)" if len(sources) > 1 else "")
                     + ": no .alpha tensor or lora_adapter_metadata")
    if sources.get("peft_config_missing"):
        parts.append("none" + (f" ({sources['peft_config_missing']} layers)" if len(sources) > 1 else "")
                     + f": no .alpha tensor, lora_adapter_metadata or {PEFT_CONFIG_NAME} beside the file")
    text = "; ".join(parts) if parts else "–"
    if scales:
        text += f" · scale {scales}"
    if info.get("scale_note"):
        text += f"; {info['scale_note']}"
    return text


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _rank_text(ranks: list[int]) -> str:
    if not ranks:
        return "rank –"
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"rank {ranks[0]}–{ranks[-1]}"


def _plural(n: int, words: tuple[str, str]) -> str:
    return f"{n} {words[0] if n == 1 else words[1]}"


def one_line_summary(lora: LoRA) -> str:
    """E.g. ``kohya_ldm · SDXL · 560 layers · rank 64``, plus a scale not kept in .alpha tensors, carried
    bias/norm differences and what is not merged, when present (the loader nodes show this line)."""
    n_te = len(lora.text_encoder_layers())
    layers = f"{len(lora.layers)} layers" + (f" ({n_te} text encoder)" if n_te else "")
    parts = [lora.key_style, BASE_LABELS.get(lora.base, lora.base), layers, _rank_text(lora.ranks())]
    if "peft_metadata" in lora.scale_sources.values():
        scales = sorted({round(s, 9) for k, s in lora.scales.items()
                         if lora.scale_sources[k] == "peft_metadata"})
        parts.append("scale " + ", ".join(f"{s:g}" for s in scales) + " from lora_adapter_metadata")
    if "peft_config" in lora.scale_sources.values():
        scales = sorted({round(s, 9) for k, s in lora.scales.items() if lora.scale_sources[k] == "peft_config"})
        parts.append("scale " + ", ".join(f"{s:g}" for s in scales) + f" from {PEFT_CONFIG_NAME}")
    if "peft_config_missing" in lora.scale_sources.values():
        parts.append(f"PEFT adapter without its {PEFT_CONFIG_NAME}: scale may be missing")
    if "none" in lora.scale_sources.values() and "ss_network_alpha" in lora.metadata:
        parts.append(f"ss_network_alpha {lora.metadata['ss_network_alpha']} not applied")
    if lora.patches:
        parts.append(_plural(len(lora.patches), ("bias/norm difference", "bias/norm differences")))
    groups = not_merged(lora)
    if groups:
        parts.append("not merged: " + ", ".join(
            _plural(g["count"], _SHORT_BY_REASON.get(g["reason"], _SHORT.get(g["kind"], _SHORT["ignored"])))
            for g in groups))
    return " · ".join(parts)


def not_merged_lines(lora_or_info: LoRA | Mapping) -> list[str]:
    """One line per group of not-merged keys: ``N × reason (e.g. 'a', 'b', 'c' and K more)``."""
    groups = not_merged(lora_or_info) if isinstance(lora_or_info, LoRA) else lora_or_info["not_merged"]
    lines = []
    for g in groups:
        more = f" and {g['count'] - len(g['examples'])} more" if g["count"] > len(g["examples"]) else ""
        shown = ", ".join(f"'{x}'" for x in g["examples"])
        lines.append(f"{g['count']} × {g['reason']} (e.g. {shown}{more})")
    return lines


# ---------------------------------------------------------------------------------- merge reporting
def merge_notes(content: LoRA | Sequence[LoRA], style: LoRA) -> list[str]:
    """What ``duolora merge`` says about its inputs (one content LoRA or several, and the style LoRA): per file,
    every group of keys that is not merged (the same list inspect shows), a scale read from outside the file
    (PEFT's adapter_config.json) and ``scale_note``: a scale in the metadata that is not applied, or one that
    may be missing."""
    lines = []
    contents = [content] if isinstance(content, LoRA) else list(content)
    roles = ["content"] if len(contents) == 1 else [f"content {i + 1}" for i in range(len(contents))]
    for role, lora in (*zip(roles, contents), ("style", style)):
        lines += [f"{role} {lora.name}: not merged: {line}" for line in not_merged_lines(lora)]
        for note in (scale_origin(lora), scale_note(lora)):
            if note:
                lines.append(f"{role} {lora.name}: {note}")
    return lines
