"""What the diffusion-transformer tables (Flux.1, Z-Image, Qwen-Image) share: building a Layout's spellings
from a list of layers whose canonical name is ComfyUI's module path and whose diffusers path may be split into
``Part``s."""

from __future__ import annotations

from collections.abc import Iterable

from ..layout import (
    ALIAS_COMFYUI,
    ALIAS_DIFFUSERS,
    ALIAS_KOHYA_LDM,
    ALIAS_LDM,
    Layer,
    Part,
    add_bare,
    block_of,
)

# (prefix, separator, alias kind): how files spell a ComfyUI module path — kohya's lora_unet_ with
# underscores, ComfyUI's own diffusion_model., and the bare path.
COMFY_SPELLINGS: tuple[tuple[str, str, str], ...] = (("lora_unet_", "_", ALIAS_KOHYA_LDM),
                                                     ("diffusion_model.", ".", ALIAS_COMFYUI), ("", ".", ALIAS_LDM))
# The diffusers-path spellings ComfyUI maps for every DiT family: transformer., the bare path, LyCORIS.
DIFFUSERS_SPELLINGS: tuple[tuple[str, str, str], ...] = (("transformer.", ".", ALIAS_DIFFUSERS),
                                                         ("", ".", ALIAS_DIFFUSERS),
                                                         ("lycoris_", "_", "lycoris_<diffusers>"))

# (canonical name, weight shape, has bias, diffusers path or the Parts it is split into), in module order.
Entry = tuple[str, tuple[int, int], bool, "str | tuple[Part, ...]"]


def layers_of(entries: Iterable[Entry], attention: callable, kohya_diffusers_prefix: str = "") -> dict[str, Layer]:
    """Layers of ``entries``; ``attention(name)`` says which are attention projections; ``kohya_diffusers_prefix``
    (e.g. OneTrainer's ``lora_transformer_``) spells the underscored diffusers path (empty: not written)."""
    layers: dict[str, Layer] = {}
    for name, shape, bias, diff in entries:
        parts = diff if isinstance(diff, tuple) else ()
        diffusers = diff if isinstance(diff, str) else ""
        kohya_diffusers = kohya_diffusers_prefix + diffusers.replace(".", "_") if diffusers and \
            kohya_diffusers_prefix else ""
        layers[name] = Layer(
            name=name, diffusers=diffusers, kohya="lora_unet_" + name.replace(".", "_"),
            kohya_diffusers=kohya_diffusers, block=block_of(name), resolution=0, shape=shape, kind="linear",
            is_attention=bool(attention(name)), comfyui="diffusion_model." + name,
            model_key=f"diffusion_model.{name}.weight", bias=bias, parts=parts)
    return layers


def spellings(layers: dict[str, Layer], diffusers: tuple[tuple[str, str, str], ...] = DIFFUSERS_SPELLINGS
              ) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str, int]], dict[str, str]]:
    """(whole-layer aliases, slice aliases, bare paths): ``COMFY_SPELLINGS`` of every canonical name and the
    ``diffusers`` spellings of every diffusers path and Part path (first writer wins)."""
    aliases: dict[str, tuple[str, str]] = {}
    part_aliases: dict[str, tuple[str, str, int]] = {}
    bare: dict[str, str] = {}

    def spelled(path: str, table: tuple[tuple[str, str, str], ...]) -> list[tuple[str, str]]:
        return [(prefix + path.replace(".", sep), kind) for prefix, sep, kind in table]

    for name, layer in layers.items():
        for spelling, kind in spelled(name, COMFY_SPELLINGS):
            aliases.setdefault(spelling, (name, kind))
        add_bare(bare, name, name)
        if layer.diffusers:
            for spelling, kind in spelled(layer.diffusers, diffusers):
                aliases.setdefault(spelling, (name, kind))
            add_bare(bare, layer.diffusers, name)
        for i, part in enumerate(layer.parts):
            if not part.path:
                continue
            for spelling, kind in spelled(part.path, diffusers):
                part_aliases.setdefault(spelling, (name, kind, i))
            add_bare(bare, part.path, name)
    return aliases, part_aliases, bare
