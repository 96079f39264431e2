"""ApplyMergedLoRA: patch MODEL (and CLIP) with a LoRA through ComfyUI's own LoRA path: the merged LoRA, or one
loader's LoRA alone (to draw references with it, or to compare it with the merge)."""

from __future__ import annotations

from ..duolora import formats
from . import comfy_bridge as bridge
from .api import io
from .types import LoraStateDict, MergedLoRA, MergedLoRAType, SourceLoRA, SourceLoRAType


class ApplyMergedLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DuoLoRA_ApplyMergedLoRA",
            display_name="Apply Merged LoRA",
            category="DuoLoRA",
            description="Applies the merged LoRA (or one loader's LoRA alone) exactly as the stock Load LoRA node "
                        "applies a saved file.",
            inputs=[
                io.Model.Input("model", tooltip="The SDXL or Flux.1 model to patch."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional: the CLIP to patch with the LoRA's text-encoder part, if any."),
                io.MultiType.Input("merged_lora", types=[MergedLoRAType, SourceLoRAType],
                                   tooltip="From ZipRank Merge, or from Load Content/Style LoRA to draw with that "
                                           "LoRA alone."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly the LoRA changes the UNet."),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly it changes the text encoders."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the LoRA applied."),
                     io.Clip.Output(display_name="CLIP", tooltip="The CLIP with the LoRA applied.")],
        )

    @classmethod
    def execute(cls, model, merged_lora: MergedLoRA | SourceLoRA, strength_model: float = 1.0,
                strength_clip: float = 1.0, clip=None) -> io.NodeOutput:
        if strength_model == 0 and strength_clip == 0:
            return io.NodeOutput(model, clip)
        # ComfyUI skips a LoRA weight whose shape does not match with only a log line; say it here instead.
        bridge.validate_for_model(merged_lora.lora, model)
        if isinstance(merged_lora, SourceLoRA):
            # The loader's LoRA (its strength folded in), spelled as the merged LoRA is: kohya keys, alpha = rank.
            state_dict = LoraStateDict(formats.lora_to_state_dict(merged_lora.lora, "kohya_ldm",
                                                                  layout=bridge.model_layout(model)))
        else:
            state_dict = merged_lora.state_dict
        new_model, new_clip = bridge.apply_lora_state_dict(model, clip, state_dict, strength_model, strength_clip)
        return io.NodeOutput(new_model, new_clip)
