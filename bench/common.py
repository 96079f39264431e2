"""Shared helpers of the benchmarks: timing, medians, the machine description, table printing."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DEVTOOLS = REPO / "devtools"


def pin_engine() -> None:
    """Import this checkout's ``duolora`` now. ``comfyhost.boot()`` drops the repository root from sys.path
    (its nodes/ would shadow ComfyUI's), after which ``import duolora`` would find an installed copy of
    another checkout (an editable install points at one) and time that code instead of this one."""
    if str(REPO) not in sys.path and "duolora" not in sys.modules:
        sys.path.insert(0, str(REPO))
    import duolora

    where = Path(duolora.__file__).resolve().parent
    if where != REPO / "duolora":
        raise RuntimeError(f"bench: `duolora` was imported from {where}, not from this checkout {REPO}; "
                           f"import the benchmarks before anything else imports duolora")


pin_engine()


def use_devtools() -> None:
    """Make ``devtools/`` (comfyhost.py and the harness modules beside it) importable (never the repository root:
    its nodes/ shadows ComfyUI's)."""
    if str(DEVTOOLS) not in sys.path:
        sys.path.insert(0, str(DEVTOOLS))


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """(median seconds, every run's seconds, the last result) of ``repeats`` calls of ``fn``."""
    runs, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), runs, result


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> dict[str, Any]:
    """Date, logical cores, torch threads and versions: printed with every run."""
    return {
        "date": datetime.date.today().isoformat(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


def table(rows: list[list[str]], header: list[str]) -> str:
    """A Markdown table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"
