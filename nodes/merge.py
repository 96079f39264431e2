"""ZipRankMerge: learn the DuoLoRA merge of a content LoRA and a style LoRA inside the real model."""

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
                "mask per rank component (ZipRank) and SDXL layer priors; the paper's Constyle cycle loss is "
                "an option (constyle_iterations, off by default). "
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
                                       "(try 5–10; needs what paper needs). The fast modes trail paper mode on "
                                       "MiniBench 2's test split (README): use them to preview, paper when it "
                                       "matters."),
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
                                 tooltip="Initialise the masks from the layer priors as METHOD.md §3 writes it "
                                         "(random components zeroed, τ_c = 0.75, τ_s = 0.5); off: all masks "
                                         "start at 1, the plain sum."),
                io.Boolean.Input("prior_loss", default=d.prior_loss,
                                 tooltip="Add the rank-constraint loss of the layer priors."),
                io.Combo.Input("prior_loss_kind", options=list(PRIOR_LOSS_KINDS), default=d.prior_loss_kind,
                               tooltip="share_hinge: in a content block the content LoRA keeps at least "
                                       "`margin` more of its nuclear norm than the style LoRA (and vice versa). "
                                       "hinge: METHOD.md §3 literally (shrinks both LoRAs). code_compat: the "
                                       "released code's L2 form."),
                _float("margin", d.margin, "Margin δ of the prior hinge: for share_hinge, how much more of its "
                                           "nuclear norm the block's own LoRA keeps than the other.", hi=10.0),
                io.Combo.Input("prior_push", options=list(PRIOR_PUSHES), default=d.prior_push,
                               tooltip="share_hinge in paper mode: both = the prior may lower the other LoRA "
                                       "and raise the block's own; dominant = it only raises the block's own "
                                       "LoRA (never weakens the other)."),
                io.Int.Input("constyle_iterations", default=d.constyle_iterations, min=0, max=8,
                             tooltip="Constyle cycle round trips (0 = off, the default: on MiniBench 2 it cost style "
                                     "similarity and added nothing; 1 = the paper, needs combined_prompt)."),
                io.Combo.Input("cycle_scale", options=list(CYCLE_SCALES), default=d.cycle_scale,
                               tooltip="fixed: the cycle losses weigh λ·L (the paper). matched: each cycle loss "
                                       "is scaled so that at λ = 1 it pulls as hard as its reconstruction loss."),
                _float("lambda_cyc", d.lambda_cyc, f"Weight of the style cycle loss ({d.lambda_cyc:g})."),
                _float("lambda_rev", d.lambda_rev, f"Weight of the content cycle loss ({d.lambda_rev:g})."),
                _float("lambda_prior", d.lambda_prior, f"Weight of the layer-prior loss ({d.lambda_prior:g})."),
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
                                       "merged LoRA."),
                io.Int.Input("max_rank", default=d.max_rank, min=0, max=4096,
                             tooltip="Rank budget: keep at most this many components of each LoRA per learned "
                                     "layer (the strongest, by σ·|mask|); 0 = no budget. A smaller, "
                                     "slightly less exact merged LoRA."),
                _float("fast_keep", d.fast_keep, "Fast modes only: how strongly each LoRA's strongest "
                                                 "directions are held at full strength (0 = pure per-layer "
                                                 "reconstruction, which weakens LoRAs where they collide).",
                       hi=100.0),
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
            method=method, basis=basis, scope=scope, objective=engine.MODES.get(mode, mode), steps=int(steps),
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
        content = content_lora.lora
        for src in (content_lora, style_lora):
            bridge.validate_for_model(src.lora, model)
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
        )
        peak = bridge.PeakMemory(bridge.execution_device(model))
        settings = {"compute_dtype": compute_dtype, "gradient_checkpointing": bool(gradient_checkpointing),
                    "device": str(bridge.execution_device(model))}
        try:
            with peak:
                result, cached = caching.run_merge_cached(
                    model, content_lora, style_lora, config, references, settings,
                    bridge.Progress(config.steps, cls.hidden.unique_id), open_denoiser=open_denoiser,
                    should_cancel=bridge.interrupted)
        except engine.MissingReferencesError as e:
            raise ValueError(_missing_references_message(mode, e)) from None
        if result.cancelled:
            bridge.raise_if_interrupted()
        config, merger, merged_lora = result.config, result.merger, result.merged
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
            extra={"masks": {k: v.detach().cpu().clone() for k, v in merger.state_dict().items()},
                   "merge_cache": cached},
        )
        bridge.send_message("duolora.done", {"node": cls.hidden.unique_id, "kept_rank": kept})
        return io.NodeOutput(merged, stats, state_dict)


_CONNECT_REFERENCES = "(VAE Encode of your content and style images, CLIP Text Encode of the prompts)"


def _missing_references_message(mode: str, error: engine.MissingReferencesError) -> str:
    """The node's words for the references a mode lacks (the engine names the inputs, the node the remedy)."""
    if error.stage == "cycle":
        return ("ZipRank Merge in 'layerwise+paper' mode runs paper steps with the Constyle cycle loss; connect "
                "combined_prompt (CLIP Text Encode of e.g. 'a sks dog in zwz style'), or set "
                "constyle_iterations to 0.")
    names = ", ".join(error.missing)
    if error.stage == "record":
        return (f"ZipRank Merge in {mode!r} mode records the model's activations on your references; connect "
                f"{names} {_CONNECT_REFERENCES}, or choose mode 'weights' to merge from the LoRAs alone.")
    return (f"ZipRank Merge in 'paper' mode learns from reference images and prompts; connect {names} "
            f"{_CONNECT_REFERENCES}, or choose method 'direct' to merge without learning.")


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

