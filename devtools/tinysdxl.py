"""Tiny SDXL stand-ins built from ComfyUI's own classes, and the full-size SDXL UNet on the ``meta`` device.

``build_tiny_model``, ``build_tiny_clip`` and ``build_tiny_vae`` keep exactly SDXL's module names and only shrink
widths; their weights are seeded, so the same seed gives bit-identical models. ``full_sdxl_meta`` gives shapes and
parameter counts of the real UNet at no memory cost. Every ComfyUI import happens inside a function: call them
after ``comfyhost.boot()`` has prepared the process.
"""

from __future__ import annotations

from typing import Any

import torch

# ---------------------------------------------------------------------------------------------------
# Model configurations (facts about SDXL; the tiny one keeps every module name and only shrinks widths)
# ---------------------------------------------------------------------------------------------------

# SDXL base UNet as ComfyUI's model detection describes it (comfy/model_detection.py, 0.3.75).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

# Overrides of ComfyUI's CLIP-L / CLIP-bigG JSON configs (comfy/sd1_clip_config.json, clip_config_bigg.json).
# Layer counts stay at SDXL's (12 and 32) so every real text-encoder LoRA key has a module to map to; the
# two widths differ on purpose so a te1/te2 mix-up changes shapes and fails loudly.
TINY_CLIP_L_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_hidden_layers": 12,
    "projection_dim": 32,
}
TINY_CLIP_G_CONFIG: dict[str, Any] = {
    "hidden_size": 48,
    "intermediate_size": 192,
    "num_attention_heads": 3,
    "num_hidden_layers": 32,
    "projection_dim": 48,
}
# SDXL's pooled vector is CLIP-G's projected EOS token (text_projection is hidden×hidden in ComfyUI).
TINY_POOLED_DIM: int = TINY_CLIP_G_CONFIG["hidden_size"]
# SDXL appends six 256-wide Fourier embeddings (height, width, crop_h, crop_w, target_h, target_w).
SDXL_SIZE_EMBED_DIM: int = 6 * 256

TINY_UNET_CONFIG: dict[str, Any] = {
    **SDXL_UNET_CONFIG,
    "model_channels": 32,
    "num_head_channels": 16,
    "context_dim": TINY_CLIP_L_CONFIG["hidden_size"] + TINY_CLIP_G_CONFIG["hidden_size"],
    "adm_in_channels": TINY_POOLED_DIM + SDXL_SIZE_EMBED_DIM,
}

# The tiny text encoders as duolora.sdxl.layout_for(te_dims=...) takes them: (hidden, layers, mlp).
TINY_TE_DIMS: dict[str, tuple[int, int, int]] = {
    which: (c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"])
    for which, c in (("te1", TINY_CLIP_L_CONFIG), ("te2", TINY_CLIP_G_CONFIG))
}

# ComfyUI's TAESD-XL latent scale (nodes.VAELoader.load_taesd for "taesdxl").
TAESDXL_SCALE = 0.13025
TAESDXL_SHIFT = 0.0

# ---------------------------------------------------------------------------------------------------
# Tiny SDXL stand-ins
# ---------------------------------------------------------------------------------------------------


def fill_seeded_(module: torch.nn.Module, seed: int, device: torch.device | str | None = None) -> torch.nn.Module:
    """Overwrite every parameter of ``module`` with seeded values (ComfyUI's ops skip initialisation).

    Matrices and kernels: N(0, 1/fan_in) so activations keep unit scale through the residual stack;
    norm scales 1 ± 0.05; biases N(0, 0.02²). Parameters are visited in ``named_parameters`` order, so
    the same architecture and seed give bit-identical weights. ``device``: where the noise is drawn (default
    the CPU; a CUDA generator fills a full-size SDXL in well under a second, with other, equally seeded values).
    """
    g = torch.Generator(device=device or "cpu").manual_seed(int(seed))
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32, device=g.device)
            if p.dim() >= 2:
                value = noise / (p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                value = noise * 0.02
            elif p.dim() == 1:
                value = 1.0 + 0.05 * noise
            else:
                value = noise * 0.02
            p.copy_(value.to(p.dtype))
    return module


def _sdxl_model_config(unet_config: dict[str, Any], dtype: torch.dtype, manual_cast_dtype: torch.dtype | None = None):
    import comfy.supported_models

    cfg = comfy.supported_models.SDXL(dict(unet_config))
    # BASE.__init__ forces SDXL's num_head_channels=64 from unet_extra_config; restore the requested widths.
    cfg.unet_config["num_head_channels"] = unet_config["num_head_channels"]
    cfg.set_inference_dtype(dtype, manual_cast_dtype)
    return cfg


def build_tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32,
                     manual_cast_dtype: torch.dtype | None = None):
    """A ``comfy.model_patcher.ModelPatcher`` around a ``comfy.model_base.SDXL`` of TINY_UNET_CONFIG.

    Same module names as SDXL (``diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q`` …),
    widths shrunk; seeded weights; eps-prediction like SDXL base. Latent: (B, 4, H/8, W/8).
    ``dtype`` is the weights' storage dtype; ``manual_cast_dtype`` the dtype the model computes in when that
    differs (ComfyUI's fp8 checkpoints: weights float8_e4m3fn, computed in bf16/fp16/fp32 by its
    ``manual_cast`` ops).
    """
    return build_sdxl_model(TINY_UNET_CONFIG, seed, dtype, torch.device("cpu"), manual_cast_dtype)


