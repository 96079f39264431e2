"""ZipRankMerge: learn the DuoLoRA merge of a content LoRA (or several: a multi-concept merge) and a style LoRA
inside the real model."""

from __future__ import annotations

import json
import time

import torch

from .. import duolora
from ..duolora import engine, formats, report
from ..duolora.config import CYCLE_SCALES, METHODS, PRIOR_LOSS_KINDS, PRIOR_PUSHES, MergeConfig
from ..duolora.optimize import MergeResult
from ..duolora.sdxl import PRESET_NAMES
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

MODES = tuple(engine.MODES)  # paper, layerwise, weights, layerwise+paper
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DEFAULTS = MergeConfig()


# What a user decides on every merge (mode, method, steps, balance) stays in view; the method's finer knobs, precision
# and memory settings sit behind the front end's "advanced" switch. An input not named here is in view.
ADVANCED_INPUTS = frozenset({
    "learning_rate", "seed", "prior_preset", "custom_prior", "prior_init", "prior_loss", "prior_loss_kind",
    "margin", "prior_push", "constyle_iterations", "cycle_scale", "lambda_cyc", "lambda_rev", "lambda_prior",
    "lambda_sim", "basis", "scope", "prune_threshold", "max_rank", "fast_keep", "gradient_checkpointing",
    "compute_dtype", "lora_dtype",
})


def _with_advanced(inputs: list[io.Input]) -> list[io.Input]:
    for widget in inputs:
        if widget.id in ADVANCED_INPUTS:
            bridge.advanced(widget)
    return inputs


def _float(name: str, default: float, tooltip: str, lo: float = 0.0, hi: float = 100.0,
           step: float = 0.001) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=lo, max=hi, step=step, tooltip=tooltip)


class ZipRankMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = _DEFAULTS
        return io.Schema(
            node_id="DuoLoRA_ZipRankMerge",
            display_name="ZipRank Merge (DuoLoRA)",
            category="DuoLoRA",
            description=(
                "Merges your subject LoRA (or several, through Add Content LoRA) and your style LoRA into one "
                "standard LoRA with DuoLoRA (ICCV 2025); mode 'weights' needs no pictures."
            ),
            hidden=[io.Hidden.unique_id],
            inputs=_with_advanced([
                io.Model.Input("model", tooltip="The SDXL checkpoint both LoRAs were trained for."),
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
                io.Combo.Input("mode", options=list(MODES), default="paper",
                               tooltip="weights: from the two LoRA files alone (seconds to a minute); paper: "
                                       "learns from your reference pictures and prompts (the paper's method, "
                                       "minutes); layerwise, layerwise+paper: in between."),
                io.Combo.Input("method", options=list(METHODS), default=d.method,
                               tooltip="ziprank: DuoLoRA's merge; direct: the two LoRAs simply added; "
                                       "ziplora_out, ziplora_in and b_lora: the methods DuoLoRA is compared with."),
                io.Float.Input("balance", default=d.balance, min=-1.0, max=1.0, step=0.05,
                               tooltip="Where the two LoRAs collide: towards +1 keep more of the subject, towards "
                                       "-1 more of the style (0: the paper's balance; not for direct or b_lora)."),
                io.Int.Input("steps", default=d.steps, min=0, max=10000,
                             tooltip="Learning steps of the paper modes (the paper uses 100; weights and "
                                     "layerwise ignore it)."),
                io.Float.Input("learning_rate", default=d.lr, min=0.0, max=1.0, step=0.0001,
                               tooltip="How fast the masks change per step (the paper uses 0.01)."),
                io.Int.Input("seed", default=d.seed, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of paper mode's random timesteps, noise and starting masks."),
                io.Combo.Input("prior_preset", options=list(PRESET_NAMES), default=d.prior_preset,
                               tooltip="Which SDXL blocks carry the subject and which the style (paper: coarse "
                                       "blocks the subject, fine blocks the style)."),
                io.String.Input("custom_prior", default="", multiline=False,
                                tooltip="Block roles for prior_preset 'custom', e.g. 'content: in7, in8, mid; "
                                        "style: out3' (or click the blocks in the diagram)."),
                io.Boolean.Input("prior_init", default=d.prior_init,
                                 tooltip="Start paper mode from the layer priors (docs/method.md §3) instead of from "
                                         "the plain sum of both LoRAs."),
                io.Boolean.Input("prior_loss", default=d.prior_loss,
                                 tooltip="Push each block toward the LoRA the layer priors give it."),
                io.Combo.Input("prior_loss_kind", options=list(PRIOR_LOSS_KINDS), default=d.prior_loss_kind,
                               tooltip="share_hinge: each block's own LoRA keeps at least `margin` more of its "
                                       "strength than the other; hinge and code_compat: the paper's and its "
                                       "code's forms."),
                _float("margin", d.margin, "How much more of its strength each block's own LoRA keeps "
                                           "(share_hinge).", hi=10.0),
                io.Combo.Input("prior_push", options=list(PRIOR_PUSHES), default=d.prior_push,
                               tooltip="both: the priors may weaken the other LoRA in a block; dominant: they "
                                       "only strengthen the block's own LoRA."),
                io.Int.Input("constyle_iterations", default=d.constyle_iterations, min=0, max=8,
                             tooltip="Round trips of the paper's Constyle cycle loss (0 = off, the default; "
                                     "above 0 it needs combined_prompt)."),
                io.Combo.Input("cycle_scale", options=list(CYCLE_SCALES), default=d.cycle_scale,
                               tooltip="fixed: the cycle losses weigh λ as in the paper; matched: each pulls as "
                                       "hard as its reconstruction loss at λ = 1."),
                _float("lambda_cyc", d.lambda_cyc, "Weight of the style cycle loss (Constyle)."),
                _float("lambda_rev", d.lambda_rev, "Weight of the content cycle loss (Constyle)."),
                _float("lambda_prior", d.lambda_prior, "Weight of the layer priors' push."),
                _float("lambda_sim", -1.0, "Weight of the mask-overlap penalty (-1: the method's own, 0 for "
                                            "ziprank and 0.01 for ziplora).", lo=-1.0),
                io.Combo.Input("basis", options=["svd", "raw"], default=d.basis,
                               tooltip="svd: masks on each LoRA's singular directions (the paper); raw: on its "
                                       "stored rank components (the released code)."),
                io.Combo.Input("scope", options=["attention", "all"], default=d.scope,
                               tooltip="attention: learn on attention layers and add the rest (the paper); all: "
                                       "learn on every layer both LoRAs change."),
                io.Float.Input("prune_threshold", default=d.prune_threshold, min=0.0, max=1.0, step=0.0001,
                               tooltip="Rank components whose mask ends below this are left out of the merged "
                                       "LoRA."),
                io.Int.Input("max_rank", default=d.max_rank, min=0, max=4096,
                             tooltip="For a smaller file, keep at most this many of each LoRA's strongest "
                                     "components per layer (0 = no limit)."),
                _float("fast_keep", d.fast_keep, "Fast modes: how firmly each LoRA's strongest directions stay at "
                                                 "full strength (0 = not at all).", hi=100.0),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Use much less memory in the paper modes for a little more time."),
                io.Combo.Input("compute_dtype", options=["auto", *DTYPES], default="auto",
                               tooltip="Precision of the model while merging (auto: the model's own)."),
                io.Combo.Input("lora_dtype", options=["auto", *DTYPES], default="auto",
                               tooltip="Precision of the merged LoRA (auto: the content LoRA file's)."),
            ]),
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
                mode: str = "paper", method: str = "ziprank", balance: float = _DEFAULTS.balance, steps: int = 100,
                learning_rate: float = 0.01,
                seed: int = _DEFAULTS.seed, prior_preset: str = _DEFAULTS.prior_preset, custom_prior: str = "",
                prior_init: bool = _DEFAULTS.prior_init, prior_loss: bool = _DEFAULTS.prior_loss,
                prior_loss_kind: str = _DEFAULTS.prior_loss_kind, margin: float = _DEFAULTS.margin,
                prior_push: str = _DEFAULTS.prior_push,
                constyle_iterations: int = _DEFAULTS.constyle_iterations, cycle_scale: str = _DEFAULTS.cycle_scale,
                lambda_cyc: float = _DEFAULTS.lambda_cyc, lambda_rev: float = _DEFAULTS.lambda_rev,
                lambda_prior: float = _DEFAULTS.lambda_prior, lambda_sim: float = -1.0,
                basis: str = "svd", scope: str = "attention", prune_threshold: float = _DEFAULTS.prune_threshold,
                max_rank: int = _DEFAULTS.max_rank, fast_keep: float = _DEFAULTS.fast_keep,
                gradient_checkpointing: bool = True, compute_dtype: str = "auto",
                lora_dtype: str = "auto") -> io.NodeOutput:
        start = time.perf_counter()
        config = MergeConfig(
            method=method, basis=basis, scope=scope, objective=engine.MODES.get(mode, mode), balance=float(balance),
            steps=int(steps),
            lr=float(learning_rate),
            seed=int(seed), prior_preset=prior_preset, custom_prior=custom_prior, prior_init=bool(prior_init),
            prior_loss=bool(prior_loss), prior_loss_kind=prior_loss_kind, margin=float(margin),
            prior_push=prior_push,
            constyle_iterations=int(constyle_iterations), cycle_scale=cycle_scale,
            lambda_cyc=float(lambda_cyc), lambda_rev=float(lambda_rev), lambda_prior=float(lambda_prior),
            lambda_sim=None if lambda_sim < 0 else float(lambda_sim), prune_threshold=float(prune_threshold),
            max_rank=int(max_rank), fast_keep=float(fast_keep),
        )
        layout = bridge.model_layout(model)
        chain = content_lora.chain()
        if style_lora.previous is not None:
            raise ValueError("ZipRank Merge's style_lora takes one LoRA, from Load Style LoRA; connect Add Content "
                             "LoRA to content_lora")
        _refuse_same_file(chain)
        content = chain[0].lora
        for src in (*chain, style_lora):
            bridge.validate_for_model(src.lora, model)
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
        rep = report.build_report(merger, result.history, roles=config.roles(),
                                  prune_threshold=config.prune_threshold)
        kept = {s.key: {"content": s.mean_kept_c, **{f"content{i + 2}": m.mean_kept for i, m in enumerate(s.more)},
                        "style": s.mean_kept_s, "layers": s.layers}
                for s in rep.by_block()}
        dtype = formats.output_dtype(DTYPES.get(lora_dtype), content.dtype)
        metadata = _provenance(config, chain, style_lora, merger.trainable_parameters(), result, kept)
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
                   "merge_cache": cached},
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


