"""BENCH/DEMO-ONLY ComfyUI node pack: the MiniBench model, its text encoder and its images as ComfyUI types.

So that the merges of the benchmark and of the demo run through the real ``DuoLoRA_ZipRankMerge`` node and
images are sampled by ComfyUI's own ``KSampler`` inside the real executor. ComfyUI loads this folder as
``custom_nodes/duolora_minibench_nodes`` (a symlink made by ``miniworld.boot()`` through
``comfyhost.boot(extra_packs=...)``); it is not part of the shipped DuoLoRA pack.
V3 API only. The "latent" of the MiniBench model is the RGB image in [-1, 1], (B, 3, 32, 32).
"""

from __future__ import annotations

import os
import sys

import torch
from comfy_api.latest import ComfyExtension, io

# Loaded through a symlink under a module name of ComfyUI's choosing: import the miniworld package by its own
# name from devtools/ (found from the real path), so there is one copy of each module in the process.
_DEVTOOLS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
if _DEVTOOLS not in sys.path:
    sys.path.insert(0, _DEVTOOLS)

from miniworld import model as mb_model
from miniworld import world as mb_world
from miniworld.loras import LoRASpec, parse_spec, reference_images

MiniText = io.Custom("MINIBENCH_TEXT")
_CACHE: dict[str, tuple] = {}


def _load(path: str):
    # A fresh model per execution: ComfyUI patches LoRA weights into the module in place, and a model
    # shared between prompts could carry one prompt's patches into the next. Only the text encoder
    # (never patched) is cached.
    import comfy.model_management

    comfy.model_management.unload_all_models()
    model, text = mb_model.load_checkpoint(path)
    if path not in _CACHE:
        _CACHE[path] = (text,)
    return mb_model.build_patcher(model), _CACHE[path][0]


class MiniBenchCheckpoint(io.ComfyNode):
    """MODEL (ComfyUI SDXL classes, tiny widths, pixel space) and the learned text encoder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MiniBenchCheckpoint",
            display_name="MiniBench checkpoint (bench)",
            category="duolora/bench",
            inputs=[io.String.Input("ckpt_path", default="", tooltip="Path of a MiniBench base_ema.safetensors"),
                    io.Boolean.Input("clip_denoised", default=True,
                                     tooltip="Clamp each step's denoised image to [-1, 1] (x0 clipping, as the "
                                             "DDIM sampler that validated the classifiers does)")],
            outputs=[io.Model.Output(display_name="MODEL"), MiniText.Output(display_name="TEXT")],
        )

    @classmethod
    def execute(cls, ckpt_path: str, clip_denoised: bool = True) -> io.NodeOutput:
        patcher, text = _load(ckpt_path)
        if clip_denoised:
            # A pixel-space model: the denoised estimate is an image in [-1, 1]; samplers get it clamped
            # (ComfyUI's post-CFG hook, applied identically for every method of the comparison).
            patcher.set_model_sampler_post_cfg_function(_clip_denoised)
        return io.NodeOutput(patcher, text)


def _clip_denoised(args: dict) -> torch.Tensor:
    return args["denoised"].clamp(-1.0, 1.0)


class MiniBenchTextEncode(io.ComfyNode):
    """CONDITIONING of a MiniBench prompt: context (1, 5, 64) and pooled_output (1, 32)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MiniBenchTextEncode",
            display_name="MiniBench text encode (bench)",
            category="duolora/bench",
            inputs=[MiniText.Input("text_encoder"), io.String.Input("prompt", default="")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text_encoder, prompt: str) -> io.NodeOutput:
        with torch.inference_mode(False), torch.no_grad():
            ctx, pooled = text_encoder.encode([prompt])
        return io.NodeOutput([[ctx.clone(), {"pooled_output": pooled.clone()}]])


class MiniBenchImages(io.ComfyNode):
    """LATENT of procedural world images, e.g. ``"star:solid*5"`` or ``"circle:diagonal;square:diagonal"``."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MiniBenchImages",
            display_name="MiniBench images (bench)",
            category="duolora/bench",
            inputs=[io.String.Input("spec", default="star:solid*5"), io.Int.Input("seed", default=0, min=0),
                    io.String.Input("folder", default="",
                                    tooltip="A folder of images (bring-your-own pair); replaces spec when set")],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, spec: str, seed: int, folder: str = "") -> io.NodeOutput:
        if folder:
            x, _ = reference_images(LoRASpec("byo", "", 0, folder=folder))
            return io.NodeOutput({"samples": x})
        shapes, textures = parse_spec(spec)
        x = mb_world.render(shapes, textures, torch.Generator().manual_seed(int(seed)))
        return io.NodeOutput({"samples": x})


class MiniBenchEmpty(io.ComfyNode):
    """An all-zero LATENT (B, 3, 32, 32) for KSampler."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MiniBenchEmpty",
            display_name="MiniBench empty image (bench)",
            category="duolora/bench",
            inputs=[io.Int.Input("batch_size", default=1, min=1, max=4096)],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, batch_size: int) -> io.NodeOutput:
        return io.NodeOutput({"samples": torch.zeros(batch_size, 3, mb_world.SIZE, mb_world.SIZE)})


class MiniBenchToImage(io.ComfyNode):
    """LATENT (B, 3, 32, 32) in [-1, 1] → IMAGE (B, 32, 32, 3) in [0, 1] (the model works on pixels)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MiniBenchToImage",
            display_name="MiniBench latent to image (bench)",
            category="duolora/bench",
            inputs=[io.Latent.Input("samples")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples: dict) -> io.NodeOutput:
        x = samples["samples"].float().clamp(-1, 1)
        return io.NodeOutput(((x + 1) / 2).permute(0, 2, 3, 1).contiguous())


class MiniBenchExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [MiniBenchCheckpoint, MiniBenchTextEncode, MiniBenchImages, MiniBenchEmpty, MiniBenchToImage]


async def comfy_entrypoint() -> MiniBenchExtension:
    return MiniBenchExtension()
