"""Stand-ins that let ComfyUI import in the test environments (docs/hosts.md; harness only, the shipped pack
never does this): an empty package for each audio dependency without a build for the environments' CPU torch, and
empty modules for torchvision's C-op registrations, which do not exist beside CPU torch.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

# Packages that a current ComfyUI imports from core modules but that have no build matching the CPU torch of the
# test environments (HOST.md): torchaudio's newest PyPI build is made for an older torch. Stand-ins let ComfyUI
# import; the audio code behind them never runs in these tests. Name -> submodules imported by name.
AUDIO_STAND_INS: dict[str, tuple[str, ...]] = {"torchaudio": ("functional", "transforms")}


class _StandIn(types.ModuleType):
    """An importable package whose every attribute lookup fails with a message naming what is missing."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"{self.__name__}.{name}: {self.__name__.split('.')[0]} is not installed in this test environment "
            "(the DuoLoRA test harness puts an empty stand-in in its place so that ComfyUI imports)"
        )


def install_audio_stand_ins() -> list[str]:
    """Register an empty stand-in for each of ``AUDIO_STAND_INS`` that is not installed (harness only; the
    shipped pack never does this). Returns the names it registered."""
    registered = []
    for package, submodules in AUDIO_STAND_INS.items():
        if package in sys.modules or importlib.util.find_spec(package) is not None:
            continue
        for name in (package, *(f"{package}.{sub}" for sub in submodules)):
            module = _StandIn(name)
            # A spec, so importlib.util.find_spec() (transformers probes optional packages with it) answers.
            module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name == package)
            module.__path__ = []  # a package: submodule imports resolve through sys.modules
            sys.modules[name] = module
        for sub in submodules:
            setattr(sys.modules[package], sub, sys.modules[f"{package}.{sub}"])
        registered.append(package)
    return registered


def install_torchvision_shim() -> None:
    """Let CPU torch import the CUDA-linked torchvision 0.28 wheel (HOST.md; harness only).

    torchvision registers C ops at import time that do not exist beside CPU torch; empty modules in
    their place let the pure-Python part load. SDXL and LoRA code paths never call those ops.
    """
    if "torchvision" in sys.modules:
        return
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))
