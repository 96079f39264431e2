"""The MiniBench world: 32×32 procedural images where content = a shape and style = a texture/palette.

Everything is generated here from a seed (no files, no downloads). Images are float tensors (B, 3, 32, 32)
in [-1, 1] (the diffusion model works directly on pixels). Captions are ``"a <shape> in <texture> style"``.
Three shapes (``star``, ``heart``, ``moon``) and three textures (``diagonal``, ``zigzag``, ``grid``) are held
out of base training: they are what the content and style LoRAs learn, giving 3 × 3 = 9 content × style pairs
whose subject and style the base never saw (MiniBench 2). ``star`` and ``diagonal`` were the only held-out
concepts of MiniBench 1; the other four were added for MiniBench 2 (the base never saw them either: it was
trained on the six base shapes and textures only, see checkpoints/MANIFEST.json).
"""

from __future__ import annotations

import math

import torch

SIZE = 32
BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
BASE_TEXTURES: tuple[str, ...] = ("solid", "hstripes", "vstripes", "checker", "dots", "gradient")
HELD_OUT_SHAPES: tuple[str, ...] = ("star", "heart", "moon")
HELD_OUT_TEXTURES: tuple[str, ...] = ("diagonal", "zigzag", "grid")
# Class order of the classifiers (MiniBench 1's seven first, so its names keep their indices).
SHAPES: tuple[str, ...] = (*BASE_SHAPES, *HELD_OUT_SHAPES)
TEXTURES: tuple[str, ...] = (*BASE_TEXTURES, *HELD_OUT_TEXTURES)
# Every content × style pair of held-out concepts, in a fixed order (the split draws from this list).
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = tuple((s, t) for s in HELD_OUT_SHAPES for t in HELD_OUT_TEXTURES)

# Each texture has its own two-colour palette, so "style" is pattern + palette (RGB in [0, 1]).
PALETTES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "solid": ((0.85, 0.15, 0.15), (0.85, 0.15, 0.15)),
    "hstripes": ((0.10, 0.25, 0.80), (0.95, 0.85, 0.10)),
    "vstripes": ((0.10, 0.60, 0.20), (0.12, 0.12, 0.30)),
    "checker": ((0.05, 0.05, 0.05), (0.95, 0.55, 0.05)),
    "dots": ((0.55, 0.15, 0.65), (0.98, 0.98, 0.98)),
    "gradient": ((0.05, 0.75, 0.85), (0.85, 0.10, 0.65)),
    "diagonal": ((0.45, 0.05, 0.10), (0.30, 0.85, 0.80)),
    "zigzag": ((0.95, 0.78, 0.20), (0.50, 0.22, 0.05)),
    "grid": ((0.95, 0.62, 0.68), (0.05, 0.33, 0.35)),
}
BACKGROUND = (0.92, 0.92, 0.88)


def caption(shape: str, texture: str) -> str:
    """The prompt for one image: ``"a circle in checker style"``."""
    return f"a {shape} in {texture} style"


