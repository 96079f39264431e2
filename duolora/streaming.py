"""The streaming weights-only merge of LoRA files (``duolora merge``; docs/method.md §5): one or more content files
and a style file.

``stream_merge`` reads every file a chunk of layers at a time, builds the merger of that chunk, solves its
masks with ``duolora.solver.solve_weights``, exports it and keeps only the exported factors (in the output
dtype), so peak memory stays near the size of the output (about the input files) instead of holding
every LoRA in float32 plus its SVD factors. ``duolora.engine.run_merge`` calls it for file sources.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import torch
from safetensors import safe_open

from . import formats
from .boxqp import SOLVER_ITERATIONS
from .config import MergeConfig
from .export import agreed_value
from .families import KNOWN_LAYOUTS
from .layout import Layout
from .lora import LoRA, merge_patches
from .mergers import DirectMerger, Merger, build_merger
from .optimize import MergeResult
from .quadratics import check_method
from .solver import solve_weights

# Layers read, solved and exported together (bounds the extra memory of the stream).
CHUNK_LAYERS = 32



class _LayerReader:
    """Reads one file's layers on demand: canonical name -> canonical LowRank, a few at a time.

    Each layer's tensors go through ``formats.state_dict_to_lora`` (the same parsing, alpha folding and
    float32 conversion as a full read), so a streamed layer equals the same layer of ``load_lora``.
    """

    def __init__(self, path: str | os.PathLike[str], meta: LoRA, layout: Layout) -> None:
        self.path = os.fspath(path)
        self.meta = meta
        self.layout = layout
        try:
            # pread copies each tensor into ordinary memory that is freed with it; the default mmap keeps
            # every page it touched resident (and counted in the process's RSS) until the file is closed.
            self._file = safe_open(self.path, framework="pt", device="cpu", backend="pread")
        except TypeError:  # safetensors < 0.8 has no backend argument
            self._file = safe_open(self.path, framework="pt", device="cpu")
        self.groups: dict[str, list[str]] = {}
        for key in self._file.keys():  # noqa: SIM118 (safe_open is not iterable)
            split = formats.split_key(key)  # the key grammar lives in formats
            if split is None:
                continue
            hit = layout.resolve_part(split[0])  # a slice of a fused layer is read with its other slices
            if hit is not None and hit[0].name in meta.layers:
                self.groups.setdefault(hit[0].name, []).append(key)

    def read(self, names: Sequence[str]) -> LoRA:
        """The named layers as a LoRA with this file's name, key style, base and dtype."""
        sd = {}
        for name in names:
            for key in self.groups.get(name, ()):
                sd[key] = self._file.get_tensor(key)
        part = formats.state_dict_to_lora(sd, {}, self.path, layouts=(self.layout,)) if sd else LoRA()
        # One float64 sum per factor is finite exactly when every entry is (much cheaper than isfinite).
        bad = [k for k, lr in part.layers.items()
               if not all(bool(torch.isfinite(t.sum(dtype=torch.float64))) for t in (lr.up, lr.down))]
        if bad:  # name every such layer of the file, not only this chunk's, as inspect does
            raise formats.non_finite_error(self.meta.name, self.path,
                                           formats.non_finite_layers(self.path, self.layout) or bad)
        return LoRA(layers=part.layers, metadata={}, source=self.path, key_style=self.meta.key_style,
                    base=self.meta.base, dtype=self.meta.dtype)

    def close(self) -> None:
        self._file = None


def _read_header(path: str | os.PathLike[str], layout: Layout) -> LoRA:
    """Header-only read (meta tensors) validated against ``layout``: names, shapes, base model."""
    candidates = (layout, *(x for x in KNOWN_LAYOUTS if x is not layout))
    meta = formats.read_lora(path, load_tensors=False, layouts=candidates)
    formats.validate_lora(meta, layout)
    meta.base = layout.base
    return meta


PathLike = str | os.PathLike[str]


def _plan(config: MergeConfig, metas_c: Sequence[LoRA], meta_s: LoRA) -> tuple[list[str], set[str]]:
    """(every layer name in merge order, the learned ones) from the headers, with the merger's own checks.

    A merger over the header-only LoRAs would work too, but operations on ``meta`` tensors import
    torch's compiler stack on first use (seconds); an empty merger gives the same rules for free.
    """
    empty_c = [LoRA(source=m.source) for m in metas_c]
    probe = build_merger("direct", empty_c, LoRA(source=meta_s.source), config)
    metas = [*metas_c, meta_s]
    names = sorted(set().union(*(m.layers for m in metas)))
    learned = set()
    for name in names:
        parts = {t: m.layers.get(name) for t, m in zip(probe.tags, metas)}
        probe._check_compatible(name, parts)
        if config.method == "ziprank" and probe._learns(name, parts):
            learned.add(name)
    if config.method == "ziprank" and not learned:
        # No shared layer in scope: build_merger raises its own message for exactly this case.
        build_merger(config.method, empty_c, LoRA(source=meta_s.source), config)
    return names, learned


