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

Inside the engine every layer has its canonical name (shared/docs/ARCHITECTURE.md) and ``up`` carries the
alpha/rank scale (METHOD.md §1), so ΔW = up @ down. Files are never unpickled: only safetensors is read.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .lora import TEXT_ENCODER_PREFIXES, LoRA, LowRank, SkippedKey, fold_alpha
from .sdxl import (
    ALIAS_ATTN_PROCS,
    ALIAS_COMFYUI,
    ALIAS_KOHYA_DIFFUSERS,
    ALIAS_KOHYA_LDM,
    ALIAS_KOHYA_TE,
    BASE_LABELS,
    SD15_LAYOUT,
    SD21_LAYOUT,
    SDXL_LAYOUT,
    STANDARD_LAYOUTS,
    Layout,
    _attn_procs_spelling,
    is_attention_projection,
)

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
        head = f.read(8)
        # pickle protocol 2-5 starts with 0x80 <proto>; torch.save's zip container with "PK\x03\x04"
        if (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head[:4] == b"PK\x03\x04":
            raise PickleFileError(_pickle_message(name), path)
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


def _pickle_message(name: str) -> str:
    return (f"{name} is a pickle-based PyTorch file (.ckpt/.pt/.pth/.bin). Loading such a file can run "
            "arbitrary code, so DuoLoRA never opens it. Convert it to .safetensors (in a trusted, isolated "
            "environment) and load the .safetensors file instead.")


def _load_tensors(path: str | os.PathLike[str], header: dict[str, dict], lazy: bool) -> dict[str, torch.Tensor]:
    """Tensors of a validated file; ``lazy`` gives meta tensors (shape + dtype only) except alphas."""
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            for key, entry in header.items():
                if lazy and not key.endswith(".alpha"):
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
    (".lora_A.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    ("_lora.down.weight", "down", "procs"),
    ("_lora.up.weight", "up", "procs"),
    (".lora.down.weight", "down", "diffusers"),
    (".lora.up.weight", "up", "diffusers"),
    (".alpha", "alpha", ""),
)
# Adapters that are not low-rank LoRAs: suffix -> algorithm.
_ADAPTER_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".hada_w1_a", "LoHa"), (".hada_w1_b", "LoHa"), (".hada_w2_a", "LoHa"), (".hada_w2_b", "LoHa"),
    (".hada_t1", "LoHa"), (".hada_t2", "LoHa"),
    (".lokr_w1", "LoKr"), (".lokr_w1_a", "LoKr"), (".lokr_w1_b", "LoKr"), (".lokr_w2", "LoKr"),
    (".lokr_w2_a", "LoKr"), (".lokr_w2_b", "LoKr"), (".lokr_t2", "LoKr"),
    (".lora_mid.weight", "Tucker"), (".dora_scale", "DoRA"),
    (".oft_blocks", "OFT"), (".oft_diag", "OFT"), (".rescale", "OFT"),
    (".a1.weight", "GLoRA"), (".a2.weight", "GLoRA"), (".b1.weight", "GLoRA"), (".b2.weight", "GLoRA"),
    (".on_input", "IA3"), (".diff", "full"), (".set_weight", "set"),
)
_ADAPTER_NAMES = {
    "LoHa": "a LyCORIS LoHa (Hadamard-product) file",
    "LoKr": "a LyCORIS LoKr (Kronecker-product) file",
    "Tucker": "a LyCORIS LoCon file with Tucker decomposition (lora_mid)",
    "DoRA": "a DoRA (weight-decomposed LoRA) file",
    "OFT": "an OFT/BOFT (orthogonal fine-tuning) file",
    "GLoRA": "a LyCORIS GLoRA file",
    "IA3": "a LyCORIS (IA)^3 file",
    "full": "a full weight-difference file (LyCORIS 'full' / .diff)",
    "set": "a weight-replacement file (set_weight)",
}
# Tensors that are reported and left out, never merged (they are not low-rank layers).
_IGNORED_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".diff_b", "bias difference (not a low-rank layer): left out of the merge"),
    (".w_norm", "norm-layer weight (not a low-rank layer): left out of the merge"),
    (".b_norm", "norm-layer bias (not a low-rank layer): left out of the merge"),
)
_EMBEDDING_RE = re.compile(r"^(bundle_emb\..*|emb_params|string_to_param\..*|string_to_token\..*|clip_[lgh])$")
_CLONEOFSIMO_RE = re.compile(r"^(unet|text_encoder):\d+:(up|down)$")
_TEXT_PROJECTION_RE = re.compile(r"^(lora_te[12]?_text_projection|text_encoders\.clip_[lg]\.transformer\."
                                 r"text_projection)\.")


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(module, part, suffix family) for a LoRA tensor key, or None."""
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


def _syntactic_style(module: str, family: str) -> str:
    """The key style a module spelling suggests when no layout knows the layer."""
    if module.startswith(("lora_unet_", "lora_te")):
        return "kohya_diffusers" if re.match(r"lora_unet_(down|up)_blocks_|lora_unet_mid_block_", module) \
            else "kohya_ldm"
    if module.startswith(("diffusion_model.", "text_encoders.")):
        return "comfyui"
    return {"peft": "diffusers_peft", "procs": "diffusers_attn_procs"}.get(family, "diffusers")


def _style_of(alias_kind: str, family: str) -> str:
    """Key style of one resolved module from how its name and its suffix are spelled."""
    if alias_kind == ALIAS_KOHYA_LDM:
        return "kohya_ldm"
    if alias_kind == ALIAS_KOHYA_DIFFUSERS:
        return "kohya_diffusers"
    if alias_kind == ALIAS_KOHYA_TE:
        return "kohya"  # text encoders are spelled alike in both kohya styles
    if alias_kind == ALIAS_COMFYUI:
        return "comfyui"
    if alias_kind == ALIAS_ATTN_PROCS or family == "procs":
        return "diffusers_attn_procs"
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
    mods = list(modules)
    if any(m.startswith("lora_te_") for m in mods) and not any(m.startswith("lora_te2_") for m in mods):
        return "sd1"  # kohya writes lora_te_ only for single-text-encoder models
    return None


def _detect(shapes: Mapping[str, tuple[int, ...]], layouts: tuple[Layout, ...], hint: str | None
            ) -> tuple[Layout, int]:
    """The layout that explains most modules by name and shape: (layout, number of exact matches)."""
    best: tuple[tuple[int, int, int, int], Layout] | None = None
    for i, layout in enumerate(layouts):
        named = matched = 0
        for module, shape in shapes.items():
            hit = layout.resolve(module)
            if hit is None:
                continue
            named += 1
            matched += _shapes_match(shape, hit[0].shape)
        score = (matched, named, int(hint == layout.base), -i)
        if best is None or score > best[0]:
            best = (score, layout)
    assert best is not None
    return best[1], best[0][0]


def _context_width_base(widths: Iterable[int]) -> str | None:
    for w in widths:
        for layout in STANDARD_LAYOUTS:
            if w == layout.config.context_dim:
                return layout.base
    return None


# ------------------------------------------------------------------------------------------ reading
def state_dict_to_lora(
    sd: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    source: str | None = None,
    *,
    layouts: tuple[Layout, ...] | None = None,
) -> LoRA:
    """Parse a LoRA state dict in any supported key style into a LoRA (float32, alpha folded into up).

    Detects the key style and the base model ("sdxl", "sd1", "sd2", "unknown") but does not refuse a
    wrong base: that is load_lora's job. Raises LoRAError subclasses for inputs that are not low-rank
    LoRAs or are malformed. Every key that is not loaded is listed in ``LoRA.skipped`` with a reason.
    ``layouts`` are the candidate bases, tried in order (default: SDXL, SD1.x, SD2.x).
    """
    metadata = dict(metadata or {})
    layouts = layouts or STANDARD_LAYOUTS
    name = _display(source)
    if not sd:
        raise EmptyLoRAError(f"{name} contains no tensors at all. Pick a LoRA file that has layers.", source)

    keys = list(sd)
    if any(_CLONEOFSIMO_RE.match(k) for k in keys):
        raise _cloneofsimo_error(sd, source)

    groups: dict[str, dict[str, str]] = {}
    families: dict[str, str] = {}
    adapters: dict[str, str] = {}
    skipped: list[SkippedKey] = []
    for key in keys:
        split = _split_key(key)
        if split is not None:
            module, part, family = split
            groups.setdefault(module, {})[part] = key
            if family:
                families[module] = family
            continue
        adapter = _adapter_of(key)
        if adapter is not None and adapter[1] == "full" and sd[key].dim() <= 1:
            # ComfyUI's LoRA extraction writes norm-layer differences as 1-D ".diff" tensors
            skipped.append(SkippedKey(key, "norm-layer difference (not a low-rank layer): left out of the "
                                      "merge", "ignored"))
            continue
        if adapter is not None:
            adapters[adapter[0]] = adapter[1]
            continue
        reason = next((r for s, r in _IGNORED_SUFFIXES if key.endswith(s)), None)
        if reason is not None:
            skipped.append(SkippedKey(key, reason, "ignored"))
        elif _EMBEDDING_RE.match(key):
            skipped.append(SkippedKey(key, "embedded textual-inversion token: not merged", "ignored"))
        else:
            skipped.append(SkippedKey(key, "not a LoRA tensor name DuoLoRA knows", "unknown_key"))

    if adapters:
        raise _adapter_error(sd, adapters, groups, metadata, layouts, source)

    lora_modules = {m: g for m, g in groups.items() if "up" in g or "down" in g}
    if not lora_modules:
        raise _not_lora_error(keys, source)
    for module, g in groups.items():
        if module not in lora_modules:
            skipped.append(SkippedKey(g["alpha"], "alpha without lora_up/lora_down tensors", "unknown_key"))

    # shapes and ranks first (they decide the base), values later
    shapes: dict[str, tuple[int, ...]] = {}
    for module, g in lora_modules.items():
        if "up" not in g or "down" not in g:
            have, miss = ("up", "down") if "up" in g else ("down", "up")
            raise MalformedLoRAError(
                f"{name}: layer '{module}' has a {have} tensor but no {miss} tensor, so the file is "
                "incomplete. Re-download it or export it again.", source)
        up, down = sd[g["up"]], sd[g["down"]]
        shapes[module] = _weight_shape(module, up, down, name, source)

    hint = _base_hint(metadata, lora_modules)
    layout, matched = _detect(shapes, layouts, hint)
    base = layout.base if matched > 0 else "unknown"

    layers: dict[str, LowRank] = {}
    alphas: dict[str, float | None] = {}
    spelled: dict[str, str] = {}
    styles: Counter[str] = Counter()
    te_styles: Counter[str] = Counter()
    dtypes: Counter[torch.dtype] = Counter()
    for module, g in lora_modules.items():
        hit = layout.resolve(module)
        family = families.get(module, "")
        if hit is None:
            styles[_syntactic_style(module, family)] += 1
            reason = f"no layer '{module}' in {layout.label}"
            if _TEXT_PROJECTION_RE.match(module + "."):
                reason = "text projection layer: not merged (only UNet and CLIP encoder layers are)"
            for part in ("down", "up", "alpha"):
                if part in g:
                    skipped.append(SkippedKey(g[part], reason,
                                              "ignored" if reason.startswith("text projection") else
                                              "unknown_layer"))
            continue
        layer, alias_kind = hit
        if layer.name in spelled:
            raise MalformedLoRAError(
                f"{name}: layer '{layer.name}' appears twice (as '{spelled[layer.name]}' and '{module}'). "
                "A LoRA file must hold each layer once; re-export it.", source)
        spelled[layer.name] = module
        (te_styles if layer.is_text_encoder else styles)[_style_of(alias_kind, family)] += 1
        up, down = sd[g["up"]], sd[g["down"]]
        dtypes[down.dtype] += 1
        alpha = None
        if "alpha" in g:
            a = sd[g["alpha"]]
            if a.numel() != 1:
                raise MalformedLoRAError(
                    f"{name}: '{g['alpha']}' should hold one number but has shape {tuple(a.shape)}. "
                    "Re-export the file.", source)
            alpha = float(a.float().item()) if a.device.type != "meta" else None
        up32, down32 = up.to(torch.float32), down.to(torch.float32)
        if down32.dim() == 4 and up32.dim() == 2:
            up32 = up32.reshape(*up32.shape, 1, 1)
        elif down32.dim() == 2 and up32.dim() == 4:
            up32 = up32.reshape(up32.shape[0], up32.shape[1])
        layers[layer.name] = LowRank(fold_alpha(up32, down32, alpha).contiguous(), down32.contiguous())
        alphas[layer.name] = alpha

    # layout (module) order, not the file's alphabetical key order: stable reports and messages
    order = {n: i for i, n in enumerate(layout.layers)}
    layers = dict(sorted(layers.items(), key=lambda kv: order[kv[0]]))
    alphas = {k: alphas[k] for k in layers}
    return LoRA(
        layers=layers,
        metadata=metadata,
        source=source,
        key_style=_file_style(styles, te_styles),
        base=base,
        skipped=skipped,
        dtype=dtypes.most_common(1)[0][0] if dtypes else None,
        alphas=alphas,
    )


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


def _adapter_error(sd: Mapping[str, torch.Tensor], adapters: dict[str, str], groups: dict[str, dict[str, str]],
                   metadata: Mapping[str, str], layouts: tuple[Layout, ...],
                   source: str | None) -> UnsupportedAdapterError:
    name = _display(source)
    algos = Counter(adapters.values())
    algo = algos.most_common(1)[0][0]
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
    return UnsupportedAdapterError(
        f"{name} is {what} with {len(adapters)} modules{made_for}, not a low-rank LoRA. DuoLoRA merges "
        "only low-rank LoRA layers (lora_down/lora_up or lora_A/lora_B): use a standard LoRA, or convert "
        f"this {algo} to one first.", source, algorithm=algo, base=base)


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

    ``load_tensors=False`` reads only the header and the alphas: layers hold ``meta`` tensors with the
    right shapes (fast, for inspect). Raises a LoRAError subclass with a user-facing message.
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
    candidates = (layout, *(x for x in STANDARD_LAYOUTS if x is not layout))
    lora = read_lora(path, layouts=candidates)
    validate_lora(lora, layout)
    lora.base = layout.base
    return lora


def validate_lora(lora: LoRA, layout: Layout = SDXL_LAYOUT, *, text_encoders: bool = True) -> None:
    """Check a parsed LoRA against ``layout``; raises the first problem as a typed LoRAError.

    ``text_encoders=False`` checks only the UNet part (for a model whose text encoders are not known).
    """
    name, src = lora.name, lora.source
    if lora.base != layout.base and lora.base != "unknown":
        raise WrongBaseModelError(
            f"{name}: this LoRA is for {BASE_LABELS.get(lora.base, lora.base)}, not {layout.label} "
            f"({_base_evidence(lora, layout)}). Pick a LoRA trained for {layout.label}.",
            src, base=lora.base, expected=layout.base)
    unknown_layers = [s for s in lora.skipped if s.kind == "unknown_layer"]
    if lora.base == "unknown" and not lora.layers and unknown_layers:
        modules = sorted({_module_of(s.key) for s in unknown_layers})
        raise WrongBaseModelError(
            f"{name}: this LoRA is not for {layout.label}: none of its {len(modules)} layers (e.g. "
            f"{_examples(modules, 2)}) exists in SDXL, SD1.x or SD2.x; it was probably made for another "
            f"model family. Pick a LoRA trained for {layout.label}.", src, base="unknown",
            expected=layout.base)
    unknown_keys = [s.key for s in lora.skipped if s.kind == "unknown_key"]
    if unknown_keys:
        these = "tensor name is not a LoRA tensor" if len(unknown_keys) == 1 else "tensor names are not LoRA tensors"
        raise UnknownKeyStyleError(
            f"{name}: {len(unknown_keys)} {these} DuoLoRA can read (e.g. "
            f"{_examples(sorted(unknown_keys))}). Remove {'it' if len(unknown_keys) == 1 else 'them'}, or export "
            "the LoRA again in kohya or "
            "diffusers format.", src)
    problems: list[str] = []
    bad: list[str] = []
    for s in unknown_layers:
        m = _module_of(s.key)
        if m not in bad:
            bad.append(m)
            problems.append(f"'{m}' does not exist in {layout.label}")
    order = {n: i for i, n in enumerate(layout.layers)}
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
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise LayerMismatchError(
            f"{name}: {len(problems)} {'layer does' if len(problems) == 1 else 'layers do'} not match {layout.label}: "
            f"{'; '.join(problems[:3])}{more}. This LoRA was made for a different model.", src, layers=bad)
    nonfinite = [k for k, v in lora.layers.items() if v.down.device.type != "meta"
                 and not (_all_finite(v.up) and _all_finite(v.down))]
    if nonfinite:
        more = f" (and {len(nonfinite) - 1} more layers)" if len(nonfinite) > 1 else ""
        raise NonFiniteError(
            f"{name}: layer '{nonfinite[0]}' contains NaN or Inf values{more}. The file is damaged (often a "
            "training run that diverged); use another epoch or export.", src, layers=nonfinite)
    if not lora.layers:
        raise EmptyLoRAError(f"{name} contains no LoRA layers. Pick a LoRA file that has layers.", src)


def _module_of(key: str) -> str:
    split = _split_key(key)
    return split[0] if split else key


def _base_evidence(lora: LoRA, layout: Layout) -> str:
    for lname, lr in lora.layers.items():
        if lname.endswith(".attn2.to_k") and not lr.is_conv:
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
    return {"sd1": SD15_LAYOUT, "sd2": SD21_LAYOUT}.get(base, SDXL_LAYOUT)


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
    Names come from ``layout`` (default: the layout of ``lora.base``; spellings depend only on structure).
    """
    if key_style not in KEY_STYLES:
        raise ValueError(f"unknown key style {key_style!r}; choose one of {', '.join(KEY_STYLES)}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha must be positive, not {alpha!r}")
    layout = layout or _layout_for_base(lora.base)
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
        layer = layout.get(lname)
        if layer is None:
            raise LayerMismatchError(
                f"{lora.name}: cannot write layer '{lname}': {layout.label} has no such layer.",
                lora.source, layers=[lname])
        te = layer.is_text_encoder
        if key_style == "kohya_ldm":
            module, down_s, up_s = layer.kohya, ".lora_down.weight", ".lora_up.weight"
        elif key_style == "kohya_diffusers":
            module, down_s, up_s = layer.kohya_diffusers, ".lora_down.weight", ".lora_up.weight"
        elif key_style == "comfyui":
            module, down_s, up_s = layer.comfyui, ".lora_down.weight", ".lora_up.weight"
        elif key_style == "diffusers_peft":
            module = layer.diffusers if te else "unet." + layer.diffusers
            down_s, up_s = ".lora_A.weight", ".lora_B.weight"
        elif key_style == "diffusers":
            module = layer.diffusers if te else "unet." + layer.diffusers
            down_s, up_s = ((".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight") if te
                            else (".lora.down.weight", ".lora.up.weight"))
        else:  # diffusers_attn_procs
            if te:
                module = layer.diffusers
                down_s, up_s = ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"
            else:
                module = _attn_procs_spelling(layer.diffusers) or layer.diffusers
                down_s, up_s = "_lora.down.weight", "_lora.up.weight"
        up = lr.up
        if alpha is not None:
            up = up * (lr.rank / float(alpha))
        out[module + down_s] = own(lr.down)
        out[module + up_s] = own(up)
        if alpha is not None or key_style in ("kohya_ldm", "kohya_diffusers", "comfyui"):
            out[module + ".alpha"] = torch.tensor(float(alpha if alpha is not None else lr.rank), dtype=dtype)
    return out


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
    if not lora.layers:
        raise EmptyLoRAError(f"{lora.name} has no layers; nothing to save to {p.name}.", lora.source)
    md = {**lora.metadata, **(metadata or {})}
    tensors = lora_to_state_dict(lora, key_style, dtype, alpha, layout=layout)
    return save_state_dict(tensors, p, metadata=md, overwrite=overwrite)


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
    if p.exists() and not overwrite:
        raise OutputExistsError(
            f"{p.name} already exists in {p.parent}; choose another file name or allow overwriting.", p)
    md = dict(metadata or {})
    for k, v in md.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"safetensors metadata must map strings to strings; {k!r} -> {type(v).__name__}")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=md)
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
                   "modelspec.title", "format", "duolora_method")


