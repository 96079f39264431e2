"""ComfyUI's dynamic VRAM in this process: whether the booted ComfyUI has it, turning it on as its ``main.py``
does, and the tiny model in its patcher (``ModelPatcherDynamic``) on a CPU. ComfyUI imports happen inside the
functions, after ``comfyhost.boot()``.
"""

from __future__ import annotations

import torch
from tinysdxl import build_tiny_model, tiny_model_loader


def enable_dynamic_vram() -> bool:
    """Turn on ComfyUI's dynamic VRAM in this process as its ``main.py`` does at start-up (comfy-aimdo's allocator
    on every torch device, ``CoreModelPatcher`` = ``ModelPatcherDynamic``). Returns whether it is on: False on a
    ComfyUI without dynamic VRAM, without a GPU, or when the allocator does not start. After ``boot(cpu=False)``."""
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic") or not torch.cuda.is_available():
        return False
    try:
        import comfy_aimdo.control
    except ImportError:
        return False
    devices = comfy.model_management.get_all_torch_devices()
    try:
        started = comfy_aimdo.control.init_devices((d.index, 0) for d in devices)
    except TypeError:  # the older allocator's protocol: device indices only
        started = comfy_aimdo.control.init_devices(d.index for d in devices)
    if started:
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    return bool(started)



def dynamic_vram_available() -> bool:
    """True when the booted ComfyUI has dynamic VRAM (``comfy.model_patcher.ModelPatcherDynamic``)."""
    import comfy.model_patcher

    return hasattr(comfy.model_patcher, "ModelPatcherDynamic")


def build_dynamic_tiny_model(seed: int = 0, loader: bool = True):
    """The tiny model in a real ``comfy.model_patcher.ModelPatcherDynamic`` (``is_dynamic()`` is True), on the CPU.

    A dynamic patcher for a CPU load device cannot be had the ordinary way: the class's ``__new__`` hands back a
    plain ModelPatcher, and its ``__init__`` starts comfy-aimdo's allocator, which needs a GPU. So the instance
    is made by the class's own ``__new__`` and initialised as the ModelPatcher it derives from, with the one
    attributes its ``__init__`` sets besides the allocator's buffers (``non_dynamic_delegate_model`` and the pin
    state's flags).
    Everything the merge calls on it (``is_dynamic``, ``clone``, ``get_non_dynamic_delegate``) is the host's
    code. Loading it itself (``ModelPatcherDynamic.load``) needs the allocator: only forward-free checks and
    paths that use its non-dynamic delegate run on a CPU. ``loader``: register ``tiny_model_loader`` as its
    ``cached_patcher_init``, as core loaders do (without it ComfyUI cannot make a non-dynamic copy).
    """
    import comfy.model_patcher

    cls = getattr(comfy.model_patcher, "ModelPatcherDynamic", None)
    if cls is None:
        raise RuntimeError("this ComfyUI has no dynamic VRAM (comfy.model_patcher.ModelPatcherDynamic)")
    plain = build_tiny_model(seed)
    patcher = cls.__new__(cls)
    comfy.model_patcher.ModelPatcher.__init__(patcher, plain.model, plain.load_device, plain.offload_device)
    patcher.non_dynamic_delegate_model = None
    # The scalar fields of the per-device pin state its __init__ registers (the executor marks a dynamic model
    # in use by the running prompt there); the allocator's host buffers are left out.
    plain.model.dynamic_vbars = {}
    plain.model.dynamic_pins = {patcher.load_device: {"hostbufs_initialized": False, "failed": False,
                                                      "active": False, "current_prompt": False}}
    if loader:
        patcher.cached_patcher_init = (tiny_model_loader, (seed,))
    return patcher
