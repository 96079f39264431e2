"""The multi-concept comparison of MiniBench: two held-out shapes and one held-out texture in one merged LoRA.

A *triple* is two held-out shapes (two content LoRAs) and one held-out texture (one style LoRA); its two
*subjects* are the pairs shape₁ × texture and shape₂ × texture. The triples come from the pair split of
``splits.json`` by one rule, without a new draw (``triples``): a triple is in the test split when both of its
pairs are test pairs, otherwise in the dev split — so no test triple uses a pair that chose defaults (dev
chooses, test reports). A *unit* is one (triple, seed). Every row of a unit samples each subject's own target
prompt "a <shape_i> in <texture> style" from the same initial noise as the pair benchmark gives that pair and
seed (``miniworld.graph.noise_seed``), and scores those images for that subject alone.

Rows (all through the real ComfyUI executor, DuoLoRA's own nodes):

* ``plain sum (all three)``: ZipRank Merge, method direct, over Load Content LoRA → Add Content LoRA;
* ``tuned plain sum (all three)``: three stacked LoraLoaderModelOnly nodes, both content LoRAs at the content
  strength and the style LoRA at the style strength the pair benchmark chose on its dev split
  (``mb_compare.tuned_stack``); left out until that choice exists;
* ``multi-concept DuoLoRA``: ZipRank Merge with the shipped defaults over both content LoRAs at once, each
  subject with its own reference images and prompts;
* ``stacked pairwise DuoLoRA``: the two single-subject merges (content_i + style) applied one after the other;
* ``single-subject DuoLoRA (reference)``: each subject sampled with its own pair's merge only (what a user with
  one subject gets; the reference the multi-concept merge is measured against, not a competitor).

``summarise`` gives, per row and subject, the unit means of ``mb_stats.METRICS`` and the paired differences of
both-hit (and the cosines) against the plain sum and against the stacked pairwise merges, with
``mb_stats.paired_difference``'s bootstrap intervals. Runs are cached per (triple, row, seed) like the pair
benchmark's, keyed by the row's resolved merge widgets (the tuned plain sum: by its strengths); a run records the
world it ran in (the base, the classifiers and the three LoRA files), and a cached run of another world runs again.

    OMP_NUM_THREADS=1 .venv/bin/python bench/minibench/mb_multi.py --split dev --seeds 0 1
    OMP_NUM_THREADS=1 .venv/bin/python bench/minibench/mb_multi.py smoke --out /tmp/mb_multi   # tiny steps
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mb_common
import mb_compare
import mb_lora
import mb_stats
import torch
from miniworld import graph
from miniworld.graph import Pair, builtin_pair, noise_seed, slug

MERGE = graph.MERGE_NODE
SUBJECTS = (0, 1)
PLAIN_SUM, TUNED, MULTI, STACKED, SINGLE = (
    "plain sum (all three)", "tuned plain sum (all three)", "multi-concept DuoLoRA", "stacked pairwise DuoLoRA",
    "single-subject DuoLoRA (reference)")
# Row -> (how the LoRAs are combined, ZipRankMerge widgets over the node's defaults).
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    PLAIN_SUM: ("multi", {"mode": "paper", "method": "direct", "prior_preset": "none", "prior_init": False,
                          "prior_loss": False, "constyle_iterations": 0}),
    TUNED: ("tuned", {}),
    MULTI: ("multi", {"mode": "paper", "method": "ziprank"}),
    STACKED: ("stacked", {"mode": "paper", "method": "ziprank"}),
    SINGLE: ("single", {"mode": "paper", "method": "ziprank"}),
}
# Rows every other row is compared to (paired, per subject).
REFERENCES = (PLAIN_SUM, STACKED)
RESULTS = mb_common.RESULTS / "multi"


@dataclass(frozen=True)
class Triple:
    """Two held-out shapes and one held-out texture: the subjects ``pairs[0]`` and ``pairs[1]``."""

    shapes: tuple[str, str]
    texture: str

    @property
    def pairs(self) -> tuple[Pair, Pair]:
        return builtin_pair(self.shapes[0], self.texture), builtin_pair(self.shapes[1], self.texture)

    @property
    def name(self) -> str:
        return f"{self.shapes[0]}+{self.shapes[1]}×{self.texture}"

    @property
    def slug(self) -> str:
        return f"{slug(self.shapes[0])}__{slug(self.shapes[1])}__{slug(self.texture)}"


def triples(pair_splits: dict[str, list[Pair]]) -> dict[str, list[Triple]]:
    """Every triple of two held-out shapes and one held-out texture, split by the pair split's rule: test when
    both of its pairs are test pairs, dev otherwise. Ordered by texture, then shapes (their world order)."""
    from miniworld import world as mb_world

    test_pairs = {p.name for p in pair_splits["test"]}
    out: dict[str, list[Triple]] = {"dev": [], "test": []}
    shapes = mb_world.HELD_OUT_SHAPES
    for texture in mb_world.HELD_OUT_TEXTURES:
        for i, a in enumerate(shapes):
            for b in shapes[i + 1:]:
                t = Triple((a, b), texture)
                out["test" if all(p.name in test_pairs for p in t.pairs) else "dev"].append(t)
    return out


def available_rows() -> list[str]:
    """Every row, the tuned plain sum only once the pair benchmark has chosen its strengths."""
    return [row for row in ROWS if row != TUNED or mb_compare.tuned_stack() is not None]


def tuned_strengths() -> dict[str, float]:
    """{"content": …, "style": …}: the tuned plain sum's strengths (``mb_compare.tuned_stack``)."""
    stack = mb_compare.tuned_stack()
    if stack is None:
        raise SystemExit(f"MiniBench multi-concept: the {TUNED!r} row needs the pair benchmark's chosen strengths "
                         "(make minibench SPLIT=dev writes them)")
    return dict(stack.parts)


