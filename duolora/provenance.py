"""What a merged LoRA file records about how it was made, written by one function for the ZipRank Merge node and
``duolora merge`` alike, and read back by one function that also takes the spellings older files hold.

Every key is ``duolora_<name>``:

* from the merge (``file_metadata``): ``method``, ``content`` (the content LoRAs' names joined by " + "),
  ``style``, ``scope``, ``prune_threshold``, ``basis`` (the exporting merger's), ``mode`` (the user's name of the
  mode: paper, layerwise, weights, layerwise+paper), ``config`` (the whole ``MergeConfig`` as JSON) and, for the
  fast modes, ``fast_objective`` (the per-layer objective before and after the solve);
* from the sources (``source_metadata``): ``version`` (of this pack), ``content`` and ``style`` (the names the
  user gave the files), ``content_sha256``,
  ``content_strength``, ``style_sha256``, ``style_strength``, and for every further content LoRA of a
  multi-concept merge ``content_2``, ``content_2_sha256``, ``content_2_strength``, … ;
* from a run through the model (``run_metadata``): ``trainable_parameters``, ``steps_done``, ``kept_rank``
  (JSON: block -> the mean kept rank of each LoRA).

Files the node wrote earlier spell the keys ``duolora.<name>`` and record the mode as its objective
("weights_only"); ``read`` accepts both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import MergeConfig, mode_of

if TYPE_CHECKING:
    from .optimize import MergeResult

PREFIX = "duolora_"
# The node's spelling of the same keys in files written before node and command line shared this writer.
OLD_PREFIX = "duolora."


@dataclass(frozen=True)
class Source:
    """One input LoRA as a file records it: its name, the SHA-256 of its file (None: not known) and the strength
    it was merged at."""

    name: str
    sha256: str | None = None
    strength: float = 1.0


def file_metadata(result: MergeResult, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The merge's own keys: the exporting merger's, the mode, the whole config and the fast objective before
    and after the solve (fast modes), then ``extra`` over them."""
    config = result.config or MergeConfig()
    md = dict(result.merged.metadata) if result.merged is not None else {}
    md[PREFIX + "mode"] = mode_of(config.objective)
    md[PREFIX + "config"] = json.dumps(config.to_dict(), sort_keys=True)
    total = result.history.get("total")
    if config.objective in ("weights_only", "layerwise") and total and len(total) == 2:
        md[PREFIX + "fast_objective"] = f"{total[0]:.6g} -> {total[1]:.6g}"
    md.update(dict(extra or {}))
    return md


def file_sources(contents: Sequence[str | os.PathLike[str]], style: str | os.PathLike[str]) -> dict[str, str]:
    """``source_metadata`` of LoRA files merged from disk (``duolora merge``, ``engine.merge_files``): each
    file by its own name, with the SHA-256 of its bytes, at strength 1."""
    from .formats import file_sha256

    return source_metadata([Source(os.path.basename(p), file_sha256(p)) for p in contents],
                           Source(os.path.basename(style), file_sha256(style)))


def source_metadata(contents: Sequence[Source], style: Source) -> dict[str, str]:
    """The pack's version and every source: ``duolora_content`` (the names joined by " + ") and
    ``duolora_style`` as the user named the files (the node: relative to models/loras), each file's SHA-256
    and strength, further content LoRAs also by name, as ``duolora_content_2``, … ."""
    from . import __version__

    md = {PREFIX + "version": __version__, PREFIX + "content": " + ".join(src.name for src in contents),
          PREFIX + "style": style.name}
    for i, src in enumerate(contents, start=1):
        key = PREFIX + ("content" if i == 1 else f"content_{i}")
        if i > 1:
            md[key] = src.name
        md[key + "_sha256"] = src.sha256 or ""
        md[key + "_strength"] = f"{src.strength:g}"
    md[PREFIX + "style_sha256"] = style.sha256 or ""
    md[PREFIX + "style_strength"] = f"{style.strength:g}"
    return md


def run_metadata(result: MergeResult, trainable_parameters: int, kept_rank: Mapping[str, object]) -> dict[str, str]:
    """What a run through the model adds: the trainable parameters, the paper steps done and the kept ranks."""
    return {PREFIX + "trainable_parameters": str(trainable_parameters),
            PREFIX + "steps_done": str(result.steps_done),
            PREFIX + "kept_rank": json.dumps(kept_rank, sort_keys=True)}


def read(metadata: Mapping[str, str]) -> dict[str, str]:
    """A file's provenance by name ("mode", "method", "content_sha256", …), from either spelling of the keys;
    the mode in the user's vocabulary ("weights", never "weights_only"). Empty for a file this pack did not
    write."""
    out: dict[str, str] = {}
    for prefix in (OLD_PREFIX, PREFIX):  # the current spelling wins where a file holds both
        out.update({k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)})
    if "mode" in out:
        out["mode"] = mode_of(out["mode"])
    return out
