"""Helpers for the node tests (test_nodes.py, test_nodes_merge.py): API prompts for the real ComfyUI host,
tiny LoRA files, patched-weight snapshots and a real (unstarted) ``server.PromptServer``.

Nothing here replaces a part of ComfyUI: prompts run through ComfyUI's own validator and executor
(``comfyhost.Host.execute``), weights are patched by ComfyUI's model management, and server messages go
through the real ``PromptServer.send_sync`` queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import comfyhost
import objectinfo
import torch

from duolora import formats
from duolora.lora import LoRA
from duolora.sdxl import Layout
from duolora.synthetic import synthetic_lora

# Sub-folder of ComfyUI's models/loras (and output/) that the node tests write into.
TEST_SUBDIR = "duolora_node_tests"
# Ranks of the tiny content and style LoRAs: different, so a content/style swap changes every count.
RANK_C, RANK_S = 4, 6
# SDXL's attention projections; the tiny model keeps SDXL's transformer depths, so it has as many.
N_ATTENTION = 560
MERGE_ID = "12"  # the ZipRankMerge node in every prompt built here


# ---------------------------------------------------------------------------------------------------
# API prompts
# ---------------------------------------------------------------------------------------------------

def node(host: comfyhost.Host, class_type: str, **inputs: Any) -> dict[str, Any]:
    """One API-prompt entry: the node's widget defaults overridden by ``inputs`` (links are [id, slot])."""
    return {"class_type": class_type, "inputs": {**objectinfo.widget_defaults(host, class_type), **inputs}}


def reference_nodes(host: comfyhost.Host) -> dict[str, dict]:
    """Tiny checkpoint "1", prompts "2"–"4" (p_c, p_s, p_cs), 64×64 images "5"/"6" → 8×8 latents "7"/"8"."""
    return {
        "1": node(host, comfyhost.TINY_CHECKPOINT_NODE, seed=0),
        "2": node(host, "CLIPTextEncode", text="a photo of sks dog", clip=["1", 1]),
        "3": node(host, "CLIPTextEncode", text="a cat in zwz style", clip=["1", 1]),
        "4": node(host, "CLIPTextEncode", text="a sks dog in zwz style", clip=["1", 1]),
        "5": node(host, "EmptyImage", width=64, height=64, batch_size=1, color=0xC03020),
        "6": node(host, "EmptyImage", width=64, height=64, batch_size=1, color=0x2040D0),
        "7": node(host, "VAEEncode", pixels=["5", 0], vae=["1", 2]),
        "8": node(host, "VAEEncode", pixels=["6", 0], vae=["1", 2]),
    }


def merge_prompt(host: comfyhost.Host, content: str, style: str, *, references: bool = True,
                 **widgets: Any) -> dict[str, dict]:
    """Checkpoint → Load Content "10" / Load Style "11" → ZipRank Merge "12" (no output node yet).

    ``references`` connects the latents and the three prompts; ``widgets`` override the merge's widgets.
    """
    prompt = reference_nodes(host) if references else {
        "1": node(host, comfyhost.TINY_CHECKPOINT_NODE, seed=0)}
    links = {}
    if references:
        links = {"content_latents": ["7", 0], "style_latents": ["8", 0], "content_prompt": ["2", 0],
                 "style_prompt": ["3", 0], "combined_prompt": ["4", 0]}
    prompt["10"] = node(host, "DuoLoRA_LoadContentLoRA", lora_name=content)
    prompt["11"] = node(host, "DuoLoRA_LoadStyleLoRA", lora_name=style)
    prompt[MERGE_ID] = node(host, "DuoLoRA_ZipRankMerge", model=["1", 0], content_lora=["10", 0],
                            style_lora=["11", 0], **links, **widgets)
    return prompt


# ---------------------------------------------------------------------------------------------------
# LoRA files
# ---------------------------------------------------------------------------------------------------