def world_id(ckpt: Path, classifiers: Path, loras: Path, triple: Triple) -> str:
    """What a run's numbers depend on besides its row: the base, the classifiers and the triple's LoRA files."""
    files = [Path(ckpt), Path(classifiers),
             *(Path(loras) / f"{spec.name}.safetensors" for spec in _specs(triple))]
    blob = "|".join(mb_compare._file_hash(f) if f.exists() else f.name for f in files)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _specs(triple: Triple) -> list:
    return [*(p.content for p in triple.pairs), triple.pairs[0].style]


def merge_widgets(host, row: str, merge_steps: int) -> dict[str, Any]:
    """The row's ZipRankMerge widgets, resolved (node defaults, the row's overrides, the bench's fixed settings)."""
    from objectinfo import widget_defaults

    resolved = {**widget_defaults(host, MERGE), **ROWS[row][1], "steps": merge_steps, "compute_dtype": "fp32",
                "lora_dtype": "fp32", "gradient_checkpointing": False}
    return {k: v for k, v in resolved.items() if not isinstance(v, list) and k != "seed"}


def run_key(host, row: str, merge_steps: int) -> str:
    """The cache key of a row's runs: how it merges and a hash of the merge widgets that take effect (the tuned
    plain sum: its strengths)."""
    if ROWS[row][0] == "tuned":
        t = tuned_strengths()
        return f"tuned_c{t['content']:g}_s{t['style']:g}"
    blob = json.dumps([ROWS[row][0], mb_compare.effective_widgets(merge_widgets(host, row, merge_steps))],
                      sort_keys=True)
    return f"{ROWS[row][0]}_" + hashlib.sha1(blob.encode()).hexdigest()[:12]


