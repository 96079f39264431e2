"""What a merged file carries besides its low-rank layers is what ComfyUI applies (issue 15, item 4), checked in
the real ComfyUI 0.3.75 with tiny and meta-device SDXL models.

(a) The bias/norm parameter table (``Layout.norms``, ``Layer.bias``) is exactly the 1-D parameters of ComfyUI's
    SDXL UNet and of its CLIP-L/CLIP-G, and the CLIP extras (text projection, embeddings) have their shapes.
(b) ComfyUI's stock key maps and ``comfy.lora.load_lora`` take every key we write for them — bias and norm
    differences, the text projection, an embedding LoRA — as the patches we mean, and leave nothing unloaded.
The LoRAs are synthetic (seeded noise with the tiny layout's names and shapes).
"""

from __future__ import annotations

import logging

import pytest
import torch

from duolora import formats, sdxl
from duolora.lora import LoRA, LowRank


def patchable(layout: sdxl.Layout, modules: dict[str, sdxl.Layer]) -> dict[str, tuple[int, ...]]:
    """Canonical 1-D parameter -> shape: norm weights and biases, and every bias a layer has."""
    out = {}
    for name, layer in modules.items():
        if layer.kind == "norm":
            out[f"{name}.weight"] = layout.param_shape(f"{name}.weight")
        if layer.bias:
            out[f"{name}.bias"] = layout.param_shape(f"{name}.bias")
    return out


def test_unet_bias_and_norm_table_is_the_real_unet(sdxl_meta) -> None:
    layout = sdxl.SDXL_LAYOUT
    real = {k[len("diffusion_model."):]: tuple(v.shape) for k, v in sdxl_meta.state_dict().items()
            if k.startswith("diffusion_model.") and v.dim() == 1}
    ours = patchable(layout, {**layout.unet_layers(), **layout.norms})
    ours = {k: v for k, v in ours.items() if not k.startswith(("te1.", "te2."))}
    assert ours == real
    # 11 transformers × (norm + 3 per block: 70 blocks) + 17 res-blocks × 2 + the output norm
    assert len(layout.norms) - sum(n.startswith(("te1.", "te2.")) for n in layout.norms) == 11 + 210 + 34 + 1


def test_clip_tables_are_the_real_text_encoders(clip, tiny_layout) -> None:
    state = clip.cond_stage_model.state_dict()
    clips = {"te1": "clip_l", "te2": "clip_g"}
    real = {}
    for key, value in state.items():
        which = next((w for w, c in clips.items() if key.startswith(f"{c}.transformer.")), None)
        if which is not None and value.dim() == 1:
            real[f"{which}.{key.split('.transformer.', 1)[1]}"] = tuple(value.shape)
    te = {k: v for k, v in {**tiny_layout.layers, **tiny_layout.extras, **tiny_layout.norms}.items()
          if k.startswith(("te1.", "te2."))}
    assert patchable(tiny_layout, te) == real
    for name, layer in tiny_layout.extras.items():
        assert tuple(state[layer.model_key].shape) == layer.shape, name


def not_loaded(records: list[logging.LogRecord]) -> set[str]:
    prefix = "lora key not loaded: "
    return {r.getMessage()[len(prefix):] for r in records if r.getMessage().startswith(prefix)}


EXTRAS_LORA = ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "te2.text_projection",
               "te1.text_model.embeddings.token_embedding")
PATCHES = ("input_blocks.4.1.norm.weight", "input_blocks.4.1.proj_in.bias", "out.0.bias",
           "input_blocks.1.0.in_layers.0.weight", "te1.text_model.final_layer_norm.weight",
           "te2.text_model.encoder.layers.0.layer_norm1.bias", "te1.text_model.encoder.layers.0.self_attn.q_proj.bias")


@pytest.mark.parametrize("style", ["kohya_ldm", "comfyui", "kohya_diffusers"])
def test_comfy_applies_everything_we_write(style: str, unet, clip, tiny_layout, caplog) -> None:
    import comfy.lora

    g = torch.Generator().manual_seed(3)
    layers = {}
    for name in EXTRAS_LORA:
        shape = tiny_layout.get(name).shape
        layers[name] = LowRank(torch.randn(shape[0], 2, generator=g), torch.randn(2, shape[1], generator=g))
    patches = {p: torch.randn(tiny_layout.param_shape(p), generator=g) for p in PATCHES}
    lora = LoRA(layers=layers, patches=patches, base="sdxl")
    state = formats.lora_to_state_dict(lora, style, dtype=torch.float32, layout=tiny_layout)
    key_map = comfy.lora.model_lora_keys_unet(unet.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    with caplog.at_level(logging.WARNING):
        loaded = comfy.lora.load_lora(state, key_map)
    assert not_loaded(caplog.records) == set()

    def model_param(param: str) -> str:
        module, _, kind = param.rpartition(".")
        layer = tiny_layout.module(module)
        return layer.model_key[: -len(".weight")] + "." + kind

    assert set(loaded) == {tiny_layout.get(n).model_key for n in layers} | {model_param(p) for p in patches}
    for param, diff in patches.items():
        kind, (value,) = loaded[model_param(param)]
        assert kind == "diff" and torch.equal(value, diff), param
    for name, lr in layers.items():
        up, down, alpha = loaded[tiny_layout.get(name).model_key].weights[:3]
        assert float(alpha) == down.shape[0] and torch.equal(up @ down, lr.up @ lr.down), name
