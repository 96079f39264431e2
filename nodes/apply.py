"""ApplyMergedLoRA: patch MODEL (and CLIP) with the merged LoRA through ComfyUI's own LoRA path."""

from __future__ import annotations

from . import comfy_bridge as bridge
from .api import io
from .types import MergedLoRA, MergedLoRAType


class ApplyMergedLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DuoLoRA_ApplyMergedLoRA",
            display_name="Apply Merged LoRA",
            category="DuoLoRA",
            description="Applies the merged LoRA exactly as the stock Load LoRA node applies the saved file.",
            inputs=[
                io.Model.Input("model", tooltip="The SDXL model to patch."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional: the CLIP to patch with the text-encoder part, if any."),
                MergedLoRAType.Input("merged_lora", tooltip="From ZipRank Merge."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly the merged LoRA changes the UNet."),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly it changes the text encoders."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP")],
        )

    @classmethod
    def execute(cls, model, merged_lora: MergedLoRA, strength_model: float = 1.0, strength_clip: float = 1.0,
                clip=None) -> io.NodeOutput:
        if strength_model == 0 and strength_clip == 0:
            return io.NodeOutput(model, clip)
        # ComfyUI skips a LoRA weight whose shape does not match with only a log line; say it here instead.
        bridge.validate_for_model(merged_lora.lora, model)
        new_model, new_clip = bridge.apply_lora_state_dict(model, clip, merged_lora.state_dict,
                                                           strength_model, strength_clip)
        return io.NodeOutput(new_model, new_clip)