def build_prompt(host, row: str, triple: Triple, seed: int, samples: int, ckpt: str, merge_steps: int,
                 sampler_steps: int, cfg: float) -> tuple[dict, dict]:
    """The API prompt of one (row, triple, seed) run and its node ids ({"images": [two ids], "merges": [...]}).

    Subject i is sampled from its target prompt with ``noise_seed(pair_i, seed)`` (the pair benchmark's noise
    of that pair and seed); every merge node's seed is the unit's seed."""
    from objectinfo import widget_defaults

    how, _ = ROWS[row]
    widgets = merge_widgets(host, row, merge_steps) if how != "tuned" else {}
    pairs = triple.pairs
    p: dict[str, dict] = {}

    def add(nid: str, cls: str, **inputs: Any) -> list:
        p[nid] = {"class_type": cls, "inputs": {**widget_defaults(host, cls), **inputs}}
        return [nid, 0]

    model = add("ckpt", "MiniBenchCheckpoint", ckpt_path=ckpt)
    text = ["ckpt", 1]
    style = pairs[0].style
    add("ls", "DuoLoRA_LoadStyleLoRA", lora_name=f"{style.name}.safetensors", strength=1.0)
    add("xs", "MiniBenchImages", spec=style.images, seed=style.seed, folder=style.folder)
    add("ps", "MiniBenchTextEncode", text_encoder=text, prompt=pairs[0].p_s)
    for i, pair in enumerate(pairs):
        c = pair.content
        add(f"xc{i}", "MiniBenchImages", spec=c.images, seed=c.seed, folder=c.folder)
        add(f"pc{i}", "MiniBenchTextEncode", text_encoder=text, prompt=pair.p_c)
        add(f"pcs{i}", "MiniBenchTextEncode", text_encoder=text, prompt=pair.target)
        add(f"lc{i}", "DuoLoRA_LoadContentLoRA", lora_name=f"{c.name}.safetensors", strength=1.0)

    def merge(nid: str, content: list, first: int) -> list:
        return add(nid, MERGE, model=model, content_lora=content, style_lora=["ls", 0],
                   content_latents=[f"xc{first}", 0], style_latents=["xs", 0], content_prompt=[f"pc{first}", 0],
                   style_prompt=["ps", 0], combined_prompt=[f"pcs{first}", 0], seed=seed, **widgets)

    def apply(nid: str, base: list, merged: list) -> list:
        return add(nid, "DuoLoRA_ApplyMergedLoRA", model=base, merged_lora=merged, strength_model=1.0,
                   strength_clip=0.0)

    if how == "tuned":  # stacked loaders, as a user does: both subjects at the content strength
        t = tuned_strengths()
        merges = []
        for nid, spec, strength in (("tc0", pairs[0].content, t["content"]), ("tc1", pairs[1].content, t["content"]),
                                    ("ts", style, t["style"])):
            model = add(nid, "LoraLoaderModelOnly", model=model, lora_name=f"{spec.name}.safetensors",
                        strength_model=strength)
        models = [model] * 2
    elif how == "multi":
        chain = add("add1", "DuoLoRA_AddContentLoRA", content_lora=["lc0", 0],
                    lora_name=f"{pairs[1].content.name}.safetensors", strength=1.0, content_latents=["xc1", 0],
                    content_prompt=["pc1", 0], combined_prompt=["pcs1", 0])
        merges = [merge("merge", chain, 0)]
        models = [apply("apply", model, merges[0])] * 2
    else:
        merges = [merge(f"merge{i}", [f"lc{i}", 0], i) for i in SUBJECTS]
        if how == "stacked":
            models = [apply("apply1", apply("apply0", model, merges[0]), merges[1])] * 2
        else:  # single: subject i sampled with its own pair's merge only
            models = [apply(f"apply{i}", model, merges[i]) for i in SUBJECTS]
    add("neg", "MiniBenchTextEncode", text_encoder=text, prompt="")
    add("empty", "MiniBenchEmpty", batch_size=samples)
    for i, pair in enumerate(pairs):
        add(f"pos{i}", "MiniBenchTextEncode", text_encoder=text, prompt=pair.target)
        add(f"ks{i}", "KSampler", model=models[i], seed=noise_seed(pair, seed), steps=sampler_steps, cfg=cfg,
            sampler_name="euler", scheduler="normal", positive=[f"pos{i}", 0], negative=["neg", 0],
            latent_image=["empty", 0], denoise=1.0)
        add(f"img{i}", "MiniBenchToImage", samples=[f"ks{i}", 0])
        add(f"out{i}", "PreviewImage", images=[f"img{i}", 0])
    return p, {"images": ["img0", "img1"], "merges": [m[0] for m in merges]}


