"""The pack's socket types and the values that travel on them (plain data, no math)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..duolora.lora import LoRA
from .api import io

# A LoRA read by LoadContentLoRA / LoadStyleLoRA, or a list of content LoRAs built by AddContentLoRA.
SourceLoRAType = io.Custom("DUOLORA_LORA")
# The merge result: an exact standard LoRA plus its provenance.
MergedLoRAType = io.Custom("DUOLORA_MERGED")
# Loss history, kept ranks and timings of one merge, for MergeReport.
MergeStatsType = io.Custom("DUOLORA_STATS")
# ComfyUI's own LoRA state-dict type (TrainLoraNode, LoraModelLoader, SaveLoRA use it).
LoraModelType = io.Custom("LORA_MODEL")

# Why every value below has a short __repr__: when a node raises, ComfyUI's executor formats each of its
# inputs with str() for the error report it sends to the browser (execution.format_value, 0.3.75). A
# dataclass's default repr prints every tensor of both LoRAs: on the tiny test model a ZipRank Merge that
# refused a file took ~11 s instead of ~0.6 s, and the error message grew to megabytes.


class LoraStateDict(dict):
    """A LORA_MODEL value: a plain ``dict`` of tensors (what ComfyUI's core nodes take) with a short repr."""

    def __repr__(self) -> str:
        n = sum(1 for k in self if k.endswith(("lora_down.weight", "lora_A.weight")))
        return f"LORA_MODEL({n} layers, {len(self)} tensors)"

    __str__ = __repr__


@dataclass(repr=False)
class SourceLoRA:
    """A loaded LoRA with where it came from.

    A multi-concept merge's content LoRAs travel as a chain: each Add Content LoRA wraps its LoRA with the
    upstream value in ``previous`` and its own references (``latents``: a LATENT dict, ``prompt`` and
    ``combined_prompt``: CONDITIONINGs; None when not connected). ``chain()`` lists them upstream first.
    """

    lora: LoRA
    name: str  # file name relative to the loras folder, or a description of the upstream node
    sha256: str | None
    summary: str
    strength: float = 1.0
    previous: SourceLoRA | None = None
    latents: Any = None
    prompt: Any = None
    combined_prompt: Any = None

    def chain(self) -> list[SourceLoRA]:
        """Every content LoRA of the chain that ends here, the first one (a Load Content LoRA) first."""
        out: list[SourceLoRA] = []
        node: SourceLoRA | None = self
        while node is not None:
            out.append(node)
            node = node.previous
        return out[::-1]

    def __repr__(self) -> str:
        if self.previous is not None:
            return "SourceLoRA(" + " + ".join(repr(s.name) for s in self.chain()) + ")"
        return f"SourceLoRA({self.name!r}: {self.summary})"


@dataclass(repr=False)
class MergedLoRA:
    """An exact standard LoRA (rank r_c + r_s — Σ r_i over every LoRA — minus pruned components) ready to apply
    or save.

    ``state_dict`` is computed once in kohya LDM keys with alpha = rank, so ApplyMergedLoRA and
    SaveMergedLoRA use the very same tensors (the applied weights equal those of the saved file loaded by
    the stock LoraLoader bit for bit).
    """

    lora: LoRA
    state_dict: dict[str, Any]
    metadata: dict[str, str]
    method: str

    def __repr__(self) -> str:
        ranks = self.lora.ranks()
        rank = f"rank {ranks[0]}–{ranks[-1]}" if ranks else "empty"
        return f"MergedLoRA({self.method}: {len(self.lora.layers)} layers, {rank})"


@dataclass(repr=False)
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

    def __repr__(self) -> str:
        return (f"MergeStats({self.method}, {self.mode}: {self.steps_done} steps, "
                f"{self.trainable_parameters} trainable, {self.wall_seconds:.1f} s)")