def _provenance(config: MergeConfig, chain: list[SourceLoRA], style: SourceLoRA, trainable: int,
                result: MergeResult, kept: dict) -> dict[str, str]:
    """What a saved merge records: the settings and every source file (name, SHA-256, strength); further content
    LoRAs of a multi-concept merge as ``duolora.content_2``, … ."""
    content = chain[0]
    more = {}
    for i, src in enumerate(chain[1:], start=2):
        more.update({f"duolora.content_{i}": src.name, f"duolora.content_{i}_sha256": src.sha256 or "",
                     f"duolora.content_{i}_strength": f"{src.strength:g}"})
    return {
        "duolora.version": duolora.__version__,
        "duolora.method": config.method,
        "duolora.mode": config.objective,
        "duolora.config": json.dumps(config.to_dict(), sort_keys=True),
        "duolora.content": content.name,
        "duolora.content_sha256": content.sha256 or "",
        "duolora.content_strength": f"{content.strength:g}",
        "duolora.style": style.name,
        "duolora.style_sha256": style.sha256 or "",
        "duolora.style_strength": f"{style.strength:g}",
        "duolora.trainable_parameters": str(trainable),
        "duolora.steps_done": str(result.steps_done),
        "duolora.kept_rank": json.dumps(kept, sort_keys=True),
        **more,
    }

