"""ApplyKLoRA: sample with a content and a style LoRA without merging them (K-LoRA, a sampling-time patch)."""

from __future__ import annotations

from ..duolora import families
from ..duolora.config import SCOPES
from ..duolora.klora import DEFAULT_ALPHA, DEFAULT_BETA, KLoRA
from . import comfy_bridge as bridge
from .api import io
from .types import SourceLoRA, SourceLoRAType


class ApplyKLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DuoLoRA_ApplyKLoRA",
            display_name="Apply K-LoRA",
            category="DuoLoRA",
            description=(
                "Samples with a content LoRA and a style LoRA without merging them (K-LoRA, CVPR 2025): in every "
                "attention layer, at every step, only one of the two LoRAs is applied, the one whose largest "
                "weights weigh more, with the style LoRA's weight growing as sampling proceeds (subject first, "
                "style later). No merge time and no file; works with any sampler. Only the UNet is patched: "
                "apply text-encoder layers, if a LoRA has them, to CLIP with the stock LoRA loader."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SDXL model both LoRAs were trained for."),
                SourceLoRAType.Input("content_lora", tooltip="From Load Content LoRA: the subject."),
                SourceLoRAType.Input("style_lora", tooltip="From Load Style LoRA: the style."),
                io.Float.Input("alpha", default=DEFAULT_ALPHA, min=0.0, max=10.0, step=0.05,
                               tooltip="How much the style LoRA's score grows from the first step to the last: "
                                       "its weight is α·t/T + β (t/T: how far sampling has got). Raise it for "
                                       "more style in the details; 1.5 is the paper's."),
                io.Float.Input("beta", default=DEFAULT_BETA, min=0.0, max=10.0, step=0.05,
                               tooltip="The style LoRA's weight at the first step. Lower it to keep more of the "
                                       "subject (a strong style LoRA), raise it for more style (a strong content "
                                       "LoRA); 0.5 is the paper's."),
                io.Combo.Input("timeline", options=list(bridge.KLORA_TIMELINES), default="steps",
                               tooltip="What t/T counts. steps: the sampler's steps done over its steps (the "
                                       "paper). noise: the noise level, the same for any step count or scheduler "
                                       "and across several samplers that share one image (base + refiner)."),
                io.Combo.Input("scope", options=list(SCOPES), default="attention",
                               tooltip="attention: the rule chooses in the attention q/k/v/out layers (the "
                                       "paper); other layers both LoRAs patch get both. all: it chooses in every "
                                       "layer both patch."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.String.Output("summary", display_name="summary",
                                 tooltip="How many layers the rule chooses in, the balance factor γ, and the share "
                                         "of layers that apply the content LoRA at the first and the last step."),
            ],
        )

    @classmethod
    def execute(cls, model, content_lora: SourceLoRA, style_lora: SourceLoRA, alpha: float = DEFAULT_ALPHA,
                beta: float = DEFAULT_BETA, timeline: str = "steps", scope: str = "attention") -> io.NodeOutput:
        family = bridge.model_layout(model).family
        if family != "sdxl":
            raise ValueError(f"Apply K-LoRA runs on SDXL models; on {families.FAMILIES[family].label}, merge the two "
                             "LoRAs with ZipRank Merge in mode 'weights'")
        for src in (content_lora, style_lora):
            bridge.validate_for_model(src.lora, model)
        # The statistics need the elements of each ΔW once: computed where the model runs.
        klora = KLoRA(content_lora.lora, style_lora.lora, alpha=alpha, beta=beta, scope=scope,
                      device=bridge.execution_device(model))
        patched = bridge.klora_model(model, klora, timeline)
        return io.NodeOutput(patched, klora.describe())
