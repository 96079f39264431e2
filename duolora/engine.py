"""One entry point for every merge: ``run_merge`` runs any mode with any method and exports the result.

The ZipRank Merge node and ``duolora merge`` both call it; neither dispatches modes itself. The modes
(``MergeConfig.objective``; the names users see are the keys of ``config.MODES``):

* ``paper`` — the paper's objective through the diffusion model (``duolora.optimize``, docs/method.md §4);
* ``layerwise`` — one recording pass over the references (``duolora.recording``), then a per-layer solve
  (``duolora.solver``, docs/method.md §5);
* ``weights_only`` — the per-layer solve from the two LoRAs alone (no model, no references);
* ``layerwise_paper`` — the layer-wise solve as the starting point of ``steps`` paper steps (it replaces the
  prior initialisation, so ``prior_init`` is switched off in the config the merge runs with).

The engine never imports a host. What a mode needs from the model comes through two things the caller hands
over: ``open_denoiser(merger, needs_grad)``, a context manager whose value is a ``ModelDenoiser`` (a
``duolora.objective.Denoiser`` over the model with the merger attached for the life of the block;
``needs_grad`` is True for paper steps, so a host may checkpoint, and False for the recording pass), and
``ReferenceInputs``, the reference latents and conditionings as the host holds them. The references a mode
needs are checked before any model work starts (``MissingReferencesError`` names the missing ones).

Sources are in-memory ``LoRA``s or file paths: one content source or a sequence of K ≥ 1 of them (a
multi-concept merge: every content LoRA has its own mask, reconstruction term, priors against the style LoRA
and Constyle cycle; ``ReferenceInputs.more_content`` holds the references of the content LoRAs after the first),
and one style source. From files, the weights-only mode (and any method that learns nothing) streams a chunk of
layers at a time (``duolora.streaming``), so memory stays near the size of the files; the other modes read the
files whole. Before any work a merge refuses one file given as two content LoRAs (the same file as content and
style is the caller's to warn about: ``same_lora_warning``), LoRAs made for different base models,
and (K ≥ 2) a merged rank above every layer's width. With ``output`` the merged LoRA is also written
(``write_merged``, once: atomic, never overwrites unless asked; an existing file is refused before any work).

Progress: ``progress(done, total, terms)`` after every paper step (terms: that step's loss terms), every
recorded reference and every streamed chunk of layers (terms empty). Cancel: ``should_cancel()`` is asked
before every paper step and every streamed chunk; a cancelled merge returns with ``cancelled=True``, its
export holds the masks reached so far (a streamed one has none), and nothing is written. An exception raised
by the callback itself propagates unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from . import formats, provenance, streaming
from .boxqp import SOLVER_ITERATIONS
from .config import MergeConfig, mode_of
from .families import family_of, resolve_preset
from .lora import TEXT_ENCODER_PREFIXES, LoRA
from .mergers import Merger, MergerError, build_merger, check_content_count, describe_lora, lora_tags
from .objective import ContentReferences, Denoiser, References
from .optimize import MergeResult, optimize
from .quadratics import check_method
from .recording import record_activations
from .sdxl import BASE_LABELS, SDXL_LAYOUT, Layout, is_attention_projection
from .solver import solve_layerwise, solve_weights

# The modes as users name them (the node's ``mode`` widget, the ``duolora_mode`` file metadata) -> objective.
# The fast mode whose per-layer solve an objective uses (for ``solver.check_method``'s message).
_FAST_MODE = {"weights_only": "weights", "layerwise": "layerwise", "layerwise_paper": "layerwise"}
# Methods whose masks are all fixed: every mode gives the same merge, and files can always stream.
_FIXED_METHODS = ("direct", "b_lora")

ProgressFn = Callable[[int, int, dict[str, float]], None]
Source = LoRA | str | os.PathLike
Sources = Source | Sequence[Source]


class ModelDenoiser(Denoiser, Protocol):
    """A ``Denoiser`` over the model with the merger attached, as ``open_denoiser``'s context yields it."""

    # Canonical layer name -> the module the adapter patches (nn.Linear / nn.Conv2d): the recording's hooks.
    modules: Mapping[str, nn.Module]

    def prepare_latents(self, samples: Any) -> list[torch.Tensor]:
        """The host's reference latents (a batch) in the model's space, one (1, C, H, W) tensor per image."""
        ...


