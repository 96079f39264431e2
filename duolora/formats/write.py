"""Writing: a ``LoRA`` spelled in any of ``KEY_STYLES`` (alpha = rank with the scale in the factors, every alpha
stored exactly; a fused layer split into its diffusers slices where the style does), the output dtype of a merge,
and atomic safetensors writes (temporary file, fsync, rename) with the mode a plain write gives."""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..families import BASE_LAYOUTS, family_of
from ..families.sdxl import SDXL_LAYOUT, attn_procs_spelling
from ..layout import Layer, Layout
from ..lora import FLOAT8_DTYPES, LoRA, LowRank
from .errors import EmptyLoRAError, LayerMismatchError, OutputExistsError, refuse_output_name
from .keys import KEY_STYLES


def _layout_for_base(base: str) -> Layout:
    return BASE_LAYOUTS.get(base, SDXL_LAYOUT)


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