def summary(lora: LoRA) -> dict:
    """A JSON-able description: key style, base, layer counts, ranks, alphas, dtype, metadata, skipped."""
    unet = lora.unet_layers()
    attention = [k for k in unet if is_attention_projection(k)]
    ranks = Counter(lr.rank for lr in lora.layers.values())
    alpha_values = sorted({a for a in lora.alphas.values() if a is not None})
    reasons = Counter(s.reason for s in lora.skipped)
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
        "dtype": str(lora.dtype).replace("torch.", "") if lora.dtype is not None else None,
        "parameters": lora.num_parameters(),
        "metadata_keys": sorted(lora.metadata),
        "metadata": {k: _clip(lora.metadata[k]) for k in _METADATA_SHOWN if k in lora.metadata},
        "skipped": len(lora.skipped),
        "skipped_reasons": dict(reasons.most_common()),
        "skipped_examples": [s.key for s in lora.skipped[:5]],
    }


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _rank_text(ranks: list[int]) -> str:
    if not ranks:
        return "rank –"
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"rank {ranks[0]}–{ranks[-1]}"


def one_line_summary(lora: LoRA) -> str:
    """E.g. ``kohya_ldm · SDXL · 560 layers · rank 64`` (text-encoder part and skipped keys when present)."""
    n_te = len(lora.text_encoder_layers())
    layers = f"{len(lora.layers)} layers" + (f" ({n_te} text encoder)" if n_te else "")
    parts = [lora.key_style, BASE_LABELS.get(lora.base, lora.base), layers, _rank_text(lora.ranks())]
    if lora.skipped:
        parts.append(f"{len(lora.skipped)} keys skipped")
    return " · ".join(parts)
