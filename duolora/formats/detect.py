"""Which base model a LoRA file is for: the layout whose layer names and shapes explain most of its modules, the
file's metadata breaking ties; the text-embedding width of a UNet's cross-attention."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..families import STANDARD_LAYOUTS
from ..layout import Layout


def shapes_match(file_shape: tuple[int, ...], layer_shape: tuple[int, ...]) -> bool:
    if tuple(file_shape) == tuple(layer_shape):
        return True
    # a 1×1 conv and a linear layer of the same width are interchangeable (SD1.x proj_in/proj_out)
    a, b = tuple(file_shape), tuple(layer_shape)
    if len(a) != len(b) and {len(a), len(b)} == {2, 4}:
        four = a if len(a) == 4 else b
        return four[2:] == (1, 1) and a[:2] == b[:2]
    return False


def base_hint(metadata: Mapping[str, str], modules: Iterable[str]) -> str | None:
    """The base a file's metadata or text-encoder prefixes claim (used only to break ties)."""
    version = metadata.get("ss_base_model_version", "").lower()
    arch = metadata.get("modelspec.architecture", "").lower()
    if version.startswith("sdxl") or "stable-diffusion-xl" in arch:
        return "sdxl"
    if version.startswith("sd_v2") or "stable-diffusion-v2" in arch or metadata.get("ss_v2") == "True":
        return "sd2"
    if version.startswith("sd_v1") or "stable-diffusion-v1" in arch:
        return "sd1"
    # kohya's sd-scripts writes "flux1" (and modelspec "flux-1-dev/lora"); Black Forest Labs' names say flux-1
    if version.startswith("flux1") or arch.startswith(("flux-1", "flux.1")):
        return "flux"
    mods = list(modules)
    if any(m.startswith("lora_te_") for m in mods) and not any(m.startswith("lora_te2_") for m in mods):
        return "sd1"  # kohya writes lora_te_ only for single-text-encoder models
    return None


def _expected_shape(layout: Layout, module: str) -> tuple[int, ...] | None:
    """The weight shape ``module`` patches in ``layout`` (a slice's rows for a Part of a fused layer), or None."""
    hit = layout.resolve_part(module)
    if hit is None:
        return None
    layer, _, index = hit
    if index is None:
        return layer.shape
    return (layer.parts[index].rows, *layer.shape[1:])


def detect_layout(shapes: Mapping[str, tuple[int, ...]], layouts: tuple[Layout, ...], hint: str | None
            ) -> tuple[Layout, int]:
    """The layout that explains most modules by name and shape: (layout, number of exact matches)."""
    best: tuple[tuple[int, int, int, int], Layout] | None = None
    for i, layout in enumerate(layouts):
        named = matched = 0
        for module, shape in shapes.items():
            expected = _expected_shape(layout, module)
            if expected is None:
                continue
            named += 1
            matched += shapes_match(shape, expected)
        score = (matched, named, int(hint == layout.base), -i)
        if best is None or score > best[0]:
            best = (score, layout)
    assert best is not None
    return best[1], best[0][0]


def context_width_base(widths: Iterable[int]) -> str | None:
    for w in widths:
        for layout in STANDARD_LAYOUTS:  # the UNet bases: their cross-attention reads the text embeddings
            if w == layout.config.context_dim:
                return layout.base
    return None
