"""``duolora inspect FILE [--json]``: describe a LoRA file without loading its weights into memory."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

from .families import BASE_LAYOUTS, KNOWN_LAYOUTS
from .formats import (
    LoRAError,
    merge_layout,
    non_finite_error,
    non_finite_keys,
    non_finite_layers,
    not_merged_lines,
    read_lora_for_merge,
    scale_text,
    summary,
    validate_lora,
)
from .lora import LoRA

# Exit status of ``duolora inspect``: scripts can ask "will a merge take this file?" without parsing text.
EXIT_USABLE = 0  # described; ``duolora merge`` and the loader nodes accept it for SDXL
EXIT_REFUSED = 1  # described, but a merge would refuse it (the reason is the "for a merge" line)
EXIT_BAD_FILE = 2  # not readable as a LoRA at all (the message is on stderr)
EXIT_STATUS_HELP = (f"exit status: {EXIT_USABLE} = a merge accepts the file; {EXIT_REFUSED} = described, but a merge "
                    f"would refuse it (the reason is on the 'for a merge' line); {EXIT_BAD_FILE} = not readable as a "
                    "LoRA (the message is on stderr)")


def inspect_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """summary() of a file (read header-only, so large files are fast) plus its NaN/Inf tensor keys and
    ``for_merge``: None when ``duolora merge`` and the loader nodes accept it for SDXL, else the message
    they refuse it with (the same validate_lora check, so the three agree on every file)."""
    lora = read_lora_for_merge(path, load_tensors=False)
    layout = merge_layout(path)
    info = summary(lora)
    info["named_like"] = _named_like(lora) if lora.base == "unknown" and not info["unknown_layers"] else None
    info["non_finite_keys"] = non_finite_keys(path)
    try:
        validate_lora(lora, layout)
        refusal = None
    except LoRAError as e:
        refusal = str(e)
    if refusal is None and info["non_finite_keys"]:
        # the layers a merge reads (a NaN in a key no merge reads, e.g. an embedded token, refuses nothing)
        bad = non_finite_layers(path, layout)
        refusal = str(non_finite_error(info["file"], os.fspath(path), bad)) if bad else None
    info["for_merge"] = refusal
    return info


def _named_like(lora: LoRA) -> str | None:
    """The label of the standard model whose layer names this LoRA's layers carry (though no shape matches)."""
    counts = {layout.label: sum(layout.get(name) is not None for name in lora.layers) for layout in KNOWN_LAYOUTS}
    best = max(counts, key=lambda label: counts[label])
    return best if counts[best] else None


def format_summary(info: dict[str, Any]) -> str:
    """The human-readable report of an inspect_file() result."""
    c = info["counts"]
    ranks = info["ranks"]
    if not ranks:
        rank = "–"
    elif len(ranks) == 1:
        rank = str(ranks[0])
    else:
        rank = f"{ranks[0]}–{ranks[-1]} (" + ", ".join(
            f"{r}: {n} layers" for r, n in info["rank_counts"].items()) + ")"
    lines = [
        f"file:                {info['file']}",
        f"key style:           {info['key_style']}",
        f"base model:          {info['base_label']}",
        f"layers:              {info['layers']}",
        f"  UNet attention:    {c['unet_attention']}",
        f"  other UNet:        {c['unet_other']}",
        f"  text encoder 1:    {c['te1']}",
        f"  text encoder 2:    {c['te2']}",
        f"rank:                {rank}",
        f"alpha:               {scale_text(info)}",
        f"dtype:               {info['dtype'] or '–'}",
        f"parameters:          {info['parameters']:,}",
    ]
    meta_keys = info["metadata_keys"]
    lines.append(f"metadata:            {len(meta_keys)} key{'' if len(meta_keys) == 1 else 's'}")
    for k, v in info["metadata"].items():
        lines.append(f"  {k}: {v}")
    patches = info["patches"]
    n_patches = patches["bias"] + patches["norm_weight"]
    if n_patches:
        lines.append(f"bias/norm diffs:     {n_patches} ({patches['bias']} bias, {patches['norm_weight']} norm "
                     "weight): ComfyUI applies them; a merge carries them, summed like layers outside its "
                     "learned scope")
    groups = info["not_merged"]
    n = sum(g["count"] for g in groups)
    lines.append(f"not merged:          {n}" + (" (counted by module)" if n else ""))
    lines.extend(f"  {line}" for line in not_merged_lines(info))
    bad = info["non_finite_keys"]
    lines.append(f"NaN/Inf tensors:     {len(bad)}" + (f" (e.g. {bad[0]})" if bad else ""))
    lines.append("for a merge:         " + ("usable" if info["for_merge"] is None else
                                            f"refused: {info['for_merge']}"))
    lines.extend(_notes(info))
    return "\n".join(lines)


def _notes(info: dict[str, Any]) -> list[str]:
    """The closing note: what the file is when it is not an SDXL LoRA."""
    if info["base"] == "sdxl":
        return []
    if info["base"] in BASE_LAYOUTS and BASE_LAYOUTS[info["base"]].family != "sdxl":
        nodes = ("so does ZipRank Merge in mode 'weights'" if BASE_LAYOUTS[info["base"]].family == "flux" else
                 "the nodes merge SDXL and Flux.1 LoRAs")
        return [(f"note: a {info['base_label']} LoRA: duolora merge merges it weights-only with another "
                 f"{info['base_label']} LoRA; {nodes}.")]
    if info["base"] != "unknown":
        return [f"note: DuoLoRA merges SDXL LoRAs; this one is for {info['base_label']}."]
    spelling = info["unrecognised_spelling"]
    if spelling is not None:
        return [(f"note: this is a LoRA whose layer names DuoLoRA does not recognise: e.g. "
                 f"'{spelling['module']}' is the layer '{spelling['layer']}' behind the prefix "
                 f"'{spelling['prefix']}'. Export it again in kohya or diffusers format to merge it.")]
    what = (f"a LoRA for {info['family_hint']} (its layer names look like {info['family_hint']} ones)"
            if info["family_hint"] else "a LoRA for a model family DuoLoRA does not know")
    n = info["unknown_layers"]
    if not n and info.get("named_like"):
        return [(f"note: its {info['layers']} layers carry {info['named_like']}'s layer names, but none has "
                 f"{info['named_like']}'s shape: a LoRA for a model built like it at other widths, not for SDXL, "
                 "SD1.x or SD2.x. DuoLoRA merges SDXL LoRAs.")]
    return [(f"note: this is {what}, not for SDXL, SD1.x or SD2.x: none of its {n} layers is one of theirs. "
             "DuoLoRA merges SDXL LoRAs.")]


def run_inspect(path: str | os.PathLike[str], as_json: bool = False, out: TextIO | None = None,
                err: TextIO | None = None) -> int:
    """Print a LoRA file's description. Returns EXIT_USABLE, EXIT_REFUSED (described, but a merge would refuse
    it) or EXIT_BAD_FILE (not readable; the message on stderr)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        info = inspect_file(path)
    except LoRAError as e:
        print(f"error: {e}", file=err)
        return EXIT_BAD_FILE
    print(json.dumps(info, indent=2) if as_json else format_summary(info), file=out)
    return EXIT_USABLE if info["for_merge"] is None else EXIT_REFUSED