def _shape_mask(shape: str, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Soft-free boolean mask of ``shape`` on centred coordinates ``x, y`` (B, H, W) with radius ``r`` (B,1,1)."""
    ax, ay = x.abs(), y.abs()
    d = torch.sqrt(x * x + y * y)
    if shape == "circle":
        return d <= r
    if shape == "square":
        return torch.maximum(ax, ay) <= 0.8 * r
    if shape == "diamond":
        return ax + ay <= 1.05 * r
    if shape == "ring":
        return (d <= r) & (d >= 0.55 * r)
    if shape == "cross":
        w = 0.33 * r
        return ((ax <= w) & (ay <= r)) | ((ay <= w) & (ax <= r))
    if shape == "triangle":
        # Upward triangle: apex at -r (image y grows downward), base at +0.7 r.
        yy = y + 0.15 * r
        return (yy <= 0.7 * r) & (ax <= (yy + r) * 0.62)
    if shape == "star":
        ang = torch.atan2(y, x) + math.pi / 2
        # Five points: the radius oscillates between 0.45 r and r with the angle.
        k = torch.remainder(ang, 2 * math.pi / 5) / (2 * math.pi / 5)
        edge = 0.5 * r + 0.6 * r * (1 - 2 * (k - 0.5).abs()) ** 1.6
        return d <= edge
    if shape == "heart":
        # The classic implicit heart (x² + y² − 1)³ − x²·y³ ≤ 0, point down (image y grows downward).
        u, v = x / (0.8 * r), -(y + 0.12 * r) / (0.8 * r)
        return (u * u + v * v - 1) ** 3 - u * u * v ** 3 <= 0
    if shape == "moon":
        # A crescent: the disc minus a disc shifted up and to the right.
        dx, dy = x - 0.45 * r, y + 0.25 * r
        return (d <= r) & (torch.sqrt(dx * dx + dy * dy) > 0.78 * r)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, x: torch.Tensor, y: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """Weight of palette colour 1 in [0, 1] for ``texture`` on pixel coordinates (B, H, W)."""
    if texture == "solid":
        return torch.zeros_like(x)
    if texture == "hstripes":
        return (torch.remainder(y + phase, 6) < 3).float()
    if texture == "vstripes":
        return (torch.remainder(x + phase, 6) < 3).float()
    if texture == "checker":
        return ((torch.floor((x + phase) / 4) + torch.floor((y + phase) / 4)) % 2).float()
    if texture == "dots":
        cx = torch.remainder(x + phase, 6) - 3
        cy = torch.remainder(y + phase, 6) - 3
        return ((cx * cx + cy * cy) <= 2.6).float()
    if texture == "gradient":
        return ((x + y) / (2 * SIZE)).clamp(0, 1)
    if texture == "diagonal":
        return (torch.remainder(x + y + phase, 8) < 4).float()
    if texture == "zigzag":
        # Horizontal chevrons: stripes whose height follows a triangle wave of period 8 along x.
        tri = (torch.remainder(x + phase, 8) - 4).abs()
        return (torch.remainder(y + tri, 7) < 3.5).float()
    if texture == "grid":
        # Thin lines every 6 px both ways on the palette's first colour.
        return ((torch.remainder(x + phase, 6) < 1.5) | (torch.remainder(y + phase, 6) < 1.5)).float()
    raise ValueError(f"unknown texture {texture!r}")


def render(shapes: list[str], textures: list[str], generator: torch.Generator | None = None,
           jitter: bool = True) -> torch.Tensor:
    """Render one image per (shape, texture) pair; returns (B, 3, SIZE, SIZE) in [-1, 1].

    ``jitter`` randomises position (±3 px), size (radius 9–12 px) and texture phase; otherwise centred,
    radius 11, phase 0 (the canonical reference images).
    """
    n = len(shapes)
    if len(textures) != n:
        raise ValueError("shapes and textures must have the same length")
    g = generator
    # Supersample 2× and average: smooth edges without a renderer.
    ss = 2
    coords = (torch.arange(SIZE * ss, dtype=torch.float32) + 0.5) / ss
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    if jitter:
        cx = 16 + (torch.rand(n, generator=g) * 6 - 3)
        cy = 16 + (torch.rand(n, generator=g) * 6 - 3)
        rad = 9 + torch.rand(n, generator=g) * 3
        phase = torch.floor(torch.rand(n, generator=g) * 6)
    else:
        cx = torch.full((n,), 16.0)
        cy = torch.full((n,), 16.0)
        rad = torch.full((n,), 11.0)
        phase = torch.zeros(n)
    out = torch.empty(n, 3, SIZE, SIZE)
    bg = torch.tensor(BACKGROUND).view(3, 1, 1)
    for i in range(n):
        x = xx - cx[i]
        y = yy - cy[i]
        mask = _shape_mask(shapes[i], x[None], y[None], rad[i].view(1, 1, 1))[0].float()
        w = _texture(textures[i], xx[None], yy[None], phase[i].view(1, 1, 1))[0]
        c0, c1 = (torch.tensor(c).view(3, 1, 1) for c in PALETTES[textures[i]])
        fg = c0 * (1 - w) + c1 * w
        img = fg * mask + bg * (1 - mask)
        out[i] = torch.nn.functional.avg_pool2d(img[None], ss)[0]
    return out * 2 - 1


def sample_pairs(n: int, generator: torch.Generator, shapes: tuple[str, ...] = BASE_SHAPES,
                 textures: tuple[str, ...] = BASE_TEXTURES) -> tuple[list[str], list[str]]:
    """``n`` random (shape, texture) pairs drawn uniformly from the given sets."""
    si = torch.randint(len(shapes), (n,), generator=generator).tolist()
    ti = torch.randint(len(textures), (n,), generator=generator).tolist()
    return [shapes[i] for i in si], [textures[i] for i in ti]


def to_uint8_grid(images: torch.Tensor, nrow: int, pad: int = 2, scale: int = 2) -> torch.Tensor:
    """Tile (B, 3, H, W) images in [-1, 1] into one (H', W', 3) uint8 grid, upscaled ``scale``× (nearest)."""
    b, c, h, w = images.shape
    ncol = nrow
    nrows = math.ceil(b / ncol)
    grid = torch.ones(c, nrows * (h + pad) + pad, ncol * (w + pad) + pad)
    img = ((images.clamp(-1, 1) + 1) / 2).float()
    for i in range(b):
        r, q = divmod(i, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img[i]
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8)


def save_png(grid: torch.Tensor, path: str) -> None:
    """Write an (H, W, 3) uint8 tensor as PNG (Pillow is one of ComfyUI's requirements)."""
    from PIL import Image

    Image.fromarray(grid.numpy()).save(path)
