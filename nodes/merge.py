"""ZipRankMerge: learn the DuoLoRA merge of a content LoRA (or several: a multi-concept merge) and a style LoRA
inside the real model."""

from __future__ import annotations

import dataclasses
import time

import torch

from ..duolora import config as config_knobs
from ..duolora import engine, families, formats, provenance, report
from ..duolora.optimize import MergeResult
from . import caching
from . import comfy_bridge as bridge
from .api import io
from .types import (
    LoraModelType,
    LoraStateDict,
    MergedLoRA,
    MergedLoRAType,
    MergeStats,
    MergeStatsType,
    SourceLoRA,
    SourceLoRAType,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The knobs on the node, in the order it shows them: every MergeConfig field with a ``ui`` name.
KNOBS = tuple(f for f in config_knobs.KNOBS if f.metadata["ui"] is not None)


def _run_settings() -> tuple[io.Input, ...]:
    """How the merge runs on this machine, not what it computes: the node's own settings (not in MergeConfig)."""
    return (
        io.Boolean.Input("gradient_checkpointing", default=True,
                         tooltip="Use much less memory in the paper modes for a little more time."),
        io.Combo.Input("compute_dtype", options=["auto", *DTYPES], default="auto",
                       tooltip="Precision of the model while merging (auto: the model's own)."),
        io.Combo.Input("lora_dtype", options=["auto", *DTYPES], default="auto",
                       tooltip="Precision of the merged LoRA (auto: the content LoRA file's)."),
    )


_RUN_DEFAULTS = {widget.id: widget.default for widget in _run_settings()}

# What a user decides on every merge (mode, method, balance, steps) stays in view; the method's finer knobs,
# precision and memory settings sit behind the front end's "advanced" switch (a knob's ``advanced`` metadata).
ADVANCED_INPUTS = frozenset({f.metadata["ui"] for f in KNOBS if f.metadata["advanced"]} | set(_RUN_DEFAULTS))


def _knob_input(f: dataclasses.Field) -> io.Input:
    """The node widget of one MergeConfig knob, from its field metadata."""
    meta, ui = f.metadata, f.metadata["ui"]
    default = config_knobs.ui_value(f, f.default)
    tooltip = meta["help"]
    if meta["none"] is not None:
        tooltip = f"{tooltip[:-1]} (-1: {meta['none']})."
    if f.name == "objective":
        return io.Combo.Input(ui, options=list(config_knobs.MODES), default=default, tooltip=tooltip)
    if meta["choices"] is not None:
        return io.Combo.Input(ui, options=list(meta["choices"]), default=default, tooltip=tooltip)
    if isinstance(f.default, bool):
        return io.Boolean.Input(ui, default=default, tooltip=tooltip)
    if isinstance(f.default, int):
        return io.Int.Input(ui, default=default, min=meta["min"], max=meta["max"], tooltip=tooltip)
    if isinstance(f.default, str):
        return io.String.Input(ui, default=default, multiline=False, tooltip=tooltip)
    return io.Float.Input(ui, default=default, min=meta["min"], max=meta["max"], step=meta["step"],
                          tooltip=tooltip)


def _widgets() -> list[io.Input]:
    inputs = [*(_knob_input(f) for f in KNOBS), *_run_settings()]
    for widget in inputs:
        if widget.id in ADVANCED_INPUTS:
            bridge.advanced(widget)
    return inputs


class ZipRankMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DuoLoRA_ZipRankMerge",
            display_name="ZipRank Merge (DuoLoRA)",
            category="DuoLoRA",
            description=(
                "Merges your subject LoRA (or several, through Add Content LoRA) and your style LoRA into one "
                "standard LoRA with DuoLoRA (ICCV 2025); mode 'weights' needs no pictures."
            ),
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.Model.Input("model", tooltip="The SDXL or Flux.1 model both LoRAs were trained for (Flux.1: mode "
                                                "'weights')."),
                SourceLoRAType.Input("content_lora",
                                     tooltip="Your subject LoRA, from Load Content LoRA (several subjects: from "
                                             "Add Content LoRA)."),
                SourceLoRAType.Input("style_lora", tooltip="Your style LoRA, from Load Style LoRA."),
                io.Latent.Input("content_latents", optional=True,
                                tooltip="Pictures of your subject through VAE Encode (paper and layerwise modes; "
                                        "several subjects: the first one's)."),
                io.Latent.Input("style_latents", optional=True,
                                tooltip="Pictures in your style through VAE Encode (paper and layerwise modes)."),
                io.Conditioning.Input("content_prompt", optional=True,
                                      tooltip="The prompt of your subject LoRA, e.g. 'a photo of sks dog'."),
                io.Conditioning.Input("style_prompt", optional=True,
                                      tooltip="The prompt of your style LoRA, e.g. 'a cat in zwz style'."),
                io.Conditioning.Input("combined_prompt", optional=True,
                                      tooltip="Your subject in your style, e.g. 'a sks dog in zwz style' (only "
                                              "for the Constyle loss, constyle_iterations above 0)."),
                *_widgets(),
            ],
            outputs=[
                MergedLoRAType.Output("merged_lora", display_name="merged_lora",
                                      tooltip="The merged LoRA, for Apply Merged LoRA and Save Merged LoRA."),
                MergeStatsType.Output("stats", display_name="stats",
                                      tooltip="Loss curves and kept ranks, for Merge Report."),
                LoraModelType.Output("lora_model", display_name="lora_model",
                                     tooltip="The merged LoRA for ComfyUI's own Load LoRA Model and Save LoRA "
                                             "Weights nodes."),
            ],
        )

    @classmethod
    def execute(cls, model, content_lora: SourceLoRA, style_lora: SourceLoRA, content_latents=None,
                style_latents=None, content_prompt=None, style_prompt=None, combined_prompt=None,
                **widgets) -> io.NodeOutput:
        start = time.perf_counter()
        config = config_knobs.from_widgets(widgets)
        run = {**_RUN_DEFAULTS, **{k: v for k, v in widgets.items() if k in _RUN_DEFAULTS}}
        gradient_checkpointing, compute_dtype, lora_dtype = (run["gradient_checkpointing"], run["compute_dtype"],
                                                             run["lora_dtype"])
        mode, method = config_knobs.mode_of(config.objective), config.method
        layout = bridge.model_layout(model)
        chain = content_lora.chain()
        if style_lora.previous is not None:
            raise ValueError("ZipRank Merge's style_lora takes one LoRA, from Load Style LoRA; connect Add Content "
                             "LoRA to content_lora")
        _refuse_same_file(chain)
        content = chain[0].lora
        for src in (*chain, style_lora):
            bridge.validate_for_model(src.lora, model)
        # The model family, from the content LoRA file (which the model was just checked to fit).
        family = families.family_of(content.base if content.base in families.BASE_FAMILY else layout)
        asked_preset = config.prior_preset
        for src in chain:
            if src.sha256 is not None and src.sha256 == style_lora.sha256:
                bridge.send_warning(cls.hidden.unique_id, engine.same_lora_warning(
                    src.name, style_lora.name, "pick your style LoRA in Load Style LoRA"))
        dtype = DTYPES.get(compute_dtype)

        def open_denoiser(merger, needs_grad: bool) -> bridge.ComfyDenoiser:
            # Checkpointing only where gradients flow (paper steps), never for the recording pass.
            return bridge.ComfyDenoiser(model, merger, compute_dtype=dtype,
                                        gradient_checkpointing=gradient_checkpointing and needs_grad,
                                        needs_grad=needs_grad)

        references = engine.ReferenceInputs(
            content_latents=None if content_latents is None else content_latents["samples"],
            style_latents=None if style_latents is None else style_latents["samples"],
            content_prompt=content_prompt, style_prompt=style_prompt, combined_prompt=combined_prompt,
            more_content=[engine.ContentInputs(None if src.latents is None else src.latents["samples"], src.prompt,
                                               src.combined_prompt) for src in chain[1:]],
        )
        peak = bridge.PeakMemory(bridge.execution_device(model))
        settings = {"compute_dtype": compute_dtype, "gradient_checkpointing": bool(gradient_checkpointing),
                    "device": str(bridge.execution_device(model))}
        try:
            with peak:
                result, cached = caching.run_merge_cached(
                    model, chain, style_lora, config, references, settings,
                    bridge.Progress(config.steps, cls.hidden.unique_id), open_denoiser=open_denoiser,
                    should_cancel=bridge.interrupted)
        except engine.MissingReferencesError as e:
            raise ValueError(_missing_references_message(mode, e, config.constyle_iterations, chain)) from None
        if result.cancelled:
            bridge.raise_if_interrupted()
        config, merger, merged_lora = result.config, result.merger, result.merged
        preset = config.prior_preset + (f" ({asked_preset})" if asked_preset != config.prior_preset else "")
        rep = report.build_report(merger, result.history, roles=config.roles(),
                                  prune_threshold=config.prune_threshold,
                                  model=f"{family.label} (from {chain[0].name}), prior preset {preset}")
        kept = {s.key: {"content": s.mean_kept_c, **{f"content{i + 2}": m.mean_kept for i, m in enumerate(s.more)},
                        "style": s.mean_kept_s, "layers": s.layers}
                for s in rep.by_block()}
        dtype = formats.output_dtype(DTYPES.get(lora_dtype), content.dtype)
        metadata = _provenance(chain, style_lora, merger.trainable_parameters(), result, kept)
        state_dict = LoraStateDict(
            formats.lora_to_state_dict(merged_lora, "kohya_ldm", dtype=dtype, layout=layout))
        merged = MergedLoRA(lora=merged_lora, state_dict=state_dict, metadata=metadata, method=method)
        stats = MergeStats(
            method=method, mode=mode, config=config.to_dict(), history=result.history,
            steps_done=result.steps_done, trainable_parameters=merger.trainable_parameters(),
            kept_rank_by_block=kept, wall_seconds=time.perf_counter() - start,
            peak_memory_bytes=peak.peak_bytes, peak_memory_kind=peak.kind, report=rep,
            # The learned and fixed masks (the merger's state_dict holds only masks, r_c + r_s values per
            # layer — one mask per LoRA): with the source files they reproduce the merge exactly.
            extra={"masks": {k: v.detach().cpu().clone() for k, v in merger.state_dict().items()},
                   "merge_cache": cached, "family": family.name},
        )
        bridge.send_message("duolora.done", {"node": cls.hidden.unique_id, "kept_rank": kept})
        return io.NodeOutput(merged, stats, state_dict)


