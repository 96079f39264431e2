"""Every file the example workflows name, made without downloads (tests, the demo, thumbnails): synthetic LoRAs
for the tiny SDXL test model, procedural reference pictures, an empty checkpoint placeholder; and the list of files
a UI workflow names."""

from __future__ import annotations

from pathlib import Path

from exampleparts import (
    CKPT,
    CONTENT2_IMAGES,
    CONTENT2_LORA,
    CONTENT_IMAGES,
    CONTENT_LORA,
    STYLE_IMAGE,
    STYLE_LORA,
)


def put_example_files(base: str | Path, image_size: int = 64) -> None:
    """Every file the example workflows name, in a ComfyUI base directory: tiny LoRAs in models/loras, pictures in
    input/, and an empty placeholder for the checkpoint (nothing here loads it). Front end 1.49.6 marks a node whose
    file combo names a missing file as having errors; with these in place the examples load clean."""
    base = Path(base)
    make_tiny_loras(base / "models" / "loras", {CONTENT_LORA: (8, 1), STYLE_LORA: (8, 2), CONTENT2_LORA: (4, 3)})
    make_reference_images(base / "input", size=image_size)
    checkpoint = base / "models" / "checkpoints" / CKPT
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.touch()


def make_reference_images(folder: str | Path, size: int = 64,
                          names: tuple[str, ...] = (*CONTENT_IMAGES, STYLE_IMAGE),
                          second: tuple[str, ...] = CONTENT2_IMAGES) -> dict[str, Path]:
    """Procedural reference pictures: two of a simple "subject" (a cartoon dog face), one "style" (stripes),
    and ``second`` of the multi-concept example's second subject (a cartoon fox face).

    ``names``: the content images first, the style image last (default: the examples' file names).
    Returns name -> path of RGB PNGs of size×size. Deterministic; drawn with Pillow only.
    """
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    k = size / 256.0

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [x0 * k, y0 * k, x1 * k, y1 * k]

    def subject(bg: tuple[int, int, int], cx: float, cy: float, r: float, fur: tuple[int, int, int]) -> Image.Image:
        img = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(img)
        ear = tuple(int(c * 0.6) for c in fur)
        d.ellipse(box(cx - 1.15 * r, cy - 0.9 * r, cx - 0.45 * r, cy + 0.5 * r), fill=ear)
        d.ellipse(box(cx + 0.45 * r, cy - 0.9 * r, cx + 1.15 * r, cy + 0.5 * r), fill=ear)
        d.ellipse(box(cx - r, cy - r, cx + r, cy + r), fill=fur)
        d.ellipse(box(cx - 0.45 * r, cy + 0.05 * r, cx + 0.45 * r, cy + 0.75 * r), fill=(235, 220, 200))
        for ex in (-0.38, 0.38):
            d.ellipse(box(cx + (ex - 0.1) * r, cy - 0.35 * r, cx + (ex + 0.1) * r, cy - 0.15 * r), fill=(20, 20, 20))
        d.ellipse(box(cx - 0.14 * r, cy + 0.12 * r, cx + 0.14 * r, cy + 0.32 * r), fill=(30, 20, 20))
        return img

    def stripes() -> Image.Image:
        img = Image.new("RGB", (size, size), (24, 40, 92))
        d = ImageDraw.Draw(img)
        for i in range(-8, 12):
            x = i * 40
            d.polygon([(x * k, 0), ((x + 20) * k, 0), ((x + 20 + 256) * k, 256 * k), ((x + 256) * k, 256 * k)],
                      fill=(236, 124, 38))
        for gx in range(20, 256, 64):
            for gy in range(20, 256, 64):
                d.ellipse(box(gx - 9, gy - 9, gx + 9, gy + 9), fill=(250, 214, 70))
        return img

    def fox() -> Image.Image:
        img = Image.new("RGB", (size, size), (236, 226, 196))
        d = ImageDraw.Draw(img)
        cx, cy, r = 128, 140, 66
        for side in (-1, 1):
            d.polygon([((cx + side * 0.95 * r) * k, (cy - 0.2 * r) * k), ((cx + side * 0.75 * r) * k, (cy - 1.35 * r) * k),
                       ((cx + side * 0.2 * r) * k, (cy - 0.75 * r) * k)], fill=(214, 96, 30))
        d.polygon([((cx - r) * k, (cy - 0.5 * r) * k), ((cx + r) * k, (cy - 0.5 * r) * k), (cx * k, (cy + r) * k)],
                  fill=(224, 110, 40))
        d.polygon([((cx - 0.45 * r) * k, (cy + 0.1 * r) * k), ((cx + 0.45 * r) * k, (cy + 0.1 * r) * k),
                   (cx * k, (cy + r) * k)], fill=(250, 244, 232))
        for ex in (-0.4, 0.4):
            d.ellipse(box(cx + (ex - 0.09) * r, cy - 0.3 * r, cx + (ex + 0.09) * r, cy - 0.12 * r), fill=(20, 20, 20))
        d.ellipse(box(cx - 0.1 * r, cy + 0.78 * r, cx + 0.1 * r, cy + 0.96 * r), fill=(30, 20, 20))
        return img

    pictures = [subject((196, 214, 230), 118, 128, 70, (150, 96, 52)),
                subject((120, 170, 96), 150, 120, 56, (176, 120, 70))]
    paths = {}
    for i, name in enumerate(names):
        img = stripes() if i == len(names) - 1 else pictures[i % len(pictures)]
        path = folder / name
        img.save(path, format="PNG")
        paths[name] = path
    for name in second:
        path = folder / name
        fox().save(path, format="PNG")
        paths[name] = path
    return paths


