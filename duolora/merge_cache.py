"""An on-disk cache of finished merges, so a merge whose output a host dropped comes back in seconds.

A host may run a node again although nothing about it changed (ComfyUI drops large node outputs when RAM runs
short and silently re-runs the node when they are needed again). A paper merge takes minutes; what it learns is
small: its masks (r_c + r_s values per layer, about 0.4 MB for SDXL at rank 64). An entry keeps those masks, the
loss history and the config the merge ran with, under a key that hashes everything the merge depends on:
both LoRAs (their tensors, or their files' SHA-256 and strength), the references, the model and every setting
(the caller puts them in, see ``Fingerprint``), plus this engine's own source. A hit rebuilds the merger from
the two LoRAs, loads the masks and exports: the very LoRA the merge exported.

Entries are single ``.safetensors`` files named by their key, written atomically; the folder is bounded in
bytes (least recently used entries go first) and may be deleted at any time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import MergeConfig
from .formats import new_file_beside
from .lora import LoRA
from .mergers import build_merger
from .optimize import MergeResult

# Bump when an entry's layout changes (old entries are then simply never hit).
FORMAT = 1
SUFFIX = ".safetensors"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


class Uncacheable(TypeError):
    """An input the key cannot describe faithfully (e.g. a callable); the merge then runs without the cache."""


class Fingerprint:
    """A SHA-256 over a stream of typed values: numbers, strings, tensors (dtype, shape, bytes), and lists,
    tuples and dicts of them (dict keys sorted). Anything else raises ``Uncacheable``.

    ``sample`` (elements): tensors larger than that contribute their first and last ``sample`` elements besides
    dtype and shape (a model's weights: a fingerprint, not a proof); 0 hashes every byte.
    """

    def __init__(self, sample: int = 0) -> None:
        self._h = hashlib.sha256()
        self.sample = sample

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def _tag(self, tag: str) -> None:
        self._h.update(f"\0{tag}\0".encode())

    def add(self, value: Any) -> Fingerprint:
        if value is None or isinstance(value, (bool, int, str)):
            self._tag(f"{type(value).__name__}:{value}")
        elif isinstance(value, float):
            self._tag(f"float:{value!r}")
        elif isinstance(value, (torch.dtype, torch.device)):
            self._tag(f"{type(value).__name__}:{value}")
        elif isinstance(value, torch.Tensor):
            self.tensor(value)
        elif isinstance(value, (list, tuple)):
            self._tag(f"{type(value).__name__}:{len(value)}")
            for item in value:
                self.add(item)
        elif isinstance(value, Mapping):
            self._tag(f"dict:{len(value)}")
            for key in sorted(value, key=str):
                self.add(str(key))
                self.add(value[key])
        else:
            raise Uncacheable(f"cannot fingerprint a {type(value).__module__}.{type(value).__qualname__}")
        return self

    def tensor(self, t: torch.Tensor) -> None:
        self._tag(f"tensor:{t.dtype}:{tuple(t.shape)}")
        if t.is_meta:
            return
        flat = t.detach().reshape(-1)
        if self.sample and flat.numel() > 2 * self.sample:
            flat = torch.cat([flat[:self.sample], flat[-self.sample:]])
        flat = flat.cpu().contiguous()
        if flat.dtype.is_floating_point and flat.element_size() == 1:  # float8: no numpy view, hash the bits
            flat = flat.view(torch.uint8)
        self._h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")

    def lora(self, lora: LoRA) -> Fingerprint:
        """Everything of a LoRA the merge reads: every layer's factors, the dense patches, dtype and spelling."""
        self._tag("lora")
        self.add({"dtype": lora.dtype, "key_style": lora.key_style, "base": lora.base})
        for name in sorted(lora.layers):
            self.add(name)
            self.tensor(lora.layers[name].up)
            self.tensor(lora.layers[name].down)
        self.add(dict(lora.patches))
        return self


_SOURCE_DIGEST: str | None = None


def engine_digest() -> str:
    """A SHA-256 of this engine's source files: an entry made by other merge code is never hit."""
    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:
        h = hashlib.sha256(f"format {FORMAT}".encode())
        for path in sorted(Path(__file__).parent.glob("*.py")):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
        _SOURCE_DIGEST = h.hexdigest()
    return _SOURCE_DIGEST


@dataclass
class MergeCache:
    """A folder of merge entries, at most ``max_bytes`` in all (0: the cache is off)."""

    folder: Path
    max_bytes: int = DEFAULT_MAX_BYTES

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def path(self, key: str) -> Path:
        return Path(self.folder) / f"{key}{SUFFIX}"

    def get(self, key: str, content: LoRA | Sequence[LoRA], style: LoRA) -> MergeResult | None:
        """The merge stored under ``key`` rebuilt from the LoRAs (one content LoRA or several), or None (no entry,
        or one that does not fit these LoRAs: it is removed)."""
        if not self.enabled:
            return None
        path = self.path(key)
        try:
            masks = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["duolora_cache"])
        except Exception:  # noqa: BLE001 - unreadable, half-written or of another layout: a miss
            return None
        try:
            config = MergeConfig.from_dict(meta["config"])
            merger = build_merger(config.method, content, style, config)
            merger.load_state_dict(masks, strict=True)
        except (KeyError, ValueError, RuntimeError):
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # recently used: evicted last
        result = MergeResult(merger=merger, history={k: [float(v) for v in vs] for k, vs in meta["history"].items()},
                             steps_done=int(meta["steps_done"]), skipped_steps=int(meta.get("skipped_steps", 0)),
                             config=config)
        result.total_components = sum(layer.rank(t) for layer in merger.layers for t in layer.tags)
        result.merged = merger.export(config.prune_threshold)
        return result

    def put(self, key: str, result: MergeResult) -> Path | None:
        """Store a finished merge (never a cancelled one); then evict the oldest entries beyond the bound."""
        if not self.enabled or result.cancelled or result.merger is None or result.config is None:
            return None
        masks = {k: v.detach().float().cpu().contiguous() for k, v in result.merger.state_dict().items()}
        history = {k: [float(x) if math.isfinite(float(x)) else str(float(x)) for x in v]
                   for k, v in result.history.items()}
        meta = {"config": result.config.to_dict(), "history": history, "steps_done": result.steps_done,
                "skipped_steps": result.skipped_steps}
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        # The mode a plain write gives (0o666 less the umask), set again after safetensors wrote the file (it
        # may replace it with one of its own); renamed into place whole.
        tmp, mode = new_file_beside(self.path(key))
        try:
            save_file(masks, tmp, metadata={"duolora_cache": json.dumps(meta)})
            os.chmod(tmp, mode)
            os.replace(tmp, self.path(key))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.evict()
        return self.path(key)

    def entries(self) -> list[Path]:
        """Every entry, least recently used first."""
        folder = Path(self.folder)
        if not folder.is_dir():
            return []
        found = []
        for p in folder.glob(f"*{SUFFIX}"):
            if p.name.startswith("."):
                continue
            try:
                found.append((p.stat().st_mtime_ns, p))
            except OSError:
                continue
        return [p for _, p in sorted(found)]

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.entries() if p.exists())

    def evict(self) -> list[Path]:
        """Remove least recently used entries until the folder holds at most ``max_bytes``; returns them."""
        entries = self.entries()
        sizes = {p: p.stat().st_size for p in entries}
        total = sum(sizes.values())
        removed = []
        for p in entries:
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= sizes[p]
            removed.append(p)
        return removed

    def clear(self) -> int:
        """Remove every entry; returns how many there were."""
        entries = self.entries()
        for p in entries:
            p.unlink(missing_ok=True)
        return len(entries)
