"""Merging on a MODEL loaded with ComfyUI's dynamic VRAM (``ModelPatcherDynamic``), as far as a CPU allows.

Dynamic VRAM casts each weight into shared device buffers at every forward and applies LoRA patches at cast
time. A forward-only pass (the layer-wise recording) may run on it as it is; a pass that backpropagates needs
the weights each forward used to keep their values until backward, so paper steps run on ComfyUI's own
non-dynamic delegate of the model (``get_non_dynamic_delegate``), fully loaded.

The limit of these tests: on a CPU ComfyUI never makes a dynamic patcher (``ModelPatcherDynamic.__new__`` hands
back a plain ``ModelPatcher`` for a CPU load device) and its allocator needs a GPU. The MODEL here is a real
``ModelPatcherDynamic`` instance initialised as its base class (``dynamicvram.build_dynamic_tiny_model``): the
strategy choice, the delegate and the paper merge through it run; loading the dynamic patcher itself (the
layer-wise pass on it) runs only on a GPU (bench/gpu.py measures both).
"""

from __future__ import annotations

import comfyhost
import dynamicvram
import pytest
import tinysdxl
import torch
from nodehelpers import MERGE_ID, merge_prompt, node, pack_module, snapshot, tiny_pair


@pytest.fixture(scope="module", autouse=True)
def _dynamic_host(host: comfyhost.Host) -> None:
    if not dynamicvram.dynamic_vram_available():
        pytest.skip("this ComfyUI has no dynamic VRAM (comfy.model_patcher.ModelPatcherDynamic)")


@pytest.fixture(scope="module")
def pair(host: comfyhost.Host, tiny_layout):
    return tiny_pair(host, tiny_layout, "dynamic")


def test_the_strategy_follows_is_dynamic_and_the_delegate_is_comfyuis(host: comfyhost.Host) -> None:
    import comfy.model_patcher

    bridge = pack_module("nodes.comfy_bridge")
    dynamic = dynamicvram.build_dynamic_tiny_model(seed=0)
    plain = tinysdxl.build_tiny_model(seed=0)
    assert type(dynamic) is comfy.model_patcher.ModelPatcherDynamic and dynamic.is_dynamic()
    assert bridge.is_dynamic(dynamic) and not bridge.is_dynamic(plain)
    # Forward-only passes and every non-dynamic model: the MODEL itself.
    assert bridge.merge_runner(dynamic, needs_grad=False) == (dynamic, False)
    assert bridge.merge_runner(plain, needs_grad=True) == (plain, False)
    # Backpropagation on a dynamic model: ComfyUI's non-dynamic delegate, made by the model's loader.
    runner, separate = bridge.merge_runner(dynamic, needs_grad=True)
    assert separate and type(runner) is comfy.model_patcher.ModelPatcher and not runner.is_dynamic()
    assert runner.model is not dynamic.model
    assert all(torch.equal(a, b) for a, b in zip(runner.model.state_dict().values(),
                                                  dynamic.model.state_dict().values(), strict=True))
    # ComfyUI keeps the delegate's weights for reuse: a second merge makes no third copy.
    again, _ = bridge.merge_runner(dynamic, needs_grad=True)
    assert again.model is runner.model


def test_a_dynamic_model_without_a_loader_gets_a_clear_error(host: comfyhost.Host, pair) -> None:
    content, style = pair
    prompt = merge_prompt(host, content.name, style.name, steps=2)
    prompt["20"] = node(host, comfyhost.TINY_DYNAMIC_MODEL_NODE, seed=0, loader=False)
    prompt[MERGE_ID]["inputs"]["model"] = ["20", 0]
    prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
    with pytest.raises(comfyhost.NodeExecutionError) as info:
        host.execute(prompt)
    message = info.value.exception_message.strip()
    assert info.value.node_id == MERGE_ID
    assert message.startswith("ZipRank Merge cannot learn on this MODEL: it is loaded with ComfyUI's dynamic VRAM "
                              "and ComfyUI could not make the non-dynamic copy that training needs ("), message
    assert message.endswith("start ComfyUI with --disable-dynamic-vram, or use mode 'layerwise' or 'weights'."), message
    assert "\n" not in message


