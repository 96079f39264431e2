"""MiniBench 2 driver: `make minibench` runs this (by path; bench/ is not a package of ours).

    OMP_NUM_THREADS=1 python bench/minibench/minibench.py                       # every stage missing, then both tables
    OMP_NUM_THREADS=1 python bench/minibench/minibench.py --split dev           # the dev split only (< 1 h on 2 CPU cores)
    OMP_NUM_THREADS=1 python bench/minibench/minibench.py --pair DIR_C:DIR_S    # bring your own pair
    OMP_NUM_THREADS=1 python bench/minibench/minibench.py smoke --out /tmp/mb   # a few steps of everything

Stages (each skipped when its output exists, so an interrupted run continues where it stopped):
1. base model (checkpoints/base_ema.safetensors; mb_train_base.py, resumable),
2. classifiers (checkpoints/classifiers.safetensors; mb_classify.py),
3. one content LoRA per held-out shape and one style LoRA per held-out texture (checkpoints/minibench_*.safetensors;
   mb_lora.py),
4. the paired comparison through the real ComfyUI executor on the dev and test splits of splits.json
   (results/; mb_compare.py, cached per pair, row and seed), with paired bootstrap intervals.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mb_common


def prepare(ck: Path, base_steps: int, lora_steps: int, train_base: bool = False, held_out: bool = True
            ) -> tuple[Path, Path]:
    """Stages 1–3: the base, the classifiers and (``held_out``) every held-out LoRA and ceiling LoRA, what is
    missing. Returns (base, classifiers)."""
    import mb_classify
    import mb_lora
    import mb_train_base

    base = ck / "base_ema.safetensors"
    if train_base or not base.exists():
        mb_train_base.main(["--steps", str(base_steps), "--lr", "8e-4", "--out", str(ck)])
    manifest = json.loads((ck / "MANIFEST.json").read_text()) if (ck / "MANIFEST.json").exists() else {}
    print(f"base model: {base} ({manifest.get('steps_done', '?')} steps, seed {manifest.get('seed', '?')})")
    classifiers = ck / mb_common.CLASSIFIERS.name
    if not classifiers.exists():
        mb_classify.main(["--steps", "1000", "--out", str(classifiers)])
    if held_out:
        mb_lora.train_missing(mb_lora.ALL_SPECS, base, ck, lora_steps)
        # The ceiling rows' LoRAs: one per held-out pair, trained on renders of the target at the merged rank.
        mb_lora.train_missing(mb_lora.JOINT_SPECS, base, ck, lora_steps, rank=16)
    return base, classifiers


def full(args: argparse.Namespace) -> int:
    import mb_compare
    import mb_lora

    # A bring-your-own pair trains its own two LoRAs below; it needs only the base and the classifiers.
    base, classifiers = prepare(args.checkpoints, args.base_steps, args.lora_steps, args.train_base,
                                held_out=not args.pair)
    rows = mb_compare.select_rows(args.methods)
    common = {"ckpt": base, "classifiers": classifiers, "samples": args.samples, "merge_steps": args.merge_steps,
                  "sampler_steps": args.sampler_steps, "cfg": args.cfg,
              "workers": args.workers if args.workers > 0 else mb_compare.default_workers()}
    if args.pair:
        content_dir, sep, style_dir = args.pair.partition(":")
        if not sep:
            raise SystemExit(f"--pair wants CONTENT_DIR:STYLE_DIR, got {args.pair!r}")
        pair = mb_compare.byo_pair(Path(content_dir), Path(style_dir))
        out = args.results / "byo" / pair.slug
        loras = out / "loras"
        loras.mkdir(parents=True, exist_ok=True)
        print(f"bring-your-own pair {pair.name}: target prompt {pair.target!r}; content {pair.p_c!r} "
              f"({len(pair.content.captions)} images), style {pair.p_s!r} ({len(pair.style.captions)} images)")
        mb_lora.train_missing([pair.content, pair.style], base, loras, args.lora_steps)
        seeds = args.seeds or mb_common.SEEDS["dev"]
        rows = mb_compare.byo_rows(rows)
        mb_compare.run([pair], rows, seeds, out, loras=loras, force=args.force, **common)
        mb_compare.report(out, {"pair": [pair]}, rows, {"pair": seeds}, args.merge_steps, base, classifiers, loras)
        return 0
    splits = mb_compare.load_splits()
    if args.split != "all":
        splits = {args.split: splits[args.split]}
    seeds = {k: args.seeds or mb_common.SEEDS[k] for k in splits}
    mb_compare.run_splits(splits, rows, seeds, args.results, loras=args.checkpoints, force=args.force, **common)
    mb_compare.report(args.results, splits, rows, seeds, args.merge_steps, base, classifiers, args.checkpoints)
    return 0


def smoke(out: Path) -> int:
    """A few steps of every stage into ``out`` (the test suite runs this so the bench code never rots)."""
    import os

    # The tuned plain sum's choice goes to the smoke run's own file (read at import; workers inherit it).
    os.environ["MINIBENCH_CHOICES"] = str(out / "choices.json")
    import mb_classify
    import mb_compare
    import mb_lora
    import mb_train_base
    from miniworld import world as mb_world

    out.mkdir(parents=True, exist_ok=True)
    # Two steps, then resume for a third: exercises the checkpoint/resume path.
    mb_train_base.main(["--steps", "2", "--batch", "4", "--save-every", "1", "--out", str(out)])
    mb_train_base.main(["--steps", "3", "--batch", "4", "--save-every", "1", "--out", str(out)])
    # Without the resume state: continue from the exported EMA weights (how a fresh clone trains on).
    (out / "base_state.pt").unlink()
    mb_train_base.main(["--steps", "4", "--batch", "4", "--save-every", "1", "--out", str(out),
                        "--init-from", str(out / "base_ema.safetensors")])
    classifiers = out / mb_common.CLASSIFIERS.name
    mb_classify.main(["--steps", "3", "--out", str(classifiers)])
    base = out / "base_ema.safetensors"
    pairs = [mb_compare.builtin_pair("star", "diagonal"), mb_compare.builtin_pair("heart", "zigzag")]
    mb_lora.train_missing([spec for p in pairs for spec in (p.content, p.style)], base, out, 2)
    mb_lora.train_missing([p.joint for p in pairs], base, out, 2, rank=16)
    import mb_masks

    mb_masks.main(["--merge-steps", "1", "--checkpoints", str(out), "--json", str(out / "masks.json"),
                   "--methods", "DuoLoRA (shipped defaults)"])
    rows = ["base (no LoRA)", "content LoRA only", "ceiling (LoRA trained on the target)", mb_compare.TUNED,
            "direct merge", "K-LoRA", "ZipRank", "DuoLoRA (shipped defaults)", "DuoLoRA + Constyle (matched λ 0.3)",
            "DuoLoRA, prior roles swapped",
            "fast: weights-only", "layer-wise + 10 % paper steps"]
    common = {"ckpt": base, "loras": out, "classifiers": classifiers, "samples": 2, "merge_steps": 1,
              "sampler_steps": 2, "cfg": 2.0}
    splits = {"dev": pairs[:1], "test": pairs[1:]}
    seeds = {"dev": [0, 1], "test": [0, 1]}
    # The dev split in this process (it chooses the tuned plain sum), the test split through two worker processes.
    mb_compare.run_splits({"dev": splits["dev"]}, rows, seeds, out / "results", workers=1, **common)
    mb_compare.run_splits({"test": splits["test"]}, rows, seeds, out / "results", workers=2, **common)
    # The same test-split runs once more in this process: the workers must have computed exactly these.
    mb_compare.run(splits["test"], rows, [0, 1], out / "serial", workers=1, **common)
    mb_compare.report(out / "results", splits, rows, seeds, merge_steps=1, ckpt=base, classifiers=classifiers,
                      loras=out)
    # Bring your own pair: two folders of PNGs (a held-out glyph on a known texture; a known shape in a new
    # texture), captions from a captions.txt and from the folder name.
    byo_c, byo_s = out / "byo" / "glyph", out / "byo" / "a_circle_in_wavy_style"
    for folder, (shape, texture), n in ((byo_c, ("moon", "solid"), 3), (byo_s, ("circle", "grid"), 2)):
        folder.mkdir(parents=True, exist_ok=True)
        import torch

        x = mb_world.render([shape] * n, [texture] * n, torch.Generator().manual_seed(5))
        for i in range(n):
            mb_world.save_png(mb_world.to_uint8_grid(x[i:i + 1], 1, pad=0, scale=1), str(folder / f"{i}.png"))
    (byo_c / "captions.txt").write_text("a crescent in solid style\n")
    return main(["--checkpoints", str(out), "--results", str(out / "results"), "--pair", f"{byo_c}:{byo_s}",
                 "--seeds", "0", "1", "--samples", "2", "--merge-steps", "1", "--sampler-steps", "2",
                 "--lora-steps", "2", "--methods", "base (no LoRA)", "direct merge", "ZipRank"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="MiniBench 2: a CPU-sized version of the paper's evaluation.")
    sub = ap.add_subparsers(dest="cmd")
    sm = sub.add_parser("smoke", help="a few steps of everything (tests)")
    sm.add_argument("--out", type=Path, required=True)
    for p in (ap, sub.add_parser("run", help="the benchmark (default)")):
        p.add_argument("--checkpoints", type=Path, default=mb_common.CHECKPOINTS)
        p.add_argument("--results", type=Path, default=mb_common.RESULTS)
        p.add_argument("--split", choices=["dev", "test", "all"], default="all")
        p.add_argument("--pair", default="", help="CONTENT_DIR:STYLE_DIR — train both LoRAs from these folders and "
                                                  "compare on that pair alone")
        p.add_argument("--train-base", action="store_true", help="(continue) training the base model")
        p.add_argument("--base-steps", type=int, default=3000)
        p.add_argument("--lora-steps", type=int, default=800)
        p.add_argument("--seeds", type=int, nargs="+", default=None)
        p.add_argument("--samples", type=int, default=32)
        p.add_argument("--merge-steps", type=int, default=100)
        p.add_argument("--sampler-steps", type=int, default=20)
        p.add_argument("--cfg", type=float, default=2.0)
        p.add_argument("--methods", nargs="*", default=[])
        p.add_argument("--force", action="store_true", help="re-run cached comparison runs")
        p.add_argument("--workers", type=int, default=0,
                       help="processes running comparisons side by side; 0 = one per CPU core (max 8), 1 on a GPU")
    args = ap.parse_args(argv)
    if args.cmd == "smoke":
        return smoke(args.out)
    return full(args)


if __name__ == "__main__":
    sys.exit(main())
