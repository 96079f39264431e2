"""``MergeConfig``: every knob of a merge in one validated dataclass, and the vocabularies it checks.

This module is a leaf of the engine (it imports only the family tables, ``duolora.families``), so the modules that read a
config — ``mergers``, ``priors``, ``optimize``, the fast-mode solver and ``engine`` — import it without
importing each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .families import PRESET_NAMES, preset_roles

METHODS: tuple[str, ...] = ("ziprank", "ziplora_out", "ziplora_in", "direct", "b_lora")
BASES: tuple[str, ...] = ("svd", "raw")
SCOPES: tuple[str, ...] = ("attention", "all")
# "layerwise_paper": the layer-wise solve as the starting point of ``steps`` paper steps.
OBJECTIVES: tuple[str, ...] = ("paper", "layerwise", "weights_only", "layerwise_paper")
# The modes as users name them (the node's ``mode``, a file's ``duolora_mode``) -> the objective each runs.
MODES: dict[str, str] = {"paper": "paper", "layerwise": "layerwise", "weights": "weights_only",
                         "layerwise+paper": "layerwise_paper"}
MODE_OF: dict[str, str] = {objective: mode for mode, objective in MODES.items()}
# "share_hinge": the scale-free hinge on kept nuclear-norm shares (the default);
# "hinge": the paper's form (κ‖m_dom‖₁ + ν·max(0, ‖m_other‖₁ − ‖m_dom‖₁ + margin));
# "code_compat": the released code's L2 form.
PRIOR_LOSS_KINDS: tuple[str, ...] = ("share_hinge", "hinge", "code_compat")
# Paper mode's share_hinge: "both" moves both LoRAs' shares; "dominant" only raises the block's own LoRA.
PRIOR_PUSHES: tuple[str, ...] = ("both", "dominant")
# How the Constyle cycle terms are weighted: "fixed" = λ·L (the paper); "matched" = λ·L scaled so that its
# gradient is as large as its reconstruction term's (objective.DuoLoRAObjective).
CYCLE_SCALES: tuple[str, ...] = ("fixed", "matched")
DEFAULT_PRUNE_THRESHOLD = 1e-3


def objective_of(mode: str) -> str:
    """The objective a mode runs; takes a user's mode name ("weights") or an objective name ("weights_only"),
    the spelling files and workflows written before the two vocabularies agreed may hold."""
    return MODES.get(mode, mode)


def mode_of(objective: str) -> str:
    """The user's name of a mode from either vocabulary ("weights_only" and "weights" both give "weights")."""
    return MODE_OF.get(objective, objective)


def knob(default: Any, help: str, *, ui: str | None = None, cli: str | None = None, advanced: bool = True,
         min: float | None = None, max: float | None = None, step: float | None = None,
         choices: Sequence[str] | None = None, cli_choices: Sequence[str] | None = None,
         none: str | None = None) -> Any:
    """A ``MergeConfig`` field with everything the node, the command line and the docs say about it.

    ``help``: one sentence in the user's words (the node's tooltip, the command's help). ``ui``: the node's input
    id (None: not on the node); ``advanced``: behind the node's advanced switch. ``cli``: the option of
    ``duolora merge`` (None: not on the command line; "--no-…" for a switch that turns a True knob off).
    ``min``/``max``/``step``: the node widget's bounds. ``choices``: the values the knob takes;
    ``cli_choices``: the ones ``duolora merge`` offers when fewer. ``none``: what None means for a knob whose
    default is None (the node shows it as -1).
    """
    meta = {"help": help, "ui": ui, "cli": cli, "advanced": advanced, "min": min, "max": max, "step": step,
            "choices": None if choices is None else tuple(choices),
            "cli_choices": None if cli_choices is None else tuple(cli_choices), "none": none}
    return field(default=default, metadata=meta)