def _merge_outputs(host: comfyhost.Host, content, style, model_node: dict | None) -> dict:
    prompt = merge_prompt(host, content.name, style.name, steps=3, lora_dtype="fp32")
    if model_node is not None:
        prompt["20"] = model_node
        prompt[MERGE_ID]["inputs"]["model"] = ["20", 0]
    prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
    prompt["14"] = node(host, "PreviewAny", source=[prompt[MERGE_ID]["inputs"]["model"][0], 0])
    return host.execute(prompt)["outputs"]


def test_paper_mode_on_a_dynamic_model_learns_what_it_learns_on_the_plain_one(host: comfyhost.Host, pair) -> None:
    content, style = pair
    plain = _merge_outputs(host, content, style, None)
    dynamic = _merge_outputs(host, content, style, node(host, comfyhost.TINY_DYNAMIC_MODEL_NODE, seed=0))
    masks_plain = plain[MERGE_ID][1].extra["masks"]
    masks_dynamic = dynamic[MERGE_ID][1].extra["masks"]
    assert dynamic[MERGE_ID][1].steps_done == 3 and masks_dynamic.keys() == masks_plain.keys()
    # Same weights, same seed, same computation: bit-identical masks and merged factors.
    assert [k for k in masks_plain if not torch.equal(masks_plain[k], masks_dynamic[k])] == []
    sd_plain, sd_dynamic = plain[MERGE_ID][0].state_dict, dynamic[MERGE_ID][0].state_dict
    assert sd_plain.keys() == sd_dynamic.keys()
    assert [k for k in sd_plain if not torch.equal(sd_plain[k], sd_dynamic[k])] == []
    # The dynamic MODEL itself was never trained on: its weights, flags, patches and modules are as built.
    model = dynamic["20"][0]
    assert model.is_dynamic()
    before = snapshot(tinysdxl.build_tiny_model(seed=0).model)
    after = snapshot(model.model)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert model.patches == {}
    assert [n for n, m in model.model.named_modules() if m._forward_hooks or m._forward_pre_hooks
            or "forward" in m.__dict__] == []
    # The delegate ComfyUI made for it is left as clean as the MODEL (it is kept for reuse).
    delegate = model.get_non_dynamic_delegate()
    assert [n for n, m in delegate.model.named_modules() if m._forward_hooks or m._forward_pre_hooks
            or "forward" in m.__dict__] == []
    assert [n for n, p in delegate.model.named_parameters() if p.grad is not None] == []


def test_apply_merged_lora_patches_a_dynamic_model_through_comfyuis_lora_path(host: comfyhost.Host, pair) -> None:
    import comfy.sd

    content, style = pair
    out = _merge_outputs(host, content, style, None)
    merged = out[MERGE_ID][0]
    apply = host.node_class_mappings["DuoLoRA_ApplyMergedLoRA"]
    dynamic = dynamicvram.build_dynamic_tiny_model(seed=0)
    patched = apply.execute(model=dynamic, merged_lora=merged, strength_model=0.7).result[0]
    stock, _ = comfy.sd.load_lora_for_models(dynamic, None, dict(merged.state_dict), 0.7, 0.0)
    # The same patches, keyed and weighted as ComfyUI's own LoRA loading makes them, on a clone of the MODEL; the
    # input is left unpatched (on a CPU ComfyUI's clone of a dynamic patcher is a plain one, as it always is there).
    assert sorted(patched.patches) == sorted(stock.patches) and len(patched.patches) > 0
    for key in stock.patches:
        assert [p[0] for p in patched.patches[key]] == [p[0] for p in stock.patches[key]] == [0.7]
    assert dynamic.patches == {} and patched.model is dynamic.model
