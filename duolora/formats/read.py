"""Reading: a LoRA state dict or .safetensors file in any supported key style becomes a ``LoRA`` (canonical layer
names, float32 factors, the writer's scale folded into up, slices of a fused layer fused, LyCORIS Tucker convs
folded); bias/norm differences become ``LoRA.patches``, and every key not read is named in ``LoRA.skipped``."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping

import torch

from ..families import KNOWN_LAYOUTS
from ..layout import Layer, Layout
from ..lora import LoRA, LowRank, SkippedKey
from .detect import base_hint, detect_layout
from .errors import EmptyLoRAError, MalformedLoRAError, RankMismatchError, display_name, quote_examples
from .keys import (
    CLONEOFSIMO_RE,
    EMBEDDING_RE,
    EMBEDDING_REASON,
    adapter_of,
    patch_of,
    split_key,
    style_of,
    syntactic_style,
)
from .not_lora import adapter_error, check_sidecar_type, cloneofsimo_error, not_lora_error
from .safetensors_io import read_header, read_tensors
from .scales import (
    PEFT_METADATA_KEY,
    file_metadata,
    layer_scale,
    looks_like_peft_adapter,
    peft_configs,
    sidecar_configs,
)

# Why keys a file holds are left out of the merge (``SkippedKey.reason``; the summaries name them).
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

    The scale of each layer comes from where its writer keeps it (``layer_scale``): ``.alpha`` tensors, the
    header's PEFT ``lora_adapter_metadata``, or the ``adapter_config.json`` PEFT's save_pretrained writes beside
    an ``adapter_model.safetensors``. Without ``metadata``, a ``source`` naming a safetensors file has its
    header's metadata read, so a caller passing some of a file's tensors gets the file's scale.
    LyCORIS Tucker convs (``lora_mid``) are folded into plain conv layers (``_fold_tucker``).
    Bias/norm differences (``.diff_b``, 1-D ``.diff``, ``.w_norm``, ``.b_norm``) become ``LoRA.patches``.
    """
    metadata = dict(metadata or {}) or file_metadata(source)
    layouts = layouts or KNOWN_LAYOUTS
    name = display_name(source)
    if not sd:
        raise EmptyLoRAError(f"{name} contains no tensors at all. Pick a LoRA file that has layers.", source)

    keys = list(sd)
    if any(CLONEOFSIMO_RE.match(k) for k in keys):
        raise cloneofsimo_error(sd, source)

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
        patch = patch_of(key, sd[key].shape)
        if patch is not None:
            patch_keys.append((key, *patch))
            continue
        adapter = adapter_of(key)
        if adapter is not None:
            adapters[adapter[0]] = adapter[1]
            continue
        if EMBEDDING_RE.match(key):
            skipped.append(SkippedKey(key, EMBEDDING_REASON, "ignored", module=key))
        else:
            skipped.append(SkippedKey(key, "not a LoRA tensor name DuoLoRA knows", "unknown_key", module=key))

    if adapters:
        raise adapter_error(sd, adapters, groups, metadata, layouts, source)
    peft = peft_configs(metadata, name, source)
    if peft is not None and any(bool(c.get("use_dora")) for c in peft.values()):
        raise adapter_error(sd, dict.fromkeys(m for m, g in groups.items() if "down" in g), groups, metadata,
                             layouts, source, algorithm="DoRA", evidence=f"its {PEFT_METADATA_KEY} says use_dora")
    sidecar = sidecar_configs(source, name)
    if sidecar is not None:
        check_sidecar_type(sidecar["*"], sd, groups, metadata, layouts, source)

    lora_modules = {m: g for m, g in groups.items() if g.keys() & {"up", "down", "mid"}}
    alpha_only = [m for m in groups if m not in lora_modules]
    if not lora_modules:
        if patch_keys:
            raise EmptyLoRAError(
                f"{name} holds only bias/norm differences ({len(patch_keys)} tensors, e.g. "
                f"{quote_examples(sorted(k for k, _, _ in patch_keys))}) and no low-rank layer, so there is nothing "
                "to merge. Pick a LoRA file that has layers.", source)
        if alpha_only and not skipped:
            raise EmptyLoRAError(
                f"{name} holds only .alpha tensors ({len(alpha_only)}, e.g. "
                f"{quote_examples(sorted(groups[m]['alpha'] for m in alpha_only))}) and no lora_down/lora_up factors: "
                "an alpha alone does nothing, so there is nothing to merge. Pick a LoRA file that has layers.",
                source)
        raise not_lora_error(keys, source)
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

    hint = base_hint(metadata, lora_modules)
    layout, matched = detect_layout(shapes, layouts, hint)
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
            styles[syntactic_style(module, family)] += 1
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
        (te_styles if layer.is_text_encoder else styles)[style_of(alias_kind, family)] += 1
        up, down = factors[module]
        dtypes[sd[g["down"]].dtype] += 1
        # the scale's rank is the file's lora_down rank, as every loader divides by it (for a Tucker layer
        # also lora_mid's, which is square)
        alpha, scale, scale_source = layer_scale(layer, module, int(sd[g["down"]].shape[0]),
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
    if sidecar is None and peft is None and "none" in sources.values() and looks_like_peft_adapter(
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
            f"{name}: the slices of layer '{layer.name}' ({quote_examples([m for _, m, _, _ in found])}) read inputs of "
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


def read_lora(path: str | os.PathLike[str], *, load_tensors: bool = True,
              layouts: tuple[Layout, ...] | None = None) -> LoRA:
    """Read a .safetensors LoRA in any supported key style (no base-model check; see load_lora).

    ``load_tensors=False`` reads only the header, the alphas and the (small) bias/norm differences: layers
    hold ``meta`` tensors with the right shapes (fast, for inspect). Raises a LoRAError subclass with a
    user-facing message.
    """
    header, metadata = read_header(path)
    tensors = read_tensors(path, header, lazy=not load_tensors)
    lora = state_dict_to_lora(tensors, metadata, os.fspath(path), layouts=layouts)
    return lora