@dataclass
class MergeConfig:
    """Every knob of a merge with its default, in the order the ZipRank Merge node shows them (those not on the
    node last); each field's metadata (``knob``) is the one place its help, bounds and names are declared.

    ``lambda_sim`` None means the method's default: 0 for ZipRank/DuoLoRA, 0.01 for ZipLoRA.
    ``lambda_content``/``lambda_style`` weight the reconstruction terms (1 in the paper; 0 switches one off);
    ``balance`` trades them against each other (``reconstruction_weights``: what every mode uses).
    ``objective`` names the objective; ``duolora.engine.run_merge`` runs any of them (``optimize`` runs
    "paper", ``duolora.solver`` the fast ones).
    """

    objective: str = knob(
        "paper", "weights: from the two LoRA files alone (seconds to a minute); paper: learns from your reference "
        "pictures and prompts (the paper's method, minutes); layerwise, layerwise+paper: in between.",
        ui="mode", advanced=False, choices=OBJECTIVES)
    method: str = knob(
        "ziprank", "ziprank: DuoLoRA's merge; direct: the two LoRAs simply added; ziplora_out, ziplora_in and "
        "b_lora: the methods DuoLoRA is compared with.",
        ui="method", cli="--method", advanced=False, choices=METHODS, cli_choices=("ziprank", "direct", "b_lora"))
    # One knob from style (−1) to content (+1): the two reconstruction terms weigh λ_c·(1 + b) and λ_s·(1 − b)
    # (``reconstruction_weights``). 0 is the paper's objective exactly; ±1 keeps only one LoRA's term.
    balance: float = knob(
        0.0, "Where the two LoRAs collide: towards +1 keep more of the subject, towards -1 more of the style (0: "
        "the paper's balance; not for direct or b_lora).",
        ui="balance", cli="--balance", advanced=False, min=-1.0, max=1.0, step=0.05)
    steps: int = knob(
        100, "Learning steps of the paper modes (the paper uses 100; weights and layerwise ignore it).",
        ui="steps", advanced=False, min=0, max=10000)
    lr: float = knob(
        0.01, "How fast the masks change per step (the paper uses 0.01).",
        ui="learning_rate", min=0.0, max=1.0, step=0.0001)
    seed: int = knob(
        0, "Seed of paper mode's random timesteps, noise and starting masks.",
        ui="seed", cli="--seed", min=0, max=0xFFFFFFFFFFFFFFFF)
    prior_preset: str = knob(
        "auto", "Which blocks carry the subject and which the style (auto: the model's own, paper on SDXL, none on "
        "Flux.1; flux_splitflux: Flux.1's single blocks 0-9 the subject, 10-37 the style).",
        ui="prior_preset", cli="--priors", choices=PRESET_NAMES)
    custom_prior: str = knob(
        "", "Block roles for prior_preset 'custom', e.g. 'content: in7, in8, mid; style: out3' (or click the "
        "blocks in the diagram).",
        ui="custom_prior", cli="--custom-prior")
    prior_init: bool = knob(
        False, "Start paper mode from the layer priors instead of from the plain sum of both LoRAs.",
        ui="prior_init")
    prior_loss: bool = knob(
        True, "Push each block toward the LoRA the layer priors give it.",
        ui="prior_loss", cli="--no-prior-loss")
    prior_loss_kind: str = knob(
        "share_hinge", "share_hinge: each block's own LoRA keeps at least `margin` more of its strength than the "
        "other; hinge and code_compat: the paper's and its code's forms.",
        ui="prior_loss_kind", cli="--prior-loss-kind", choices=PRIOR_LOSS_KINDS)
    margin: float = knob(
        0.4, "How much more of its strength each block's own LoRA keeps (share_hinge).",
        ui="margin", cli="--margin", min=0.0, max=10.0, step=0.001)
    prior_push: str = knob(
        "dominant", "both: the priors may weaken the other LoRA in a block; dominant: they only strengthen the "
        "block's own LoRA.",
        ui="prior_push", choices=PRIOR_PUSHES)
    # Off by default: on the benchmark's dev split the cycle terms added nothing to both-hit and cost style
    # similarity; 1 = the paper's round trip (at the matched λ 0.3 below).
    constyle_iterations: int = knob(
        0, "Round trips of the paper's Constyle cycle loss (0 = off, the default; above 0 it needs "
        "combined_prompt).",
        ui="constyle_iterations", min=0, max=8)
    cycle_scale: str = knob(
        "matched", "fixed: the cycle losses weigh λ as in the paper; matched: each pulls as hard as its "
        "reconstruction loss at λ = 1.",
        ui="cycle_scale", choices=CYCLE_SCALES)
    lambda_cyc: float = knob(
        0.3, "Weight of the style cycle loss (Constyle).", ui="lambda_cyc", min=0.0, max=100.0, step=0.001)
    lambda_rev: float = knob(
        0.3, "Weight of the content cycle loss (Constyle).", ui="lambda_rev", min=0.0, max=100.0, step=0.001)
    lambda_prior: float = knob(
        0.1, "Weight of the layer priors' push.",
        ui="lambda_prior", cli="--lambda-prior", min=0.0, max=100.0, step=0.001)
    lambda_sim: float | None = knob(
        None, "Weight of the mask-overlap penalty.",
        ui="lambda_sim", cli="--lambda-sim", min=-1.0, max=100.0, step=0.001,
        none="the method's, 0 for ziprank and 0.01 for ziplora")
    basis: str = knob(
        "svd", "svd: masks on each LoRA's singular directions (the paper); raw: on its stored rank components (the "
        "released code).",
        ui="basis", cli="--basis", choices=BASES)
    scope: str = knob(
        "attention", "attention: learn on attention layers and add the rest (the paper); all: learn on every layer "
        "both LoRAs change.",
        ui="scope", cli="--scope", choices=SCOPES)
    prune_threshold: float = knob(
        DEFAULT_PRUNE_THRESHOLD, "Rank components whose mask ends below this are left out of the merged LoRA.",
        ui="prune_threshold", cli="--prune-threshold", min=0.0, max=1.0, step=0.0001)
    # Opt-in rank budget: keep at most this many components of each LoRA per layer in the export (those
    # with the largest σᵢ·|mᵢ|); 0 keeps every component the prune threshold keeps.
    max_rank: int = knob(
        0, "For a smaller file, keep at most this many of each LoRA's strongest components per layer (0 = no "
        "limit).",
        ui="max_rank", cli="--max-rank", min=0, max=4096)
    # Fast modes only: γ·Σᵢ shareᵢ·(1 − mᵢ)² per LoRA and layer (shareᵢ = σᵢ/Σσ), in units of the layer's
    # normalised reconstruction: keeps each LoRA's dominant singular directions near full strength.
    fast_keep: float = knob(
        0.0, "Fast modes: how firmly each LoRA's strongest directions stay at full strength (0 = not at all).",
        ui="fast_keep", cli="--fast-keep", min=0.0, max=100.0, step=0.001)
    kappa: float = knob(
        1.0, "Weight κ of the dominant LoRA's mask in the hinge and code_compat prior losses.", cli="--kappa")
    nu: float = knob(1.0, "Weight ν of the prior losses' hinge between the two LoRAs.", cli="--nu")
    lambda_content: float = knob(1.0, "Weight of the content reconstruction term.", cli="--lambda-content")
    lambda_style: float = knob(1.0, "Weight of the style reconstruction term.", cli="--lambda-style")
    w_c: float = knob(
        1.0, "Weight of each content LoRA in the layers merged as a plain sum (text encoders, layers out of "
        "scope).", cli="--w-c")
    w_s: float = knob(1.0, "Weight of the style LoRA in the layers merged as a plain sum.", cli="--w-s")
    grad_clip: float = knob(1.0, "Largest gradient norm of a paper step (0 = no clipping).")
    tau_c: float = knob(
        0.75, "Where paper mode starts from the priors, the other LoRA's starting mask keeps the entries above "
        "this.")
    tau_s: float = knob(
        0.5, "Where paper mode starts from the priors, the block's own LoRA's starting mask keeps the entries "
        "above this.")

    def __post_init__(self) -> None:
        # The user's mode names ("weights") are accepted for the objective they run ("weights_only").
        self.objective = objective_of(self.objective)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and what is allowed."""
        for f in dataclasses.fields(self):
            allowed = f.metadata["choices"]
            if allowed is not None and getattr(self, f.name) not in allowed:
                raise ValueError(f"MergeConfig.{f.name}={getattr(self, f.name)!r} is not one of {', '.join(allowed)}")
        for name in ("steps", "constyle_iterations", "max_rank"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"MergeConfig.{name} must be ≥ 0, got {getattr(self, name)}")
        for name in ("lr", "grad_clip", "prune_threshold", "fast_keep"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"MergeConfig.{name} must be ≥ 0, got {getattr(self, name)}")
        b = float(self.balance)
        if not -1.0 <= b <= 1.0:
            raise ValueError(f"MergeConfig.balance must be between -1 (style) and 1 (content), got {self.balance}")
        if self.prior_preset == "custom":
            preset_roles("custom", self.custom_prior)  # raises ValueError on a malformed block list

    @property
    def effective_lambda_sim(self) -> float:
        if self.lambda_sim is not None:
            return float(self.lambda_sim)
        return 0.01 if self.method.startswith("ziplora") else 0.0

    @property
    def reconstruction_weights(self) -> tuple[float, float]:
        """(weight of the content reconstruction term, weight of the style one): λ_c·(1 + b), λ_s·(1 − b) with
        b = ``balance``. Moving b towards +1 makes the merge keep what the content LoRA does where the two LoRAs
        collide, towards −1 the style LoRA's; their sum is unchanged for λ_c = λ_s, so the balance trades one
        term against the other without weakening the reconstruction against the priors. At b = 0 the weights
        are λ_c and λ_s themselves (the merge is bit for bit the one without the knob)."""
        b = float(self.balance)
        if b == 0.0:
            return float(self.lambda_content), float(self.lambda_style)
        return float(self.lambda_content) * (1.0 + b), float(self.lambda_style) * (1.0 - b)

    def roles(self) -> dict[str, str]:
        """Block -> "content"/"style" for the chosen prior preset."""
        return preset_roles(self.prior_preset, self.custom_prior)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MergeConfig:
        """Inverse of ``to_dict``; unknown keys are an error (a misspelt knob must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MergeConfig key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**data)


