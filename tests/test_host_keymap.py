"""Our SDXL layer table and LoRA key spellings agree with ComfyUI's own (Foundation item 6).

(a) ``duolora.sdxl.unet_layers`` lists exactly the Linear/Conv2d weights of ComfyUI's real SDXL UNet
    (built on the meta device), with their shapes, and its diffusers spellings are the ones
    ``comfy.utils.unet_to_diffusers`` uses.
(b) For synthetic LoRAs (seeded noise, not trained: no real SDXL LoRA is small enough to ship) written in
    every key style of ``duolora.formats``, ComfyUI's stock key maps (``comfy.lora.model_lora_keys_unet`` /
    ``model_lora_keys_clip``, always with a fresh ``{}``) and ``comfy.lora.load_lora`` route each written
    key to ``diffusion_model.<canonical name>.weight`` (or the CLIP weight) with our ΔW.
"""

from __future__ import annotations

import logging
import re

import pytest
import tinysdxl
import torch

from duolora import formats, sdxl
from duolora.lora import LoRA
from duolora.synthetic import synthetic_lora

STYLES = formats.KEY_STYLES
# ComfyUI 0.3.75 knows plain diffusers attention projections only in the legacy attention-processor
# spelling (`…attn1.processor.to_q`): `unet.….attn1.to_q.lora_A/…lora.down` keys are not in its key map,
# so its stock LoraLoader drops those layers. Every other layer of these styles maps.
ATTENTION_UNMAPPED_BY_COMFY = {"diffusers_peft", "diffusers"}

SDXL_UNET_PARAMETERS = 2_567_463_684


