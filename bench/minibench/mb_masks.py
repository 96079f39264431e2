"""What the learned masks look like: re-run some comparison rows' merges through the real ZipRankMerge node and print
their mask statistics (mean, share above 0.5, share pruned) and the kept rank per attention block.

    OMP_NUM_THREADS=1 python bench/minibench/mb_masks.py --seed 0 --methods "ZipRank" "DuoLoRA (shipped defaults)"

The merges are the comparison's own prompts (mb_compare.build_prompt, same pair and seed, 100 paper steps) with
one sample; nothing is written unless ``--json`` names a file. A mask entry scales one singular direction of one LoRA in one
layer: 1 keeps it whole, 0 removes it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import mb_common
import mb_compare
import torch


def mask_statistics(masks: dict[str, torch.Tensor], prune_threshold: float = 1e-3) -> dict[str, float]:
    """Mean, share > 0.5 and share below the prune threshold of the content (m_c) and style (m_s) masks."""
    out: dict[str, float] = {}
    for which in ("m_c", "m_s"):
        m = torch.cat([v.detach().flatten().float() for k, v in masks.items() if k.endswith(which)])
        out[f"{which}_mean"] = round(float(m.mean()), 3)
        out[f"{which}_above_half"] = round(float((m > 0.5).float().mean()), 3)
        out[f"{which}_pruned"] = round(float((m.abs() < prune_threshold).float().mean()), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merge-steps", type=int, default=100)
    ap.add_argument("--checkpoints", type=Path, default=mb_common.CHECKPOINTS)
    ap.add_argument("--json", type=Path, default=None, help="also write the records (a JSON list) here")
    ap.add_argument("--pair", default="star×diagonal", help="a held-out pair, e.g. heart×zigzag")
    ap.add_argument("--methods", nargs="+", default=["ZipRank", "DuoLoRA (shipped defaults)", "DuoLoRA + Constyle (matched λ 0.3)",
                                                      "fast: layer-wise"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    unknown = [m for m in args.methods if mb_compare.all_rows().get(m) is None or not mb_compare.is_merge_row(m)]
    if unknown:
        ap.error(f"not a merge row of mb_compare: {', '.join(unknown)}")
    pair = mb_compare.builtin_pair(*args.pair.split("×"))
    host = mb_common.boot()
    ck = args.checkpoints
    records = []
    for spec in (pair.content, pair.style):
        shutil.copyfile(ck / f"{spec.name}.safetensors", host.loras_dir / f"{spec.name}.safetensors")
    for method in args.methods:
        prompt, ids = mb_compare.build_prompt(host, method, pair, args.seed, 1, str(ck / "base_ema.safetensors"),
                                              args.merge_steps, 2, 2.0)
        stats = host.execute(prompt)["outputs"][ids["merge"]][1]
        kept = {k: [round(v["content"], 2), round(v["style"], 2)] for k, v in stats.kept_rank_by_block.items()}
        records.append({"method": method, "pair": pair.name, "seed": args.seed, **mask_statistics(stats.extra["masks"]),
                        "kept_rank_by_block": kept})
        print(json.dumps(records[-1]), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