KNOBS: tuple[dataclasses.Field, ...] = dataclasses.fields(MergeConfig)
_BY_NAME = {f.name: f for f in KNOBS}


def default(name: str) -> Any:
    """The default of the knob ``name``, for functions that take a knob as an argument."""
    return _BY_NAME[name].default


def ui_value(f: dataclasses.Field, value: Any) -> Any:
    """A knob's value as the node shows it: the user's mode name, -1 for None."""
    if f.name == "objective":
        return mode_of(value)
    if value is None and f.metadata["none"] is not None:
        return -1.0
    return value


def from_ui(f: dataclasses.Field, value: Any) -> Any:
    """A node widget's value as the knob's value (the inverse of ``ui_value``)."""
    if f.name == "objective":
        return objective_of(value)
    if f.metadata["none"] is not None:
        return None if float(value) < 0 else float(value)
    kind = type(f.default)
    return kind(value) if kind in (bool, int, float) else value


def from_widgets(values: Mapping[str, Any]) -> MergeConfig:
    """The config a node's widget values ask for (by input id); a knob without a widget value keeps its
    default, so a workflow saved before a knob existed runs with that knob's default."""
    return MergeConfig(**{f.name: from_ui(f, values[f.metadata["ui"]]) for f in KNOBS
                          if f.metadata["ui"] is not None and f.metadata["ui"] in values})
