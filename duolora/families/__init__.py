"""The model families DuoLoRA knows, each a table (``duolora.layout.Family`` + its ``Layout``s).

``sdxl`` (with SD1.x/SD2.x, which share its UNet table), ``flux`` (Flux.1), ``zimage`` (Z-Image, ComfyUI's
Lumina2 class) and ``qwen_image``. Adding a family adds a module here, not a code path elsewhere: the
engine, the file formats and the ComfyUI bridge read these tables.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..layout import Family, Layout, parse_custom_prior
from . import flux, qwen_image, sdxl, zimage

FAMILIES: dict[str, Family] = {f.name: f for f in (sdxl.FAMILY, flux.FAMILY, zimage.FAMILY, qwen_image.FAMILY)}
# The family of each base model a LoRA may be detected for.
BASE_FAMILY: dict[str, str] = {"sdxl": "sdxl", "sd1": "sdxl", "sd2": "sdxl", "flux": "flux", "zimage": "zimage",
                               "qwen_image": "qwen_image"}
BASE_LABELS: dict[str, str] = {**sdxl.BASE_LABELS, "flux": flux.FAMILY.label, "zimage": zimage.FAMILY.label,
                               "qwen_image": qwen_image.FAMILY.label}
# The full-size layout of each base: what a file is detected against, in the order ties are broken.
STANDARD_LAYOUTS: tuple[Layout, ...] = sdxl.STANDARD_LAYOUTS
KNOWN_LAYOUTS: tuple[Layout, ...] = (*sdxl.STANDARD_LAYOUTS, flux.FLUX_LAYOUT, zimage.ZIMAGE_LAYOUT,
                                     qwen_image.QWEN_IMAGE_LAYOUT)
BASE_LAYOUTS: dict[str, Layout] = {layout.base: layout for layout in KNOWN_LAYOUTS}

# "auto": the model family's own default preset (SDXL: paper; Flux.1: none), resolved when the family is known.
AUTO = "auto"
# Every family's presets: "auto" first, SDXL's, Flux.1's, then "none" and "custom" (the names are unique across
# families).
PRESET_NAMES: tuple[str, ...] = (
    AUTO, *dict.fromkeys(n for f in FAMILIES.values() for n in f.presets if n != "none"), "none", "custom")


def merge_layout(base: str, shapes: Mapping[str, tuple[int, ...]]) -> Layout:
    """The layout a merge of a LoRA checks it against, from its detected ``base`` and its layers' weight shapes
    (canonical name -> shape): a diffusion transformer's full-size table when detected as one; for a file whose
    layers all carry Flux.1's names at other widths (``base`` "unknown"), Flux.1's table at those widths; else
    SDXL's (a file for SD1.x/SD2.x or an unknown model is then refused with SDXL's messages)."""
    layout = BASE_LAYOUTS.get(base)
    if layout is not None and layout.family != "sdxl":
        return layout
    fitted = flux.fitted_layout(shapes) if base == "unknown" else None
    return fitted if fitted is not None else sdxl.SDXL_LAYOUT


def family_of(layout_or_base: Layout | str) -> Family:
    """The Family of a Layout or a base name ("sd1" and "sd2" belong to "sdxl"; an unknown base too)."""
    if isinstance(layout_or_base, Layout):
        return FAMILIES[layout_or_base.family]
    return FAMILIES[BASE_FAMILY.get(layout_or_base, "sdxl")]


def preset_family(preset: str) -> Family | None:
    """The family whose blocks a named preset refers to (None for "none", "custom" and unknown names)."""
    if preset in ("none", "custom"):
        return None
    return next((f for f in FAMILIES.values() if preset in f.presets), None)


def parse_custom_preset(spec: str, family: Family | None = None) -> dict[str, str]:
    """Block -> role of a custom prior for ``family``; without one, for the first family whose blocks it names
    (SDXL's message when it names none)."""
    if family is not None:
        return parse_custom_prior(spec, family)
    first: ValueError | None = None
    for candidate in FAMILIES.values():
        try:
            return parse_custom_prior(spec, candidate)
        except ValueError as e:
            first = first or e
    assert first is not None
    raise first


def preset_roles(preset: str, custom: str | Mapping[str, str] | None = None,
                 family: Family | None = None) -> dict[str, str]:
    """Block -> role for a preset name (``custom`` takes a spec string or a dict); "auto" is ``family``'s
    default preset (SDXL's without a family, the engine's default model)."""
    if preset == AUTO:
        preset = (family or FAMILIES["sdxl"]).default_preset
    if preset == "custom":
        if isinstance(custom, Mapping):
            return dict(custom)
        return parse_custom_preset(custom or "", family)
    for candidate in ([family] if family is not None else FAMILIES.values()):
        if preset in candidate.presets:
            return dict(candidate.presets[preset])
    names = (AUTO, *family.preset_names) if family is not None else PRESET_NAMES
    raise ValueError(f"unknown layer-prior preset {preset!r}; choose one of {', '.join(names)}")


def resolve_preset(family: Family, preset: str, custom: str = "", subject: str = "") -> str:
    """The preset a merge on ``family`` uses: "auto" gives the family's default; a named preset must be one of
    the family's and a custom prior must name its blocks.

    Raises ValueError in one line that says what is wrong and which presets a merge on ``family`` takes
    (``subject``: the file the family was read from, named in the message).
    """
    choices = ", ".join((AUTO, *family.preset_names))
    merge = f"this merge is for {family.label}" + (f" ({subject})" if subject else "")
    if preset == AUTO:
        return family.default_preset
    if preset == "custom":
        try:
            parse_custom_prior(custom, family)
        except ValueError as e:
            raise ValueError(f"{e}; {merge}") from None
        return preset
    if preset in family.presets:
        return preset
    owner = preset_family(preset)
    named = f"names {owner.label} blocks" if owner is not None else "is unknown"
    raise ValueError(f"prior preset '{preset}' {named}, but {merge}: choose one of {choices}")
