"""The MiniBench comparison: every merge method through the REAL ComfyUI executor, paired, on 9 held-out pairs.

A *pair* is one held-out content (a shape the base never saw, learned by a content LoRA) × one held-out style
(a texture the base never saw, learned by a style LoRA): 3 × 3 = 9 pairs, split once into a dev split (used to
choose defaults and hyper-parameters) and a test split (only reported) by the seeded draw in ``splits.json``.
A *unit* is one (pair, seed). For every unit and method one API prompt runs in ComfyUI's own PromptExecutor:
MiniBenchCheckpoint → DuoLoRA_LoadContentLoRA / DuoLoRA_LoadStyleLoRA → DuoLoRA_ZipRankMerge (reference images
and prompts from the bench pack; the node's seed = the unit's seed) → DuoLoRA_ApplyMergedLoRA → ComfyUI's
KSampler on the target prompt "a <shape> in <texture> style" → MiniBenchToImage; rows without a merge stack LoRAs
with ComfyUI's LoraLoaderModelOnly (``Stack``), as a user does. Every method of a unit samples
from the SAME initial noise (the KSampler seed depends on the unit only) with the same sampler, so method
differences are paired. The images are scored per sample (mb_classify.Scorer): content hit, style hit, both,
content-feature cosine to the content references (DINO-like) and style-feature cosine to the style references
(CSD-like). Each run is cached as JSON under ``<results>/runs/<pair>/<key>_s<seed>.json``, where the key of a
merge row is a hash of ALL its resolved ZipRankMerge widgets (defaults included): two rows that merge the same
way share their runs, and a row whose configuration changed (e.g. after a default changed) runs again. A run also
records the world it ran in (``world_id``: the base, the classifiers and the LoRA files); a cached run of another
world is run again.

    OMP_NUM_THREADS=1 python bench/minibench/mb_compare.py --split dev --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mb_common
import mb_lora
import mb_stats
import torch
from miniworld import graph
from miniworld import world as mb_world

# The pair, its seeds and the prompt of one run moved to devtools/miniworld/graph.py (the demo builds its runs
# with them too).
from miniworld.graph import Pair, builtin_pair, noise_seed, slug

from duolora.config import MergeConfig

SPLITS_FILE = mb_common.HERE / "splits.json"

_PRIORS_OFF = {"prior_preset": "none", "prior_init": False, "prior_loss": False, "constyle_iterations": 0}


@dataclass(frozen=True)
class Stack:
    """A row without a merge: LoRAs applied one after another with ComfyUI's LoraLoaderModelOnly, each at its
    strength, as a user stacks loaders. Roles: "content", "style", "joint" (the pair's ceiling LoRA)."""

    parts: tuple[tuple[str, float], ...]

    @property
    def key(self) -> str:
        return "stack_" + "_".join(f"{role}{strength:g}" for role, strength in self.parts)


@dataclass(frozen=True)
class KLoRARow:
    """A row without a merge: the content and style LoRAs through Apply K-LoRA's sampling-time patch, with these
    widgets over the node's own defaults (``klora_widgets``)."""

    widgets: tuple[tuple[str, Any], ...] = ()


# The row a user's own recipe gives: two stacked loaders at the strengths chosen on the dev split (CHOICES_FILE).
TUNED = "tuned plain sum"
# MINIBENCH_CHOICES moves it (the smoke test's own choices; worker processes inherit the environment).
CHOICES_FILE = Path(os.environ.get("MINIBENCH_CHOICES", mb_common.HERE / "choices.json"))
# The small grid the tuned plain sum is chosen from: what a user tries by hand, style strength turned down first.
PLAIN_SUM_GRID = [(c, s) for c in (0.75, 1.0, 1.25) for s in (0.25, 0.5, 0.75, 1.0)]
# Row name → ZipRankMerge widgets over the node's own defaults, a Stack, TUNED's stack, a KLoRARow, or None (the base).
# Rows that say nothing about priors or Constyle run the node's DEFAULTS, so they follow the shipped defaults
# whenever those change.
ROWS: dict[str, dict[str, Any] | Stack | KLoRARow | None] = {
    "base (no LoRA)": None,
    "content LoRA only": Stack((("content", 1.0),)),
    "style LoRA only": Stack((("style", 1.0),)),
    "ceiling (LoRA trained on the target)": Stack((("joint", 1.0),)),
    TUNED: None,  # resolved from CHOICES_FILE (tuned_stack)
    "direct merge": {"mode": "paper", "method": "direct", **_PRIORS_OFF},
    "ZipLoRA (out)": {"mode": "paper", "method": "ziplora_out", **_PRIORS_OFF},
    # Training-free, at the node's defaults (the paper's α 1.5 and β 0.5, the steps timeline, attention layers).
    "K-LoRA": KLoRARow(),
    "ZipRank": {"mode": "paper", "method": "ziprank", **_PRIORS_OFF},
    # The shipped defaults ARE ZipRank + the share prior (Constyle off by default).
    "DuoLoRA (shipped defaults)": {"mode": "paper", "method": "ziprank"},
    "DuoLoRA + Constyle (matched λ 0.3)": {"mode": "paper", "method": "ziprank", "constyle_iterations": 1,
                                           "cycle_scale": "matched", "lambda_cyc": 0.3, "lambda_rev": 0.3},
    "fast: weights-only": {"mode": "weights", "method": "ziprank"},
    "fast: layer-wise": {"mode": "layerwise", "method": "ziprank"},
}


def tuned_stack(path: Path | None = None) -> Stack | None:
    """The tuned plain sum's strengths as chosen on the dev split (``choose_plain_sum``), None before the choice."""
    path = path or CHOICES_FILE
    if not path.exists():
        return None
    chosen = json.loads(path.read_text()).get("tuned_plain_sum", {}).get("chosen")
    if not chosen:
        return None
    return Stack((("content", float(chosen["content"])), ("style", float(chosen["style"]))))


def stack_of(row: str) -> Stack | None:
    """The Stack a row applies (TUNED resolved), or None for the base and the merge rows."""
    spec = _tuned_or_exit() if row == TUNED else all_rows()[row]
    return spec if isinstance(spec, Stack) else None


def _tuned_or_exit() -> Stack:
    chosen = tuned_stack()
    if chosen is None:
        raise SystemExit(f"MiniBench: the '{TUNED}' row needs its strengths, chosen on the dev split: run the dev split "
                         f"first (make minibench SPLIT=dev), which writes {CHOICES_FILE.name}")
    return chosen


def plain_sum_row(content: float, style: float) -> str:
    return f"dev: two loaders, content {content:g}, style {style:g}"


# The balance the merge ships with is chosen on the dev split from these (BALANCE_RULE); each mode's row at
# balance 0 is its standard row (BALANCE_ROW_AT_ZERO).
BALANCE_CANDIDATES = (0.0, 0.25, 0.5, 0.75, 0.9)
BALANCE_MODES = ("paper", "weights")
BALANCE_ROW_AT_ZERO = {"paper": "DuoLoRA (shipped defaults)", "weights": "fast: weights-only"}
# The direction check (content hit rises and style hit falls as balance rises) adds one point towards style.
BALANCE_TOWARDS_STYLE = -0.5


def balance_row(mode: str, balance: float) -> str:
    if balance == 0:
        return BALANCE_ROW_AT_ZERO[mode]
    return f"dev: {'DuoLoRA' if mode == 'paper' else 'weights-only'}, balance {balance:+g}"


def _swapped_paper_prior() -> str:
    """The ``paper`` preset with the roles exchanged (content = 16×16 blocks, style = 8×8 blocks), as a
    ``custom_prior`` spec: a diagnostic row for where this world keeps its textures."""
    from duolora.sdxl import CONTENT, PRESETS, STYLE

    paper = PRESETS["paper"]
    parts = [f"{role}: " + ", ".join(b for b, r in paper.items() if r == other)
             for role, other in ((CONTENT, STYLE), (STYLE, CONTENT))]
    return "; ".join(parts)


# The layer priors and Constyle as docs/method.md §3–§4 first specified them (MiniBench 1's defaults) and as the
# released code's shipped script sets them; the share-hinge candidates the dev split chooses among.
_LITERAL = {"prior_preset": "paper", "prior_init": True, "prior_loss": True, "prior_loss_kind": "hinge",
            "margin": 0.0, "lambda_prior": 0.1, "cycle_scale": "fixed", "lambda_cyc": 0.01, "lambda_rev": 0.01}
_RELEASED = {"prior_preset": "code_literal", "prior_init": False, "prior_loss": True, "prior_loss_kind": "code_compat",
             "lambda_prior": 0.01, "cycle_scale": "fixed", "lambda_cyc": 0.1, "lambda_rev": 0.1}
_SHARE = {"prior_preset": "paper", "prior_init": False, "prior_loss": True, "prior_loss_kind": "share_hinge",
          "margin": 0.2, "lambda_prior": 0.1, "prior_push": "both", "cycle_scale": "fixed", "lambda_cyc": 0.01,
          "lambda_rev": 0.01}
# Rows run only when named (--methods): ablations and the variants the dev split chooses among.
VARIANTS: dict[str, dict[str, Any]] = {
    "ZipRank + priors": {"mode": "paper", "method": "ziprank", "constyle_iterations": 0},
    "DuoLoRA, prior roles swapped": {"mode": "paper", "method": "ziprank", "prior_preset": "custom",
                                     "custom_prior": _swapped_paper_prior()},
    "ZipLoRA (in)": {"mode": "paper", "method": "ziplora_in", **_PRIORS_OFF},
    "ZipRank + the paper's literal priors": {"mode": "paper", "method": "ziprank", **_LITERAL,
                                             "constyle_iterations": 0},
    "DuoLoRA as the paper writes it": {"mode": "paper", "method": "ziprank", **_LITERAL, "constyle_iterations": 1},
    "DuoLoRA, released code's settings": {"mode": "paper", "method": "ziprank", **_RELEASED,
                                          "constyle_iterations": 1},
    "dev: ZipRank + share priors δ 0.2": {"mode": "paper", "method": "ziprank", **_SHARE, "constyle_iterations": 0},
    "dev: ZipRank + share priors δ 0.4": {"mode": "paper", "method": "ziprank", **_SHARE, "margin": 0.4,
                                          "constyle_iterations": 0},
    "dev: share priors + Constyle fixed λ 0.01": {"mode": "paper", "method": "ziprank", **_SHARE,
                                                  "constyle_iterations": 1, "cycle_scale": "fixed",
                                                  "lambda_cyc": 0.01, "lambda_rev": 0.01},
    "dev: share priors + Constyle matched λ 0.3": {"mode": "paper", "method": "ziprank", **_SHARE,
                                                   "constyle_iterations": 1, "cycle_scale": "matched",
                                                   "lambda_cyc": 0.3, "lambda_rev": 0.3},
    "dev: share priors push dominant δ 0.2 + Constyle matched λ 0.3": {
        "mode": "paper", "method": "ziprank", **_SHARE, "prior_push": "dominant", "constyle_iterations": 1,
        "cycle_scale": "matched", "lambda_cyc": 0.3, "lambda_rev": 0.3},
    "dev: share priors push dominant δ 0.4 + Constyle matched λ 0.3": {
        "mode": "paper", "method": "ziprank", **_SHARE, "prior_push": "dominant", "margin": 0.4,
        "constyle_iterations": 1, "cycle_scale": "matched", "lambda_cyc": 0.3, "lambda_rev": 0.3},
    "dev: share priors + Constyle matched λ 1": {"mode": "paper", "method": "ziprank", **_SHARE,
                                                 "constyle_iterations": 1, "cycle_scale": "matched",
                                                 "lambda_cyc": 1.0, "lambda_rev": 1.0},
    "dev: shipped priors + Constyle matched λ 0.1": {"mode": "paper", "method": "ziprank", "constyle_iterations": 1,
                                                     "cycle_scale": "matched", "lambda_cyc": 0.1, "lambda_rev": 0.1},
    "dev: weights-only, share priors, keep 10": {"mode": "weights", "method": "ziprank", **_SHARE, "fast_keep": 10.0},
    "dev: layer-wise, share priors, keep 10": {"mode": "layerwise", "method": "ziprank", **_SHARE, "fast_keep": 10.0},
    "dev: layer-wise + 10 %, share priors push dominant, keep 10": {
        "mode": "layerwise+paper", "method": "ziprank", **_SHARE, "prior_push": "dominant", "fast_keep": 10.0,
        "constyle_iterations": 0, "steps_fraction": 0.1},
    "dev: weights-only, share priors, keep 0": {"mode": "weights", "method": "ziprank", **_SHARE, "fast_keep": 0.0},
    "dev: weights-only, share priors, keep 1": {"mode": "weights", "method": "ziprank", **_SHARE, "fast_keep": 1.0},
    "dev: layer-wise, share priors, keep 0": {"mode": "layerwise", "method": "ziprank", **_SHARE, "fast_keep": 0.0},
    "dev: layer-wise, share priors, keep 1": {"mode": "layerwise", "method": "ziprank", **_SHARE, "fast_keep": 1.0},
    "dev: layer-wise + 10 %, share priors, keep 1": {"mode": "layerwise+paper", "method": "ziprank", **_SHARE,
                                                     "fast_keep": 1.0, "constyle_iterations": 0,
                                                     "steps_fraction": 0.1},
    "layer-wise + 10 % paper steps": {"mode": "layerwise+paper", "method": "ziprank", "steps_fraction": 0.1},
    # The grid the tuned plain sum is chosen from (dev split only).
    **{plain_sum_row(c, s): Stack((("content", c), ("style", s))) for c, s in PLAIN_SUM_GRID},
    # The balance candidates the shipped default is chosen from (dev split only; BALANCE_RULE), and the
    # direction check's point towards style.
    **{balance_row(mode, b): {"mode": mode, "method": "ziprank", "balance": b}
       for mode in BALANCE_MODES for b in BALANCE_CANDIDATES if b != 0},
    balance_row("paper", BALANCE_TOWARDS_STYLE): {"mode": "paper", "method": "ziprank",
                                                  "balance": BALANCE_TOWARDS_STYLE},
}


def all_rows() -> dict[str, dict[str, Any] | Stack | KLoRARow | None]:
    return {**ROWS, **VARIANTS}


def byo_pair(content_dir: Path, style_dir: Path) -> Pair:
    """A pair from two folders of images (``make minibench PAIR=content_dir:style_dir``).

    The captions must read "a <word> in <word> style" (the world's caption form): the content word is taken
    from the content captions, the style word from the style captions. Raises ValueError naming the folder.
    """
    c = mb_lora.LoRASpec.from_folder(content_dir, "content")
    s = mb_lora.LoRASpec.from_folder(style_dir, "style")

    def words(spec: mb_lora.LoRASpec, folder: Path) -> tuple[str, str]:
        parts = spec.captions[0].lower().split()
        if len(parts) != 5 or parts[0] != "a" or parts[2] != "in" or parts[4] != "style":
            raise ValueError(f"{folder}: caption {spec.captions[0]!r} must read 'a <shape> in <texture> style' "
                             f"(put it in {folder}/captions.txt, or name the folder a_<shape>_in_<texture>_style)")
        return parts[1], parts[3]

    content_word = words(c, content_dir)[0]
    style_word = words(s, style_dir)[1]
    return Pair(c, s, content_word, style_word, c.captions[0], s.captions[0])


def load_splits(path: Path = SPLITS_FILE) -> dict[str, list[Pair]]:
    """{"dev": [...], "test": [...]} from splits.json (written once by ``make_splits``)."""
    data = json.loads(path.read_text())
    return {k: [builtin_pair(*p.split("×")) for p in data[k]] for k in ("dev", "test")}


def make_splits(seed: int = 2026) -> dict[str, Any]:
    """The one seeded draw of the dev/test split (run once; its result is committed as splits.json).

    The dev split is a transversal of the 3 × 3 grid — three pairs that use every held-out shape and every
    held-out texture once — so both splits see every concept and no concept is judged only on pairs that chose
    the defaults. star × diagonal (MiniBench 1's only pair, already used to choose things) is in dev by rule;
    of the two transversals through it, the seeded draw picks one. The other six pairs are the test split.
    """
    shapes, textures = mb_world.HELD_OUT_SHAPES, mb_world.HELD_OUT_TEXTURES
    options = [dict(zip(shapes, perm, strict=True)) for perm in itertools.permutations(textures)
               if perm[shapes.index("star")] == "diagonal"]
    pick = options[int(torch.randint(len(options), (1,), generator=torch.Generator().manual_seed(seed)))]
    dev = [(s, pick[s]) for s in shapes]
    test = [p for p in mb_world.HELD_OUT_PAIRS if p not in dev]
    rule = " ".join(make_splits.__doc__.split("\n\n")[1].split())
    return {"seed": seed, "rule": rule, "dev": [f"{s}×{t}" for s, t in dev], "test": [f"{s}×{t}" for s, t in test]}


def build_prompt(host, row: str, pair: Pair, seed: int, samples: int, ckpt: str, merge_steps: int,
                 sampler_steps: int, cfg: float) -> tuple[dict, dict]:
    """The API prompt of one (row, pair, seed) run and the ids of its image / merge nodes (miniworld.graph)."""
    stack = stack_of(row)
    merge = merge_widgets(host, row, merge_steps) if is_merge_row(row) else None
    klora = klora_widgets(host, row) if is_klora_row(row) else None
    return graph.build_prompt(host, pair, seed, samples, ckpt, sampler_steps, cfg, merge=merge,
                              stack=stack.parts if stack else (), klora=klora)


def is_merge_row(row: str) -> bool:
    return isinstance(all_rows()[row], dict)


def is_klora_row(row: str) -> bool:
    return isinstance(all_rows()[row], KLoRARow)


def lora_roles(row: str) -> list[str]:
    """The pair's LoRAs a row reads ("content", "style", "joint")."""
    stack = stack_of(row)
    if stack is not None:
        return [role for role, _ in stack.parts]
    return ["content", "style"] if is_merge_row(row) or is_klora_row(row) else []


def klora_widgets(host, row: str) -> dict[str, Any]:
    """The Apply K-LoRA widgets of a K-LoRA row: the node's defaults with the row's overrides, all resolved."""
    from objectinfo import widget_defaults

    resolved = {**widget_defaults(host, graph.KLORA_NODE), **dict(all_rows()[row].widgets)}
    return {k: v for k, v in resolved.items() if not isinstance(v, list)}


def merge_widgets(host, row: str, merge_steps: int) -> dict[str, Any]:
    """The ZipRankMerge widgets of a row: the node's defaults, the row's overrides, the bench's fixed settings.

    Everything is resolved here (defaults included), so a run's record says exactly what ran and a cached run
    can be checked against the row's current widgets.
    """
    from objectinfo import widget_defaults

    widgets = dict(all_rows()[row] or {})
    fraction = widgets.pop("steps_fraction", None)
    steps = max(1, round(merge_steps * fraction)) if fraction is not None else merge_steps
    resolved = {**widget_defaults(host, "DuoLoRA_ZipRankMerge"), **widgets, "steps": steps,
                "compute_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False}
    # The unit's seed is set by the caller; links (lists) are not widgets.
    return {k: v for k, v in resolved.items() if not isinstance(v, list) and k != "seed"}


# Widgets the node gained after runs were cached, at the value that reproduces the older behaviour.
_NEUTRAL_WIDGETS: dict[str, Any] = {"prior_push": "both", "balance": 0.0}
_PRIOR_WIDGETS = ("prior_init", "prior_loss", "prior_loss_kind", "margin", "prior_push", "lambda_prior", "custom_prior")
_CYCLE_WIDGETS = ("constyle_iterations", "cycle_scale", "lambda_cyc", "lambda_rev")


# The fast modes' per-layer objective is engine code, not a widget: its version joins their cache key, so a
# change of the solver re-runs them. 2: each LoRA's reconstruction seen through its own output space
# (duolora.quadratics.own_output_grams); runs of version 1 (the full-output objective) are keyed without it.
FAST_SOLVER_MODES = ("weights", "layerwise", "layerwise+paper")
FAST_SOLVER_VERSION = 2


def effective_widgets(widgets: dict[str, Any]) -> dict[str, Any]:
    """The merge widgets that can change a run's result: a widget whose value has no effect given the others
    (Constyle weights with Constyle off, prior weights with no prior, fast-mode knobs in paper mode, …) is left
    out, and so is a widget added later at its neutral value. Two rows that merge the same way get the same
    cache key even when they spell irrelevant widgets differently, and changing a default only re-runs the
    rows it affects."""
    w = {k: v for k, v in widgets.items() if _NEUTRAL_WIDGETS.get(k, object()) != v}
    if w.get("prior_preset") == "auto":  # MiniBench's model is SDXL-layout: the family's own preset is paper
        w["prior_preset"] = "paper"
    drop: set[str] = set()
    mode, method = w.get("mode"), w.get("method")
    if method in ("direct", "b_lora"):  # nothing learned: only the export's settings matter
        return {k: w[k] for k in ("method", "scope", "prune_threshold", "lora_dtype") if k in w}
    if w.get("prior_preset") == "none" or (not w.get("prior_loss") and not w.get("prior_init")):
        drop.update(_PRIOR_WIDGETS, {"prior_preset"})
    elif not w.get("prior_loss"):
        drop.update(("prior_loss_kind", "margin", "prior_push", "lambda_prior"))
    if w.get("prior_loss_kind") != "share_hinge":
        drop.add("prior_push")
    if w.get("prior_preset") != "custom":
        drop.add("custom_prior")
    if mode in ("weights", "layerwise") or not w.get("constyle_iterations"):
        drop.update(_CYCLE_WIDGETS)
    if mode in ("weights", "layerwise"):
        drop.update(("steps", "learning_rate", "gradient_checkpointing", "prior_init"))
    if mode == "paper":
        drop.add("fast_keep")
    out = {k: v for k, v in w.items() if k not in drop}
    if mode in FAST_SOLVER_MODES:
        out["fast_solver"] = FAST_SOLVER_VERSION
    return out


def run_key(host, row: str, merge_steps: int) -> str:
    """The cache key of a row's runs: its slug for the rows without a merge, else ``m`` + a hash of the merge
    widgets that take effect (``effective_widgets``), so equal merges share runs whatever the row is called."""
    if is_klora_row(row):  # its own prefix: a K-LoRA run never shares a key with a merge or a stack
        blob = json.dumps(klora_widgets(host, row), sort_keys=True)
        return "k" + hashlib.sha1(blob.encode()).hexdigest()[:12]
    if not is_merge_row(row):
        stack = stack_of(row)
        return stack.key if stack else slug(row)
    return widgets_key(merge_widgets(host, row, merge_steps))


def widgets_key(widgets: dict[str, Any]) -> str:
    blob = json.dumps(effective_widgets(widgets), sort_keys=True)
    return "m" + hashlib.sha1(blob.encode()).hexdigest()[:12]


def migrate_cache(out: Path) -> int:
    """Rename cached merge runs to the key of their recorded widgets (after a change of ``effective_widgets``);
    returns how many moved. A run whose new name is taken is left where it is."""
    moved = 0
    for path in sorted((out / "runs").glob("*/m*_s*.json")):
        rec = json.loads(path.read_text())
        if "merge_widgets" not in rec:
            continue
        target = path.parent / f"{widgets_key(rec['merge_widgets'])}_s{rec['seed']}.json"
        if target != path and not target.exists():
            path.rename(target)
            if path.with_suffix(".pt").exists():
                path.with_suffix(".pt").rename(target.with_suffix(".pt"))
            moved += 1
    return moved


def run_path(out: Path, pair: Pair, key: str, seed: int) -> Path:
    return out / "runs" / pair.slug / f"{key}_s{seed}.json"


_FILE_HASHES: dict[Path, str] = {}


def _file_hash(path: Path) -> str:
    path = Path(path).resolve()
    if path not in _FILE_HASHES:
        _FILE_HASHES[path] = hashlib.sha1(path.read_bytes()).hexdigest()
    return _FILE_HASHES[path]


def world_id(ckpt: Path, classifiers: Path, loras: Path, pair: Pair, row: str) -> str:
    """What a run's numbers depend on besides its row: the base, the classifiers and the LoRA files it reads.
    Files missing here (a bring-your-own pair before training) count as their names."""
    files = [Path(ckpt), Path(classifiers), *(Path(loras) / pair.lora_file(r) for r in lora_roles(row))]
    blob = "|".join(_file_hash(f) if f.exists() else f.name for f in files)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def is_current(path: Path, world: str) -> bool:
    """A cached run exists and was run in this world."""
    return path.exists() and json.loads(path.read_text()).get("world") == world


@dataclass
class RunPlan:
    row: str
    pair: Pair
    seed: int
    path: Path


def plan(pairs: list[Pair], rows: list[str], seeds: list[int], out: Path, host, merge_steps: int,
         force: bool, world: dict[tuple[str, str], str]) -> tuple[list[RunPlan], int]:
    """Runs still to do (seed-major, so a run cut short has every row at the first seeds) and the cached count.

    Two rows with the same configuration are planned once. ``world``: (pair slug, row) → ``world_id``; a cached
    run of another world is run again."""
    todo, cached, seen = [], 0, set()
    for seed in seeds:
        for pair in pairs:
            for row in rows:
                path = run_path(out, pair, run_key(host, row, merge_steps), seed)
                if path in seen:
                    continue
                seen.add(path)
                if not force and is_current(path, world[(pair.slug, row)]):
                    cached += 1
                    continue
                todo.append(RunPlan(row, pair, seed, path))
    return todo, cached


# Seconds per run on one 2-core CPU thread (measured 2026-11-30, 32 samples, euler 20 steps); the estimate
# is replaced by this run's own mean as soon as a row has finished once.
_DEFAULT_RUN_S = {"sample": 24.0, "paper": 26.0, "constyle": 38.0, "fast": 4.0}


def _estimate(todo: list[RunPlan], done: dict[str, list[float]], samples: int) -> float:
    total = 0.0
    for r in todo:
        if done.get(r.row):
            total += sum(done[r.row]) / len(done[r.row])
            continue
        w = all_rows()[r.row] if is_merge_row(r.row) else {}
        merge = 0.0
        if w.get("mode") in ("paper", "layerwise+paper") and w.get("method") != "direct":
            frac = w.get("steps_fraction", 1.0)
            constyle = w.get("constyle_iterations", MergeConfig().constyle_iterations)
            merge = (_DEFAULT_RUN_S["constyle"] if constyle else _DEFAULT_RUN_S["paper"]) * frac
        elif w:
            merge = _DEFAULT_RUN_S["fast"]
        total += merge + _DEFAULT_RUN_S["sample"] * samples / 32
    return total


def default_workers() -> int:
    """Worker processes of a run when none is asked: one per CPU core (each samples on one thread), at most 8;
    one on a CUDA GPU (the runs share the device)."""
    if torch.cuda.is_available():
        return 1
    return max(1, min(8, os.cpu_count() or 1))


def run(pairs: list[Pair], rows: list[str], seeds: list[int], out: Path, ckpt: Path, loras: Path,
        classifiers: Path, samples: int, merge_steps: int, sampler_steps: int, cfg: float,
        force: bool = False, workers: int = 1) -> None:
    """Run every missing (pair, row, seed) through the executor and cache its per-sample scores.

    ``workers`` > 1: the runs are dealt round-robin to that many worker processes, each booting its own
    ComfyUI on one thread; this process shows one progress bar over all of them. Every run is cached as it
    finishes, so a failed or interrupted worker loses only its current run; a worker's failure raises
    RuntimeError after the others have finished."""
    from tqdm import tqdm

    host = mb_common.boot()
    world = {(pair.slug, row): world_id(ckpt, classifiers, loras, pair, row) for pair in pairs for row in rows}
    todo, cached = plan(pairs, rows, seeds, out, host, merge_steps, force, world)
    workers = max(1, min(int(workers), len(todo)))
    est = _estimate(todo, {}, samples) / workers
    print(f"MiniBench: {len(pairs)} pair(s) × {len(seeds)} seed(s) × {len(rows)} row(s): {cached} cached, "
          f"{len(todo)} to run on {workers} worker(s), expected ≈ {est / 60:.0f} min on this machine", flush=True)
    if not todo:
        return
    settings = (out, ckpt, loras, classifiers, samples, merge_steps, sampler_steps, cfg, world)
    if workers == 1:
        _run_runs(host, todo, *settings, show=True)
        return
    # Each worker is a fresh `python mb_compare.py --worker PLAN` process (booting ComfyUI exactly as a serial
    # run does); its plan is a pickle of its runs and the settings, its output goes to a log beside the plan.
    scratch = Path(tempfile.mkdtemp(prefix="minibench-workers-"))
    procs, logs = [], []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for i in range(workers):
        plan_file, log = scratch / f"worker{i}.pkl", scratch / f"worker{i}.log"
        plan_file.write_bytes(pickle.dumps((todo[i::workers], settings)))
        with log.open("w") as fh:
            procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(plan_file)],
                                          stdout=fh, stderr=subprocess.STDOUT, env=env))
        logs.append(log)
    bar = tqdm(total=len(todo), unit="run", file=sys.stdout, dynamic_ncols=True, mininterval=5)
    t0 = time.time()

    def finished(r: RunPlan) -> bool:  # written by this invocation (--force re-runs files that exist)
        return r.path.exists() and r.path.stat().st_mtime >= t0

    try:
        while any(proc.poll() is None for proc in procs):
            time.sleep(2.0)
            done = sum(finished(r) for r in todo)
            bar.update(done - bar.n)
            if done:
                left = (time.time() - t0) / done * (len(todo) - done)
                bar.set_postfix_str(f"{workers} workers; ≈ {left / 60:.0f} min left")
        bar.update(sum(finished(r) for r in todo) - bar.n)
    finally:
        for proc in procs:  # Ctrl-C or an error here: stop the workers too; finished runs stay cached
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        bar.close()
    failed = [i for i, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        missing = sum(not finished(r) for r in todo)
        tail = logs[failed[0]].read_text(errors="replace")[-3000:]
        raise RuntimeError(f"MiniBench: worker(s) {failed} failed (exit codes {[procs[i].returncode for i in failed]}; "
                           f"logs in {scratch}); {missing} run(s) are missing and the others are cached — run the "
                           f"same command again to finish them. End of worker {failed[0]}'s log:\n{tail}")
    shutil.rmtree(scratch, ignore_errors=True)


def run_splits(splits: dict[str, list[Pair]], rows: list[str], seeds: dict[str, list[int]], out: Path, **kw: Any
               ) -> None:
    """``run`` on each split (its rows by ``rows_of_split``). Before the tuned plain sum's strengths exist, the dev
    split runs its other rows first, then chooses them (``choose_plain_sum``); the test split refuses to run it.
    After the dev split, ``choose_balance`` records the balance its candidates choose."""
    for split, pairs in splits.items():
        split_rows = rows_of_split(rows, split)
        if TUNED in rows and tuned_stack() is None:
            if split != "dev":
                raise SystemExit(f"MiniBench: the {TUNED!r} row is chosen on the dev split; run the dev split first "
                                 "(make minibench SPLIT=dev)")
            run(pairs, [r for r in split_rows if r != TUNED], seeds[split], out, **kw)
            choose_plain_sum(out, pairs, seeds[split], kw["ckpt"], kw["classifiers"], kw["loras"])
        run(pairs, split_rows, seeds[split], out, **kw)
        if split == "dev" and all(row in split_rows for row in balance_rows()):
            choose_balance(out, pairs, seeds[split], kw["ckpt"], kw["classifiers"], kw["loras"], kw["merge_steps"])


def _worker_main(plan_file: Path) -> int:
    """``--worker PLAN``: run the pickled runs of one worker of ``run`` (its own ComfyUI, one thread, no bar)."""
    todo, settings = pickle.loads(Path(plan_file).read_bytes())
    torch.set_num_threads(1)
    _run_runs(mb_common.boot(), todo, *settings, show=False)
    return 0


def _run_runs(host, todo: list[RunPlan], out: Path, ckpt: Path, loras: Path, classifiers: Path, samples: int,
              merge_steps: int, sampler_steps: int, cfg: float, world: dict[tuple[str, str], str], show: bool) -> None:
    """Execute and cache the planned runs in order (``show``: a progress bar with the expected time left)."""
    from miniworld import classify as mb_classify
    from tqdm import tqdm

    pairs = list({r.pair.slug: r.pair for r in todo}.values())
    needed = {r.pair.lora_file(role) for r in todo for role in lora_roles(r.row)}
    for name in sorted(needed):
        shutil.copyfile(loras / name, host.loras_dir / name)
    scorer = mb_classify.Scorer(classifiers)
    refs = {pair.slug: (mb_lora.reference_images(pair.content)[0], mb_lora.reference_images(pair.style)[0])
            for pair in pairs}
    done: dict[str, list[float]] = {}
    bar = tqdm(todo, unit="run", file=sys.stdout, dynamic_ncols=True, mininterval=5, disable=not show)
    for i, r in enumerate(bar):
        bar.set_postfix_str(f"{r.pair.name} s{r.seed} {r.row[:28]}; ≈ {_estimate(todo[i:], done, samples) / 60:.0f} min left")
        prompt, ids = build_prompt(host, r.row, r.pair, r.seed, samples, str(ckpt), merge_steps, sampler_steps, cfg)
        t0 = time.time()
        result = host.execute(prompt)
        wall = time.time() - t0
        done.setdefault(r.row, []).append(wall)
        images = (result["outputs"][ids["image"]][0].permute(0, 3, 1, 2) * 2 - 1).float().cpu()
        refs_c, refs_s = refs[r.pair.slug]
        per_sample = {
            "content_hit": scorer.hits(images, r.pair.content_word, "shape", refs_c).tolist(),
            "style_hit": scorer.hits(images, r.pair.style_word, "texture", refs_s).tolist(),
            "content_cos": [round(v, 5) for v in scorer.cosine(images, refs_c, "shape").tolist()],
            "style_cos": [round(v, 5) for v in scorer.cosine(images, refs_s, "texture").tolist()],
        }
        rec = {"row": r.row, "pair": r.pair.name, "seed": r.seed, "world": world[(r.pair.slug, r.row)],
               "samples": samples, "sampler": "euler",
               "sampler_steps": sampler_steps, "cfg": cfg, "noise_seed": noise_seed(r.pair, r.seed),
               "prompt_wall_s": round(wall, 2), **{k: round(v, 5) for k, v in mb_stats.unit_means(per_sample).items()},
               "per_sample": per_sample}
        if is_klora_row(r.row):
            rec.update(klora_widgets=klora_widgets(host, r.row), klora_summary=result["outputs"]["klora"][1])
        if ids["merge"] is not None:
            stats = result["outputs"][ids["merge"]][1]
            rec.update(trainable_parameters=int(stats.trainable_parameters), merge_wall_s=round(float(stats.wall_seconds), 2),
                       merge_steps_done=int(stats.steps_done), merge_widgets=merge_widgets(host, r.row, merge_steps),
                       mask_stats=_mask_stats(stats.extra["masks"]))
        r.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(images[:8].clone(), r.path.with_suffix(".pt"))
        tmp = r.path.with_name(r.path.name + ".part")  # a run stopped mid-write leaves no truncated cache entry
        tmp.write_text(json.dumps(rec) + "\n")
        os.replace(tmp, r.path)
    bar.close()




def _mask_stats(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for which in ("m_c", "m_s"):
        vals = [v.detach().flatten().float() for k, v in masks.items() if k.endswith(which)]
        if vals:
            m = torch.cat(vals)
            out[f"{which}_mean"] = round(float(m.mean()), 4)
    return out


# ------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------

# The comparisons every row gets an interval against: what a user does by hand, and the pack's default merge.
REFERENCES = (TUNED, "DuoLoRA (shipped defaults)")


def collect(out: Path, pairs: list[Pair], rows: list[str], seeds: list[int], keys: dict[str, str],
            world: dict[tuple[str, str], str] | None = None) -> dict[str, dict[tuple, dict]]:
    """row → unit (pair name, seed) → record, for the runs present on disk (``keys``: row → run_key); with
    ``world`` ((pair slug, row) → world_id) only the runs of that world."""
    data: dict[str, dict[tuple, dict]] = {}
    for row in rows:
        for pair in pairs:
            for seed in seeds:
                path = run_path(out, pair, keys[row], seed)
                if path.exists():
                    rec = json.loads(path.read_text())
                    if world is None or rec.get("world") == world[(pair.slug, row)]:
                        data.setdefault(row, {})[(pair.name, seed)] = rec
    return data


def summarise(data: dict[str, dict[tuple, dict]], resamples: int = 4000) -> dict[str, Any]:
    """Levels and paired differences (to each of REFERENCES) with bootstrap intervals, per row."""
    summary: dict[str, Any] = {}
    units = {row: {u: mb_stats.unit_means(rec["per_sample"]) for u, rec in recs.items()} for row, recs in data.items()}
    for row, recs in data.items():
        s: dict[str, Any] = {"units": len(recs)}
        for m in mb_stats.METRICS:
            s[m] = mb_stats.mean([v[m] for v in units[row].values()])
        walls = [r["merge_wall_s"] for r in recs.values() if "merge_wall_s" in r]
        s["merge_wall_s"] = mb_stats.mean(walls) if walls else None
        s["trainable_parameters"] = next((r["trainable_parameters"] for r in recs.values()
                                          if "trainable_parameters" in r), None)
        for ref in REFERENCES:
            if ref in units and ref != row and set(units[row]) & set(units[ref]):
                s[f"vs {ref}"] = {m: mb_stats.paired_difference(units[row], units[ref], m, resamples)
                                  for m in ("both_hit", "content_cos", "style_cos")}
        summary[row] = s
    return summary


def _pct(v: float) -> str:
    return "–" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def _d(d: dict | None, pct: bool) -> str:
    if d is None:
        return "–"
    k = 100 if pct else 1
    f = "{:+.1f} [{:+.1f}, {:+.1f}]" if pct else "{:+.3f} [{:+.3f}, {:+.3f}]"
    return f.format(k * d["diff"], k * d["lo"], k * d["hi"])


def tables(summary: dict[str, Any], title: str) -> str:
    """Two markdown tables: levels, then paired differences with 95 % bootstrap intervals."""
    lines = [f"#### {title}: levels (mean over units)", "",
             "| method | units | content hit % | style hit % | both % | content cos | style cos | trainable | merge s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row, s in summary.items():
        tp = f"{s['trainable_parameters']:,}" if s.get("trainable_parameters") is not None else "–"
        ms = f"{s['merge_wall_s']:.1f}" if s.get("merge_wall_s") is not None else "–"
        lines.append(f"| {row} | {s['units']} | {_pct(s['content_hit'])} | {_pct(s['style_hit'])} | "
                     f"{_pct(s['both_hit'])} | {s['content_cos']:.3f} | {s['style_cos']:.3f} | {tp} | {ms} |")
    ra, rb = (_short(r) for r in REFERENCES)
    lines += ["", f"#### {title}: paired differences, mean [95 % bootstrap interval over units]", "",
              (f"| method | Δ both % vs {ra} | Δ content cos vs {ra} | Δ style cos vs {ra} | "
               f"Δ both % vs {rb} | Δ content cos vs {rb} | Δ style cos vs {rb} |"),
              "|---|---|---|---|---|---|---|"]
    for row, s in summary.items():
        a, b = (s.get(f"vs {r}") for r in REFERENCES)
        lines.append(f"| {row} | {_d(a and a['both_hit'], True)} | {_d(a and a['content_cos'], False)} | "
                     f"{_d(a and a['style_cos'], False)} | {_d(b and b['both_hit'], True)} | "
                     f"{_d(b and b['content_cos'], False)} | {_d(b and b['style_cos'], False)} |")
    widths = [(s[f"vs {ref}"][m]["half_width"], m) for s in summary.values() for ref in REFERENCES
              if f"vs {ref}" in s for m in ("both_hit", "content_cos", "style_cos")]
    if widths:
        both = max(w for w, m in widths if m == "both_hit")
        cos = max(w for w, m in widths if m != "both_hit")
        lines += ["", f"Widest interval half-width: both {100 * both:.1f} points, cosines {cos:.4f}."]
    return "\n".join(lines) + "\n"


def _short(row: str) -> str:
    return row.split(" (")[0]


def grid(out: Path, pair: Pair, rows: list[str], seed: int, path: Path, keys: dict[str, str]) -> list[str]:
    """One row of 8 samples per method (the unit (pair, seed)) as a PNG; returns the rows drawn."""
    drawn, images = [], []
    for row in rows:
        pt = run_path(out, pair, keys[row], seed).with_suffix(".pt")
        if pt.exists():
            x = torch.load(pt)[:8]
            images.append(torch.cat([x, torch.ones(8 - len(x), 3, 32, 32)]))
            drawn.append(row)
    if images:
        mb_world.save_png(mb_world.to_uint8_grid(torch.cat(images), 8, scale=3), str(path))
    return drawn


def report(out: Path, splits: dict[str, list[Pair]], rows: list[str], seeds: dict[str, list[int]],
           merge_steps: int = 100, ckpt: Path = mb_common.CHECKPOINTS / "base_ema.safetensors",
           classifiers: Path = mb_common.CLASSIFIERS, loras: Path = mb_common.CHECKPOINTS) -> dict:
    """Tables, summary.json and one grid per split into ``out`` from the runs of this world; prints the tables."""
    host = mb_common.boot()
    if TUNED in rows and tuned_stack() is None:
        print(f"({TUNED!r} is left out: its strengths are chosen on the dev split, which has not run yet)")
        rows = [r for r in rows if r != TUNED]
    keys = {row: run_key(host, row, merge_steps) for row in rows}
    full: dict[str, Any] = {}
    text = []
    for split, pairs in splits.items():
        split_rows = rows_of_split(rows, split)
        world = {(pair.slug, row): world_id(ckpt, classifiers, loras, pair, row) for pair in pairs for row in split_rows}
        keys.update({row: run_key(host, row, merge_steps) for row in split_rows if row not in keys})
        data = collect(out, pairs, split_rows, seeds[split], keys, world)
        if not data:
            continue
        summary = summarise(data)
        full[split] = {"pairs": [p.name for p in pairs], "seeds": seeds[split], "rows": summary}
        t = tables(summary, f"{split} split ({', '.join(p.name for p in pairs)}; seeds {seeds[split][0]}–{seeds[split][-1]})")
        (out / f"{split}_table.md").write_text(t)
        drawn = grid(out, pairs[0], [r for r in split_rows if r in data], seeds[split][0],
                     out / f"{split}_grid.png", keys)
        if drawn:  # a fresh clone has the runs' JSON but not their images (.pt, not committed): keep the grid
            (out / f"{split}_grid_rows.txt").write_text(f"pair {pairs[0].name}, seed {seeds[split][0]}; rows:\n"
                                                    + "\n".join(drawn) + "\n")
        text.append(t)
    (out / "summary.json").write_text(json.dumps(full, indent=1, default=str) + "\n")
    print("\n".join(text))
    return full


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="MiniBench 2: compare merge methods through the real ComfyUI executor.")
    ap.add_argument("--split", choices=["dev", "test", "all"], default="all")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the split's own (mb_common.SEEDS)")
    ap.add_argument("--samples", type=int, default=32, help="images per unit and method")
    ap.add_argument("--merge-steps", type=int, default=100)
    ap.add_argument("--sampler-steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--methods", nargs="*", default=[], help="rows (names or slugs); default the standard rows")
    ap.add_argument("--ckpt", type=Path, default=mb_common.CHECKPOINTS / "base_ema.safetensors")
    ap.add_argument("--loras", type=Path, default=mb_common.CHECKPOINTS)
    ap.add_argument("--classifiers", type=Path, default=mb_common.CLASSIFIERS)
    ap.add_argument("--out", type=Path, default=mb_common.RESULTS)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="only print the tables of the cached runs")
    ap.add_argument("--workers", type=int, default=0,
                    help="processes running comparisons side by side; 0 = one per CPU core (max 8), 1 on a GPU")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one worker of run()
    args = ap.parse_args(argv)
    if args.worker is not None:
        return _worker_main(args.worker)
    torch.set_num_threads(1)
    splits = load_splits()
    if args.split != "all":
        splits = {args.split: splits[args.split]}
    rows = select_rows(args.methods)
    seeds = {k: args.seeds or mb_common.SEEDS[k] for k in splits}
    if not args.report_only:
        run_splits(splits, rows, seeds, args.out, ckpt=args.ckpt, loras=args.loras, classifiers=args.classifiers,
                   samples=args.samples, merge_steps=args.merge_steps, sampler_steps=args.sampler_steps, cfg=args.cfg,
                   force=args.force, workers=args.workers if args.workers > 0 else default_workers())
    report(args.out, splits, rows, seeds, args.merge_steps, args.ckpt, args.classifiers, args.loras)
    return 0


def byo_rows(rows: list[str]) -> list[str]:
    """The rows a bring-your-own pair can run: no ceiling (there is no render of its target to train on), and the
    tuned plain sum only once the dev split has chosen its strengths."""
    return [r for r in rows if not (r == TUNED and tuned_stack() is None) and "joint" not in lora_roles(r)]


def rows_of_split(rows: list[str], split: str) -> list[str]:
    """The rows a split runs: on the dev split, the plain-sum grid the tuned plain sum is chosen from and the balance
    candidates the shipped balance is chosen from join them."""
    rows = list(rows)
    if split == "dev" and TUNED in rows:
        rows += [plain_sum_row(c, s) for c, s in PLAIN_SUM_GRID]
    if split == "dev" and all(row in rows for row in BALANCE_ROW_AT_ZERO.values()):
        rows += [r for r in balance_rows() if r not in rows]
    return rows


def balance_rows() -> list[str]:
    """The rows BALANCE_RULE reads: each mode at each candidate, and paper mode towards style."""
    rows = [balance_row(mode, b) for mode in BALANCE_MODES for b in BALANCE_CANDIDATES]
    return [*rows, balance_row("paper", BALANCE_TOWARDS_STYLE)]


PLAIN_SUM_RULE = (
    "The tuned plain sum is the point of the grid PLAIN_SUM_GRID (content strength 0.75, 1 or 1.25 × style strength "
    "0.25, 0.5, 0.75 or 1, two LoraLoaderModelOnly nodes) with the highest mean both-hit over the dev split's units; "
    "points within 1 percentage point of the best are tied, and a tie goes to the point nearest to (1, 1) in "
    "|content − 1| + |style − 1|, then to the higher style strength. It is chosen once, from the dev runs at "
    "mb_common.SEEDS['dev'], and written to choices.json; the test split only reports it.")


def dev_levels(out: Path, pairs: list[Pair], rows: list[str], seeds: list[int], keys: dict[str, str], ckpt: Path,
               classifiers: Path, loras: Path, chooser: str, what: str) -> Callable[[str, str], float]:
    """``level(row, metric)``: the mean over the dev units of a row's per-sample metric, from the cached runs of
    this world. Raises RuntimeError (naming ``chooser`` and ``what`` the rows are) when a row lacks a unit."""
    world = {(pair.slug, row): world_id(ckpt, classifiers, loras, pair, row) for pair in pairs for row in rows}
    data = collect(out, pairs, rows, seeds, keys, world)
    want = len(pairs) * len(seeds)
    missing = [row for row in rows if len(data.get(row, {})) < want]
    if missing:
        raise RuntimeError(f"{chooser}: the dev runs of {len(missing)} {what} are missing "
                           f"({missing[0]!r} …); run the dev split first")

    def level(row: str, metric: str) -> float:
        return mb_stats.mean([mb_stats.unit_means(rec["per_sample"])[metric] for rec in data[row].values()])

    return level


def choose_plain_sum(out: Path, pairs: list[Pair], seeds: list[int], ckpt: Path, classifiers: Path,
                     loras: Path, path: Path | None = None) -> Stack:
    """Apply PLAIN_SUM_RULE to the dev runs of the grid and record the choice (with every candidate's both-hit)."""
    path = path or CHOICES_FILE
    rows = [plain_sum_row(c, s) for c, s in PLAIN_SUM_GRID]
    level = dev_levels(out, pairs, rows, seeds, {row: stack_of(row).key for row in rows}, ckpt, classifiers, loras,
                       "choose_plain_sum", "grid point(s)")
    both = {cs: level(row, "both_hit") for cs, row in zip(PLAIN_SUM_GRID, rows, strict=True)}
    best = max(both.values())
    tied = [cs for cs, v in both.items() if v >= best - 0.01]
    chosen = min(tied, key=lambda cs: (abs(cs[0] - 1) + abs(cs[1] - 1), -cs[1]))
    record = json.loads(path.read_text()) if path.exists() else {}
    record["tuned_plain_sum"] = {
        "rule": PLAIN_SUM_RULE, "pairs": [p.name for p in pairs], "seeds": seeds,
        "both_hit": {f"content {c:g}, style {s:g}": round(v, 4) for (c, s), v in both.items()},
        "chosen": {"content": chosen[0], "style": chosen[1]},
    }
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"tuned plain sum (dev split): content {chosen[0]:g}, style {chosen[1]:g} "
          f"(both-hit {100 * both[chosen]:.1f} %; best {100 * best:.1f} %)")
    return tuned_stack(path)