@dataclass
class LoRAFile:
    """A LoRA written into ComfyUI's loras folder: ``name`` is what the loader's combo shows."""

    name: str
    path: Path
    lora: LoRA

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def write_lora(host: comfyhost.Host, lora: LoRA, filename: str, layout: Layout) -> LoRAFile:
    """Save ``lora`` (kohya LDM keys, fp32, alpha = rank) as ``loras/<TEST_SUBDIR>/<filename>``."""
    path = host.loras_dir / TEST_SUBDIR / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    formats.save_lora(lora, path, key_style="kohya_ldm", dtype=torch.float32, layout=layout, overwrite=True)
    return LoRAFile(f"{TEST_SUBDIR}/{filename}", path, lora)


def tiny_pair(host: comfyhost.Host, layout: Layout, tag: str) -> tuple[LoRAFile, LoRAFile]:
    """A content (rank 4) and a style (rank 6) synthetic LoRA on every tiny attention projection and
    both tiny text encoders; std 0.2, so each visibly changes the model."""
    content = synthetic_lora(layout, rank=RANK_C, text_encoder=True, seed=11, std=0.2)
    style = synthetic_lora(layout, rank=RANK_S, text_encoder=True, seed=12, std=0.2)
    return (write_lora(host, content, f"{tag}_content.safetensors", layout),
            write_lora(host, style, f"{tag}_style.safetensors", layout))


def read_tiny(path: Path, layout: Layout) -> LoRA:
    """Read a LoRA file written for the tiny model (its shapes exist only in the tiny layout)."""
    return formats.read_lora(path, layouts=(layout,))


def folder_listing(folder: Path) -> list[str]:
    """Every entry (hidden temp files included) under ``folder``, relative, sorted."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------

def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def patched_weights(patcher: Any) -> dict[str, torch.Tensor]:
    """The weights of a ModelPatcher (MODEL, or a CLIP's ``.patcher``) with its patches applied by
    ComfyUI's model management — what a sampler sees — then unpatched again."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    try:
        return snapshot(patcher.model)
    finally:
        comfy.model_management.unload_all_models()


def pack_module(name: str) -> ModuleType:
    """A module of the pack as ComfyUI loaded it (e.g. ``"nodes.loaders"``); its package name is the path."""
    suffix = f"{comfyhost.PACK_DIR_NAME}.{name}"
    for mod_name, module in list(sys.modules.items()):
        if mod_name.endswith(suffix) and module is not None:
            return module
    raise LookupError(f"pack module {name!r} is not loaded")


# ---------------------------------------------------------------------------------------------------
# A real server object
# ---------------------------------------------------------------------------------------------------

class ServerMessages:
    """Messages sent through a real ``server.PromptServer``'s ``send_sync`` (its asyncio queue)."""

    def __init__(self, prompt_server: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.server = prompt_server
        self.loop = loop
        self.received: list[tuple[str, Any, str | None]] = []

    def drain(self) -> list[tuple[str, Any, str | None]]:
        """Run the loop's pending callbacks (``send_sync`` uses ``call_soon_threadsafe``), empty the queue."""
        self.loop.run_until_complete(asyncio.sleep(0))
        while not self.server.messages.empty():
            self.received.append(self.server.messages.get_nowait())
        return self.received


@contextmanager
def real_prompt_server(client_id: str | None = None) -> Iterator[ServerMessages]:
    """A real, unstarted ``server.PromptServer`` as ``PromptServer.instance`` (HOST.md), restored after.

    ``client_id`` is set as the server's current client, as the executor does on a running server for
    the prompt's sender.
    """
    import server

    had = "instance" in server.PromptServer.__dict__
    previous = server.PromptServer.__dict__.get("instance")
    loop = asyncio.new_event_loop()
    try:
        instance = server.PromptServer(loop)
        instance.client_id = client_id
        yield ServerMessages(instance, loop)
    finally:
        if had:
            server.PromptServer.instance = previous
        elif "instance" in server.PromptServer.__dict__:
            del server.PromptServer.instance
        loop.close()
