"""Checking a read LoRA against a model's layout (base model, layer names and shapes, unknown layers, NaN/Inf)
with one typed error per problem; ``load_lora`` reads and checks a file, ``merge_layout`` picks the layout a merge
checks it against."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable

from safetensors import safe_open

from .. import families
from ..families import BASE_LABELS, KNOWN_LAYOUTS, family_of
from ..families.sdxl import SDXL_LAYOUT
from ..layout import Layout
from ..lora import TEXT_ENCODER_PREFIXES, LoRA
from .detect import base_hint, shapes_match
from .errors import (
    EmptyLoRAError,
    LayerMismatchError,
    LoRAError,
    NonFiniteError,
    UnknownKeyStyleError,
    WrongBaseModelError,
    quote_examples,
)
from .keys import patch_of, split_key
from .read import RANK_ZERO_REASON, read_lora
from .safetensors_io import all_finite, read_header

# A file whose unknown modules are at least this share of its modules is refused as made for another
# model; below it the SDXL part loads and the rest is named as skipped. An SDXL LoRA's modules are all
# SDXL layers; a few extra ones come from tools that also train something else. A quarter or more is no
# longer "a few": the merge would drop much of what the file does, and the file is likely for a model
# that only shares some names with SDXL.
UNKNOWN_SHARE_REFUSED = 0.25


# Names some other model families give their layers: enough to say what a file probably is.
_FAMILY_HINTS: tuple[tuple[str, str], ...] = (
    (r"double_blocks|single_blocks|single_transformer_blocks", "Flux"),
    (r"joint_blocks|context_block", "Stable Diffusion 3"),
    (r"^lora_prior_", "Stable Cascade"),
    (r"adaln_single", "PixArt"),
    (r"blocks[._]\d+[._](cross_attn|self_attn)", "Wan (video)"),
)


def family_hint(modules: Iterable[str]) -> str | None:
    """The model family a file's unknown module names suggest, or None."""
    votes: Counter[str] = Counter()
    for m in modules:
        for pattern, family in _FAMILY_HINTS:
            if re.search(pattern, m):
                votes[family] += 1
                break
    return votes.most_common(1)[0][0] if votes else None


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
                f"layers (e.g. {quote_examples(list(lora.layers), 2)}), none of which exists in {layout.label}. Pick a "
                f"LoRA trained for {layout.label}.", src, base=owner.base, expected=layout.base)
    unknown_keys = [s.key for s in lora.skipped if s.kind == "unknown_key"]
    if unknown_keys:
        n = len(unknown_keys)
        these = "tensor name is not a LoRA tensor" if n == 1 else "tensor names are not LoRA tensors"
        raise UnknownKeyStyleError(
            f"{name}: {n} {these} DuoLoRA can read (e.g. {quote_examples(sorted(unknown_keys))}). What "
            f"{'it does' if n == 1 else 'they do'} to the model is unknown, so DuoLoRA refuses the file rather "
            f"than merge it without {'it' if n == 1 else 'them'}. Export the LoRA again as a plain kohya or "
            "diffusers LoRA.", src)
    total = len(lora.layers) + len(unknown)
    if unknown and len(unknown) >= UNKNOWN_SHARE_REFUSED * total:
        spelling = sum(1 for m in unknown if spelling_of(m) is not None)
        if spelling * 2 > len(unknown):
            what = "are spelled with a prefix DuoLoRA does not recognise"
            advice = ("Export the LoRA again in kohya (lora_unet_…) or diffusers (unet.…) format; the README's "
                      "'LoRA files it reads' lists every spelling DuoLoRA reads.")
        else:
            family = family_hint(unknown)
            what = f"do not exist in {layout.label}"
            advice = (f"A LoRA with this many unknown layers was made for a different model"
                      f"{f' (its layer names look like {family} ones)' if family else ''}. Pick a LoRA trained "
                      f"for {layout.label}.")
        raise LayerMismatchError(
            f"{name}: {len(unknown)} of its {total} layers {what} (e.g. {quote_examples(unknown)}). {advice}",
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
        elif not shapes_match(lr.weight_shape, target.shape):
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
                 and not (all_finite(v.up) and all_finite(v.down))]
    nonfinite += [k for k, v in lora.patches.items() if v.device.type != "meta" and not all_finite(v)]
    if nonfinite:
        raise non_finite_error(name, src, nonfinite)
    if not lora.layers:
        empty = list(dict.fromkeys(s.module for s in lora.skipped if s.reason == RANK_ZERO_REASON))
        if empty:
            raise EmptyLoRAError(
                f"{name}: all {len(empty)} of its layers have rank 0 (lora_down (0, in), lora_up (out, 0), e.g. "
                f"{quote_examples(empty, 2)}), so it changes nothing and there is nothing to merge. Pick a LoRA file "
                "that has layers (a tool that pruned this one removed every component).", src)
        raise EmptyLoRAError(f"{name} contains no LoRA layers. Pick a LoRA file that has layers.", src)


