"""The MiniBench LoRAs' training images: what each content and style LoRA learns (``LoRASpec``).

One content LoRA per held-out shape (``star``, ``heart``, ``moon``): that glyph in one known style, 5 fixed
images, caption "a <shape> in solid style". One style LoRA per held-out texture (``diagonal``, ``zigzag``,
``grid``): the texture on known shapes, 2 fixed images, captions "a circle in <texture> style" / "a square in
<texture> style". A spec can also name a folder of images (bring your own pair: ``LoRASpec.from_folder``).
The same images are the reference latents of a merge (``MiniBenchImages``). The trainer is
bench/minibench/mb_lora.py; the trained files are in ``miniworld.CHECKPOINTS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from miniworld import world as mb_world


@dataclass(frozen=True)
class LoRASpec:
    """What one LoRA learns: ``images`` in the MiniBench image-spec syntax, rendered with ``seed`` — or, when
    ``folder`` is set, the image files of that folder with their captions (``from_folder``)."""

    name: str
    images: str
    seed: int
    folder: str = ""
    captions: tuple[str, ...] = ()

    @classmethod
    def from_folder(cls, folder: Path, role: str) -> LoRASpec:
        """A LoRA spec from a folder of images (png/jpg/webp, any size; resized to 32×32).

        Captions: ``captions.txt`` in the folder — either one line per image, ``<file name>: <caption>``, or
        one caption line for all images — else the folder's name with ``_`` read as spaces (a folder named
        ``a_blob_in_solid_style``). Raises ValueError naming the folder when it holds no image or a caption
        is missing.
        """
        folder = Path(folder)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not files:
            raise ValueError(f"{folder}: no .png/.jpg/.webp images in this folder")
        by_file: dict[str, str] = {}
        default = folder.name.replace("_", " ")
        cap_file = folder / "captions.txt"
        if cap_file.exists():
            lines = [ln.strip() for ln in cap_file.read_text().splitlines() if ln.strip()]
            if len(lines) == 1 and ":" not in lines[0]:
                default = lines[0]
            else:
                for ln in lines:
                    name, sep, cap = ln.partition(":")
                    if not sep:
                        raise ValueError(f"{cap_file}: line {ln!r} is not '<file name>: <caption>'")
                    by_file[name.strip()] = cap.strip()
        captions = tuple(by_file.get(p.name, default) for p in files)
        slug = "".join(c if c.isalnum() else "_" for c in folder.name.lower())
        return cls(f"minibench_{role}_byo_{slug}", "", 0, folder=str(folder), captions=captions)


# One seed per held-out concept (star and diagonal keep MiniBench 1's).
CONTENT_SEEDS = {"star": 1, "heart": 3, "moon": 4}
STYLE_SEEDS = {"diagonal": 2, "zigzag": 5, "grid": 6}


def content_spec(shape: str) -> LoRASpec:
    """The content LoRA of a held-out shape: 5 images of it in solid style."""
    return LoRASpec(f"minibench_content_{shape}", f"{shape}:solid*5", CONTENT_SEEDS[shape])


def style_spec(texture: str) -> LoRASpec:
    """The style LoRA of a held-out texture: a circle and a square in it."""
    return LoRASpec(f"minibench_style_{texture}", f"circle:{texture};square:{texture}", STYLE_SEEDS[texture])


def joint_spec(shape: str, texture: str) -> LoRASpec:
    """The ceiling's LoRA of a held-out pair: 5 images of the target itself ("a <shape> in <texture> style"),
    rendered with a seed of the pair's own."""
    return LoRASpec(f"minibench_joint_{shape}_{texture}", f"{shape}:{texture}*5",
                    100 + 10 * CONTENT_SEEDS[shape] + STYLE_SEEDS[texture])


ALL_SPECS = [*(content_spec(s) for s in mb_world.HELD_OUT_SHAPES), *(style_spec(t) for t in mb_world.HELD_OUT_TEXTURES)]
# The ceiling rows' LoRAs, one per held-out pair (trained with the content and style LoRAs' rank added).
JOINT_SPECS = [joint_spec(s, t) for s, t in mb_world.HELD_OUT_PAIRS]
# MiniBench 1's pair (star × diagonal stripes): the demo's LoRAs.
CONTENT = content_spec("star")
STYLE = style_spec("diagonal")


def parse_spec(spec: str) -> tuple[list[str], list[str]]:
    """``"star:solid*5; circle:diagonal"`` → (shapes, textures) (same syntax as the bench node pack)."""
    shapes: list[str] = []
    textures: list[str] = []
    for part in spec.split(";"):
        part = part.strip()
        if not part:
            continue
        pair, _, count = part.partition("*")
        shape, _, texture = (s.strip() for s in pair.partition(":"))
        if shape not in mb_world.SHAPES or texture not in mb_world.TEXTURES:
            raise ValueError(f"unknown shape/texture in {part!r}")
        n = int(count) if count.strip() else 1
        shapes += [shape] * n
        textures += [texture] * n
    return shapes, textures


def reference_images(spec: LoRASpec) -> tuple[torch.Tensor, list[str]]:
    """The fixed training images (N, 3, 32, 32) in [-1, 1] and their captions."""
    if spec.folder:
        from PIL import Image

        files = sorted(p for p in Path(spec.folder).iterdir()
                       if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        imgs = []
        for f in files:
            im = Image.open(f).convert("RGB").resize((mb_world.SIZE, mb_world.SIZE), Image.BILINEAR)
            imgs.append(torch.tensor(list(im.getdata()), dtype=torch.float32).view(mb_world.SIZE, mb_world.SIZE, 3))
        x = torch.stack(imgs).permute(0, 3, 1, 2) / 127.5 - 1
        return x, list(spec.captions)
    shapes, textures = parse_spec(spec.images)
    x = mb_world.render(shapes, textures, torch.Generator().manual_seed(spec.seed))
    return x, [mb_world.caption(s, t) for s, t in zip(shapes, textures, strict=True)]
