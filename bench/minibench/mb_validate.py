"""Check the base model and the classifiers on GENERATED samples (not only on clean renders).

    OMP_NUM_THREADS=1 python bench/minibench/mb_validate.py --check       # the base-quality check (below)
    OMP_NUM_THREADS=1 python bench/minibench/mb_validate.py --loras --name loras   # each LoRA alone
    OMP_NUM_THREADS=1 python bench/minibench/mb_validate.py            # samples + grid + predictions
    OMP_NUM_THREADS=1 python bench/minibench/mb_validate.py --labels results/validation/hand_labels.json

``--loras`` checks each held-out LoRA and each ceiling LoRA alone (files beside ``--ckpt``): ``--per`` samples
(default 64) of the captions of its own training images at the benchmark's sampler settings, and the share that shows
what it learned (LORA_TARGET: 90 %); written to ``results/base_check/<--name>.json`` and ``.png`` (8 per LoRA).

``--check`` samples ``--per`` images (default 4) of each of the 36 (shape, texture) pairs of base training at the
benchmark's sampler settings (ComfyUI's KSampler code: euler, normal, 20 steps, CFG 2.0, x0 clipped) and prints
and writes (``results/base_check/<--name>.json`` and ``.png``) what says whether the base draws its own world:

- background error: the largest channel's distance between the median colour of a sample's 3-px border and the
  world's background (0.92, 0.92, 0.88), [0, 1] scale; median and 90th percentile;
- border noise: the standard deviation of the border's pixels (mean over channels; a clean render has 0 unless
  the shape reaches the border);
- the classifiers' hit rate on the prompted shape and on the prompted texture;
- pure noise: samples whose grain (mean |x − its 3×3 box blur|, [-1, 1] scale) exceeds PURE_NOISE_GRAIN, which no
  clean render reaches (largest 0.16 in 512 renders) and i.i.d. noise always does (smallest 0.56);
- unusable: pure noise, or a sample that is not the prompted shape and whose shape features are farther from
  every known shape's prototype than 99 % of clean renders (so it shows no known shape).

Every line also gives the same numbers for clean renders of the same prompts, the ceiling a perfect model
reaches. The targets for MiniBench 3 (TARGETS) are printed beside them.

The second form samples ``--per`` images (default 2) of each base pair and writes results/validation/grid.png (row
= prompted shape, columns = prompted textures, ``--per`` images each, in the order of mb_world.BASE_TEXTURES) and
predictions.json. A person then looks at the grid and writes hand_labels.json: {"shape": [...], "texture": [...]}
in the same order, with "?" for unreadable images; the third call re-scores the stored samples
(samples.safetensors) with ``--classifiers`` and reports classifier-vs-hand agreement on the readable ones.
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
BORDER = 3
PURE_NOISE_GRAIN = 0.3
# Clean renders' 1st percentile of the best shape-prototype cosine (measured on 512 jittered renders: 0.921).
KNOWN_SHAPE_COSINE = 0.92
TARGETS = {"background_error_median": 0.05, "shape_hit": 0.95, "texture_hit": 0.95, "pure_noise": 0}


def border_pixels(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, N) pixels of each image's ``BORDER``-px frame, in [0, 1]."""
    keep = torch.ones(x.shape[-2:], dtype=torch.bool)
    keep[BORDER:-BORDER, BORDER:-BORDER] = False
    return ((x.float() + 1) / 2)[:, :, keep]


def grain(x: torch.Tensor) -> torch.Tensor:
    """(B,) mean |x − 3×3 box blur of x| ([-1, 1] scale): high-frequency energy, 0.06 for a typical render."""
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x.float(), (1, 1, 1, 1), mode="replicate"), 3, 1)
    return (x.float() - blurred).abs().mean((1, 2, 3))


