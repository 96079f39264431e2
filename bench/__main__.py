"""``python -m bench [b1] [b2] [b3]`` (``make bench`` runs all three): prints every benchmark with its ratios.

Options: ``--repeats`` (B1 runs per median), ``--steps`` (B2 timed steps), ``--paper-steps`` (B3's paper mode
and ZipLoRA steps, 100 as in the paper), ``--json FILE`` to keep the raw numbers. Run it on an idle machine;
``OMP_NUM_THREADS`` is respected and printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from . import common


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("which", nargs="*", metavar="{b1,b2,b3}", help="benchmarks to run (default: all three)")
    parser.add_argument("--repeats", type=int, default=3, help="B1: runs per median")
    parser.add_argument("--steps", type=int, default=5, help="B2: timed steps per median (after one warm-up)")
    parser.add_argument("--paper-steps", type=int, default=100, help="B3: paper mode and ZipLoRA steps")
    parser.add_argument("--draws", type=int, default=16, help="B3: held-out (σ, ε) draws")
    parser.add_argument("--no-sdxl-shapes", dest="sdxl_shapes", action="store_false",
                        help="B2: skip the full-size SDXL projection and transformer-block timings (~8 min)")
    parser.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    args = parser.parse_args(argv)
    which = list(dict.fromkeys(args.which or ["b1", "b2", "b3"]))
    unknown = [w for w in which if w not in ("b1", "b2", "b3")]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from b1, b2, b3")

    info = common.machine()
    print(f"DuoLoRA benchmarks · {info['date']} · {info['cores']} logical cores · torch {info['torch']} with "
          f"{info['torch_threads']} thread(s) (OMP_NUM_THREADS={info['OMP_NUM_THREADS']}) · {info['cpu']}", flush=True)
    results: dict = {"machine": info}
    start = time.perf_counter()
    if "b1" in which:
        from . import b1_weights

        results["b1"] = b1_weights.run(repeats=args.repeats)
        print(b1_weights.report(results["b1"]), flush=True)
    if "b2" in which or "b3" in which:
        from . import tiny

        setup = tiny.setup()
        if "b2" in which:
            from . import b2_step

            results["b2"] = b2_step.run(setup, steps=args.steps)
            print(b2_step.report(results["b2"]), flush=True)
            if args.sdxl_shapes:
                from . import b2_sdxl

                results["b2_sdxl_projections"] = b2_sdxl.run()
                print(b2_sdxl.report(results["b2_sdxl_projections"]), flush=True)
                results["b2_sdxl_blocks"] = b2_sdxl.run_blocks()
                print(b2_sdxl.report_blocks(results["b2_sdxl_blocks"]), flush=True)
        if "b3" in which:
            from . import b3_fidelity

            results["b3"] = b3_fidelity.run(setup, steps=args.paper_steps, draws=args.draws)
            print(b3_fidelity.report(results["b3"]), flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    sys.exit(main())
