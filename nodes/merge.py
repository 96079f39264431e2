"""ZipRankMerge: learn the DuoLoRA merge of a content LoRA and a style LoRA inside the real model."""

from __future__ import annotations

import dataclasses
import json
import time

import torch
from comfy_api.latest import io

from .. import duolora
from ..duolora import fast, formats, report
from ..duolora.mergers import METHODS, build_merger
from ..duolora.objective import References
from ..duolora.optimize import MergeConfig, MergeResult, optimize
from ..duolora.sdxl import PRESET_NAMES
from . import comfy_bridge as bridge
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

MODES = ("paper", "layerwise", "weights", "layerwise+paper")
# The node's mode names -> MergeConfig.objective.
_OBJECTIVES = {"paper": "paper", "layerwise": "layerwise", "weights": "weights_only",
               "layerwise+paper": "layerwise_paper"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DEFAULTS = MergeConfig()


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
                "Merges a content LoRA and a style LoRA into one LoRA with DuoLoRA (ICCV 2025): a learned "
                "mask per rank component (ZipRank), SDXL layer priors, and the Constyle cycle loss. "
                "The result is an exact standard LoRA any loader can use."
            ),
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.Model.Input("model", tooltip="The SDXL model both LoRAs were trained for."),
                SourceLoRAType.Input("content_lora", tooltip="From Load Content LoRA: the subject."),
                SourceLoRAType.Input("style_lora", tooltip="From Load Style LoRA: the style."),
                io.Latent.Input("content_latents", optional=True,
                                tooltip="VAE Encode of your content (subject) images; a batch is cycled through."),
                io.Latent.Input("style_latents", optional=True,
                                tooltip="VAE Encode of your style image(s)."),
                io.Conditioning.Input("content_prompt", optional=True,
                                      tooltip="The content LoRA's prompt, e.g. 'a photo of sks dog' (p_c)."),
                io.Conditioning.Input("style_prompt", optional=True,
                                      tooltip="The style LoRA's prompt, e.g. 'a cat in zwz style' (p_s)."),
                io.Conditioning.Input("combined_prompt", optional=True,
                                      tooltip="Subject in the style, e.g. 'a sks dog in zwz style' (p_cs); "
                                              "used by the Constyle cycle loss."),
                io.Combo.Input("mode", options=list(MODES), default="paper",
                               tooltip="paper: the paper's objective through the diffusion model, 100 steps "
                                       "(needs the reference latents and prompts). layerwise: one forward "
                                       "pass per reference, then a per-layer solve (needs the content/style "
                                       "latents and prompts; seconds). weights: from the two LoRAs alone "
                                       "(no latents or prompts needed). layerwise+paper: the layer-wise "
                                       "solve replaces the prior initialisation, then `steps` paper steps "
                                       "(try 5–10; needs what paper needs). The fast modes lost the subject "
                                       "in the README's MiniBench test: use paper when it matters."),
                io.Combo.Input("method", options=list(METHODS), default=d.method,
                               tooltip="ziprank: DuoLoRA's rank masks. ziplora_out / ziplora_in: ZipLoRA's "
                                       "per-column masks. direct: plain sum. b_lora: B-LoRA's two blocks."),
                io.Int.Input("steps", default=d.steps, min=0, max=10000,
                             tooltip="Optimisation steps (the paper: 100)."),
                io.Float.Input("learning_rate", default=d.lr, min=0.0, max=1.0, step=0.0001,
                               tooltip="Adam learning rate of the masks (the paper: 0.01)."),
                io.Int.Input("seed", default=d.seed, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seeds timesteps, noise and the prior initialisation."),
                io.Combo.Input("prior_preset", options=list(PRESET_NAMES), default=d.prior_preset,
                               tooltip="Which SDXL blocks carry content and which carry style. paper: "
                                       "low-resolution attention = content, high-resolution = style."),
                io.String.Input("custom_prior", default="", multiline=False,
                                tooltip="For prior_preset 'custom': e.g. 'content: input_blocks.7.1, "
                                        "middle_block.1; style: output_blocks.3.1'."),
                io.Boolean.Input("prior_init", default=d.prior_init,
                                 tooltip="Initialise the masks from the layer priors (τ_c = 0.75, τ_s = 0.5)."),
                io.Boolean.Input("prior_loss", default=d.prior_loss,
                                 tooltip="Add the rank-constraint loss of the layer priors."),
                io.Int.Input("constyle_iterations", default=d.constyle_iterations, min=0, max=8,
                             tooltip="Constyle cycle round trips (1 = the paper, 0 = off)."),
                _float("lambda_cyc", d.lambda_cyc, "Weight of the style cycle loss (0.01)."),
                _float("lambda_rev", d.lambda_rev, "Weight of the content cycle loss (0.01)."),
                _float("lambda_prior", d.lambda_prior, "Weight of the layer-prior rank loss (0.1)."),
                _float("lambda_sim", -1.0, "Weight of the mask-similarity loss; -1 = the method's "
                                            "default (0 for ziprank, 0.01 for ziplora).", lo=-1.0),
                io.Combo.Input("basis", options=["svd", "raw"], default=d.basis,
                               tooltip="svd: mask singular directions (the paper's math). raw: mask the "
                                       "LoRA's own rank components (the released code)."),
                io.Combo.Input("scope", options=["attention", "all"], default=d.scope,
                               tooltip="attention: learn masks on attention q/k/v/out (the paper); other "
                                       "shared layers are summed. all: learn on every shared layer."),
                io.Float.Input("prune_threshold", default=d.prune_threshold, min=0.0, max=1.0, step=0.0001,
                               tooltip="Rank components with |mask| below this are dropped from the "
                                       "merged LoRA (adaptive rank)."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute UNet blocks in the backward pass: much less memory, "
                                         "a little slower."),
                io.Combo.Input("compute_dtype", options=["auto", *DTYPES], default="auto",
                               tooltip="Dtype of the UNet during the merge (auto: the model's own). "
                                       "Masks and the loss stay fp32."),
                io.Combo.Input("lora_dtype", options=["auto", *DTYPES], default="auto",
                               tooltip="Dtype of the merged LoRA (auto: the content LoRA file's dtype)."),
            ],
            outputs=[
                MergedLoRAType.Output("merged_lora", display_name="merged_lora",
                                      tooltip="The merged LoRA, for Apply Merged LoRA and Save Merged LoRA."),
                MergeStatsType.Output("stats", display_name="stats",
                                      tooltip="Loss history and kept ranks, for Merge Report."),
                LoraModelType.Output("lora_model", display_name="lora_model",
                                     tooltip="The merged LoRA as ComfyUI's LORA_MODEL (for the core "
                                             "Load LoRA Model and Save LoRA Weights nodes)."),
            ],
        )

    @classmethod
    def execute(cls, model, content_lora: SourceLoRA, style_lora: SourceLoRA, content_latents=None,
                style_latents=None, content_prompt=None, style_prompt=None, combined_prompt=None,
                mode: str = "paper", method: str = "ziprank", steps: int = 100, learning_rate: float = 0.01,
                seed: int = 0, prior_preset: str = "paper", custom_prior: str = "", prior_init: bool = True,
                prior_loss: bool = True, constyle_iterations: int = 1, lambda_cyc: float = 0.01,
                lambda_rev: float = 0.01, lambda_prior: float = 0.1, lambda_sim: float = -1.0,
                basis: str = "svd", scope: str = "attention", prune_threshold: float = 1e-3,
                gradient_checkpointing: bool = True, compute_dtype: str = "auto",
                lora_dtype: str = "auto") -> io.NodeOutput:
        start = time.perf_counter()
        config = MergeConfig(
            method=method, basis=basis, scope=scope, objective=_OBJECTIVES.get(mode, mode), steps=int(steps),
            lr=float(learning_rate),
            seed=int(seed), prior_preset=prior_preset, custom_prior=custom_prior, prior_init=bool(prior_init),
            prior_loss=bool(prior_loss), constyle_iterations=int(constyle_iterations),
            lambda_cyc=float(lambda_cyc), lambda_rev=float(lambda_rev), lambda_prior=float(lambda_prior),
            lambda_sim=None if lambda_sim < 0 else float(lambda_sim), prune_threshold=float(prune_threshold),
        )
        if mode == "layerwise+paper":
            # The layer-wise solve is the starting point: the prior initialisation would overwrite it.
            config = dataclasses.replace(config, prior_init=False)
        layout = bridge.model_layout(model)
        content, style = content_lora.lora, style_lora.lora
        for src in (content_lora, style_lora):
            bridge.validate_for_model(src.lora, model)
        if mode != "paper":
            fast.check_method(method, mode.split("+")[0])
        merger = build_merger(method, content, style, config)
        needs_references = bool(merger.mask_parameters()) and config.steps > 0
        peak = bridge.PeakMemory(bridge.execution_device(model))
        with peak:
            if mode == "weights" and merger.mask_parameters():
                result = fast.solve_weights(merger, config)
            elif mode == "layerwise" and merger.mask_parameters():
                result = _run_layerwise(model, merger, config, content_latents, style_latents, content_prompt,
                                        style_prompt, compute_dtype, cls.hidden.unique_id)
            elif mode == "paper" and needs_references:
                result = _run_paper(model, merger, config, content_latents, style_latents, content_prompt,
                                    style_prompt, combined_prompt, gradient_checkpointing, compute_dtype,
                                    cls.hidden.unique_id)
            elif mode == "layerwise+paper" and merger.mask_parameters():
                if config.steps > 0 and config.constyle_iterations > 0 and combined_prompt is None:
                    raise ValueError(
                        "ZipRank Merge in 'layerwise+paper' mode runs paper steps with the Constyle cycle loss; "
                        "connect combined_prompt (CLIP Text Encode of e.g. 'a sks dog in zwz style'), or set "
                        "constyle_iterations to 0."
                    )
                result = _run_layerwise(model, merger, config, content_latents, style_latents, content_prompt,
                                        style_prompt, compute_dtype, cls.hidden.unique_id, mode)
                if config.steps > 0:
                    result = _run_paper(model, merger, dataclasses.replace(config, objective="paper"),
                                        content_latents, style_latents, content_prompt, style_prompt,
                                        combined_prompt, gradient_checkpointing, compute_dtype,
                                        cls.hidden.unique_id)
            else:
                result = MergeResult(merger=merger)
        merged_lora = merger.export(config.prune_threshold)
        rep = report.build_report(merger, result.history, roles=config.roles(),
                                  prune_threshold=config.prune_threshold)
        kept = {s.key: {"content": s.mean_kept_c, "style": s.mean_kept_s, "layers": s.layers}
                for s in rep.by_block()}
        dtype = formats.output_dtype(DTYPES.get(lora_dtype), content.dtype)
        metadata = _provenance(config, content_lora, style_lora, merger.trainable_parameters(), result, kept)
        state_dict = LoraStateDict(
            formats.lora_to_state_dict(merged_lora, "kohya_ldm", dtype=dtype, layout=layout))
        merged = MergedLoRA(lora=merged_lora, state_dict=state_dict, metadata=metadata, method=method)
        stats = MergeStats(
            method=method, mode=mode, config=config.to_dict(), history=result.history,
            steps_done=result.steps_done, trainable_parameters=merger.trainable_parameters(),
            kept_rank_by_block=kept, wall_seconds=time.perf_counter() - start,
            peak_memory_bytes=peak.peak_bytes, peak_memory_kind=peak.kind, report=rep,
            # The learned and fixed masks (the merger's state_dict holds only masks, r_c + r_s values per
            # layer): with the two source files they reproduce the merge exactly.
            extra={"masks": {k: v.detach().cpu().clone() for k, v in merger.state_dict().items()}},
        )
        bridge.send_message("duolora.done", {"node": cls.hidden.unique_id, "kept_rank": kept})
        return io.NodeOutput(merged, stats, state_dict)


