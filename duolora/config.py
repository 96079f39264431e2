"""``MergeConfig``: every knob of a merge in one validated dataclass, and the vocabularies it checks.

This module is a leaf of the engine (it imports only ``duolora.sdxl``), so the modules that read a
config — ``mergers``, ``priors``, ``optimize``, the fast-mode solver and ``engine`` — import it without
importing each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .sdxl import PRESET_NAMES, preset_roles

METHODS: tuple[str, ...] = ("ziprank", "ziplora_out", "ziplora_in", "direct", "b_lora")
BASES: tuple[str, ...] = ("svd", "raw")
SCOPES: tuple[str, ...] = ("attention", "all")
# "layerwise_paper": the layer-wise solve as the starting point of ``steps`` paper steps.
OBJECTIVES: tuple[str, ...] = ("paper", "layerwise", "weights_only", "layerwise_paper")
# "share_hinge": the scale-free hinge on kept nuclear-norm shares (the default since MiniBench 2);
# "hinge": docs/method.md §3 literally (κ‖m_dom‖₁ + ν·max(0, ‖m_other‖₁ − ‖m_dom‖₁ + margin));
# "code_compat": the released code's L2 form.
PRIOR_LOSS_KINDS: tuple[str, ...] = ("share_hinge", "hinge", "code_compat")
# Paper mode's share_hinge: "both" moves both LoRAs' shares; "dominant" only raises the block's own LoRA.
PRIOR_PUSHES: tuple[str, ...] = ("both", "dominant")
# How the Constyle cycle terms are weighted: "fixed" = λ·L (the paper); "matched" = λ·L scaled so that its
# gradient is as large as its reconstruction term's (objective.DuoLoRAObjective).
CYCLE_SCALES: tuple[str, ...] = ("fixed", "matched")
DEFAULT_PRUNE_THRESHOLD = 1e-3


@dataclass
class MergeConfig:
    """Every knob of a merge, with the defaults of docs/method.md (§2–§4).

    ``lambda_sim`` None means the method's default: 0 for ZipRank/DuoLoRA, 0.01 for ZipLoRA.
    ``lambda_content``/``lambda_style`` weight the reconstruction terms (1 in the paper; 0 switches one off);
    ``balance`` trades them against each other (``reconstruction_weights``: what every mode uses).
    ``objective`` names the objective; ``duolora.engine.run_merge`` runs any of them (``optimize`` runs
    "paper", ``duolora.solver`` the fast ones).
    """

    method: str = "ziprank"
    basis: str = "svd"
    scope: str = "attention"
    objective: str = "paper"
    steps: int = 100
    lr: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    prior_preset: str = "paper"
    custom_prior: str = ""
    prior_init: bool = False
    prior_loss: bool = True
    prior_loss_kind: str = "share_hinge"
    tau_c: float = 0.75
    tau_s: float = 0.5
    kappa: float = 1.0
    nu: float = 1.0
    margin: float = 0.4
    prior_push: str = "dominant"
    # Off by default since MiniBench 2 (dev split, 2026-12-01): the cycle terms add nothing to both-hit and cost
    # style similarity; 1 = the paper's round trip (at the matched λ 0.3 below).
    constyle_iterations: int = 0
    lambda_content: float = 1.0
    lambda_style: float = 1.0
    # One knob from style (−1) to content (+1): the two reconstruction terms weigh λ_c·(1 + b) and λ_s·(1 − b)
    # (``reconstruction_weights``). 0 is the paper's objective exactly; ±1 keeps only one LoRA's term.
    balance: float = 0.0
    lambda_cyc: float = 0.3
    lambda_rev: float = 0.3
    lambda_prior: float = 0.1
    lambda_sim: float | None = None
    cycle_scale: str = "matched"
    # Fast modes only: γ·Σᵢ shareᵢ·(1 − mᵢ)² per LoRA and layer (shareᵢ = σᵢ/Σσ), in units of the layer's
    # normalised reconstruction: keeps each LoRA's dominant singular directions near full strength.
    fast_keep: float = 0.0
    prune_threshold: float = DEFAULT_PRUNE_THRESHOLD
    # Opt-in rank budget: keep at most this many components of each LoRA per layer in the export (those
    # with the largest σᵢ·|mᵢ|); 0 keeps every component the prune threshold keeps.
    max_rank: int = 0
    w_c: float = 1.0
    w_s: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and what is allowed."""
        choices = {
            "method": METHODS, "basis": BASES, "scope": SCOPES, "objective": OBJECTIVES,
            "prior_preset": PRESET_NAMES, "prior_loss_kind": PRIOR_LOSS_KINDS, "cycle_scale": CYCLE_SCALES,
            "prior_push": PRIOR_PUSHES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"MergeConfig.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
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