DenoiserFactory = Callable[[Merger, bool], AbstractContextManager[ModelDenoiser]]


@dataclass
class ContentInputs:
    """A further content LoRA's references as the host holds them (multi-concept); any may be None. The field
    names are the ones ``MissingReferencesError`` reports for that LoRA."""

    content_latents: Any = None
    content_prompt: Any = None
    combined_prompt: Any = None

    def missing(self, names: Sequence[str]) -> list[str]:
        return [name for name in names if getattr(self, name, None) is None]


@dataclass
class ReferenceInputs:
    """The references as the host holds them; any may be None (``run_merge`` says which a mode needs).

    Latents go through the denoiser's ``prepare_latents``; conditionings are passed to ``predict`` as they
    are. The field names are the ones ``MissingReferencesError`` reports. ``content_*`` and ``combined_prompt``
    belong to the (first) content LoRA; ``more_content`` holds one ``ContentInputs`` per further content LoRA,
    in order.
    """

    content_latents: Any = None
    style_latents: Any = None
    content_prompt: Any = None
    style_prompt: Any = None
    combined_prompt: Any = None
    more_content: Sequence[ContentInputs] = ()

    def missing(self, names: Sequence[str]) -> list[str]:
        return [name for name in names if getattr(self, name) is None]


class MissingReferencesError(ValueError):
    """A mode needs references the caller did not give.

    ``stage``: "paper" (paper steps learn from all five, ``combined_prompt`` only while Constyle is on),
    "record" (the layer-wise recording needs the content and style latents and prompts) or "cycle"
    (``layerwise_paper``'s paper steps need ``combined_prompt`` for Constyle; checked first, before the
    recording). ``missing``: the ``ReferenceInputs`` (or ``ContentInputs``) field names, in field order.
    ``content_index``: None for the main fields; k ≥ 2 when content LoRA k (its ``more_content`` entry) lacks
    them, with ``lora`` its file name.
    """

    def __init__(self, stage: str, missing: list[str], objective: str, content_index: int | None = None,
                 lora: str | None = None) -> None:
        self.stage, self.missing, self.objective = stage, list(missing), objective
        self.content_index, self.lora = content_index, lora
        whose = "" if content_index is None else f" of content LoRA {content_index} {lora!r}"
        super().__init__(f"the {objective!r} objective needs {', '.join(missing)}{whose} ({stage})")


class SameFileError(MergerError):
    """One LoRA file given as two content LoRAs."""


class RankWidthError(MergerError):
    """A multi-concept merge whose merged rank would exceed every layer's width."""


def same_lora_warning(content: str, style: str, remedy: str) -> str:
    """The warning for a merge whose content and style are one LoRA (one file, or two identical files): a LoRA
    merged with itself brings in no second subject or style. ``remedy``: what to pick, in the caller's words."""
    which = f"the same file, {content}" if content == style else f"identical files ({content} and {style})"
    return (f"content and style are {which}: a LoRA merged with itself adds nothing new (the plain sum only "
            f"doubles it); {remedy}.")


_RECORDED = ("content_latents", "style_latents", "content_prompt", "style_prompt")
_ALL = (*_RECORDED, "combined_prompt")
_RECORDED_MORE = ("content_latents", "content_prompt")
_ALL_MORE = (*_RECORDED_MORE, "combined_prompt")


@dataclass
class OutputFile:
    """Where and how ``run_merge`` writes the merged LoRA.

    ``dtype``: of the written factors (None: the content LoRA's, fp16 when it has none). ``key_style``:
    kohya_ldm or comfyui (both what ComfyUI's LoraLoader maps). ``extra_metadata`` is written over the
    merge's own provenance (``duolora_mode``, ``duolora_config``, the exporting merger's keys).
    """

    path: str | os.PathLike[str]
    key_style: str = "kohya_ldm"
    dtype: torch.dtype | None = None
    overwrite: bool = False
    extra_metadata: Mapping[str, str] = field(default_factory=dict)

    def refuse_existing(self) -> None:
        """Refuse, before any work, a name that is not .safetensors and a file that exists (unless
        ``overwrite``)."""
        p = Path(self.path)
        formats.refuse_output_name(p)
        if p.exists() and not self.overwrite:
            raise formats.OutputExistsError(
                f"{p.name} already exists in {p.parent}; choose another file name or allow overwriting.", p)