_CONNECT_REFERENCES = "(VAE Encode of your content and style images, CLIP Text Encode of the prompts)"
_CONNECT_COMBINED = "combined_prompt (CLIP Text Encode of your subject in your style, e.g. 'a sks dog in zwz style')"


def _refuse_same_file(chain: list[SourceLoRA]) -> None:
    """One file given as two content LoRAs (by two loaders, even under two names): the same SHA-256. The same
    file as content and style is warned about instead (``engine.same_lora_warning``)."""
    roles = [f"content LoRA {i + 1}" for i in range(len(chain))]
    seen: dict[str, tuple[str, SourceLoRA]] = {}
    for role, src in zip(roles, chain):
        if src.sha256 is None:
            continue
        if src.sha256 in seen:
            first_role, first = seen[src.sha256]
            raise ValueError(f"{first_role} {first.name!r} and {role} {src.name!r} are the same file (identical "
                             "SHA-256): give each LoRA once (to make a LoRA stronger, raise its strength instead)")
        seen[src.sha256] = (role, src)


def _missing_references_message(mode: str, error: engine.MissingReferencesError, constyle_iterations: int,
                                 chain: list[SourceLoRA] | None = None) -> str:
    """The node's words for the references a mode lacks (the engine names the inputs, the node the remedy):
    each missing input with what to connect, and the setting that makes it unnecessary."""
    if error.content_index is not None:
        names = ", ".join(error.missing)
        src = (chain or [])[error.content_index - 1] if chain and len(chain) >= error.content_index else None
        name = src.name if src is not None else error.lora
        what = ("runs paper steps with the Constyle cycle loss" if error.stage == "cycle" else
                "records the model's activations on each subject's references" if error.stage == "record" else
                "learns each subject from its own reference images and prompts")
        remedy = ("set constyle_iterations to 0" if error.stage == "cycle"
                  else "choose mode 'weights' to merge from the LoRAs alone")
        return (f"ZipRank Merge in {mode!r} mode {what}: content LoRA {error.content_index} {name!r} has no "
                f"{names}; connect {names} on its Add Content LoRA node (VAE Encode of that subject's images, "
                f"CLIP Text Encode of its prompts), or {remedy}.")
    if error.stage == "cycle" or error.missing == ["combined_prompt"]:
        return (f"ZipRank Merge in {mode!r} mode with the Constyle cycle loss on (constyle_iterations "
                f"{constyle_iterations}) needs combined_prompt; connect {_CONNECT_COMBINED}, or set "
                "constyle_iterations to 0.")
    names = ", ".join(error.missing)
    if error.stage == "record":
        return (f"ZipRank Merge in {mode!r} mode records the model's activations on your references; connect "
                f"{names} {_CONNECT_REFERENCES}, or choose mode 'weights' to merge from the LoRAs alone.")
    constyle = (" (combined_prompt only for the Constyle cycle loss: or set constyle_iterations to 0)"
                if "combined_prompt" in error.missing else "")
    return (f"ZipRank Merge in 'paper' mode learns from reference images and prompts; connect {names} "
            f"{_CONNECT_REFERENCES}{constyle}, or choose mode 'weights' to merge from the LoRAs alone.")


def _provenance(chain: list[SourceLoRA], style: SourceLoRA, trainable: int, result: MergeResult,
                kept: dict) -> dict[str, str]:
    """What a saved merge records (``duolora.provenance``: the same keys ``duolora merge`` writes): the
    settings, every source file (name, SHA-256, strength) and the run's trainable parameters, steps and kept
    ranks."""
    sources = [provenance.Source(src.name, src.sha256, src.strength) for src in chain]
    return {**provenance.file_metadata(result),
            **provenance.source_metadata(sources, provenance.Source(style.name, style.sha256, style.strength)),
            **provenance.run_metadata(result, trainable, kept)}
