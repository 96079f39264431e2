"""The ComfyUI node API the pack is written against: the pinned ``comfy_api.v0_0_2`` (present in every ComfyUI the
pack is tested with; ``comfy_api.latest`` is documented as unstable), or ``latest`` in a ComfyUI that no longer
ships that version."""

from __future__ import annotations

try:
    from comfy_api.v0_0_2 import ComfyExtension, io, ui
except ImportError:
    from comfy_api.latest import ComfyExtension, io, ui

__all__ = ["ComfyExtension", "io", "ui"]
