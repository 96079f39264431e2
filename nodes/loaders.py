"""LoadContentLoRA and LoadStyleLoRA: read a LoRA file (any common key style) for the merge; AddContentLoRA: one
more content LoRA, with its own references, for a multi-concept merge."""

from __future__ import annotations

import os
import threading

from ..duolora import formats
from ..duolora.lora import LoRA
from ..duolora.sdxl import SDXL_LAYOUT
from . import comfy_bridge as bridge
from .api import io
from .types import LoraModelType, SourceLoRA, SourceLoRAType

# Module-level cache (V3 nodes keep no instance state): (path, mtime_ns, size, mtime_ns of a PEFT
# adapter_config.json beside it or None) -> (LoRA, sha256).
_CACHE: dict[tuple[str, int, int, int | None], tuple[LoRA, str]] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4
# The combo entry for "no file" (ComfyUI's Train LoRA node spells it the same way): with an upstream
# LORA_MODEL connected, or an empty loras folder, the combo must still hold a valid value.
NO_FILE = "[None]"


def read_cached(path: str) -> tuple[LoRA, str]:
    """The parsed LoRA and its file hash, re-read only when the file's mtime or size changed, or the PEFT
    adapter_config.json beside it (which holds its scale) appeared, changed or went."""
    st = os.stat(path)
    sidecar = formats.peft_sidecar(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size, sidecar.stat().st_mtime_ns if sidecar else None)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    lora = formats.read_lora_for_merge(path)
    if lora.base in ("sd1", "sd2"):
        # DuoLoRA merges SDXL LoRAs; say so at the loader, before a long merge starts.
        formats.validate_lora(lora, SDXL_LAYOUT)
    value = (lora, formats.file_sha256(path))
    with _CACHE_LOCK:
        for old in [k for k in _CACHE if k[0] == key[0]]:
            del _CACHE[old]
        while len(_CACHE) >= _CACHE_SIZE:
            del _CACHE[next(iter(_CACHE))]
        _CACHE[key] = value
    return value


def _read(lora_name: str, strength: float, lora_model: dict | None) -> tuple[SourceLoRA, str]:
    if lora_model is not None:
        lora = formats.state_dict_to_lora(dict(lora_model), {}, "LORA_MODEL from an upstream node")
        name, digest = "LORA_MODEL (upstream node)", None
    else:
        if not lora_name or lora_name == NO_FILE:
            raise ValueError("no LoRA file chosen: put .safetensors LoRAs in ComfyUI's models/loras folder, "
                             "refresh, and pick one (or connect a LORA_MODEL to lora_model)")
        lora, digest = read_cached(bridge.lora_path(lora_name))
        name = lora_name
    summary = formats.one_line_summary(lora)
    if strength != 1.0:
        lora = lora.scaled(strength)
        summary += f" · strength {strength:g}"
    return SourceLoRA(lora=lora, name=name, sha256=digest, summary=summary, strength=strength), summary


def _load(lora_name: str, strength: float, lora_model: dict | None) -> io.NodeOutput:
    source, summary = _read(lora_name, strength, lora_model)
    # The summary also goes to the node itself (ui text), where the front end shows it after a run.
    return io.NodeOutput(source, summary, ui={"text": [summary]})


def _fingerprint(lora_name: str) -> tuple[int, int] | str:
    """What ComfyUI compares between runs to decide whether a loader runs again (its output cache otherwise keys
    on the inputs alone): the file's modification time and size, so a LoRA overwritten under the same name
    (retrained, re-downloaded) is read again and everything after it re-runs. Without a file to read, the name."""
    if not lora_name or lora_name == NO_FILE:
        return lora_name
    try:
        st = os.stat(bridge.lora_path(lora_name))
    except OSError:  # missing: execute() says so with the node's own message
        return lora_name
    return st.st_mtime_ns, st.st_size


def _file_inputs(what: str) -> list:
    return [
        io.Combo.Input("lora_name", options=[*bridge.lora_names(), NO_FILE],
                       tooltip=f"The {what} LoRA file, from ComfyUI's models/loras folder (.safetensors); "
                               f"{NO_FILE} when a LoRA comes in through lora_model."),
        io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                       tooltip=f"Scales the {what} LoRA before merging (1.0 = as trained)."),
        LoraModelType.Input("lora_model", optional=True,
                            tooltip="Optional: a LoRA from another node (such as ComfyUI's Train LoRA), "
                                    "used instead of the file when connected."),
    ]


