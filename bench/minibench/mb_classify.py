"""Shape and texture classifiers: the MiniBench stand-ins for DINO (content) and CSD (style).

Each is a small CNN trained on procedurally rendered images of all 9 shapes / 9 textures (held-out ones
included: they are the metric, not the generator) with augmentations that mimic a generator's failure
modes: random background colour, per-channel colour/brightness jitter, Gaussian and low-frequency noise,
blur. The shape classifier also sees random palettes so that it cannot cheat through colour.
The penultimate features (64-d, after global pooling) give continuous scores: the cosine between a sample's
features and the mean features of the reference images (DINO-like for shapes, CSD-like for textures).

    OMP_NUM_THREADS=1 python bench/minibench/mb_classify.py --steps 1000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mb_common
import torch
import torch.nn.functional as F
from miniworld import world as mb_world

# The network, the file format and the Scorer moved to devtools/miniworld/classify.py (the demo scores with
# them too); this script keeps the trainer.
from miniworld.classify import SmallCNN, load_classifiers, save_classifiers


def augment(x: torch.Tensor, g: torch.Generator, kind: str) -> torch.Tensor:
    """Generator-like corruptions of a (B, 3, 32, 32) batch in [-1, 1]; ``kind`` is "shape" or "texture"."""
    b = x.shape[0]
    x01 = (x + 1) / 2
    bg = torch.tensor(mb_world.BACKGROUND).view(1, 3, 1, 1)
    is_bg = ((x01 - bg).abs().sum(1, keepdim=True) < 0.02).float()
    # Background drift: a random colour near (or far from) the canonical one.
    new_bg = bg + (torch.rand(b, 3, 1, 1, generator=g) - 0.5) * torch.rand(b, 1, 1, 1, generator=g) * 1.0
    x01 = x01 * (1 - is_bg) + new_bg * is_bg
    if kind == "shape":
        # Any palette: permute channels and invert some, so colour says nothing about the shape.
        perm = torch.stack([torch.randperm(3, generator=g) for _ in range(b)])
        x01 = torch.gather(x01, 1, perm.view(b, 3, 1, 1).expand_as(x01))
        inv = torch.rand(b, 1, 1, 1, generator=g) < 0.3
        x01 = torch.where(inv, 1 - x01, x01)
        jit = 0.35
    else:
        # Generated samples drift in hue and saturation: mix channels a little (palette stays recognisable)
        # and pull colours toward grey by a random amount.
        mix = torch.eye(3) + torch.randn(b, 3, 3, generator=g) * 0.12
        x01 = torch.einsum("bij,bjhw->bihw", mix, x01)
        grey = x01.mean(1, keepdim=True)
        sat = 0.5 + torch.rand(b, 1, 1, 1, generator=g) * 0.6
        x01 = grey + (x01 - grey) * sat
        jit = 0.25
    scale = 1 + (torch.rand(b, 3, 1, 1, generator=g) - 0.5) * 2 * jit
    shift = (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 2 * jit * 0.5
    x01 = x01 * scale + shift
    # Blur some images a little (a 3×3 box mixed in).
    blur = F.avg_pool2d(F.pad(x01, (1, 1, 1, 1), mode="replicate"), 3, 1)
    w = torch.rand(b, 1, 1, 1, generator=g) * 0.6
    x01 = x01 * (1 - w) + blur * w
    # White noise and low-frequency blotches (the residual noise of under-trained samplers).
    x01 = x01 + torch.randn(x01.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g) * 0.2
    low = F.interpolate(torch.randn(b, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)
    x01 = x01 + low * torch.rand(b, 1, 1, 1, generator=g) * 0.1
    return (x01.clamp(0, 1) * 2 - 1)


def train(kind: str, steps: int, seed: int = 0, batch: int = 64, log=print) -> SmallCNN:
    """Train the "shape" or "texture" classifier over all classes of its kind (9 each)."""
    labels = mb_world.SHAPES if kind == "shape" else mb_world.TEXTURES
    net = SmallCNN(len(labels))
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for step in range(steps):
        g = torch.Generator().manual_seed(seed * 7919 + step + (0 if kind == "shape" else 10**6))
        shapes, textures = mb_world.sample_pairs(batch, g, mb_world.SHAPES, mb_world.TEXTURES)
        x = augment(mb_world.render(shapes, textures, g), g, kind)
        y = torch.tensor([labels.index(s) for s in (shapes if kind == "shape" else textures)])
        for group in opt.param_groups:
            group["lr"] = 2e-3 * (1 - step / steps) + 1e-5
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"{kind} step {step + 1} loss {float(loss):.4f}")
    net.eval()
    return net


@torch.no_grad()
def accuracy(net: SmallCNN, kind: str, n: int = 700, seed: int = 123, corrupt: bool = True) -> float:
    """Accuracy on fresh rendered images of all 81 pairs (augmented when ``corrupt``)."""
    labels = mb_world.SHAPES if kind == "shape" else mb_world.TEXTURES
    g = torch.Generator().manual_seed(seed)
    shapes, textures = mb_world.sample_pairs(n, g, mb_world.SHAPES, mb_world.TEXTURES)
    x = mb_world.render(shapes, textures, g)
    if corrupt:
        x = augment(x, g, kind)
    y = torch.tensor([labels.index(s) for s in (shapes if kind == "shape" else textures)])
    return float((net(x).argmax(1) == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the MiniBench shape/texture classifiers.")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=mb_common.CLASSIFIERS)
    ap.add_argument("--kinds", nargs="+", default=["shape", "texture"], help="which classifiers to (re)train")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    nets = {}
    previous = load_classifiers(args.out) if args.out.exists() else {}
    for k in ("shape", "texture"):
        if k in args.kinds or k not in previous:
            nets[k] = train(k, args.steps, args.seed)
        else:
            # Keep an already validated classifier; only the requested kinds are retrained.
            nets[k] = SmallCNN(len(mb_world.SHAPES if k == "shape" else mb_world.TEXTURES))
            nets[k].load_state_dict(previous[k])
            nets[k].eval()
    report = {
        f"{k}_acc_{mode}": accuracy(nets[k], k, corrupt=mode == "augmented")
        for k in nets for mode in ("clean", "augmented")
    }
    report["wall_time_s"] = round(time.time() - t0, 1)
    report["steps"] = args.steps
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_classifiers(nets, args.out)
    (args.out.with_suffix(".json")).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
