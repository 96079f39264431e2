"""A tiny Flux.1 built from ComfyUI's own classes, for tests of Flux LoRAs in the real host.

``build_tiny_flux`` makes ComfyUI's ``comfy.supported_models.Flux`` model config with the widths shrunk
(``TINY_FLUX_CONFIG``) and lets it build its ``comfy.model_base.Flux`` around ``comfy.ldm.flux.model.Flux``:
exactly FLUX.1-dev's module names (``diffusion_model.double_blocks.0.img_attn.qkv``,
``diffusion_model.single_blocks.11.linear1`` …), so ComfyUI's LoRA key map treats it as the Flux it is
(kohya ``lora_unet_…``, diffusers ``transformer.transformer_blocks.N.attn.to_q`` onto row slices of the fused
``qkv``/``linear1``, ComfyUI ``diffusion_model.…``). Seeded weights (``tinysdxl.fill_seeded_``); flow-matching
(ComfyUI's ``ModelType.FLUX``) like FLUX.1-dev. Call after ``comfyhost.boot()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tinysdxl
import torch

TINY_FLUX_NODE = "TinyFluxModel"  # the test node pack's node that outputs it (devtools/tiny_nodes)

# FLUX.1-dev's unet_config (as comfy/model_detection.py reads a checkpoint) with the widths shrunk: hidden 32 in
# 2 heads of 16 (axes 4 + 6 + 6), MLP 4 × 32, 2 double blocks and 12 single blocks (so single blocks 10 and 11
# exist: the SplitFlux preset gives this model both roles), text width 40, pooled width 24.
TINY_FLUX_CONFIG: dict[str, Any] = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 24, "context_in_dim": 40,
    "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 12,
    "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}


def flux_unet_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` plus what this ComfyUI's ``FluxParams`` requires besides it: hosts whose Flux takes the text
    positions' id axes (``txt_ids_dims``) get ``[]``, what their model detection gives FLUX.1."""
    import comfy.ldm.flux.model

    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    out = dict(config)
    if "txt_ids_dims" in fields:
        out.setdefault("txt_ids_dims", [])
    return out


def build_tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32, config: dict[str, Any] | None = None):
    """A ``comfy.model_patcher.ModelPatcher`` around a ``comfy.model_base.Flux`` of ``config`` (default
    ``TINY_FLUX_CONFIG``), seeded. Latent: (B, 16, H/8, W/8); ``cached_patcher_init`` set as core loaders set it."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    cfg = comfy.supported_models.Flux(flux_unet_config(config or TINY_FLUX_CONFIG))
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({}, "model.diffusion_model.", device=torch.device("cpu"))
    tinysdxl.fill_seeded_(model, seed)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    patcher.cached_patcher_init = (build_tiny_flux, (seed, dtype, config))
    return patcher
