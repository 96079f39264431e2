"""The MiniBench comparison: every merge method through the REAL ComfyUI executor, scored by classifiers.

For each method and seed one API prompt runs in ComfyUI's own PromptExecutor: MiniBenchCheckpoint →
DuoLoRA_LoadContentLoRA / DuoLoRA_LoadStyleLoRA → DuoLoRA_ZipRankMerge (reference images and prompts from
the bench pack) → DuoLoRA_ApplyMergedLoRA → ComfyUI's KSampler (one per evaluation prompt) →
MiniBenchToImage → PreviewImage. The images are scored with the shape/texture classifiers
(mb_classify.Scorer). Each (method, seed) result is cached in results/runs/, so re-running continues.

    OMP_NUM_THREADS=1 python bench/minibench/mb_compare.py --seeds 0 1 2 --samples 24
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import mb_common
import mb_lora
import mb_world
import torch

GLYPH = mb_world.HELD_OUT_SHAPE
TEXTURE = mb_world.HELD_OUT_TEXTURE
# (prompt, expected shape, expected texture): the target, then the two recontextualisations.
EVAL_PROMPTS: dict[str, tuple[str, str, str]] = {
    "target": (mb_world.caption(GLYPH, TEXTURE), GLYPH, TEXTURE),
    "glyph_known_style": (mb_world.caption(GLYPH, "checker"), GLYPH, "checker"),
    "shape_new_texture": (mb_world.caption("triangle", TEXTURE), "triangle", TEXTURE),
}
CONTENT_PROMPT = mb_world.caption(GLYPH, "solid")
STYLE_PROMPT = mb_world.caption("circle", TEXTURE)

def _swapped_paper_prior() -> str:
    """The ``paper`` preset with the roles exchanged (content = 16×16 blocks, style = 8×8 blocks), as a
    ``custom_prior`` spec: a diagnostic row for where this world keeps its textures."""
    from duolora.sdxl import CONTENT, PRESETS, STYLE

    paper = PRESETS["paper"]
    parts = [f"{role}: " + ", ".join(b for b, r in paper.items() if r == other)
             for role, other in ((CONTENT, STYLE), (STYLE, CONTENT))]
    return "; ".join(parts)


_PRIORS_OFF = {"prior_preset": "none", "prior_init": False, "prior_loss": False, "constyle_iterations": 0}
_PRIORS_ON = {"prior_preset": "paper", "prior_init": True, "prior_loss": True}
# Method name → ZipRankMerge widgets (None: no merge node; "content_only"/"style_only" apply one LoRA).
METHODS: dict[str, dict[str, Any] | None] = {
    "base (no LoRA)": None,
    "content LoRA only": None,
    "style LoRA only": None,
    "direct merge": {"mode": "paper", "method": "direct", **_PRIORS_OFF},
    "B-LoRA blocks": {"mode": "paper", "method": "b_lora", **_PRIORS_OFF},
    "ZipLoRA (out)": {"mode": "paper", "method": "ziplora_out", **_PRIORS_OFF},
    "ZipLoRA (in)": {"mode": "paper", "method": "ziplora_in", **_PRIORS_OFF},
    "ZipRank": {"mode": "paper", "method": "ziprank", **_PRIORS_OFF},
    "ZipRank + priors": {"mode": "paper", "method": "ziprank", **_PRIORS_ON, "constyle_iterations": 0},
    # The two halves of the layer priors (METHOD.md §3), one at a time.
    "ZipRank + prior init only": {"mode": "paper", "method": "ziprank", **_PRIORS_ON, "prior_loss": False,
                                  "constyle_iterations": 0},
    "ZipRank + prior loss only": {"mode": "paper", "method": "ziprank", **_PRIORS_ON, "prior_init": False,
                                  "constyle_iterations": 0},
    "DuoLoRA (+ Constyle)": {"mode": "paper", "method": "ziprank", **_PRIORS_ON, "constyle_iterations": 1},
    "DuoLoRA, prior roles swapped": {"mode": "paper", "method": "ziprank", **_PRIORS_ON, "prior_preset": "custom",
                                     "custom_prior": _swapped_paper_prior(), "constyle_iterations": 1},
    "fast: weights-only": {"mode": "weights", "method": "ziprank", **_PRIORS_ON, "constyle_iterations": 0},
    "fast: layer-wise": {"mode": "layerwise", "method": "ziprank", **_PRIORS_ON, "constyle_iterations": 0},
    "layer-wise + 10 % paper steps": {"mode": "layerwise+paper", "method": "ziprank", **_PRIORS_ON,
                                      "constyle_iterations": 1, "steps_fraction": 0.1},
    # The fast modes without the layer priors (what the solvers themselves do in this world).
    "fast: weights-only, no priors": {"mode": "weights", "method": "ziprank", **_PRIORS_OFF},
    "fast: layer-wise, no priors": {"mode": "layerwise", "method": "ziprank", **_PRIORS_OFF},
    "layer-wise + 10 % paper steps, no priors": {"mode": "layerwise+paper", "method": "ziprank", **_PRIORS_OFF,
                                                 "steps_fraction": 0.1},
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def build_prompt(host, method: str, seed: int, samples: int, ckpt: str, merge_steps: int,
                 sampler_steps: int, cfg: float, content_file: str, style_file: str) -> tuple[dict, dict]:
    """The API prompt of one (method, seed) run and the ids of its image / merge nodes."""
    from comfyhost import widget_defaults  # devtools/ is on sys.path once mb_common is imported

    p: dict[str, dict] = {}

    def add(nid: str, cls: str, **inputs: Any) -> list:
        p[nid] = {"class_type": cls, "inputs": {**widget_defaults(host, cls), **inputs}}
        return [nid, 0]

    add("ckpt", "MiniBenchCheckpoint", ckpt_path=ckpt)
    model = ["ckpt", 0]
    text = ["ckpt", 1]
    ids: dict[str, Any] = {"images": {}, "merge": None}
    widgets = METHODS[method]
    if widgets is not None:
        add("lc", "DuoLoRA_LoadContentLoRA", lora_name=content_file, strength=1.0)
        add("ls", "DuoLoRA_LoadStyleLoRA", lora_name=style_file, strength=1.0)
        add("xc", "MiniBenchImages", spec=mb_lora.CONTENT.images, seed=mb_lora.CONTENT.seed)
        add("xs", "MiniBenchImages", spec=mb_lora.STYLE.images, seed=mb_lora.STYLE.seed)
        add("pc", "MiniBenchTextEncode", text_encoder=text, prompt=CONTENT_PROMPT)
        add("ps", "MiniBenchTextEncode", text_encoder=text, prompt=STYLE_PROMPT)
        add("pcs", "MiniBenchTextEncode", text_encoder=text, prompt=EVAL_PROMPTS["target"][0])
        widgets = dict(widgets)
        # A row may run a fraction of the paper's steps (the layer-wise start + 10 % of them).
        steps = max(1, round(merge_steps * widgets.pop("steps_fraction"))) if "steps_fraction" in widgets \
            else merge_steps
        add("merge", "DuoLoRA_ZipRankMerge", model=model, content_lora=["lc", 0], style_lora=["ls", 0],
            content_latents=["xc", 0], style_latents=["xs", 0], content_prompt=["pc", 0],
            style_prompt=["ps", 0], combined_prompt=["pcs", 0], steps=steps, seed=seed,
            compute_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False, **widgets)
        add("apply", "DuoLoRA_ApplyMergedLoRA", model=model, merged_lora=["merge", 0], strength_model=1.0,
            strength_clip=0.0)
        model = ["apply", 0]
        ids["merge"] = "merge"
    elif method != "base (no LoRA)":
        name = content_file if method.startswith("content") else style_file
        add("single", "LoraLoaderModelOnly", model=model, lora_name=name, strength_model=1.0)
        model = ["single", 0]
    add("neg", "MiniBenchTextEncode", text_encoder=text, prompt="")
    add("empty", "MiniBenchEmpty", batch_size=samples)
    for k, (prompt, _, _) in EVAL_PROMPTS.items():
        add(f"pos_{k}", "MiniBenchTextEncode", text_encoder=text, prompt=prompt)
        add(f"ks_{k}", "KSampler", model=model, seed=1000 + seed, steps=sampler_steps, cfg=cfg,
            sampler_name="euler", scheduler="normal", positive=[f"pos_{k}", 0], negative=["neg", 0],
            latent_image=["empty", 0], denoise=1.0)
        add(f"img_{k}", "MiniBenchToImage", samples=[f"ks_{k}", 0])
        add(f"out_{k}", "PreviewImage", images=[f"img_{k}", 0])
        ids["images"][k] = f"img_{k}"
    return p, ids


def score_run(scorer, images: dict[str, torch.Tensor], refs_c: torch.Tensor, refs_s: torch.Tensor) -> dict:
    """Hit rates and cosines of one run; ``images`` maps eval-prompt key → (B, 3, 32, 32) in [-1, 1]."""
    out: dict[str, float] = {}
    for k, x in images.items():
        _, want_s, want_t = EVAL_PROMPTS[k]
        ps, pt = scorer.predict(x)
        hs = torch.tensor([s == want_s for s in ps], dtype=torch.float32)
        ht = torch.tensor([t == want_t for t in pt], dtype=torch.float32)
        out[f"{k}_content_hit"] = float(hs.mean())
        out[f"{k}_style_hit"] = float(ht.mean())
        out[f"{k}_both_hit"] = float((hs * ht).mean())
        if k == "target":
            out["content_cos"] = float(scorer.cosine(x, refs_c, "shape").mean())
            out["style_cos"] = float(scorer.cosine(x, refs_s, "texture").mean())
    return out


def run(args: argparse.Namespace) -> dict:
    import mb_classify

    host = mb_common.boot()
    runs_dir = args.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for spec in (mb_lora.CONTENT, mb_lora.STYLE):
        src = args.loras / f"{spec.name}.safetensors"
        shutil.copyfile(src, host.loras_dir / src.name)
        files[spec.name] = src.name
    scorer = mb_classify.Scorer(args.classifiers)
    refs_c, _ = mb_lora.reference_images(mb_lora.CONTENT)
    refs_s, _ = mb_lora.reference_images(mb_lora.STYLE)
    methods = [m for m in METHODS if not args.methods or m in args.methods or slug(m) in args.methods]
    # Seed-major: a run cut short still has every method at the first seeds.
    for seed in args.seeds:
        for method in methods:
            path = runs_dir / f"{slug(method)}_s{seed}.json"
            if path.exists() and not args.force:
                continue
            prompt, ids = build_prompt(host, method, seed, args.samples, str(args.ckpt), args.merge_steps,
                                       args.sampler_steps, args.cfg, files[mb_lora.CONTENT.name],
                                       files[mb_lora.STYLE.name])
            t0 = time.time()
            result = host.execute(prompt)
            wall = time.time() - t0
            images = {k: (result["outputs"][nid][0].permute(0, 3, 1, 2) * 2 - 1).float()
                      for k, nid in ids["images"].items()}
            rec = {"method": method, "seed": seed, "samples": args.samples, "merge_steps": args.merge_steps,
                   "sampler_steps": args.sampler_steps, "cfg": args.cfg, "prompt_wall_s": round(wall, 2),
                   **score_run(scorer, images, refs_c, refs_s)}
            if ids["merge"] is not None:
                stats = result["outputs"][ids["merge"]][1]
                rec["trainable_parameters"] = int(stats.trainable_parameters)
                rec["merge_wall_s"] = round(float(stats.wall_seconds), 2)
                rec["merge_steps_done"] = int(stats.steps_done)
                rec["merge_widgets"] = METHODS[method]
            torch.save({k: v[:8].clone() for k, v in images.items()}, runs_dir / f"{slug(method)}_s{seed}.pt")
            path.write_text(json.dumps(rec, indent=1) + "\n")
            print(f"{method} seed {seed}: target both {rec['target_both_hit']:.2f} "
                  f"content {rec['target_content_hit']:.2f} style {rec['target_style_hit']:.2f} "
                  f"({wall:.1f} s)", flush=True)
    return aggregate(args.out, methods, args.seeds)


def _ms(values: list[float], pct: bool = True) -> str:
    if not values:
        return "–"
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1))
    return f"{100 * m:.0f} ± {100 * s:.0f}" if pct else f"{m:.3f} ± {s:.3f}"


def aggregate(out: Path, methods: list[str], seeds: list[int]) -> dict:
    """Mean ± std over seeds → results/table.md, results/summary.json and results/grid.png."""
    rows = []
    summary: dict[str, Any] = {}
    grid_rows = []
    for method in methods:
        recs = [json.loads(p.read_text()) for s in seeds
                if (p := out / "runs" / f"{slug(method)}_s{s}.json").exists()]
        if not recs:
            continue
        col = {k: [r[k] for r in recs if k in r] for k in recs[0]}
        summary[method] = {k: v for k, v in col.items() if k not in ("method",)}
        params = f"{recs[0]['trainable_parameters']:,}" if "trainable_parameters" in recs[0] else "–"
        wall = _ms(col.get("merge_wall_s", []), pct=False).split(" ± ")[0] if "merge_wall_s" in col else "–"
        rows.append(
            f"| {method} | {len(recs)} | {_ms(col['target_content_hit'])} | {_ms(col['target_style_hit'])} | "
            f"{_ms(col['target_both_hit'])} | {_ms(col['content_cos'], False)} | {_ms(col['style_cos'], False)} | "
            f"{_ms(col['glyph_known_style_both_hit'])} | {_ms(col['shape_new_texture_both_hit'])} | "
            f"{params} | {wall} |")
        pt = out / "runs" / f"{slug(method)}_s{seeds[0]}.pt"
        if pt.exists():
            grid_rows.append(torch.load(pt)["target"][:8])
    head = ("| method | seeds | content hit % | style hit % | both % | content cos (DINO-like) | "
            "style cos (CSD-like) | glyph in known style, both % | known shape in new texture, both % | "
            "trainable params | merge s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    table = head + "\n" + "\n".join(rows)
    (out / "table.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if grid_rows:
        x = torch.cat([torch.cat([r, torch.zeros(8 - len(r), 3, 32, 32)]) for r in grid_rows])
        mb_world.save_png(mb_world.to_uint8_grid(x, 8, scale=3), str(out / "grid.png"))
        (out / "grid_rows.txt").write_text("\n".join(m for m in methods if any(
            (out / "runs" / f"{slug(m)}_s{seeds[0]}.pt").exists() for _ in [0])) + "\n")
    print(table)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="MiniBench: compare merge methods through the real ComfyUI executor.")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=24, help="images per evaluation prompt and seed")
    ap.add_argument("--merge-steps", type=int, default=100)
    ap.add_argument("--sampler-steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--methods", nargs="*", default=[], help="subset (names or slugs); default all")
    ap.add_argument("--ckpt", type=Path, default=mb_common.CHECKPOINTS / "base_ema.safetensors")
    ap.add_argument("--loras", type=Path, default=mb_common.CHECKPOINTS)
    ap.add_argument("--classifiers", type=Path, default=mb_common.CLASSIFIERS)
    ap.add_argument("--out", type=Path, default=mb_common.RESULTS)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