def quality(x: torch.Tensor, shapes: list[str], textures: list[str], scorer) -> dict:
    """The base-check numbers of images ``x`` (B, 3, 32, 32) in [-1, 1] prompted with ``shapes``/``textures``."""
    import torch.nn.functional as F

    b = border_pixels(x)
    bg = torch.tensor(mb_world.BACKGROUND).view(1, 3)
    bg_err = (b.median(2).values - bg).abs().amax(1)
    noise = b.std(2).mean(1)
    ps, pt = scorer.predict(x)
    shape_hit = torch.tensor([a == w for a, w in zip(ps, shapes, strict=True)])
    texture_hit = torch.tensor([a == w for a, w in zip(pt, textures, strict=True)])
    pure = grain(x) > PURE_NOISE_GRAIN
    with torch.no_grad():
        f = F.normalize(scorer.shape.features(x.float()), dim=1)
        known = (f @ scorer._prototypes("shape").T).amax(1) >= KNOWN_SHAPE_COSINE
    unusable = pure | (~shape_hit & ~known)

    def q(t: torch.Tensor, v: float) -> float:
        return round(float(t.float().quantile(v)), 4)

    return {
        "samples": len(shapes),
        "background_error_median": q(bg_err, 0.5), "background_error_p90": q(bg_err, 0.9),
        "background_error_over_0.1": round(float((bg_err > 0.1).float().mean()), 4),
        "border_noise_median": q(noise, 0.5), "border_noise_p90": q(noise, 0.9),
        "shape_hit": round(float(shape_hit.float().mean()), 4),
        "texture_hit": round(float(texture_hit.float().mean()), 4),
        "pure_noise": int(pure.sum()), "unusable": round(float(unusable.float().mean()), 4),
    }


