"""The tiny SDXL-layout model in the real ComfyUI (devtools/comfyhost.py, tinysdxl.py) with generated LoRAs and references,
shared by B2 and B3. Nothing is downloaded: weights are seeded noise, latents are seeded N(0, 1) samples in the
model's space, prompts go through the tiny CLIP exactly as CLIPTextEncode sends them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .common import use_devtools

PROMPTS = ("a photo of sks dog", "a cat in zwz style", "a sks dog in zwz style")


@dataclass
class TinySetup:
    host: Any
    model: Any  # comfy ModelPatcher
    layout: Any  # duolora Layout of the tiny model
    content: Any  # duolora LoRA
    style: Any
    content_latents: torch.Tensor  # LATENT "samples" (B, 4, H, W)
    style_latents: torch.Tensor
    p_c: Any  # CONDITIONING
    p_s: Any
    p_cs: Any


def setup(latent_side: int = 32, rank: int = 8, n_content: int = 2, seed: int = 0) -> TinySetup:
    """Boot the in-process ComfyUI once and build everything B2/B3 need (seeded)."""
    use_devtools()
    import comfyhost
    import tinysdxl

    from duolora import sdxl
    from duolora.synthetic import synthetic_lora

    host = comfyhost.boot()
    model = tinysdxl.build_tiny_model(seed=seed)
    clip = tinysdxl.build_tiny_clip(seed=seed)
    layout = sdxl.layout_for(sdxl.UNetConfig.from_comfy(tinysdxl.TINY_UNET_CONFIG), te_dims=tinysdxl.TINY_TE_DIMS)
    content = synthetic_lora(layout, rank=rank, seed=seed + 1, std=0.2)
    style = synthetic_lora(layout, rank=rank, seed=seed + 2, std=0.2)
    with torch.inference_mode(False):
        conds = [clip.encode_from_tokens_scheduled(clip.tokenize(text)) for text in PROMPTS]
    g = torch.Generator().manual_seed(1000 + seed)
    scale = model.model.latent_format.scale_factor  # so the model sees N(0, 1) latents after process_latent_in
    content_latents = torch.randn(n_content, 4, latent_side, latent_side, generator=g) / scale
    style_latents = torch.randn(1, 4, latent_side, latent_side, generator=g) / scale
    return TinySetup(host, model, layout, content, style, content_latents, style_latents, *conds)


def bridge():
    """The pack's comfy_bridge module, as ComfyUI loaded it."""
    import sys

    use_devtools()
    import comfyhost

    suffix = f"{comfyhost.PACK_DIR_NAME}.nodes.comfy_bridge"
    for name, module in list(sys.modules.items()):
        if name.endswith(suffix) and module is not None:
            return module
    raise LookupError("the DuoLoRA pack's comfy_bridge is not loaded (boot the host first)")


def references(den, t: TinySetup):
    from duolora.objective import References

    return References(content=den.prepare_latents(t.content_latents), style=den.prepare_latents(t.style_latents),
                      p_c=t.p_c, p_s=t.p_s, p_cs=t.p_cs)