BALANCE_RULE = (
    "The balance the merge ships with (MergeConfig.balance, one value for every mode) is the candidate of "
    "BALANCE_CANDIDATES (0, 0.25, 0.5, 0.75, 0.9) with the highest both-hit averaged over paper mode (DuoLoRA at the "
    "other shipped defaults) and weights-only mode, each the mean over the dev split's units at "
    "mb_common.SEEDS['dev']; candidates within 2 percentage points of the best are tied, and a tie goes to the "
    "value nearest 0 (the paper's balance). Chosen once and written to choices.json; the test split only reports "
    "it. The direction check, reported beside it and choosing nothing: in paper mode at balance -0.5, 0 and the "
    "chosen value (or +0.5 when 0 is chosen), content hit rises and style hit falls as balance rises.")


def choose_balance(out: Path, pairs: list[Pair], seeds: list[int], ckpt: Path, classifiers: Path, loras: Path,
                   merge_steps: int, path: Path | None = None) -> float:
    """Apply BALANCE_RULE to the dev runs of the balance rows and record the choice in choices.json (with every
    candidate's both-hit per mode, and the direction check's content and style hits)."""
    path = path or CHOICES_FILE
    names = balance_rows()
    host = mb_common.boot()
    level = dev_levels(out, pairs, names, seeds, {row: run_key(host, row, merge_steps) for row in names}, ckpt,
                       classifiers, loras, "choose_balance", "balance row(s)")
    per_mode = {(mode, b): level(balance_row(mode, b), "both_hit") for mode in BALANCE_MODES
                for b in BALANCE_CANDIDATES}
    both = {b: mb_stats.mean([per_mode[(mode, b)] for mode in BALANCE_MODES]) for b in BALANCE_CANDIDATES}
    best = max(both.values())
    chosen = min((b for b, v in both.items() if v >= best - 0.02), key=abs)
    direction = [BALANCE_TOWARDS_STYLE, 0.0, chosen if chosen != 0 else 0.5]
    check = {f"{b:+g}": {"content_hit": round(level(balance_row("paper", b), "content_hit"), 4),
                         "style_hit": round(level(balance_row("paper", b), "style_hit"), 4)} for b in direction}
    hits = list(check.values())
    monotone = all(x["content_hit"] <= y["content_hit"] and x["style_hit"] >= y["style_hit"]
                   for x, y in itertools.pairwise(hits))
    record = json.loads(path.read_text()) if path.exists() else {}
    record["balance"] = {
        "rule": BALANCE_RULE, "pairs": [p.name for p in pairs], "seeds": seeds,
        "both_hit": {f"{mode} {b:+g}": round(v, 4) for (mode, b), v in per_mode.items()},
        "both_hit_mean": {f"{b:+g}": round(v, 4) for b, v in both.items()},
        "chosen": chosen, "direction_check": {"paper": check, "monotone": monotone},
    }
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"balance (dev split): {chosen:+g} (both-hit {100 * both[chosen]:.1f} %, mean of paper and weights-only; "
          f"best {100 * best:.1f} %); direction check in paper mode {'holds' if monotone else 'does not hold'}")
    return chosen


def select_rows(names: list[str]) -> list[str]:
    """The rows named (by name or slug), in table order; the standard rows when none is named."""
    if not names:
        return list(ROWS)
    known = all_rows()
    picked = [r for r in known if r in names or slug(r) in names]
    unknown = [n for n in names if n not in known and n not in {slug(r) for r in known}]
    if unknown:
        raise SystemExit(f"unknown MiniBench row(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return picked


if __name__ == "__main__":
    raise SystemExit(main())