def run_path(out: Path, triple: Triple, key: str, seed: int) -> Path:
    return out / "runs" / triple.slug / f"{key}_s{seed}.json"


def run(triple_list: list[Triple], rows: list[str], seeds: list[int], out: Path, ckpt: Path, loras: Path,
        classifiers: Path, samples: int, merge_steps: int, sampler_steps: int, cfg: float,
        force: bool = False) -> int:
    """Run and cache every missing (triple, row, seed) in this process; returns how many ran."""
    from miniworld import classify as mb_classify

    host = mb_common.boot()
    world = {t.slug: world_id(ckpt, classifiers, loras, t) for t in triple_list}
    for triple in triple_list:
        for spec in _specs(triple):
            shutil.copyfile(loras / f"{spec.name}.safetensors", host.loras_dir / f"{spec.name}.safetensors")
    scorer = mb_classify.Scorer(classifiers)
    todo = [(t, row, seed) for seed in seeds for t in triple_list for row in rows
            if force or not mb_compare.is_current(run_path(out, t, run_key(host, row, merge_steps), seed),
                                                  world[t.slug])]
    print(f"MiniBench multi-concept: {len(triple_list)} triple(s) × {len(seeds)} seed(s) × {len(rows)} row(s): "
          f"{len(todo)} to run", flush=True)
    for n, (triple, row, seed) in enumerate(todo, 1):
        prompt, ids = build_prompt(host, row, triple, seed, samples, str(ckpt), merge_steps, sampler_steps, cfg)
        t0 = time.time()
        result = host.execute(prompt)
        wall = time.time() - t0
        subjects = []
        for pair, image_id in zip(triple.pairs, ids["images"]):
            images = (result["outputs"][image_id][0].permute(0, 3, 1, 2) * 2 - 1).float().cpu()
            refs_c = mb_lora.reference_images(pair.content)[0]
            refs_s = mb_lora.reference_images(pair.style)[0]
            per_sample = {
                "content_hit": scorer.hits(images, pair.content_word, "shape", refs_c).tolist(),
                "style_hit": scorer.hits(images, pair.style_word, "texture", refs_s).tolist(),
                "content_cos": [round(v, 5) for v in scorer.cosine(images, refs_c, "shape").tolist()],
                "style_cos": [round(v, 5) for v in scorer.cosine(images, refs_s, "texture").tolist()],
            }
            subjects.append({"pair": pair.name, "noise_seed": noise_seed(pair, seed), "per_sample": per_sample,
                             **{k: round(v, 5) for k, v in mb_stats.unit_means(per_sample).items()}})
        stats = [result["outputs"][m][1] for m in ids["merges"]]
        rec = {"row": row, "triple": triple.name, "seed": seed, "world": world[triple.slug], "samples": samples,
               "sampler_steps": sampler_steps, "cfg": cfg, "prompt_wall_s": round(wall, 2), "subjects": subjects,
               "merge_widgets": merge_widgets(host, row, merge_steps) if ROWS[row][0] != "tuned" else {},
               "strengths": tuned_strengths() if ROWS[row][0] == "tuned" else {},
               "trainable_parameters": [int(s.trainable_parameters) for s in stats],
               "merge_wall_s": [round(float(s.wall_seconds), 2) for s in stats]}
        path = run_path(out, triple, run_key(host, row, merge_steps), seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(json.dumps(rec) + "\n")
        os.replace(tmp, path)
        print(f"  [{n}/{len(todo)}] {triple.name} s{seed} {row}: {wall:.0f} s", flush=True)
    return len(todo)


def collect(out: Path, triple_list: list[Triple], rows: list[str], seeds: list[int], keys: dict[str, str],
            world: dict[str, str]) -> dict[str, dict[tuple, dict]]:
    """row → unit (triple name, seed) → record, for the runs on disk of this world (triple slug → world_id)."""
    data: dict[str, dict[tuple, dict]] = {}
    for row in rows:
        for triple in triple_list:
            for seed in seeds:
                path = run_path(out, triple, keys[row], seed)
                if mb_compare.is_current(path, world[triple.slug]):
                    data.setdefault(row, {})[(triple.name, seed)] = json.loads(path.read_text())
    return data


def summarise(data: dict[str, dict[tuple, dict]], resamples: int = 4000) -> dict[str, Any]:
    """Per row and subject: unit means of every metric and paired differences against ``REFERENCES``; per row
    also the mean over both subjects of both-hit."""
    units = {row: {i: {u: mb_stats.unit_means(rec["subjects"][i]["per_sample"]) for u, rec in recs.items()}
                   for i in SUBJECTS} for row, recs in data.items()}
    summary: dict[str, Any] = {}
    for row, recs in data.items():
        s: dict[str, Any] = {"units": len(recs), "subjects": []}
        for i in SUBJECTS:
            sub: dict[str, Any] = {m: mb_stats.mean([v[m] for v in units[row][i].values()]) for m in mb_stats.METRICS}
            for ref in REFERENCES:
                if ref in units and ref != row and set(units[row][i]) & set(units[ref][i]):
                    sub[f"vs {ref}"] = {m: mb_stats.paired_difference(units[row][i], units[ref][i], m, resamples)
                                        for m in ("both_hit", "content_cos", "style_cos")}
            s["subjects"].append(sub)
        s["both_hit"] = mb_stats.mean([sub["both_hit"] for sub in s["subjects"]])
        summary[row] = s
    return summary


def tables(summary: dict[str, Any], title: str) -> str:
    """Markdown: both-hit per subject (levels), then the paired differences per subject against each reference."""
    pct = mb_compare._pct
    lines = [f"#### {title}: both-hit per subject (mean over units)", "",
             ("| method | units | subject 1 both % | subject 2 both % | mean both % | subject 1 content / style "
              "hit % | subject 2 content / style hit % |"), "|---|---|---|---|---|---|---|"]
    for row, s in summary.items():
        a, b = s["subjects"]
        lines.append(f"| {row} | {s['units']} | {pct(a['both_hit'])} | {pct(b['both_hit'])} | {pct(s['both_hit'])} | "
                     f"{pct(a['content_hit'])} / {pct(a['style_hit'])} | {pct(b['content_hit'])} / {pct(b['style_hit'])} |")
    for ref in REFERENCES:
        lines += ["", f"#### {title}: Δ both-hit % vs {ref}, per subject, mean [95 % bootstrap interval over units]", "",
                  "| method | subject 1 | subject 2 |", "|---|---|---|"]
        for row, s in summary.items():
            cells = [mb_compare._d(sub.get(f"vs {ref}", {}).get("both_hit"), True) for sub in s["subjects"]]
            lines.append(f"| {row} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def report(out: Path, splits: dict[str, list[Triple]], rows: list[str], seeds: dict[str, list[int]],
           merge_steps: int, ckpt: Path = mb_common.CHECKPOINTS / "base_ema.safetensors",
           classifiers: Path = mb_common.CLASSIFIERS, loras: Path = mb_common.CHECKPOINTS) -> dict:
    """Tables and summary.json of the cached runs of this world into ``out``; prints the tables."""
    host = mb_common.boot()
    keys = {row: run_key(host, row, merge_steps) for row in rows}
    full, text = {}, []
    for split, triple_list in splits.items():
        world = {t.slug: world_id(ckpt, classifiers, loras, t) for t in triple_list}
        data = collect(out, triple_list, rows, seeds[split], keys, world)
        if not data:
            continue
        summary = summarise(data)
        full[split] = {"triples": [t.name for t in triple_list], "seeds": seeds[split], "rows": summary}
        t = tables(summary, f"multi-concept, {split} split ({', '.join(x.name for x in triple_list)}; "
                            f"seeds {seeds[split][0]}–{seeds[split][-1]})")
        (out / f"{split}_table.md").write_text(t)
        text.append(t)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(full, indent=1, default=str) + "\n")
    print("\n".join(text))
    return full


