"""A LoRA file written by ``duolora.formats.save_lora`` does exactly what it says in stock ComfyUI.

The LoRA is synthetic (seeded noise; no real SDXL LoRA is small enough to ship). It is written with kohya
LDM keys, fp32, and an alpha that differs from the rank (the ``alpha=`` override rescales ``up`` so the file
still means the same ΔW), read by ``comfy.utils.load_torch_file`` and applied by ComfyUI's own
``comfy.sd.load_lora_for_models`` — what the stock LoraLoader node does — then patched the way samplers do
(``comfy.model_management.load_models_gpu``) and unpatched through ``unload_all_models``.
"""

from __future__ import annotations

import pytest
import torch

from duolora import formats
from duolora.lora import LowRank
from duolora.sdxl import Layout
from duolora.synthetic import synthetic_lora

RANK = 4
FILE_ALPHA = 1.5  # ≠ RANK: ComfyUI must apply alpha/rank = 0.375 to the file's up to get our ΔW back
ATTENTION_LAYER = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
CROSS_ATTENTION_LAYER = "middle_block.1.transformer_blocks.9.attn2.to_k"
CONV_LAYER = "input_blocks.1.0.in_layers.2"  # a 3×3 convolution
SKIP_CONV_LAYER = "input_blocks.4.0.skip_connection"  # a 1×1 convolution


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def max_error(patched: dict, originals: dict, layers: dict[str, LowRank], strength: float,
              layout: Layout) -> dict[str, float]:
    """Per layer: max |W_patched − (W + strength·ΔW)| over the weight's entries."""
    errors = {}
    for name, lr in layers.items():
        key = layout[name].model_key
        errors[name] = float((patched[key] - (originals[key] + strength * lr.delta())).abs().max())
    return errors


@pytest.fixture
def saved_lora(host, tiny_layout):
    lora = synthetic_lora(tiny_layout, rank=RANK, scope="all", text_encoder=True, seed=21, std=0.2)
    path = formats.save_lora(lora, host.loras_dir / "duolora_loader_test.safetensors", key_style="kohya_ldm",
                             dtype=torch.float32, alpha=FILE_ALPHA, layout=tiny_layout, overwrite=True)
    yield lora, path
    path.unlink()


def test_file_is_kohya_fp32_with_alpha_not_rank(saved_lora) -> None:
    import comfy.utils

    lora, path = saved_lora
    state = comfy.utils.load_torch_file(str(path), safe_load=True)
    alphas = {k: float(v) for k, v in state.items() if k.endswith(".alpha")}
    assert len(alphas) == len(lora.layers) == 794 + 264
    assert set(alphas.values()) == {FILE_ALPHA}
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2.lora_up.weight" in state


@pytest.mark.parametrize(("strength", "strength_clip"), [(1.0, 0.5), (-0.75, 1.25)])
def test_stock_loader_adds_exactly_strength_times_delta(
    saved_lora, tiny_model, tiny_clip, tiny_layout, strength: float, strength_clip: float
) -> None:
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    lora, path = saved_lora
    unet_layers, te_layers = lora.unet_layers(), lora.text_encoder_layers()
    unet_before = snapshot(tiny_model.model)
    clip_before = snapshot(tiny_clip.cond_stage_model)

    model2, clip2 = comfy.sd.load_lora_for_models(
        tiny_model, tiny_clip, comfy.utils.load_torch_file(str(path), safe_load=True), strength, strength_clip
    )
    comfy.model_management.load_models_gpu([model2, clip2.patcher])
    try:
        unet_after = snapshot(model2.model)
        clip_after = snapshot(clip2.cond_stage_model)
    finally:
        comfy.model_management.unload_all_models()

    unet_err = max_error(unet_after, unet_before, unet_layers, strength, tiny_layout)
    clip_err = max_error(clip_after, clip_before, te_layers, strength_clip, tiny_layout)
    for name in (ATTENTION_LAYER, CROSS_ATTENTION_LAYER, CONV_LAYER, SKIP_CONV_LAYER):
        assert unet_err[name] <= 1e-5, name
        # The change is real, far above the tolerance (std=0.2 LoRA on weights of scale ~0.1).
        assert float(unet_layers[name].delta().abs().max()) * abs(strength) > 1e-2
    assert max(unet_err.values()) <= 1e-5
    assert max(clip_err.values()) <= 1e-5
    # Nothing else moved: every weight outside the LoRA (norms, biases, embeddings) is bit-identical.
    patched_keys = {tiny_layout[n].model_key for n in lora.layers}
    for before, after in ((unet_before, unet_after), (clip_before, clip_after)):
        for k in before:
            if k not in patched_keys:
                assert torch.equal(after[k], before[k]), k

    # Unpatched: back to the original weights bit for bit.
    for module, before in ((tiny_model.model, unet_before), (tiny_clip.cond_stage_model, clip_before)):
        now = module.state_dict()
        changed = [k for k in before if not torch.equal(now[k], before[k])]
        assert changed == []
