"""SaveMergedLoRA: write the merged LoRA into the loras folder, atomically and never over a file."""

from __future__ import annotations

from ..duolora import engine
from . import comfy_bridge as bridge
from .api import io
from .types import MergedLoRA, MergedLoRAType


class SaveMergedLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DuoLoRA_SaveMergedLoRA",
            display_name="Save Merged LoRA",
            category="DuoLoRA",
            description="Saves the merged LoRA into your loras folder as a standard LoRA (kohya keys with alpha) "
                        "that ComfyUI, A1111/Forge and kohya tools load, and shows its name here after a run.",
            is_output_node=True,
            inputs=[
                MergedLoRAType.Input("merged_lora", tooltip="From ZipRank Merge."),
                io.String.Input("filename_prefix", default="duolora/merged",
                                tooltip="Name of the file in models/loras (a sub-folder is allowed); a counter "
                                        "is added so no file is ever overwritten."),
            ],
            outputs=[io.String.Output("path", display_name="path",
                                      tooltip="The saved file, relative to models/loras.")],
        )

    @classmethod
    def execute(cls, merged_lora: MergedLoRA, filename_prefix: str = "duolora/merged") -> io.NodeOutput:
        path, relative = bridge.next_lora_path(filename_prefix)
        engine.write_merged(merged_lora.state_dict, path, merged_lora.metadata)
        return io.NodeOutput(relative, ui={"text": [relative]})
