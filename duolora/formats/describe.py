"""Describing a read LoRA for people: inspect's summary and its alpha line, the loader nodes' one-line summary,
what is not merged and why, where a scale came from, and what ``duolora merge`` says about its inputs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from ..families import BASE_LABELS
from ..layout import is_attention_projection
from ..lora import LoRA
from .errors import LoRAError
from .keys import EMBEDDING_REASON
from .read import ALPHA_ONLY_REASON, RANK_ZERO_REASON
from .scales import (
    PEFT_CONFIG_MISSING_NOTE,
    PEFT_CONFIG_NAME,
    PEFT_DEFAULTS,
    PEFT_METADATA_KEY,
    peft_configs,
    sidecar_configs,
)
from .validate import family_hint, spelling_of, unknown_modules

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
        "family_hint": family_hint(unknown) if unknown else None,
        "unrecognised_spelling": _spelling_example(unknown),
    }


def _peft_details(lora: LoRA, place: str = "peft_metadata") -> list[str]:
    """The LoraConfig entries that decided scales, e.g. ["unet: lora_alpha 64 / r 16"]: of the header's
    lora_adapter_metadata (``place`` "peft_metadata") or of the adapter_config.json beside the file
    ("peft_config", one config: ["lora_alpha 32 / r 16"])."""
    if place not in lora.scale_sources.values():
        return []
    try:
        parts = (peft_configs(lora.metadata, lora.name, lora.source) if place == "peft_metadata"
                 else sidecar_configs(lora.source, lora.name)) or {}
    except LoRAError:
        return []
    out = []
    for component, config in parts.items():
        r = config.get("r", PEFT_DEFAULTS["r"])
        alpha = config.get("lora_alpha", PEFT_DEFAULTS["lora_alpha"])
        text = (("" if place == "peft_config" else f"{'all' if component == '*' else component}: ")
                + f"lora_alpha {alpha} / {'√' if config.get('use_rslora') else ''}r {r}")
        patterns = [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)]
        if patterns:
            text += " (with " + " and ".join(f"{len(config[k])} {k} entries" for k in patterns) + ")"
        out.append(text)
    return out


def _spelling_example(unknown: list[str]) -> dict | None:
    for module in unknown:
        found = spelling_of(module)
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
