"""The errors of reading and writing LoRA files: one ``LoRAError`` subclass per kind of problem, each message
naming the file, what is wrong and what to do; and the refusal of an output name that is not .safetensors."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


class LoRAError(Exception):
    """A LoRA file (or an in-memory LoRA) that cannot be used, with a message for the user.

    Every message names the file, says what is wrong and what to do. ``path`` is the file (or None).
    """

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = os.fspath(path) if path is not None else None

    def __str__(self) -> str:
        return self.message


class MissingFileError(LoRAError, FileNotFoundError):
    """The path does not exist."""


class NotSafetensorsError(LoRAError):
    """Not a safetensors file, truncated, or with a corrupt header."""


class PickleFileError(LoRAError):
    """A pickle-based PyTorch file (.ckpt/.pt/.bin/.pth): refused without unpickling."""


class NotALoRAError(LoRAError):
    """A valid safetensors file that is not a LoRA (a checkpoint, a VAE, an embedding, …)."""


class UnknownKeyStyleError(LoRAError):
    """Tensor names that no supported LoRA key style explains (``base``: detected from shapes, if any)."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, base: str = "unknown") -> None:
        super().__init__(message, path)
        self.base = base


class UnsupportedAdapterError(LoRAError):
    """A LyCORIS/PEFT adapter that is not a low-rank LoRA (LoHa, LoKr, DoRA, …)."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, algorithm: str = "",
                 base: str = "unknown") -> None:
        super().__init__(message, path)
        self.algorithm = algorithm
        self.base = base


class WrongBaseModelError(LoRAError):
    """A LoRA made for another base model (SD1.x, SD2.x, or none we know)."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, base: str = "unknown",
                 expected: str = "sdxl") -> None:
        super().__init__(message, path)
        self.base = base
        self.expected = expected


class LayerMismatchError(LoRAError):
    """Layers missing from the target layout or with the wrong shape."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None,
                 layers: list[str] | None = None) -> None:
        super().__init__(message, path)
        self.layers = layers or []


class RankMismatchError(LoRAError):
    """lora_up and lora_down of one layer disagree on the rank."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, layer: str = "") -> None:
        super().__init__(message, path)
        self.layer = layer


class MalformedLoRAError(LoRAError):
    """A layer with a missing factor, impossible tensor shapes, or a layer spelled twice."""


class NonFiniteError(LoRAError):
    """NaN or Inf in a layer."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None,
                 layers: list[str] | None = None) -> None:
        super().__init__(message, path)
        self.layers = layers or []


class EmptyLoRAError(LoRAError):
    """No tensors, or no LoRA layers."""


class OutputExistsError(LoRAError, FileExistsError):
    """save_lora would overwrite an existing file."""


class OutputNameError(LoRAError, ValueError):
    """An output file name that does not end in .safetensors (the only format written)."""


def refuse_output_name(path: str | os.PathLike[str]) -> None:
    """Raise OutputNameError unless ``path`` ends in .safetensors: what is written is always safetensors, and
    loaders go by the name."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        why = (f"ComfyUI would refuse a {p.suffix} file as pickle-based" if p.suffix.lower() in PICKLE_SUFFIXES
               else "ComfyUI lists LoRA files by their extension")
        raise OutputNameError(
            f"{p.name}: the merged LoRA is written in the safetensors format, so its name must end in "
            f".safetensors ({why}); use {p.stem}.safetensors.", p)


def display_name(path: str | os.PathLike[str] | None) -> str:
    return os.path.basename(os.fspath(path)) if path is not None else "<in-memory LoRA>"


def quote_examples(items: Iterable[str], n: int = 3) -> str:
    items = list(items)
    shown = ", ".join(f"'{x}'" for x in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


# The classes are named by the package, as before it had submodules: ComfyUI's error report shows a node's failure
# as the exception's module and name ("duolora.formats.WrongBaseModelError"), and pickling finds them there.
for _cls in (LoRAError, MissingFileError, NotSafetensorsError, PickleFileError, NotALoRAError, UnknownKeyStyleError,
             UnsupportedAdapterError, WrongBaseModelError, LayerMismatchError, RankMismatchError, MalformedLoRAError,
             NonFiniteError, EmptyLoRAError, OutputExistsError, OutputNameError):
    _cls.__module__ = __package__
del _cls