def run_merge(
    content: Sources,
    style: Source,
    config: MergeConfig,
    *,
    open_denoiser: DenoiserFactory | None = None,
    references: ReferenceInputs | None = None,
    progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    output: OutputFile | None = None,
    layout: Layout = SDXL_LAYOUT,
    iterations: int = SOLVER_ITERATIONS,
    chunk_layers: int = streaming.CHUNK_LAYERS,
) -> MergeResult:
    """Merge ``content`` (one source or a sequence of K ≥ 1) and ``style`` — ``LoRA``s or file paths, all of one
    kind — in ``config.objective``'s mode.

    Returns a ``MergeResult`` with the merger (None when streamed), ``history`` (per paper step, or the fast
    objective before and after the solve), ``steps_done``, ``cancelled``, ``config`` (the one it ran with),
    ``merged`` (the export: rank r_c + r_s per layer — Σ r_i over every LoRA — minus pruned components; float32
    factors in memory, in the output dtype when streamed to a file; None after a cancelled stream),
    ``total_components``, ``path`` (with ``output``) and ``wall_seconds``. ``iterations`` caps the fast
    solver's steps; ``chunk_layers`` and ``layout`` (the model family files are checked against) apply to
    file sources. See the module docstring for the model hooks, progress and cancel.

    Raises ``FastModeError`` for a feature-mask method in a fast mode, ``MissingReferencesError``,
    ``formats.LoRAError`` (unreadable or mismatched files, an existing output), ``SameFileError``,
    ``RankWidthError``, ``MergerError`` (B-LoRA with several content LoRAs, …) and ValueError (no
    ``open_denoiser`` for a mode that runs the model).
    """
    start = time.perf_counter()
    objective = config.objective
    contents = _sources(content)
    if objective in _FAST_MODE:
        check_method(config.method, _FAST_MODE[objective])
    if objective == "layerwise_paper" and config.prior_init:
        # The layer-wise solve is the starting point: the prior initialisation would overwrite it.
        config = dataclasses.replace(config, prior_init=False)
    if output is not None:
        output.refuse_existing()
    kinds = {isinstance(src, LoRA) for src in (*contents, style)}
    if len(kinds) > 1:
        raise TypeError("run_merge takes LoRAs or file paths, not some of each")
    from_files = kinds == {False}
    check_content_count(config.method, [_display(src) for src in contents])
    _check_distinct(contents, style)
    config = _for_family(config, contents, style, layout, from_files)
    export_dtype = None
    if from_files:
        headers = streaming.open_headers(contents, style, layout)
        _check_width(headers[:-1], headers[-1], config)
        if output is not None:
            export_dtype = output.dtype or headers[0].dtype or torch.float16
        if objective == "weights_only" or config.method in _FIXED_METHODS:
            result = streaming.stream_merge(contents if len(contents) > 1 else contents[0], style, config,
                                            layout=layout, headers=headers, export_dtype=export_dtype,
                                            progress=progress, should_cancel=should_cancel,
                                            chunk_layers=chunk_layers, iterations=iterations)
            return _finish(result, output, layout, start)
        contents = [formats.load_lora(p, layout) for p in contents]
        style = formats.load_lora(style, layout)
    else:
        _check_families(contents, style)
        _check_width(contents, style, config)
        if output is not None:
            export_dtype = output.dtype or contents[0].dtype or torch.float16
    merger = build_merger(config.method, contents[0] if len(contents) == 1 else contents, style, config)
    result = _solve(merger, config, open_denoiser, references or ReferenceInputs(), progress, should_cancel,
                    iterations)
    result.config = config
    result.total_components = sum(layer.rank(t) for layer in merger.layers for t in layer.tags)
    result.merged = merger.export(config.prune_threshold)
    if export_dtype is not None:
        result.merged.dtype = export_dtype
    return _finish(result, output, layout, start)