def linear_conv_weights(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> weight shape of every Linear/Conv2d in ``module``, in module order."""
    return {
        name: tuple(m.weight.shape)
        for name, m in module.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }


def not_loaded(records: list[logging.LogRecord]) -> set[str]:
    """Keys ComfyUI's load_lora reported as not loaded (its own 'lora key not loaded: …' warnings)."""
    prefix = "lora key not loaded: "
    return {r.getMessage()[len(prefix):] for r in records if r.getMessage().startswith(prefix)}


def only(lora: LoRA, names: list[str]) -> LoRA:
    return LoRA(layers={n: lora.layers[n] for n in names}, base=lora.base, dtype=lora.dtype)


# ------------------------------------------------------------------------------------------ (a) tables


def test_sdxl_table_is_the_real_unet(sdxl_meta) -> None:
    table = sdxl.unet_layers(sdxl.SDXL)
    real = linear_conv_weights(sdxl_meta.diffusion_model)
    assert tinysdxl.num_parameters(sdxl_meta.diffusion_model) == SDXL_UNET_PARAMETERS
    assert len(real) == 794
    assert list(table) == list(real)
    assert {n: layer.shape for n, layer in table.items()} == real
    assert sum(layer.is_attention for layer in table.values()) == 560
    assert all(layer.model_key == f"diffusion_model.{n}.weight" for n, layer in table.items())


def test_comfy_detects_our_sdxl_config(sdxl_meta) -> None:
    import comfy.model_detection
    import comfy.supported_models

    # ComfyUI's checkpoint detection, run on the meta UNet's tensor shapes, says "SDXL" and yields our config.
    detected = comfy.model_detection.model_config_from_unet(sdxl_meta.state_dict(), "diffusion_model.")
    assert isinstance(detected, comfy.supported_models.SDXL)
    assert sdxl.UNetConfig.from_comfy(detected.unet_config) == sdxl.SDXL
    assert sdxl.UNetConfig.from_comfy(sdxl_meta.model_config.unet_config) == sdxl.SDXL


def test_diffusers_spellings_are_comfys(sdxl_meta) -> None:
    import comfy.utils

    table = sdxl.unet_layers(sdxl.SDXL)
    comfy_map = comfy.utils.unet_to_diffusers(sdxl_meta.model_config.unet_config)
    spellings: dict[str, set[str]] = {}
    for diffusers_key, ldm_key in comfy_map.items():
        if ldm_key.endswith(".weight") and ldm_key[: -len(".weight")] in table:
            spellings.setdefault(ldm_key[: -len(".weight")], set()).add(diffusers_key[: -len(".weight")])
    assert set(spellings) == set(table)
    for name, layer in table.items():
        expected = {layer.diffusers}
        if name.startswith("label_emb."):
            # ComfyUI accepts SDXL's ADM MLP under both diffusers names.
            expected.add(layer.diffusers.replace("add_embedding.", "class_embedding."))
        assert spellings[name] == expected, name


def test_tiny_table_is_the_tiny_unet(unet, tiny_layout) -> None:
    real = linear_conv_weights(unet.model.diffusion_model)
    table = tiny_layout.unet_layers()
    assert list(table) == list(real)
    assert {n: layer.shape for n, layer in table.items()} == real


def test_tiny_text_encoder_table_is_the_tiny_clip(clip, tiny_layout) -> None:
    state = clip.cond_stage_model.state_dict()
    table = tiny_layout.text_encoder_layers()
    assert len(table) == 6 * (12 + 32)
    for name, layer in table.items():
        clip_name = "clip_l" if name.startswith("te1.") else "clip_g"
        assert layer.model_key == f"{clip_name}.transformer.{name[4:]}.weight"
        assert tuple(state[layer.model_key].shape) == layer.shape, name


# ------------------------------------------------------------------------------- (b) ComfyUI key maps


def comfy_delta(adapter, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW exactly as ComfyUI computes it when patching (strength 1) — applied to a zero weight."""
    zero = torch.zeros(shape, dtype=torch.float32)
    return adapter.calculate_weight(zero, "probe", 1.0, 1.0, None, lambda w: w)


def one_per_kind(names: list[str]) -> list[str]:
    """The first layer of every name pattern (digits wildcarded): each kind of layer once, ~40 on SDXL."""
    seen: dict[str, str] = {}
    for n in names:
        seen.setdefault(re.sub(r"\d+", "#", n), n)
    return list(seen.values())


def assert_comfy_reads_our_factors(patches: dict, lora: LoRA, model_key, weights: dict) -> None:
    """For every layer: ComfyUI's down is ours, its up·alpha/rank is ours, up@down fits the real weight;
    for one layer of each kind also the dense ΔW of ComfyUI's own patch math equals ours."""
    for name, ours in lora.layers.items():
        adapter = patches[model_key(name)]
        up, down, alpha = adapter.weights[:3]
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        assert torch.equal(down.reshape(ours.down.shape).float(), ours.down), name
        torch.testing.assert_close(up.reshape(ours.up.shape).float() * scale, ours.up, rtol=1e-6, atol=0)
        weight = weights[model_key(name)]
        assert (up.shape[0], down[0].numel()) == (weight.shape[0], weight[0].numel()), name
    if weights[model_key(next(iter(lora.layers)))].is_meta:
        return
    for name in one_per_kind(list(lora.layers)):
        ours = lora.layers[name].delta()
        theirs = comfy_delta(patches[model_key(name)], tuple(ours.shape))
        assert (theirs - ours).abs().max() <= 1e-6 * ours.abs().max(), name


@pytest.mark.parametrize("style", STYLES)
def test_comfy_maps_every_unet_key_tiny(style: str, unet, tiny_layout, caplog) -> None:
    import comfy.lora

    lora = synthetic_lora(tiny_layout, rank=3, scope="all", seed=5, std=0.2)
    attention = list(tiny_layout.attention_layers())
    key_map = comfy.lora.model_lora_keys_unet(unet.model, {})
    state = formats.lora_to_state_dict(lora, style, layout=tiny_layout)
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(state, key_map)

    unmapped = attention if style in ATTENTION_UNMAPPED_BY_COMFY else []
    mapped = [n for n in lora.layers if n not in set(unmapped)]
    assert set(patches) == {f"diffusion_model.{n}.weight" for n in mapped}
    # What ComfyUI leaves unloaded is exactly the written keys of the unmapped layers, nothing else.
    expected_left = formats.lora_to_state_dict(only(lora, unmapped), style, layout=tiny_layout) if unmapped else {}
    assert not_loaded(caplog.records) == set(expected_left)
    assert_comfy_reads_our_factors(patches, only(lora, mapped), lambda n: f"diffusion_model.{n}.weight",
                                   unet.model.state_dict())


@pytest.mark.parametrize("style", STYLES)
def test_comfy_maps_every_unet_key_full_sdxl(style: str, sdxl_meta, caplog) -> None:
    import comfy.lora

    lora = synthetic_lora(sdxl.SDXL_LAYOUT, rank=1, scope="all", seed=9)
    key_map = comfy.lora.model_lora_keys_unet(sdxl_meta, {})
    weights = sdxl_meta.state_dict()
    state = formats.lora_to_state_dict(lora, style, layout=sdxl.SDXL_LAYOUT)
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(state, key_map)

    attention = set(sdxl.SDXL_LAYOUT.attention_layers())
    unmapped = attention if style in ATTENTION_UNMAPPED_BY_COMFY else set()
    mapped = [n for n in lora.layers if n not in unmapped]
    assert len(mapped) == (234 if unmapped else 794)
    assert set(patches) == {f"diffusion_model.{n}.weight" for n in mapped}
    assert len(not_loaded(caplog.records)) == 2 * len(unmapped)
    # Meta weights: factor-level checks only (no dense ΔW at full size).
    assert_comfy_reads_our_factors(patches, only(lora, mapped), lambda n: f"diffusion_model.{n}.weight", weights)


@pytest.mark.parametrize("style", STYLES)
def test_comfy_maps_every_text_encoder_key(style: str, clip, tiny_layout, caplog) -> None:
    import comfy.lora

    full = synthetic_lora(tiny_layout, rank=2, scope="attention", text_encoder=True, seed=3, std=0.2)
    lora = only(full, list(tiny_layout.text_encoder_layers()))
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    state = formats.lora_to_state_dict(lora, style, layout=tiny_layout)
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(state, key_map)

    assert not_loaded(caplog.records) == set()
    assert set(patches) == {tiny_layout[n].model_key for n in lora.layers}
    assert_comfy_reads_our_factors(patches, lora, lambda n: tiny_layout[n].model_key,
                                   clip.cond_stage_model.state_dict())
