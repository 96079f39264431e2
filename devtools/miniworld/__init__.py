"""MiniBench's trained miniature world, importable by the demo (scripts/demo.py) and by MiniBench (bench/minibench/).

A 32×32 procedural world (``world``: content = a shape, style = a texture), a text-to-image model built from
ComfyUI's own SDXL classes with SDXL's block layout at tiny widths (``model``), the shape and texture
classifiers that score generated images (``classify``), the fixed training images of the content and style
LoRAs (``loras``), the API prompt of one sampling run through the real nodes (``graph``) and the ComfyUI node
pack that exposes the model, its text encoder and its images as ComfyUI types (``comfy_nodes``, loaded by
:func:`boot`). The trained files live in ``bench/minibench/checkpoints/`` (:data:`CHECKPOINTS`); the scripts
that train them and the benchmark stay in ``bench/minibench/``.

Nothing here imports ComfyUI at module level: ComfyUI modules are imported inside functions, after
``comfyhost.boot()`` has prepared the process. ``devtools/`` must be on ``sys.path`` (as for ``comfyhost``).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# The committed trained files (bench/minibench/README.md says how each was made).
CHECKPOINTS = REPO / "bench" / "minibench" / "checkpoints"
BASE = CHECKPOINTS / "base_ema.safetensors"
CLASSIFIERS = CHECKPOINTS / "classifiers.safetensors"
# The node pack (MiniBenchCheckpoint, MiniBenchTextEncode, MiniBenchImages, MiniBenchEmpty, MiniBenchToImage)
# and the folder name ComfyUI loads it under.
PACK_DIR = HERE / "comfy_nodes"
PACK_NAME = "duolora_minibench_nodes"


def boot(base_dir: Path | None = None):
    """Boot the real in-process ComfyUI (``comfyhost.boot``) with the DuoLoRA pack, the tiny test pack and
    the MiniBench pack; returns the ``comfyhost.Host``. Raises ``comfyhost.PackImportError`` with ComfyUI's
    import log if the DuoLoRA pack or the MiniBench pack did not load (or ComfyUI was already booted in this
    process without the MiniBench pack: extra packs load on the first boot only).

    KSampler's own tqdm bars are switched off: callers print their own progress (the benchmark one bar over
    its runs, the demo one line per run).
    """
    import comfyhost
    import torch

    # Device selection is automatic: ComfyUI's model management takes a CUDA GPU when there is one (merges and
    # sampling run there; the classifiers and the scores stay on the CPU), else the CPU.
    host = comfyhost.boot(base_dir, extra_packs={PACK_NAME: PACK_DIR}, cpu=not torch.cuda.is_available())
    host.require_pack()
    host.require_pack(PACK_NAME)
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    return host
