"""Check the base model and the classifiers on GENERATED samples (not only on clean renders).

    OMP_NUM_THREADS=1 python bench/minibench/mb_validate.py            # samples + grid + predictions
    OMP_NUM_THREADS=1 python bench/minibench/mb_validate.py --labels results/validation/hand_labels.json

The first call samples ``--per`` images for each of the 36 (shape, texture) pairs of base training with
DDIM + CFG and writes results/validation/grid.png (row = prompted shape, columns = prompted textures,
``--per`` images each, in the order of mb_world.BASE_TEXTURES) and predictions.json. A person then looks at
the grid and writes hand_labels.json: {"shape": [...], "texture": [...]} in the same order, with "?" for
unreadable images; the second call re-scores the stored samples (samples.safetensors) with ``--classifiers``
and reports classifier-vs-hand agreement on the readable ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mb_common
import torch
from miniworld import model as mb_model
from miniworld import world as mb_world

SAMPLES = "samples.safetensors"


def save_samples(x: torch.Tensor, path: Path) -> None:
    """The validation images (float32, [-1, 1]) so later classifiers can be re-checked on the same hand labels."""
    import safetensors.torch

    safetensors.torch.save_file({"samples": x.float().contiguous()}, str(path))


def load_samples(path: Path) -> torch.Tensor:
    import safetensors.torch

    return safetensors.torch.load_file(str(path))["samples"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Validate base model and classifiers on generated samples.")
    ap.add_argument("--ckpt", type=Path, default=mb_common.CHECKPOINTS / "base_ema.safetensors")
    ap.add_argument("--classifiers", type=Path, default=mb_common.CLASSIFIERS)
    ap.add_argument("--out", type=Path, default=mb_common.RESULTS / "validation")
    ap.add_argument("--per", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--labels", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    pred_path = args.out / "predictions.json"
    if args.labels is not None:
        pred = json.loads(pred_path.read_text())
        if (args.out / SAMPLES).exists():
            # Score the stored samples with the classifiers given now (the hand labels stay valid).
            from miniworld import classify as mb_classify

            pred["shape"], pred["texture"] = mb_classify.Scorer(args.classifiers).predict(
                load_samples(args.out / SAMPLES))
            pred_path.write_text(json.dumps(pred, indent=1) + "\n")
        hand = json.loads(args.labels.read_text())
        report = {}
        for kind in ("shape", "texture"):
            pairs = [(p, h) for p, h in zip(pred[kind], hand[kind], strict=True) if h != "?"]
            report[f"{kind}_readable"] = len(pairs)
            report[f"{kind}_agreement"] = round(sum(p == h for p, h in pairs) / max(len(pairs), 1), 3)
            report[f"{kind}_prompt_following_by_hand"] = round(
                sum(h == w for h, w in zip(hand[kind], pred[f"prompted_{kind}"], strict=True)) / len(hand[kind]), 3)
        (args.out / "agreement.json").write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report))
        return 0

    from miniworld import classify as mb_classify

    mb_common.boot()
    model, text = mb_model.load_checkpoint(str(args.ckpt))
    shapes = [s for s in mb_world.BASE_SHAPES for _ in mb_world.BASE_TEXTURES for _ in range(args.per)]
    textures = [t for _ in mb_world.BASE_SHAPES for t in mb_world.BASE_TEXTURES for _ in range(args.per)]
    with torch.no_grad():
        ctx, pooled = text.encode([mb_world.caption(s, t) for s, t in zip(shapes, textures, strict=True)])
        uctx, upooled = text.encode([""])
    x = mb_common.ddim_sample(model.diffusion_model, model, ctx, pooled, uctx, upooled, args.seed, args.steps,
                              args.cfg)
    mb_world.save_png(mb_world.to_uint8_grid(x, len(mb_world.BASE_TEXTURES) * args.per, scale=3),
                      str(args.out / "grid.png"))
    scorer = mb_classify.Scorer(args.classifiers)
    ps, pt = scorer.predict(x)
    pred = {"shape": ps, "texture": pt, "prompted_shape": shapes, "prompted_texture": textures,
            "classifier_prompt_following": {
                "shape": sum(a == b for a, b in zip(ps, shapes, strict=True)) / len(ps),
                "texture": sum(a == b for a, b in zip(pt, textures, strict=True)) / len(pt)}}
    pred_path.write_text(json.dumps(pred, indent=1) + "\n")
    save_samples(x, args.out / SAMPLES)
    print(json.dumps(pred["classifier_prompt_following"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