def _chunk_merger(method: str, contents: list[LoRA], style: LoRA, config: MergeConfig, learns: bool) -> Merger:
    content: LoRA | list[LoRA] = contents[0] if len(contents) == 1 else contents
    if learns or method in ("direct", "b_lora"):
        return build_merger(method, content, style, config)
    # A chunk without a learned layer: every layer is fixed, exactly as the full merger fixes it.
    return DirectMerger(content, style, scope=config.scope, w_c=config.w_c, w_s=config.w_s,
                        prune_threshold=config.prune_threshold)


def open_headers(content_path: PathLike | Sequence[PathLike], style_path: PathLike,
                 layout: Layout) -> tuple[LoRA, ...]:
    """Every file's header (names, shapes, base model; no tensors), validated against ``layout``: the content
    file(s) first, then the style file.

    Raises the engine's ``formats.LoRAError`` subclasses (missing file, wrong base model, …)."""
    contents = [content_path] if isinstance(content_path, (str, os.PathLike)) else list(content_path)
    return (*(_read_header(p, layout) for p in contents), _read_header(style_path, layout))


def stream_merge(
    content_path: PathLike | Sequence[PathLike],
    style_path: PathLike,
    config: MergeConfig,
    *,
    layout: Layout,
    headers: Sequence[LoRA] | None = None,
    export_dtype: torch.dtype | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    chunk_layers: int = CHUNK_LAYERS,
    iterations: int = SOLVER_ITERATIONS,
) -> MergeResult:
    """Weights-only merge of LoRA files (one content path or several, and the style path), ``chunk_layers``
    layers at a time; nothing is written.

    Per chunk: read every file's layers, build the merger of that chunk (``build_merger``: same layers, same
    SVD basis, same fixed layers as a merger over the whole files), solve its masks, export it with
    ``Merger.export`` and keep only the exported factors, in ``export_dtype`` (default float32, like
    ``Merger.export``). ``headers``: from ``open_headers`` when the caller already read them.
    ``progress(layers_done, layers_total, {})`` after every chunk; ``should_cancel()`` before every chunk
    (True: the result comes back with ``cancelled=True`` and no ``merged``). Returns a ``MergeResult``
    with ``merger=None``, ``merged`` (metadata: ``Merger.export``'s provenance, from a chunk built by the
    requested method when there is one; ``patches``: the inputs' bias/norm differences merged as
    ``Merger.export`` merges them), ``total_components`` and ``history``: each term of the fast
    objective, mean over the learned layers, at the direct merge and after the solve. Raises the engine's
    typed errors (``formats.LoRAError``, ``MergerError``, ``FastModeError``).
    """
    start = time.perf_counter()
    check_method(config.method, "weights")
    content_paths = [content_path] if isinstance(content_path, (str, os.PathLike)) else list(content_path)
    metas = list(headers) if headers is not None else list(open_headers(content_paths, style_path, layout))
    names, learned = _plan(config, metas[:-1], metas[-1])
    out_dtype = export_dtype or torch.float32
    readers = [_LayerReader(p, m, layout) for p, m in zip([*content_paths, style_path], metas)]
    layers: dict = {}
    history_acc: dict[str, list[float]] = {}
    metadata: dict[str, str] = {}
    metadata_from_method = False
    total = 0
    step = max(1, int(chunk_layers))
    try:
        for lo in range(0, len(names), step):
            if should_cancel is not None and should_cancel():
                return MergeResult(merger=None, cancelled=True, config=config,
                                   wall_seconds=time.perf_counter() - start)
            chunk = names[lo: lo + step]
            parts = [r.read(chunk) for r in readers]
            learns = any(n in learned for n in chunk)
            merger = _chunk_merger(config.method, parts[:-1], parts[-1], config, learns)
            del parts
            if merger.learned_layers():
                res = solve_weights(merger, config, iterations)
                n_learned = len(merger.learned_layers())
                for k, (before, after) in res.history.items():
                    acc = history_acc.setdefault(k, [0.0, 0.0])
                    acc[0] += before * n_learned
                    acc[1] += after * n_learned
            exported = merger.export(config.prune_threshold)
            if not metadata or (learns and not metadata_from_method):
                # Merger.export's provenance, from a chunk built by the requested method when there is one.
                metadata, metadata_from_method = dict(exported.metadata), learns
            for layer in merger.layers:
                total += sum(layer.rank(t) for t in layer.tags)
            for name, lr in exported.layers.items():
                # Keep only the output-dtype copy: the float32 factors of the chunk are freed with it.
                layers[name] = lr.to(dtype=out_dtype)
            del merger, exported
            if progress is not None:
                progress(min(lo + len(chunk), len(names)), len(names), {})
    finally:
        for r in readers:
            r.close()
    history = {k: [v[0] / max(1, len(learned)), v[1] / max(1, len(learned))] for k, v in history_acc.items()}
    key_style = agreed_value([m.key_style for m in metas], "unknown")  # as Merger.export
    # The inputs' bias/norm differences, as Merger.export carries them (the headers hold their values).
    patches = merge_patches([m.patches for m in metas[:-1]] if len(metas) > 2 else metas[0].patches,
                            metas[-1].patches, config.w_c, config.w_s)
    merged = LoRA(layers=layers, metadata=metadata, source=None, key_style=key_style, base=layout.base,
                  dtype=out_dtype, patches=patches)
    return MergeResult(merger=None, history=history, config=config, merged=merged, total_components=total,
                       wall_seconds=time.perf_counter() - start)