def base_check(patcher, text, scorer, per: int, seed: int) -> tuple[dict, torch.Tensor]:
    """(numbers of the model's samples and of clean renders of the same prompts, the samples)."""
    prompts = [(s, t) for s in mb_world.BASE_SHAPES for t in mb_world.BASE_TEXTURES]
    x = mb_common.comfy_sample(patcher, text, [mb_world.caption(s, t) for s, t in prompts], seed, per)
    shapes = [s for s, _ in prompts for _ in range(per)]
    textures = [t for _, t in prompts for _ in range(per)]
    clean = mb_world.render(shapes, textures, torch.Generator().manual_seed(seed))
    return {"model": quality(x, shapes, textures, scorer), "clean renders": quality(clean, shapes, textures, scorer),
            "targets": TARGETS, "sampler": dict(mb_common.SAMPLER), "per_prompt": per, "seed": seed}, x


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
    ap.add_argument("--per", type=int, default=None, help="samples per prompt (default: 4 with --check, else 2)")
    ap.add_argument("--steps", type=int, default=mb_common.SAMPLER["steps"])
    ap.add_argument("--cfg", type=float, default=mb_common.SAMPLER["cfg"])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--labels", type=Path, default=None)
    ap.add_argument("--check", action="store_true", help="the base-quality check (see the module's help)")
    ap.add_argument("--name", default="current", help="--check: the report's name under results/base_check/")
    ap.add_argument("--loras", action="store_true",
                    help="check each held-out LoRA and ceiling LoRA alone on its own prompts instead (LORA_TARGET)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.loras:
        return loras_main(args)
    if args.check:
        return check_main(args)
    args.per = args.per or 2
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
    prompts = [mb_world.caption(s, t) for s in mb_world.BASE_SHAPES for t in mb_world.BASE_TEXTURES]
    x = mb_common.comfy_sample(mb_model.build_patcher(model), text, prompts, args.seed, args.per, args.steps, args.cfg)
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


# Each LoRA alone must draw what it learned in this share of the samples of its own prompts.
LORA_TARGET = 0.9


def lora_words(spec_name: str) -> dict[str, str]:
    """What a MiniBench LoRA teaches, by its name: {"shape": …} (content), {"texture": …} (style) or both (joint)."""
    _, role, rest = spec_name.split("_", 2)
    if role == "content":
        return {"shape": rest}
    if role == "style":
        return {"texture": rest}
    shape, texture = rest.split("_")
    return {"shape": shape, "texture": texture}


def lora_check(patcher, text, scorer, specs, loras_dir: Path, samples: int, seed: int
               ) -> tuple[dict, torch.Tensor]:
    """Each LoRA alone (ComfyUI's own LoRA loading, strength 1) on the captions of its training images, ``samples``
    images each (split over its distinct captions), at the benchmark's sampler settings: the share of samples that
    show what it teaches (shape, texture, or both for a ceiling LoRA). Returns (report, the first 8 images of each)."""
    import comfy.sd
    import comfy.utils
    from miniworld.loras import reference_images

    report, rows = {}, []
    for i, spec in enumerate(specs):
        refs, captions = reference_images(spec)
        prompts = list(dict.fromkeys(captions))
        lora = comfy.utils.load_torch_file(str(loras_dir / f"{spec.name}.safetensors"), safe_load=True)
        model, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
        x = mb_common.comfy_sample(model, text, prompts, seed + 100 * i, samples // len(prompts))
        hit = torch.ones(len(x))
        entry = {}
        for kind, word in lora_words(spec.name).items():
            h = scorer.hits(x, word, kind, refs)
            entry[f"{kind}_hit ({word})"] = round(float(h.mean()), 4)
            hit = hit * h
        entry["hit"] = round(float(hit.mean()), 4)
        entry["prompts"] = prompts
        report[spec.name] = entry
        rows.append(torch.cat([x[:8], torch.ones(8 - len(x[:8]), *x.shape[1:])]))
    return report, torch.cat(rows)


def loras_main(args) -> int:
    from miniworld import classify as mb_classify
    from miniworld.loras import ALL_SPECS, JOINT_SPECS

    mb_common.boot()
    model, text = mb_model.load_checkpoint(str(args.ckpt))
    patcher = mb_model.build_patcher(model)
    specs = [s for s in (*ALL_SPECS, *JOINT_SPECS) if (args.ckpt.parent / f"{s.name}.safetensors").is_file()]
    missing = [s.name for s in (*ALL_SPECS, *JOINT_SPECS) if s not in specs]
    if missing:
        print(f"not trained yet (left out): {', '.join(missing)}")
    report, x = lora_check(patcher, text, mb_classify.Scorer(args.classifiers), specs,
                           args.ckpt.parent, args.per or 64, args.seed)
    out = mb_common.RESULTS / "base_check"
    out.mkdir(parents=True, exist_ok=True)
    record = {"target": LORA_TARGET, "samples_per_lora": args.per or 64, "sampler": dict(mb_common.SAMPLER),
              "loras": report, "not_trained": missing}
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    mb_world.save_png(mb_world.to_uint8_grid(x, 8, scale=2), str(out / f"{args.name}.png"))
    for name, entry in report.items():
        flag = "" if entry["hit"] >= LORA_TARGET else f"  (below {LORA_TARGET:.0%})"
        print(f"{name:>36}: " + ", ".join(f"{k} {v}" for k, v in entry.items() if k != "prompts") + flag)
    return 0


def check_main(args) -> int:
    from miniworld import classify as mb_classify

    mb_common.boot()
    model, text = mb_model.load_checkpoint(str(args.ckpt))
    patcher = mb_model.build_patcher(model)
    report, x = base_check(patcher, text, mb_classify.Scorer(args.classifiers), args.per or 4, args.seed)
    report["checkpoint"] = {"path": str(args.ckpt.resolve().relative_to(mb_common.REPO))
                            if args.ckpt.resolve().is_relative_to(mb_common.REPO) else args.ckpt.name,
                            "prediction": mb_model.prediction_of(model)}
    manifest = args.ckpt.parent / "MANIFEST.json"
    if manifest.exists():
        report["checkpoint"]["steps_done"] = json.loads(manifest.read_text()).get("steps_done")
    out = mb_common.RESULTS / "base_check"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    # Row = prompted shape; each row holds the per_prompt samples of every base texture in order.
    mb_world.save_png(mb_world.to_uint8_grid(x, len(mb_world.BASE_TEXTURES) * (args.per or 4), scale=2),
                      str(out / f"{args.name}.png"))
    for name in ("model", "clean renders"):
        print(f"{name:>14}: " + ", ".join(f"{k} {v}" for k, v in report[name].items()))
    print(f"{'targets':>14}: " + ", ".join(f"{k} {v}" for k, v in TARGETS.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
