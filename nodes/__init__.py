"""ComfyUI adapters of the DuoLoRA pack: thin V3 nodes over the ``duolora`` engine."""

from __future__ import annotations

from .api import ComfyExtension, io
from .apply import ApplyMergedLoRA
from .klora import ApplyKLoRA
from .loaders import AddContentLoRA, LoadContentLoRA, LoadStyleLoRA
from .merge import ZipRankMerge
from .report import MergeReport
from .save import SaveMergedLoRA

NODES: list[type[io.ComfyNode]] = [
    LoadContentLoRA, AddContentLoRA, LoadStyleLoRA, ZipRankMerge, ApplyMergedLoRA, SaveMergedLoRA, MergeReport,
    ApplyKLoRA,
]


class DuoLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