def _run_paper(model, merger, config: MergeConfig, content_latents, style_latents, content_prompt,
               style_prompt, combined_prompt, gradient_checkpointing: bool, compute_dtype: str,
               node_id: str | None) -> MergeResult:
    missing = [name for name, value in (
        ("content_latents", content_latents), ("style_latents", style_latents),
        ("content_prompt", content_prompt), ("style_prompt", style_prompt),
        ("combined_prompt", combined_prompt)) if value is None]
    if config.constyle_iterations == 0 and "combined_prompt" in missing:
        missing.remove("combined_prompt")
    if missing:
        raise ValueError(
            f"ZipRank Merge in 'paper' mode learns from reference images and prompts; connect "
            f"{', '.join(missing)} (VAE Encode of your content and style images, CLIP Text Encode of the "
            f"prompts), or choose method 'direct' to merge without learning."
        )
    dtype = DTYPES.get(compute_dtype)
    with bridge.ComfyDenoiser(model, merger, compute_dtype=dtype,
                              gradient_checkpointing=gradient_checkpointing) as denoiser:
        refs = References(
            content=denoiser.prepare_latents(content_latents["samples"]),
            style=denoiser.prepare_latents(style_latents["samples"]),
            p_c=content_prompt, p_s=style_prompt, p_cs=combined_prompt if combined_prompt is not None
            else content_prompt,
        )
        progress = bridge.Progress(config.steps, node_id)
        result = optimize(merger, denoiser, refs, config, progress=progress, should_cancel=bridge.interrupted)
    if result.cancelled:
        bridge.raise_if_interrupted()
    return result