def _schema(node_id: str, display: str, what: str) -> io.Schema:
    return io.Schema(
        node_id=node_id,
        display_name=display,
        category="DuoLoRA",
        description=f"Reads the {what} LoRA for a DuoLoRA merge (kohya, diffusers/PEFT or ComfyUI keys) and shows "
                    "what the file holds after a run.",
        inputs=_file_inputs(what),
        outputs=[
            SourceLoRAType.Output(f"{what}_lora", display_name=f"{what}_lora",
                                  tooltip=f"The {what} LoRA, for ZipRank Merge or Apply K-LoRA (or for Apply "
                                          "Merged LoRA, to draw with it alone)."),
            io.String.Output("summary", display_name="summary",
                             tooltip="Key style, base model, layer count and rank of the file."),
        ],
    )


class LoadContentLoRA(io.ComfyNode):
    @classmethod
    def fingerprint_inputs(cls, lora_name: str = NO_FILE, **_: object) -> tuple[int, int] | str:
        return _fingerprint(lora_name)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("DuoLoRA_LoadContentLoRA", "Load Content LoRA", "content")

    @classmethod
    def execute(cls, lora_name: str, strength: float = 1.0, lora_model: dict | None = None) -> io.NodeOutput:
        return _load(lora_name, strength, lora_model)


class LoadStyleLoRA(io.ComfyNode):
    @classmethod
    def fingerprint_inputs(cls, lora_name: str = NO_FILE, **_: object) -> tuple[int, int] | str:
        return _fingerprint(lora_name)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("DuoLoRA_LoadStyleLoRA", "Load Style LoRA", "style")

    @classmethod
    def execute(cls, lora_name: str, strength: float = 1.0, lora_model: dict | None = None) -> io.NodeOutput:
        return _load(lora_name, strength, lora_model)


class AddContentLoRA(io.ComfyNode):
    """One more subject for a multi-concept merge: chained after Load Content LoRA (or another Add Content
    LoRA), it carries its own LoRA file and the references ZipRank Merge learns that subject from."""

    @classmethod
    def fingerprint_inputs(cls, lora_name: str = NO_FILE, **_: object) -> tuple[int, int] | str:
        return _fingerprint(lora_name)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DuoLoRA_AddContentLoRA",
            display_name="Add Content LoRA",
            category="DuoLoRA",
            description=(
                "Adds one more content (subject) LoRA for a multi-concept DuoLoRA merge: several subjects and one "
                "style in one merged LoRA. Chain it after Load Content LoRA (or another Add Content LoRA) and "
                "connect the last one to ZipRank Merge's content_lora. Each subject learns from its own "
                "references: connect this subject's images and prompts here."),
            inputs=[
                SourceLoRAType.Input("content_lora",
                                     tooltip="The content LoRA(s) so far: from Load Content LoRA or another Add "
                                             "Content LoRA."),
                *_file_inputs("content"),
                io.Latent.Input("content_latents", optional=True,
                                tooltip="VAE Encode of this subject's images (paper and layerwise modes)."),
                io.Conditioning.Input("content_prompt", optional=True,
                                      tooltip="This LoRA's prompt, e.g. 'a photo of sks cat' (paper and "
                                              "layerwise modes)."),
                io.Conditioning.Input("combined_prompt", optional=True,
                                      tooltip="This subject in the style, e.g. 'a sks cat in zwz style'; used by "
                                              "the Constyle cycle loss."),
            ],
            outputs=[
                SourceLoRAType.Output("content_loras", display_name="content_loras",
                                      tooltip="Every content LoRA so far, for ZipRank Merge's content_lora (or "
                                              "one more Add Content LoRA)."),
                io.String.Output("summary", display_name="summary",
                                 tooltip="Key style, base model, layer count and rank of this file."),
            ],
        )

    @classmethod
    def execute(cls, content_lora: SourceLoRA, lora_name: str, strength: float = 1.0,
                lora_model: dict | None = None, content_latents: dict | None = None, content_prompt=None,
                combined_prompt=None) -> io.NodeOutput:
        source, summary = _read(lora_name, strength, lora_model)
        source.previous = content_lora
        source.latents, source.prompt, source.combined_prompt = content_latents, content_prompt, combined_prompt
        return io.NodeOutput(source, summary, ui={"text": [summary]})
