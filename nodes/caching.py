"""ZipRank Merge's on-disk merge cache: the key of one merge, and the merge run through the cache.

ComfyUI may drop a node's output under RAM pressure and run the node again although none of its inputs changed;
a paper merge takes minutes. The cache (``duolora.merge_cache``, placed by ``comfy_bridge.merge_cache``) keeps
what a merge learned under a key made of everything the merge depends on, so such a re-run costs a rebuild and
an export (seconds) instead of the optimisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..duolora import engine
from ..duolora.config import MergeConfig
from ..duolora.merge_cache import Fingerprint, Uncacheable, engine_digest
from ..duolora.optimize import MergeResult
from . import comfy_bridge as bridge
from .types import SourceLoRA


def merge_key(model, contents: Sequence[SourceLoRA], style: SourceLoRA, references: engine.ReferenceInputs,
              config: MergeConfig, settings: dict[str, Any]) -> str:
    """The cache key: every LoRA in order (its file's SHA-256 and strength, or its tensors when it came from an
    upstream node), the references (each further subject's too), the model, the config and the node's other
    ``settings``, this engine's source. Raises ``Uncacheable`` for an input that cannot be described (e.g. a
    conditioning holding hooks)."""
    fp = Fingerprint()
    fp.add(["duolora merge", engine_digest(), config.to_dict(), settings, len(contents)])
    for source in (*contents, style):
        if source.sha256:
            fp.add(["file", source.sha256, float(source.strength)])
        else:
            fp.lora(source.lora)
    for name in ("content_latents", "style_latents", "content_prompt", "style_prompt", "combined_prompt"):
        fp.add([name, getattr(references, name)])
    for i, more in enumerate(references.more_content, start=2):
        for name in ("content_latents", "content_prompt", "combined_prompt"):
            fp.add([f"{name} {i}", getattr(more, name)])
    fp.add(bridge.model_fingerprint(model))
    return fp.hexdigest()


def run_merge_cached(model, contents: Sequence[SourceLoRA], style: SourceLoRA, config: MergeConfig,
                     references: engine.ReferenceInputs, settings: dict[str, Any], progress: bridge.Progress,
                     **kwargs: Any) -> tuple[MergeResult, dict[str, Any]]:
    """``engine.run_merge`` through the merge cache. Returns the result and what the cache did (``hit``, ``key``,
    ``entry``; ``reason`` when it was not used). ``contents``: the content LoRAs in order (one, or several for a
    multi-concept merge). A cancelled merge is never stored."""
    loras = contents[0].lora if len(contents) == 1 else [src.lora for src in contents]
    cache = bridge.merge_cache()
    info: dict[str, Any] = {"hit": False, "key": None, "entry": None}
    key = None
    if cache.enabled:
        try:
            key = merge_key(model, contents, style, references, config, settings)
        except Uncacheable as err:
            info["reason"] = str(err)
    else:
        info["reason"] = "off"
    if key is not None:
        info["key"] = key
        bridge.raise_if_interrupted()
        result = cache.get(key, loras, style.lora)
        if result is not None:
            info.update(hit=True, entry=str(cache.path(key)))
            progress.finished(result)
            return result, info
    result = engine.run_merge(loras, style.lora, config, references=references, progress=progress, **kwargs)
    if key is not None and not result.cancelled:
        path = cache.put(key, result)
        info["entry"] = None if path is None else str(path)
    return result, info
