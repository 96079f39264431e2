"""MergeReport: the kept-rank histograms (the paper's Fig. 4/5) and loss curves as an IMAGE and a preview."""

from __future__ import annotations

import io as _io

import numpy as np
import torch
from PIL import Image

from .api import io, ui
from .types import MergeStats, MergeStatsType


def _png_to_image(png: bytes) -> torch.Tensor:
    img = Image.open(_io.BytesIO(png)).convert("RGB")
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


class MergeReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DuoLoRA_MergeReport",
            display_name="Merge Report",
            category="DuoLoRA",
            description="Shows how many rank components of each LoRA the merge kept, per block and per prior "
                        "group, and the loss curves; its first line names the model family and the prior preset.",
            is_output_node=True,
            inputs=[MergeStatsType.Input("stats", tooltip="From ZipRank Merge.")],
            outputs=[
                io.Image.Output("report", display_name="report", tooltip="The report figure."),
                io.String.Output("summary", display_name="summary", tooltip="The report as text."),
            ],
        )

    @classmethod
    def execute(cls, stats: MergeStats) -> io.NodeOutput:
        image = _png_to_image(stats.report.figure_png())
        text = stats.report.text() + (
            f"\nwall time {stats.wall_seconds:.1f} s, peak memory {stats.peak_memory_bytes / 2**20:.0f} MiB "
            f"({stats.peak_memory_kind})"
        )
        return io.NodeOutput(image, text, ui=ui.PreviewImage(image, cls=cls))
