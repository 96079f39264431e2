"""TEST-ONLY ComfyUI node pack: a tiny seeded SDXL "checkpoint" and a tiny Flux.1 MODEL (no downloads).

Workflow tests replace ``CheckpointLoaderSimple`` with ``TinySDXLCheckpoint`` and nothing else.
ComfyUI loads this folder as ``custom_nodes/duolora_tiny_nodes`` (a symlink made by comfyhost.boot).
V3 API only: ComfyUI 0.3.75 ignores ``comfy_entrypoint`` when ``NODE_CLASS_MAPPINGS`` exists.
"""

from __future__ import annotations

import os
import sys

from comfy_api.latest import ComfyExtension, io

# Loaded through a symlink as a custom-node package: find devtools/ (for comfyhost, tinysdxl) from the real path.
_DEVTOOLS = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if _DEVTOOLS not in sys.path:
    sys.path.insert(0, _DEVTOOLS)

import comfyhost
import dynamicvram
import tinyflux
import tinysdxl


class TinySDXLCheckpoint(io.ComfyNode):
    """MODEL, CLIP and VAE of a tiny SDXL-layout model built from ComfyUI's own classes."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=comfyhost.TINY_CHECKPOINT_NODE,
            display_name="Tiny SDXL checkpoint (tests)",
            category="duolora/testing",
            description="A seeded, randomly initialised SDXL-layout model for tests (not a real checkpoint).",
            inputs=[
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**31 - 1,
                    tooltip="Seed of the random weights: the same seed builds bit-identical models.",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Clip.Output(display_name="CLIP"),
                io.Vae.Output(display_name="VAE"),
            ],
        )

    @classmethod
    def execute(cls, seed: int) -> io.NodeOutput:
        return io.NodeOutput(
            # As core loaders do: with how it is made again (Train LoRA trains on such a fresh copy).
            tinysdxl.tiny_model_loader(seed),
            tinysdxl.build_tiny_clip(seed),
            tinysdxl.build_tiny_vae(seed),
        )


class TinySDXLDynamicModel(io.ComfyNode):
    """The tiny MODEL in ComfyUI's dynamic-VRAM patcher (``dynamicvram.build_dynamic_tiny_model``), where the
    booted ComfyUI has one."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=comfyhost.TINY_DYNAMIC_MODEL_NODE,
            display_name="Tiny SDXL dynamic-VRAM model (tests)",
            category="duolora/testing",
            description="The tiny model's MODEL in a ModelPatcherDynamic (is_dynamic() is true), for tests.",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the random weights (the same as the tiny checkpoint's)."),
                io.Boolean.Input("loader", default=True,
                                 tooltip="Register how the model is made again (core loaders do), so ComfyUI can "
                                         "make a non-dynamic copy."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, seed: int, loader: bool = True) -> io.NodeOutput:
        return io.NodeOutput(dynamicvram.build_dynamic_tiny_model(seed, loader=loader))


class TinyFluxModel(io.ComfyNode):
    """MODEL of a tiny Flux.1 built from ComfyUI's own classes (``tinyflux.build_tiny_flux``)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=tinyflux.TINY_FLUX_NODE,
            display_name="Tiny Flux.1 model (tests)",
            category="duolora/testing",
            description="A seeded, randomly initialised Flux.1-layout model for tests (not a real checkpoint).",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                                 tooltip="Seed of the random weights: the same seed builds bit-identical models.")],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, seed: int) -> io.NodeOutput:
        return io.NodeOutput(tinyflux.build_tiny_flux(seed))


class TinyNodesExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TinySDXLCheckpoint, TinySDXLDynamicModel, TinyFluxModel]


async def comfy_entrypoint() -> TinyNodesExtension:
    return TinyNodesExtension()
