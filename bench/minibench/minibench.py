"""MiniBench driver: `make minibench` runs this (by path; bench/ is not a package of ours).

    OMP_NUM_THREADS=1 python bench/minibench/minibench.py            # everything missing, then the table
    OMP_NUM_THREADS=1 python bench/minibench/minibench.py smoke --out /tmp/mb   # a few steps of everything

Stages (each skipped when its output exists, so an interrupted run continues where it stopped):
1. base model (checkpoints/base_ema.safetensors; mb_train_base.py, resumable),
2. classifiers (checkpoints/classifiers.safetensors; mb_classify.py),
3. content and style LoRAs (checkpoints/minibench_*.safetensors; mb_lora.py),
4. the comparison through the real ComfyUI executor (results/; mb_compare.py, cached per method and seed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mb_common


def full(args: argparse.Namespace) -> int:
    import mb_classify
    import mb_compare
    import mb_lora
    import mb_train_base

    ck = args.checkpoints
    base = ck / "base_ema.safetensors"
    if args.train_base or not base.exists():
        mb_train_base.main(["--steps", str(args.base_steps), "--lr", "8e-4", "--out", str(ck)])
    manifest = json.loads((ck / "MANIFEST.json").read_text()) if (ck / "MANIFEST.json").exists() else {}
    print(f"base model: {base} ({manifest.get('steps_done', '?')} steps, seed {manifest.get('seed', '?')})")
    classifiers = ck / mb_common.CLASSIFIERS.name
    if not classifiers.exists():
        mb_classify.main(["--steps", "1000", "--out", str(classifiers)])
    mb_lora.main(["--steps", str(args.lora_steps), "--ckpt", str(base), "--out", str(ck)])
    cmp_args = ["--seeds", *map(str, args.seeds), "--samples", str(args.samples), "--merge-steps",
                str(args.merge_steps), "--sampler-steps", str(args.sampler_steps), "--ckpt", str(base),
                "--loras", str(ck), "--classifiers", str(classifiers), "--out", str(args.results)]
    if args.methods:
        cmp_args += ["--methods", *args.methods]
    return mb_compare.main(cmp_args)


def smoke(out: Path) -> int:
    """A few steps of every stage into ``out`` (the test suite runs this so the bench code never rots)."""
    import mb_classify
    import mb_compare
    import mb_lora
    import mb_train_base

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
    mb_lora.main(["--steps", "2", "--ckpt", str(out / "base_ema.safetensors"), "--out", str(out)])
    import mb_masks

    mb_masks.main(["--merge-steps", "1", "--checkpoints", str(out), "--json", str(out / "masks.json"),
                   "--methods", "ZipRank + priors"])
    return mb_compare.main(["--seeds", "0", "--samples", "2", "--merge-steps", "1", "--sampler-steps", "2",
                            "--ckpt", str(out / "base_ema.safetensors"), "--loras", str(out),
                            "--classifiers", str(classifiers), "--out", str(out / "results"),
                            "--methods", "base (no LoRA)", "direct merge", "DuoLoRA (+ Constyle)",
                            "DuoLoRA, prior roles swapped", "fast: weights-only", "layer-wise + 10 % paper steps"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="MiniBench: a CPU-sized version of the paper's evaluation.")
    sub = ap.add_subparsers(dest="cmd")
    sm = sub.add_parser("smoke", help="a few steps of everything (tests)")
    sm.add_argument("--out", type=Path, required=True)
    for p in (ap, sub.add_parser("run", help="the benchmark (default)")):
        p.add_argument("--checkpoints", type=Path, default=mb_common.CHECKPOINTS)
        p.add_argument("--results", type=Path, default=mb_common.RESULTS)
        p.add_argument("--train-base", action="store_true", help="(continue) training the base model")
        p.add_argument("--base-steps", type=int, default=3000)
        p.add_argument("--lora-steps", type=int, default=800)
        p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        p.add_argument("--samples", type=int, default=32)
        p.add_argument("--merge-steps", type=int, default=100)
        p.add_argument("--sampler-steps", type=int, default=20)
        p.add_argument("--methods", nargs="*", default=[])
    args = ap.parse_args(argv)
    if args.cmd == "smoke":
        return smoke(args.out)
    return full(args)


if __name__ == "__main__":
    sys.exit(main())
