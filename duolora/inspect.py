"""``duolora inspect FILE [--json]``: describe a LoRA file without loading its weights into memory."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

from .formats import LoRAError, non_finite_keys, read_lora, summary

EXIT_BAD_FILE = 2


def inspect_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """summary() of a file (read header-only, so large files are fast) plus its NaN/Inf tensor keys."""
    lora = read_lora(path, load_tensors=False)
    info = summary(lora)
    info["non_finite_keys"] = non_finite_keys(path)
    return info


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
    alphas = ", ".join(f"{a:g}" for a in info["alphas"])
    if not alphas:
        alpha = "none (scale 1)"
    elif info["layers_without_alpha"]:
        alpha = f"{alphas} ({info['layers_without_alpha']} layers without alpha: scale 1)"
    else:
        alpha = alphas
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
        f"alpha:               {alpha}",
        f"dtype:               {info['dtype'] or '–'}",
        f"parameters:          {info['parameters']:,}",
    ]
    meta_keys = info["metadata_keys"]
    lines.append(f"metadata:            {len(meta_keys)} key{'' if len(meta_keys) == 1 else 's'}")
    for k, v in info["metadata"].items():
        lines.append(f"  {k}: {v}")
    lines.append(f"skipped keys:        {info['skipped']}")
    for reason, n in info["skipped_reasons"].items():
        lines.append(f"  {n} × {reason}")
    bad = info["non_finite_keys"]
    lines.append(f"NaN/Inf tensors:     {len(bad)}" + (f" (e.g. {bad[0]})" if bad else ""))
    if info["base"] != "sdxl":
        lines.append(f"note: DuoLoRA merges SDXL LoRAs; this one is for {info['base_label']}.")
    return "\n".join(lines)


def run_inspect(path: str | os.PathLike[str], as_json: bool = False, out: TextIO | None = None,
                err: TextIO | None = None) -> int:
    """Print a LoRA file's description; 0 on success, 2 (message on stderr) when the file is unusable."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        info = inspect_file(path)
    except LoRAError as e:
        print(f"error: {e}", file=err)
        return EXIT_BAD_FILE
    print(json.dumps(info, indent=2) if as_json else format_summary(info), file=out)
    return 0