def make_tiny_loras(folder: str | Path, specs: dict[str, tuple[int, int]] | None = None,
                    text_encoder: bool = False) -> dict[str, Path]:
    """Synthetic LoRAs for the tiny SDXL test model (devtools/tinysdxl.TINY_UNET_CONFIG), kohya keys.

    ``specs``: file name -> (rank, seed); default: the examples' content LoRA (rank 8, seed 1) and style
    LoRA (rank 8, seed 2). ``text_encoder`` adds te1/te2 layers of the tiny CLIP. Returns name -> path.
    """
    import tinysdxl

    from duolora import formats, sdxl, synthetic

    specs = specs or {CONTENT_LORA: (8, 1), STYLE_LORA: (8, 2)}
    te_dims = tinysdxl.TINY_TE_DIMS if text_encoder else None
    layout = sdxl.layout_for(sdxl.UNetConfig.from_comfy(tinysdxl.TINY_UNET_CONFIG), te_dims=te_dims)
    paths = {}
    for name, (rank, seed) in specs.items():
        lora = synthetic.synthetic_lora(layout, rank=rank, seed=seed, std=0.2, text_encoder=text_encoder)
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        formats.save_lora(lora, path, overwrite=True, layout=layout)
        paths[name] = path
    return paths


def input_file_names(workflow: dict) -> dict[str, list[str]]:
    """The files a UI workflow names, by kind: {"loras": [...], "images": [...], "checkpoints": [...]}."""
    kinds = {"lora_name": "loras", "image": "images", "ckpt_name": "checkpoints"}
    found: dict[str, list[str]] = {v: [] for v in kinds.values()}
    for node in workflow.get("nodes", []):
        names = {"LoraLoader": ["lora_name"], "DuoLoRA_LoadContentLoRA": ["lora_name"],
                 "DuoLoRA_AddContentLoRA": ["lora_name"], "DuoLoRA_LoadStyleLoRA": ["lora_name"], "LoadImage": ["image"],
                 "CheckpointLoaderSimple": ["ckpt_name"]}.get(node.get("type"), [])
        for i, name in enumerate(names):
            value = (node.get("widgets_values") or [])[i]
            if value not in found[kinds[name]]:
                found[kinds[name]].append(value)
    return found
