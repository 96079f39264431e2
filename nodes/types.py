"""The pack's socket types and the values that travel on them (plain data, no math)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from comfy_api.latest import io

from ..duolora.lora import LoRA

# A LoRA read by LoadContentLoRA / LoadStyleLoRA.
SourceLoRAType = io.Custom("DUOLORA_LORA")
# The merge result: an exact standard LoRA plus its provenance.
MergedLoRAType = io.Custom("DUOLORA_MERGED")
# Loss history, kept ranks and timings of one merge, for MergeReport.
MergeStatsType = io.Custom("DUOLORA_STATS")
# ComfyUI's own LoRA state-dict type (TrainLoraNode, LoraModelLoader, SaveLoRA use it).
LoraModelType = io.Custom("LORA_MODEL")


@dataclass
class SourceLoRA:
    """A loaded LoRA with where it came from."""

    lora: LoRA
    name: str  # file name relative to the loras folder, or a description of the upstream node
    sha256: str | None
    summary: str
    strength: float = 1.0


@dataclass
class MergedLoRA:
    """An exact standard LoRA (rank r_c + r_s minus pruned components) ready to apply or save.

    ``state_dict`` is computed once in kohya LDM keys with alpha = rank, so ApplyMergedLoRA and
    SaveMergedLoRA use the very same tensors (the applied weights equal those of the saved file loaded by
    the stock LoraLoader bit for bit).
    """

    lora: LoRA
    state_dict: dict[str, Any]
    metadata: dict[str, str]
    method: str


@dataclass
class MergeStats:
    method: str
    mode: str
    config: dict[str, Any]
    history: dict[str, list[float]]
    steps_done: int
    trainable_parameters: int
    kept_rank_by_block: dict[str, dict[str, float]]
    wall_seconds: float
    peak_memory_bytes: int
    peak_memory_kind: str
    report: Any = None  # duolora.report.MergeReport
    extra: dict[str, Any] = field(default_factory=dict)
