"""The MiniBench shape and texture classifiers: the stand-ins for DINO (content) and CSD (style) that score images.

Each is a small CNN (``SmallCNN``) over the world's shapes / textures. The penultimate features (64-d, after
global pooling) give continuous scores: the cosine between a sample's features and the mean features of the
reference images (DINO-like for shapes, CSD-like for textures); ``Scorer.hits`` says whether a sample shows a
named shape or texture. The trainer (augmentations, training, accuracy) is bench/minibench/mb_classify.py;
the committed, hand-validated file is ``miniworld.CLASSIFIERS``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from miniworld import CLASSIFIERS
from miniworld import world as mb_world

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

    def __init__(self, path: Path = CLASSIFIERS) -> None:
        st = load_classifiers(path)
        # The classes are the first n names of SHAPES / TEXTURES, n read from the file: the class order keeps
        # MiniBench 1's seven first, so a 7-class file (MiniBench 1) scores those seven and a 9-class file all.
        self.labels: dict[str, tuple[str, ...]] = {}
        for kind, names in (("shape", mb_world.SHAPES), ("texture", mb_world.TEXTURES)):
            n = st.get(kind, {}).get("head.bias", torch.empty(0)).shape[0]
            if not 2 <= n <= len(names):
                raise ValueError(f"{path}: no {kind} classifier with 2 to {len(names)} classes in this file "
                                 f"(found {n}); train one with bench/minibench/mb_classify.py")
            self.labels[kind] = names[:n]
        self.shape = SmallCNN(len(self.labels["shape"]))
        self.texture = SmallCNN(len(self.labels["texture"]))
        self.shape.load_state_dict(st["shape"])
        self.texture.load_state_dict(st["texture"])
        self.shape.eval()
        self.texture.eval()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[list[str], list[str]]:
        """Predicted shape and texture names of (B, 3, 32, 32) images in [-1, 1]."""
        s = self.shape(x).argmax(1).tolist()
        t = self.texture(x).argmax(1).tolist()
        return [self.labels["shape"][i] for i in s], [self.labels["texture"][i] for i in t]

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
        labels = self.labels[kind]
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
            labels = self.labels[kind]
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