def _for_family(config: MergeConfig, contents: Sequence[Source], style: Source, layout: Layout,
                from_files: bool) -> MergeConfig:
    """``config`` as a merge on the model family runs it: with the prior preset the family uses ("auto": the
    family's own). The family: the LoRAs' (in memory) or ``layout``'s (files).

    Raises ValueError in one line for another family's preset, a custom prior that names blocks the family does
    not have, a mode that runs the model on a family whose sampling it does not model (flow matching), and
    B-LoRA on a family without its two SDXL blocks.
    """
    bases = [] if from_files else [src.base for src in (*contents, style) if src.base not in ("unknown", "", None)]
    family = family_of(bases[0]) if bases else family_of(layout)
    subject = _display(contents[0])
    if config.objective != "weights_only" and family.prediction != "eps":
        raise ValueError(f"mode '{mode_of(config.objective)}' runs the model with an ε-prediction objective, but "
                         f"{subject} is a {family.label} LoRA (flow matching): on {family.label}, choose mode "
                         "'weights'")
    if config.method == "b_lora" and not family.b_lora:
        raise ValueError(f"method 'b_lora' merges SDXL's two B-LoRA blocks, which {family.label} ({subject}) "
                         "does not have: choose ziprank or direct")
    preset = resolve_preset(family, config.prior_preset, config.custom_prior, subject)
    return config if preset == config.prior_preset else dataclasses.replace(config, prior_preset=preset)


def _sources(content: Sources) -> list[Source]:
    if isinstance(content, (LoRA, str, os.PathLike)):
        return [content]
    out = list(content)
    if not out:
        raise MergerError("a merge needs at least one content LoRA")
    return out


def _display(src: Source) -> str:
    return src.name if isinstance(src, LoRA) else os.path.basename(os.fspath(src))


def _identity(src: Source) -> tuple[str, Any]:
    """A file's real path (a LoRA read from a file: that file's), else the object itself."""
    path = os.fspath(src) if not isinstance(src, LoRA) else src.source
    if path is not None and (not isinstance(src, LoRA) or os.path.isfile(path)):
        return ("file", os.path.realpath(path))
    return ("object", id(src))


def _check_distinct(contents: Sequence[Source], style: Source) -> None:
    """Refuse one file given as two content LoRAs: merging a subject with itself only doubles it, and its two
    masks would compete for the same directions. The same file as content and style is merged (a one-pair merge
    always was); the CLI and the node warn about it (``same_lora_warning``)."""
    tags = lora_tags(len(contents))
    seen: dict[tuple[str, Any], int] = {}
    for i, src in enumerate(contents):
        key = _identity(src)
        if key in seen:
            j = seen[key]
            first = describe_lora(tags[j], _display(contents[j]), len(contents))
            second = describe_lora(tags[i], _display(src), len(contents))
            same = f"the same file ({key[1]})" if key[0] == "file" else "the same LoRA"
            raise SameFileError(f"{first} and {second} are {same}: give each LoRA once (to make a LoRA stronger, "
                                "raise its strength instead)")
        seen[key] = i


def _check_families(contents: Sequence[LoRA], style: LoRA) -> None:
    """Refuse in-memory LoRAs made for different base models (file sources are checked against ``layout``)."""
    tags = lora_tags(len(contents))
    known = [(t, lo) for t, lo in zip(tags, [*contents, style]) if lo.base not in ("unknown", "", None)]
    for tag, lora in known[1:]:
        first_tag, first = known[0]
        if lora.base != first.base:
            label, first_label = (BASE_LABELS.get(b, b) for b in (lora.base, first.base))
            raise formats.WrongBaseModelError(
                f"{describe_lora(tag, lora.name, len(contents))} is made for {label} but "
                f"{describe_lora(first_tag, first.name, len(contents))} for {first_label}; "
                "all LoRAs of a merge must be made for the same base model",
                lora.source, base=lora.base, expected=first.base)


def _check_width(contents: Sequence[LoRA], style: LoRA, config: MergeConfig) -> None:
    """A multi-concept merge refuses a merged rank above the width of every layer it patches: its LoRA would
    be larger than the dense weight differences and no exact rank reduction could be applied to it."""
    if len(contents) < 2:
        return
    loras = [*contents, style]
    excess = []
    for name in sorted(set().union(*(lo.layers for lo in loras))):
        parts = [lo.layers[name] for lo in loras if name in lo.layers]
        if len(parts) < 2:
            return  # a layer one file alone patches keeps that file's rank, never above its width
        width = min(parts[0].out_features, parts[0].in_features * parts[0].kernel_size[0] * parts[0].kernel_size[1])
        # The rank budget caps each LoRA's components in the layers ZipRank learns (``duolora.export.kept_factors``).
        budget = (config.max_rank if config.max_rank > 0 and config.method == "ziprank"
                  and not name.startswith(TEXT_ENCODER_PREFIXES)
                  and (config.scope == "all" or is_attention_projection(name)) else 0)
        merged = sum(min(lr.rank, budget) if budget else lr.rank for lr in parts)
        if merged <= width:
            return
        excess.append((merged, width))
    if excess:
        ranks = ", ".join(f"{lo.name} {max(lo.ranks() or [0])}" for lo in loras)
        raise RankWidthError(
            f"{len(contents)} content LoRAs and a style LoRA (ranks {ranks}) would give a merged LoRA of rank "
            f"{min(m for m, _ in excess)} or more in every layer, above every layer's width (at most "
            f"{max(w for _, w in excess)}): merge fewer LoRAs, or set max_rank so that the LoRAs together keep at "
            "most a layer's width")