def non_finite_error(name: str, source: str | None, layers: list[str]) -> NonFiniteError:
    """The refusal of a file with NaN/Inf in ``layers`` (canonical layer or parameter names), naming how many:
    the same message from inspect, ``duolora merge`` and the nodes."""
    if len(layers) == 1:
        what = f"layer '{layers[0]}' contains"
    else:
        what = f"{len(layers)} layers ({quote_examples(layers, 2)}) contain"
    return NonFiniteError(
        f"{name}: {what} NaN or Inf values. The file is damaged (often a training run that diverged); use "
        "another epoch or export.", source, layers=layers)


def non_finite_layers(path: str | os.PathLike[str], layout: Layout = SDXL_LAYOUT) -> list[str]:
    """The layers and bias/norm differences a merge reads from ``path`` that hold NaN or Inf, one tensor at a
    time: canonical names in ``layout``'s order. A NaN alpha counts for its layer (it scales the whole ΔW);
    tensors no merge reads (unknown layers, embedded tokens) do not count."""
    header, _ = read_header(path)
    order = layout.order()
    found: dict[str, None] = {}
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        for key in header:
            split = split_key(key)
            patch = None if split is not None else patch_of(key, header[key]["shape"])
            if split is not None:
                hit = layout.resolve_part(split[0])
            else:
                hit = layout.resolve_module(patch[0]) if patch is not None else None
            if hit is None:
                continue
            t = f.get_tensor(key)
            if t.is_floating_point() and not all_finite(t):
                found[hit[0].name if patch is None else f"{hit[0].name}.{patch[1]}"] = None
    return sorted(found, key=lambda n: (n not in order, order.get(n, 0), n))


def spelling_of(module: str) -> tuple[str, str, Layout] | None:
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
    claimed = base_hint(lora.metadata, ())
    for module in unknown:
        found = spelling_of(module)
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
            f"{quote_examples(unknown, 2)}) is a spelling of a {layout.label} layer DuoLoRA recognises. Export the "
            "LoRA again in kohya (lora_unet_…) or diffusers (unet.…) format; the README's 'LoRA files it "
            "reads' lists every spelling DuoLoRA reads.", src, base=claimed)
    family = family_hint(unknown)
    looks = f" (its layer names look like {family} ones)" if family else ""
    known = "SDXL, SD1.x or SD2.x" if layout.family == "sdxl" else layout.label
    return WrongBaseModelError(
        f"{name}: this LoRA is not for {layout.label}: none of its {n} layers (e.g. {quote_examples(unknown, 2)}) "
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
        if not shapes_match(lr.weight_shape, target.shape):
            return f"e.g. its layer '{lname}' is {tuple(lr.weight_shape)}, in {layout.label} {tuple(target.shape)}"
    # same names and shapes in both (e.g. a CLIP-L-only LoRA): the metadata or the kohya prefix decided
    return "its metadata or its single-text-encoder key prefix lora_te_ say so"


def merge_layout(path: str | os.PathLike[str], *others: str | os.PathLike[str]) -> Layout:
    """The layout a merge of the LoRA file at ``path`` (with ``others``) is checked against
    (``families.merge_layout``): its family's full-size layout when its header is detected as a diffusion
    transformer's (Flux.1, Z-Image, Qwen-Image); Flux.1's table at the files' widths when their layers carry
    Flux.1's names at other widths; else SDXL's (a file for SD1.x/SD2.x or an unknown model is then refused
    with SDXL's messages, as the merge always did)."""
    loras = [read_lora(p, load_tensors=False, layouts=KNOWN_LAYOUTS) for p in (path, *others)]
    shapes = {n: lr.weight_shape for lo in loras if lo.base == loras[0].base for n, lr in lo.layers.items()}
    return families.merge_layout(loras[0].base, shapes)


def read_lora_for_merge(path: str | os.PathLike[str], *, load_tensors: bool = True) -> LoRA:
    """``read_lora`` with the table a merge checks the file against (``merge_layout``): a Flux.1 LoRA at other
    widths is read with Flux.1's table at its widths (its split projections placed at those widths)."""
    layout = merge_layout(path)
    fitted = layout not in KNOWN_LAYOUTS
    return read_lora(path, load_tensors=load_tensors, layouts=(layout, *KNOWN_LAYOUTS) if fitted else None)