def _run_layerwise(model, merger, config: MergeConfig, content_latents, style_latents, content_prompt,
                   style_prompt, compute_dtype: str, node_id: str | None, mode: str = "layerwise") -> MergeResult:
    """Layer-wise mode: one no-grad forward per reference records each layer's input statistics, then the
    engine solves every layer's masks (duolora.fast)."""
    missing = [name for name, value in (
        ("content_latents", content_latents), ("style_latents", style_latents),
        ("content_prompt", content_prompt), ("style_prompt", style_prompt)) if value is None]
    if missing:
        raise ValueError(
            f"ZipRank Merge in {mode!r} mode records the model's activations on your references; connect "
            f"{', '.join(missing)} (VAE Encode of your content and style images, CLIP Text Encode of the "
            f"prompts), or choose mode 'weights' to merge from the LoRAs alone."
        )
    dtype = DTYPES.get(compute_dtype)
    with bridge.ComfyDenoiser(model, merger, compute_dtype=dtype, gradient_checkpointing=False) as denoiser:
        refs = References(
            content=denoiser.prepare_latents(content_latents["samples"]),
            style=denoiser.prepare_latents(style_latents["samples"]),
            p_c=content_prompt, p_s=style_prompt, p_cs=content_prompt,
        )
        bar = bridge.Progress(len(refs.content) + len(refs.style), node_id)
        stats = fast.record_activations(merger, denoiser, denoiser.modules, refs, config,
                                        progress=lambda done, total: bar(done, total, {}))
    return fast.solve_layerwise(merger, stats, config)


def _provenance(config: MergeConfig, content: SourceLoRA, style: SourceLoRA, trainable: int,
                result: MergeResult, kept: dict) -> dict[str, str]:
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
    }