def _solve(merger: Merger, config: MergeConfig, open_denoiser: DenoiserFactory | None, refs: ReferenceInputs,
           progress: ProgressFn | None, should_cancel: Callable[[], bool] | None, iterations: int) -> MergeResult:
    """The mode dispatch: set the merger's masks and return the solver's or the loop's result."""
    objective = config.objective
    if not merger.mask_parameters():  # direct, B-LoRA: nothing to learn in any mode
        return MergeResult(merger=merger)
    if objective == "weights_only":
        return solve_weights(merger, config, iterations)
    if objective == "paper":
        if config.steps == 0:
            return MergeResult(merger=merger)
        _require(refs, "paper", objective, constyle=config.constyle_iterations > 0, merger=merger)
        return _paper(merger, config, _factory(open_denoiser, objective), refs, progress, should_cancel)
    if objective == "layerwise_paper" and config.steps > 0 and config.constyle_iterations > 0:
        _require_cycle(refs, merger, objective)
    _require(refs, "record", objective, merger=merger)
    factory = _factory(open_denoiser, objective)
    with factory(merger, False) as denoiser:
        prepared = References(content=denoiser.prepare_latents(refs.content_latents),
                              style=denoiser.prepare_latents(refs.style_latents),
                              p_c=refs.content_prompt, p_s=refs.style_prompt, p_cs=refs.content_prompt,
                              more_content=[ContentReferences(denoiser.prepare_latents(more.content_latents),
                                                              more.content_prompt, more.content_prompt)
                                            for more in _more(refs, merger)])
        record_progress = None if progress is None else (lambda done, total: progress(done, total, {}))
        stats = record_activations(merger, denoiser, denoiser.modules, prepared, config, progress=record_progress)
    result = solve_layerwise(merger, stats, config, iterations)
    if objective == "layerwise_paper" and config.steps > 0:
        # The recording's references and the cycle check above cover everything paper steps need.
        result = _paper(merger, dataclasses.replace(config, objective="paper"), factory, refs, progress,
                        should_cancel)
    return result


def _more(refs: ReferenceInputs, merger: Merger) -> list[ContentInputs]:
    """One ``ContentInputs`` per further content LoRA of the merger (an empty one where the caller gave none)."""
    more = list(refs.more_content)[: merger.n_content - 1]
    return more + [ContentInputs() for _ in range(merger.n_content - 1 - len(more))]


def _require(refs: ReferenceInputs, stage: str, objective: str, constyle: bool = True,
             merger: Merger | None = None) -> None:
    names = _ALL if stage == "paper" and constyle else _RECORDED
    missing = refs.missing(names)
    if missing:
        raise MissingReferencesError(stage, missing, objective)
    if merger is None:
        return
    more_names = _ALL_MORE if stage == "paper" and constyle else _RECORDED_MORE
    for i, more in enumerate(_more(refs, merger)):
        missing = more.missing(more_names)
        if missing:
            raise MissingReferencesError(stage, missing, objective, i + 2, merger.content_names[i + 1])


def _require_cycle(refs: ReferenceInputs, merger: Merger, objective: str) -> None:
    """``layerwise_paper`` with Constyle: every content LoRA's ``combined_prompt``, before the recording."""
    if refs.combined_prompt is None:
        raise MissingReferencesError("cycle", ["combined_prompt"], objective)
    for i, more in enumerate(_more(refs, merger)):
        if more.combined_prompt is None:
            raise MissingReferencesError("cycle", ["combined_prompt"], objective, i + 2, merger.content_names[i + 1])