def smoke(out: Path) -> int:
    """Tiny steps of everything the multi-concept comparison needs, into ``out``: the triple split
    (triples.json), the tuned plain sum's strengths (choices.json, fixed), a base (2 steps), classifiers
    (3 steps), the LoRAs of star, heart and zigzag (2 steps), then every row on the test triple star + heart ×
    zigzag at 2 seeds (1 merge step, 2 samples, 2 sampler steps) and its report."""
    import mb_classify
    import mb_train_base

    out.mkdir(parents=True, exist_ok=True)
    # The tuned plain sum reads the smoke run's own strengths (fixed here, not chosen: the pair benchmark's
    # smoke test covers the choice).
    mb_compare.CHOICES_FILE = out / "choices.json"
    mb_compare.CHOICES_FILE.write_text(json.dumps({"tuned_plain_sum": {
        "rule": "smoke test: a fixed choice", "chosen": {"content": 1.0, "style": 0.5}}}) + "\n")
    # The split of every triple by the committed pair split's rule (what the full comparison runs).
    split = triples(mb_compare.load_splits())
    (out / "triples.json").write_text(json.dumps({k: [t.name for t in v] for k, v in split.items()}) + "\n")
    mb_train_base.main(["--steps", "2", "--batch", "4", "--save-every", "1", "--out", str(out)])
    classifiers = out / mb_common.CLASSIFIERS.name
    mb_classify.main(["--steps", "3", "--out", str(classifiers)])
    triple = Triple(("star", "heart"), "zigzag")
    mb_lora.train_missing([*(p.content for p in triple.pairs), triple.pairs[0].style], out / "base_ema.safetensors",
                          out, 2)
    rows = available_rows()
    base = out / "base_ema.safetensors"
    run([triple], rows, [0, 1], out / "results", base, out, classifiers, samples=2, merge_steps=1, sampler_steps=2,
        cfg=2.0)
    report(out / "results", {"test": [triple]}, rows, {"test": [0, 1]}, 1, base, classifiers, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="MiniBench: the multi-concept comparison (two shapes, one texture).")
    sub = ap.add_subparsers(dest="cmd")
    sm = sub.add_parser("smoke", help="tiny steps of everything (tests)")
    sm.add_argument("--out", type=Path, required=True)
    ap.add_argument("--split", choices=["dev", "test", "all"], default="dev")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the split's own (mb_common.SEEDS)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--merge-steps", type=int, default=100)
    ap.add_argument("--sampler-steps", type=int, default=mb_common.SAMPLER["steps"])
    ap.add_argument("--cfg", type=float, default=mb_common.SAMPLER["cfg"])
    ap.add_argument("--ckpt", type=Path, default=mb_common.CHECKPOINTS / "base_ema.safetensors")
    ap.add_argument("--loras", type=Path, default=mb_common.CHECKPOINTS)
    ap.add_argument("--classifiers", type=Path, default=mb_common.CLASSIFIERS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.cmd == "smoke":
        return smoke(args.out)
    splits = triples(mb_compare.load_splits())
    if args.split != "all":
        splits = {args.split: splits[args.split]}
    rows = available_rows()
    if TUNED not in rows:
        print(f"({TUNED!r} is left out: the pair benchmark has not chosen its strengths yet)")
    seeds = {k: args.seeds or mb_common.SEEDS[k] for k in splits}
    if not args.report_only:
        for split, triple_list in splits.items():
            run(triple_list, rows, seeds[split], args.out, args.ckpt, args.loras, args.classifiers, args.samples,
                args.merge_steps, args.sampler_steps, args.cfg, args.force)
    report(args.out, splits, rows, seeds, args.merge_steps, args.ckpt, args.classifiers, args.loras)
    return 0


if __name__ == "__main__":
    sys.exit(main())