def tiny_model_loader(seed: int = 0, disable_dynamic: bool = False):
    """The tiny model as ComfyUI's own loaders hand a MODEL out: with ``cached_patcher_init`` set to how it is made
    again (hosts with dynamic VRAM re-make a model that way for a non-dynamic copy: ``disable_dynamic=True``).
    On a CPU every ModelPatcher is non-dynamic, so ``disable_dynamic`` changes nothing here."""
    model = build_tiny_model(seed)
    model.cached_patcher_init = (tiny_model_loader, (seed,))
    return model


def build_sdxl_model(unet_config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32,
                     device: torch.device | None = None, manual_cast_dtype: torch.dtype | None = None,
                     dynamic: bool = False, disable_dynamic: bool = False):
    """A ``ModelPatcher`` around a ``comfy.model_base.SDXL`` of ``unet_config`` (``SDXL_UNET_CONFIG``: the
    full-size 2.57 B-parameter UNet), built directly on ``device`` with seeded weights (drawn there).
    Model management loads it on ComfyUI's torch device.

    ``dynamic``: in ComfyUI's dynamic-VRAM patcher (after ``enable_dynamic_vram``), its weights moved to the
    offload device, from which dynamic VRAM streams them, and with ``cached_patcher_init`` set to this function,
    as a core loader sets it, so ComfyUI can make a non-dynamic copy (``disable_dynamic``, its keyword)."""
    import comfy.model_management
    import comfy.model_patcher

    device = torch.device(device or "cpu")
    cfg = _sdxl_model_config(unet_config, dtype, manual_cast_dtype)
    model = cfg.get_model({}, "model.diffusion_model.", device=device)
    fill_seeded_(model, seed, device=None if device.type == "cpu" else device)
    offload = comfy.model_management.unet_offload_device()
    if dynamic and not disable_dynamic:
        patcher_class = comfy.model_patcher.ModelPatcherDynamic
        model.to(offload)
    else:
        patcher_class = comfy.model_patcher.ModelPatcher
    patcher = patcher_class(model, load_device=comfy.model_management.get_torch_device(), offload_device=offload)
    if dynamic:
        patcher.cached_patcher_init = (
            lambda disable_dynamic=False: build_sdxl_model(unet_config, seed, dtype, device, manual_cast_dtype,
                                                           dynamic=True, disable_dynamic=disable_dynamic), ())
    return patcher


def build_tiny_clip(seed: int = 0, dtype: torch.dtype | None = torch.float32):
    """A ``comfy.sd.CLIP`` with SDXL's two text encoders (``clip_l``, ``clip_g``) at tiny widths.

    Built by ComfyUI's own ``SDXLClipModel``; the sizes come in through ComfyUI's
    ``model_options["clip_l_model_config"/"clip_g_model_config"]`` overrides. Conditioning is
    (B, 77, 80) plus a pooled (B, 48). ``dtype=None`` keeps ComfyUI's CPU default (float16).
    """
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    options: dict[str, Any] = {
        "clip_l_model_config": dict(TINY_CLIP_L_CONFIG),
        "clip_g_model_config": dict(TINY_CLIP_G_CONFIG),
    }
    if dtype is not None:
        options["dtype"] = dtype
    clip = comfy.sd.CLIP(target=target, model_options=options)
    fill_seeded_(clip.cond_stage_model, seed)
    return clip


def tiny_taesd_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded TAESD-format state dict (``taesd_encoder.*``, ``taesd_decoder.*``, SDXL scale/shift)."""
    import comfy.taesd.taesd

    net = fill_seeded_(comfy.taesd.taesd.TAESD(latent_channels=4), seed)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    sd["vae_scale"] = torch.tensor(TAESDXL_SCALE)
    sd["vae_shift"] = torch.tensor(TAESDXL_SHIFT)
    return sd


def build_tiny_vae(seed: int = 0):
    """A ``comfy.sd.VAE`` that ComfyUI recognises as TAESD (8× down/up-sampling, 4 latent channels)."""
    import comfy.sd

    return comfy.sd.VAE(sd=tiny_taesd_state_dict(seed))


def full_sdxl_meta():
    """The real full-size SDXL ``comfy.model_base.SDXL`` with every tensor on the ``meta`` device.

    Shapes and parameter counts are exact; no memory is allocated. Built on each call (about a second).
    """
    cfg = _sdxl_model_config(SDXL_UNET_CONFIG, torch.float16)
    return cfg.get_model({}, "model.diffusion_model.", device=torch.device("meta"))


def num_parameters(module: torch.nn.Module) -> int:
    """Number of scalar parameters of ``module`` (works on ``meta`` tensors)."""
    return sum(p.numel() for p in module.parameters())