def _factory(open_denoiser: DenoiserFactory | None, objective: str) -> DenoiserFactory:
    if open_denoiser is None:
        raise ValueError(f"the {objective!r} objective runs the diffusion model; pass open_denoiser "
                         "(or use the 'weights_only' objective)")
    return open_denoiser


def _paper(merger: Merger, config: MergeConfig, open_denoiser: DenoiserFactory, refs: ReferenceInputs,
           progress: ProgressFn | None, should_cancel: Callable[[], bool] | None) -> MergeResult:
    with open_denoiser(merger, True) as denoiser:
        prepared = References(
            content=denoiser.prepare_latents(refs.content_latents),
            style=denoiser.prepare_latents(refs.style_latents),
            p_c=refs.content_prompt, p_s=refs.style_prompt,
            p_cs=refs.combined_prompt if refs.combined_prompt is not None else refs.content_prompt,
            more_content=[ContentReferences(
                denoiser.prepare_latents(more.content_latents), more.content_prompt,
                more.combined_prompt if more.combined_prompt is not None else more.content_prompt)
                for more in _more(refs, merger)],
        )
        return optimize(merger, denoiser, prepared, config, progress=progress, should_cancel=should_cancel)


def _finish(result: MergeResult, output: OutputFile | None, layout: Layout, start: float) -> MergeResult:
    """Write the export when asked (never after a cancel) and stamp the wall time."""
    if output is not None and not result.cancelled and result.merged is not None:
        result.path = write_merged(result.merged, output.path, file_metadata(result, output),
                                   key_style=output.key_style, dtype=result.merged.dtype, layout=layout,
                                   overwrite=output.overwrite)
    result.wall_seconds = time.perf_counter() - start
    return result


def write_merged(merged: LoRA | Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                 metadata: Mapping[str, str], *, key_style: str = "kohya_ldm", dtype: torch.dtype | None = None,
                 layout: Layout = SDXL_LAYOUT, overwrite: bool = False) -> Path:
    """Write a merged LoRA file once, atomically (``formats.save_state_dict``): the one writer of ``run_merge``'s
    ``output`` (``duolora merge``, ``merge_files``) and of the Save Merged LoRA node.

    ``merged``: the export (its layers and bias/norm differences are spelled in ``key_style`` and ``dtype`` by
    ``formats.save_lora``, with ``metadata`` over the export's own) or tensors already in file form (the node's,
    which Apply Merged LoRA uses too; ``metadata`` is then written as given). Refuses an existing file unless
    ``overwrite``. Returns the written path.
    """
    if isinstance(merged, LoRA):
        return formats.save_lora(merged, path, key_style=key_style, dtype=dtype, metadata=metadata,
                                 overwrite=overwrite, layout=layout)
    return formats.save_state_dict(merged, path, metadata=metadata, overwrite=overwrite)


def file_metadata(result: MergeResult, output: OutputFile | None = None) -> dict[str, str]:
    """What a written merge records (``provenance.file_metadata``), with ``output.extra_metadata`` over it."""
    return provenance.file_metadata(result, output.extra_metadata if output is not None else None)


def merge_files(
    content_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    style_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    config: MergeConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    key_style: str = "kohya_ldm",
    overwrite: bool = False,
    layout: Layout = SDXL_LAYOUT,
    progress: ProgressFn | None = None,
    chunk_layers: int = streaming.CHUNK_LAYERS,
    iterations: int = SOLVER_ITERATIONS,
    extra_metadata: Mapping[str, str] | None = None,
) -> MergeResult:
    """The weights-only merge of LoRA files (one content file or several, and a style file) into a standard LoRA
    file: ``run_merge`` with file sources and an ``OutputFile`` (the objective is forced to ``weights_only``;
    default config: ``MergeConfig()``). ``duolora merge`` runs exactly this. The file records its sources
    (``provenance.file_sources``: names and SHA-256) with ``extra_metadata`` over them."""
    config = dataclasses.replace(config or MergeConfig(), objective="weights_only")
    contents = [content_path] if isinstance(content_path, (str, os.PathLike)) else list(content_path)
    output = OutputFile(out_path, key_style=key_style, dtype=dtype, overwrite=overwrite,
                        extra_metadata={**provenance.file_sources(contents, style_path), **(extra_metadata or {})})
    return run_merge(content_path, style_path, config, progress=progress, output=output, layout=layout,
                     chunk_layers=chunk_layers, iterations=iterations)
