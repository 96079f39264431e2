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
import mb_world
import torch
import torch.nn.functional as F

FEATURES = 64


class SmallCNN(torch.nn.Module):
    """(B, 3, 32, 32) in [-1, 1] → logits (B, n); ``features`` gives the (B, 64) penultimate vector."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        c = (16, 32, FEATURES)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, c[0], 3, padding=1), torch.nn.GroupNorm(4, c[0]), torch.nn.SiLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c[0], c[1], 3, padding=1), torch.nn.GroupNorm(8, c[1]), torch.nn.SiLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c[1], c[2], 3, padding=1), torch.nn.GroupNorm(8, c[2]), torch.nn.SiLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c[2], c[2], 3, padding=1), torch.nn.GroupNorm(8, c[2]), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(c[2], n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


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


def save_classifiers(nets: dict[str, torch.nn.Module], path: Path) -> None:
    """Both state dicts in one safetensors file (keys ``shape.*`` / ``texture.*``): plain tensors, no pickle,
    small enough (< 1 MB) to commit so every clone scores with the same validated classifiers."""
    import safetensors.torch

    flat = {f"{k}.{name}": t.detach().contiguous() for k, net in nets.items() for name, t in net.state_dict().items()}
    safetensors.torch.save_file(flat, str(path), metadata={"format": "minibench-classifiers"})


def load_classifiers(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{"shape": state_dict, "texture": state_dict} from :func:`save_classifiers`' file."""
    import safetensors.torch

    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in safetensors.torch.load_file(str(path)).items():
        kind, name = key.split(".", 1)
        out.setdefault(kind, {})[name] = t
    return out


class Scorer:
    """Both classifiers, loaded from ``classifiers.safetensors``: labels, hit tests and reference cosines."""

    def __init__(self, path: Path = mb_common.CLASSIFIERS) -> None:
        st = load_classifiers(path)
        self.shape = SmallCNN(len(mb_world.SHAPES))
        self.texture = SmallCNN(len(mb_world.TEXTURES))
        self.shape.load_state_dict(st["shape"])
        self.texture.load_state_dict(st["texture"])
        self.shape.eval()
        self.texture.eval()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[list[str], list[str]]:
        """Predicted shape and texture names of (B, 3, 32, 32) images in [-1, 1]."""
        s = self.shape(x).argmax(1).tolist()
        t = self.texture(x).argmax(1).tolist()
        return [mb_world.SHAPES[i] for i in s], [mb_world.TEXTURES[i] for i in t]

    @torch.no_grad()
    def cosine(self, x: torch.Tensor, refs: torch.Tensor, kind: str) -> torch.Tensor:
        """Cosine (B,) between each image's penultimate features and the mean reference features."""
        net = self.shape if kind == "shape" else self.texture
        f = F.normalize(net.features(x), dim=1)
        r = F.normalize(F.normalize(net.features(refs), dim=1).mean(0, keepdim=True), dim=1)
        return (f * r).sum(1)

    @torch.no_grad()
    def hits(self, x: torch.Tensor, want: str, kind: str, refs: torch.Tensor) -> torch.Tensor:
        """1.0 where an image shows ``want`` (a shape or texture name), else 0.0; (B,).

        A class the classifier knows: its argmax. A concept it does not know (a bring-your-own glyph or
        texture): open-set nearest prototype — the image's features are closer (cosine) to the mean features
        of ``refs`` (the LoRA's own training images) than to the prototype of every known class (mean
        features of 64 seeded renders of that class).
        """
        labels = mb_world.SHAPES if kind == "shape" else mb_world.TEXTURES
        if want in labels:
            net = self.shape if kind == "shape" else self.texture
            return (net(x).argmax(1) == labels.index(want)).float()
        to_ref = self.cosine(x, refs, kind)
        net = self.shape if kind == "shape" else self.texture
        f = F.normalize(net.features(x), dim=1)
        best_known = (f @ self._prototypes(kind).T).amax(1)
        return (to_ref > best_known).float()

    def _prototypes(self, kind: str) -> torch.Tensor:
        """(n_classes, 64) unit mean features of seeded renders of every known class of ``kind``."""
        cached = getattr(self, f"_proto_{kind}", None)
        if cached is None:
            labels = mb_world.SHAPES if kind == "shape" else mb_world.TEXTURES
            net = self.shape if kind == "shape" else self.texture
            g = torch.Generator().manual_seed(31337)
            rows = []
            for label in labels:
                shapes, textures = mb_world.sample_pairs(64, g, mb_world.SHAPES, mb_world.TEXTURES)
                if kind == "shape":
                    shapes = [label] * 64
                else:
                    textures = [label] * 64
                f = F.normalize(net.features(mb_world.render(shapes, textures, g)), dim=1).mean(0)
                rows.append(F.normalize(f, dim=0))
            cached = torch.stack(rows)
            setattr(self, f"_proto_{kind}", cached)
        return cached


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
