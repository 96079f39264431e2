"""Evaluate a merger inside any torch model, with masks that differ per batch element.

For every canonical layer name given with its module (``nn.Linear`` or ``nn.Conv2d``, subclasses such as
ComfyUI's ops included) the adapter adds the low-rank path of every LoRA of the merger to the module's output:

    rank masks:  y += ((x·Aᵀ) ⊙ m)·Bᵀ          out masks: y += ((x·Aᵀ)·Bᵀ) ⊙ m          in masks: y += ((x ⊙ m)·Aᵀ)·Bᵀ

(conv: the down projection is a convolution with the base module's kernel size, stride, padding and
dilation, the up projection a 1×1 convolution). The mask of each batch element comes from its *branch*
(docs/method.md §4: "all three LoRA configurations are the same adapter with different masks"):

* ``"merged"``  — the merger's own masks (learned ones carry gradient);
* ``"content"`` — the content LoRA alone, mask (1, 0); with several content LoRAs the first one alone,
  ``"content2"``, ``"content3"``, … the others (``content_branch``);
* ``"style"``   — the style LoRA alone, mask (0, 1);
* ``"base"``    — no LoRA at all, mask (0, 0);
* ``(a, b)``    — constant masks (a, b), e.g. (1.0, 1.0) for the plain direct merge; one weight per LoRA of
  the merger, in its tag order (content LoRAs, then the style LoRA).

So ε_m, ε_c and ε_s come from ONE batched forward. What a call costs depends on whether its masks need a
gradient (a step's cost should be what the model costs; issue 11):

* **masks with gradient** (grad mode on, a ``"merged"`` element, a learned layer): the low-rank path above,
  with the merger's own masks when every element is ``"merged"`` and per-element mask rows otherwise;
* **constant masks** (everything else: the no-grad targets of paper mode, fixed layers, …): each run of
  consecutive elements with the same branch is one fixed ΔW = B·diag(m)·A. Without grad mode, where the
  module's weight is directly usable (``foldable``) and it costs fewer flops, ΔW is folded into the weight
  for that call — y = x·(W + ΔW)ᵀ + b, what a static patch computes — else the run gets the low-rank path
  with its constant masks folded into the factors (no mask multiply, only the LoRAs the run uses).

A layer may also be given one branch for every element (``set_layer_branches``: a sampling-time rule such as
``duolora.klora`` picks one LoRA per layer and step); it is evaluated like a run of constant masks.

Every module's ``forward`` is wrapped while attached; ``remove`` (or leaving the context manager) restores
every module exactly (same parameters, same forward, no attribute left behind).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .mergedlayer import IN, OUT, RANK, MergedLayer
from .mergers import STYLE_TAG, Merger

if TYPE_CHECKING:
    from typing_extensions import Self

Branch = str | tuple[float, ...]
MERGED, CONTENT, STYLE, BASE = "merged", "content", "style", "base"
BRANCH_NAMES: tuple[str, ...] = (MERGED, CONTENT, STYLE, BASE)
# How a call with constant masks is evaluated: "auto" folds ΔW into the weight where that is cheaper,
# "fold" wherever the module allows it, "lowrank" never folds, "masks" uses the per-element mask path for
# every call (how every call was evaluated before issue 11; kept to measure against and to test with).
CONSTANT_PATHS: tuple[str, ...] = ("auto", "fold", "lowrank", "masks")
# Storage-only dtypes (ComfyUI's fp8 weights): never a dtype to multiply in.
_STORAGE_ONLY = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                             "float8_e8m0fnu") if hasattr(torch, n)}
_FOLD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The fold-or-low-rank choice charges each extra operation (kernel launch, dispatch) as this many
# multiply-adds: about what one CPU core does in the few microseconds an operation costs. Small layers then
# fold (fewer operations); large ones decide by arithmetic alone.
OP_COST = 65536
_MISSING = object()


class AdapterError(ValueError):
    """A module or branch the adapter cannot work with; the message names the layer."""


def content_branch(index: int) -> str:
    """The branch of the content LoRA at ``index`` (0-based) alone: "content", then "content2", "content3", …"""
    return CONTENT if index == 0 else f"{CONTENT}{index + 1}"


def _content_index(b: str) -> int | None:
    """0 for "content", k − 1 for "content<k>" (k ≥ 2), None for any other name."""
    if b == CONTENT:
        return 0
    if b.startswith(CONTENT) and b[len(CONTENT):].isdigit() and int(b[len(CONTENT):]) >= 2:
        return int(b[len(CONTENT):]) - 1
    return None


def _check_branch(b: Branch, n_loras: int = 2) -> Branch:
    if isinstance(b, str):
        index = _content_index(b)
        if b not in BRANCH_NAMES and index is None:
            raise AdapterError(f"unknown branch {b!r}; use one of {', '.join(BRANCH_NAMES)}, content2, content3, … "
                               "or a tuple of one weight per LoRA")
        if index is not None and index >= n_loras - 1:
            raise AdapterError(f"branch {b!r} names content LoRA {index + 1}, but the merger has "
                               f"{n_loras - 1} content LoRA(s)")
        return b
    if isinstance(b, tuple) and len(b) == n_loras:
        return tuple(float(x) for x in b)
    raise AdapterError(f"branch {b!r} must be a name ({', '.join(BRANCH_NAMES)}, content2, …) or a tuple of "
                       f"{n_loras} weights, one per LoRA of the merger")


def branch_weights(branch: Branch, tags: Sequence[str]) -> tuple[float, ...]:
    """The constant mask weight of each LoRA (in ``tags`` order) under a branch other than ``"merged"``."""
    if isinstance(branch, tuple):
        return branch
    if branch == BASE:
        return (0.0,) * len(tags)
    if branch == STYLE:
        return tuple(1.0 if t == STYLE_TAG else 0.0 for t in tags)
    index = _content_index(branch)
    return tuple(1.0 if i == index else 0.0 for i in range(len(tags)))


def plain_weight(module: nn.Module) -> bool:
    """True when ``module``'s forward is torch's own ``nn.Linear``/``nn.Conv2d`` forward: its output is
    exactly ``F.linear(x, weight, bias)`` (or the convolution), so ΔW may be folded into ``weight`` for a call.
    Hosts whose modules compute differently (cast weights, per-forward weight functions) pass their own test
    as ``Adapter(foldable=...)``."""
    forward = type(module).forward
    return forward is nn.Linear.forward or forward is nn.Conv2d.forward


class Adapter:
    """Wraps the given modules' forward to add a merger's low-rank paths.

    ``modules``: canonical layer name -> module. Layers of the merger without a module are listed in
    ``missing``, modules without a merger layer in ``unused``; neither is an error (a host model may
    hold more or fewer layers than a LoRA patches). ``compute_dtype`` is the dtype of the low-rank path
    (default float32: inputs are cast on entry and the result cast back to the module's output dtype;
    None computes in the input's dtype; a storage-only dtype such as float8 is refused, and float8 inputs
    compute in float32). Masks stay float32 parameters of the merger.
    ``foldable(module)`` says whether a module's output is exactly F.linear/conv of its ``weight`` and
    ``bias`` right now (default ``plain_weight``); ``constant_path`` is one of ``CONSTANT_PATHS``.
    """

    def __init__(
        self,
        merger: Merger,
        modules: Mapping[str, nn.Module],
        compute_dtype: torch.dtype | None = torch.float32,
        foldable: Callable[[nn.Module], bool] = plain_weight,
        constant_path: str = "auto",
    ) -> None:
        if compute_dtype in _STORAGE_ONLY:
            raise AdapterError(f"compute_dtype {compute_dtype} is a storage format; compute in the model's "
                               f"compute dtype (float32, bfloat16 or float16)")
        if constant_path not in CONSTANT_PATHS:
            raise AdapterError(f"constant_path {constant_path!r} is not one of {', '.join(CONSTANT_PATHS)}")
        self.merger = merger
        self.compute_dtype = compute_dtype
        self.foldable = foldable
        self.constant_path = constant_path
        self._targets: dict[str, nn.Module] = {}
        for name, module in modules.items():
            if name in merger:
                self._check_module(name, module, merger.layer(name))
                self._targets[name] = module
        self.attached: list[str] = list(self._targets)
        self.missing: list[str] = [n for n in merger.names if n not in self._targets]
        self.unused: list[str] = [n for n in modules if n not in merger]
        # name -> (the module's own forward attribute before attach, or _MISSING; our wrapper)
        self._wrapped: dict[str, tuple[object, Callable]] = {}
        self._branches: list[Branch] | None = None
        # Canonical layer name -> the one branch every element of that layer uses (``set_layer_branches``).
        self._layer_branches: dict[str, Branch] = {}
        self._cache: dict[tuple, Any] = {}
        # How the calls were evaluated since attach: "masked", "rows", "lowrank", "fold" -> module calls.
        self.path_counts: dict[str, int] = {}

    # -- life cycle ------------------------------------------------------------------------------------
    @staticmethod
    def _check_module(name: str, module: nn.Module, layer: MergedLayer) -> None:
        want = (layer.out_features, layer.in_channels, *layer.kernel_size)
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise AdapterError(f"layer {name}: grouped convolutions (groups={module.groups}) are not supported")
            shape = (module.out_channels, module.in_channels, *module.kernel_size)
        elif isinstance(module, nn.Linear):
            # A 1×1 conv LoRA on a Linear module is the same map (hosts differ on proj_in/proj_out).
            shape = (module.out_features, module.in_features, 1, 1)
        else:
            raise AdapterError(f"layer {name}: module {type(module).__name__} is neither nn.Linear nor nn.Conv2d")
        if shape != want:
            raise AdapterError(
                f"layer {name}: the LoRA patches a weight of shape {layer.weight_shape} but the module's is "
                f"{shape if isinstance(module, nn.Conv2d) else shape[:2]}"
            )

    def attach(self) -> Self:
        """Wrap every module's forward (idempotent)."""
        if not self._wrapped:
            for name, module in self._targets.items():
                previous = module.__dict__.get("forward", _MISSING)
                wrapper = self._make_forward(name, module, module.forward)
                # A plain instance attribute shadows the class's forward (nn.Module.__call__ calls self.forward).
                module.__dict__["forward"] = wrapper
                self._wrapped[name] = (previous, wrapper)
        return self

    def remove(self) -> None:
        """Unwrap every module and drop every cached tensor; the modules are exactly as before ``attach``."""
        for name, (previous, wrapper) in self._wrapped.items():
            module = self._targets[name]
            if module.__dict__.get("forward") is wrapper:
                if previous is _MISSING:
                    del module.__dict__["forward"]
                else:
                    module.__dict__["forward"] = previous
            # else: someone wrapped our wrapper since; it stays in their chain and passes calls through.
        self._wrapped.clear()
        self._cache.clear()

    @property
    def attached_now(self) -> bool:
        return bool(self._wrapped)

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- branches --------------------------------------------------------------------------------------
    def set_branches(self, branches: Sequence[Branch] | None) -> None:
        """One branch per batch element (None: every element is ``"merged"``).

        A module input whose batch is k·len(branches) (e.g. a host that concatenates k copies) uses the
        branches tiled k times, in the order ``torch.cat`` would produce. Put elements of the same branch
        next to each other: each run of equal branches is one ΔW for the constant-mask paths.
        """
        n = len(self.merger.tags)
        self._branches = None if branches is None else [_check_branch(b, n) for b in branches]

    @property
    def branches(self) -> list[Branch] | None:
        return None if self._branches is None else list(self._branches)

    def set_layer_branches(self, layer_branches: Mapping[str, Branch] | None) -> None:
        """One branch per named layer, for every batch element, in place of the per-element branches there
        (None or empty: none). A layer's own branch is evaluated as one constant ΔW (unless it is
        ``"merged"`` with learned masks under grad mode); the layers not named keep ``set_branches``'s.
        Sampling-time rules that pick a LoRA per layer and step (``duolora.klora``) set this before each call."""
        self._layer_branches = {} if not layer_branches else {
            name: _check_branch(b) for name, b in layer_branches.items()}

    @property
    def layer_branches(self) -> dict[str, Branch]:
        return dict(self._layer_branches)

    def _runs(self, n: int, name: str) -> list[tuple[int, int, Branch]]:
        """(start, stop, branch) of each run of equal branches over a batch of n elements."""
        key = ("runs", None if self._branches is None else tuple(self._branches), n)
        runs = self._cache.get(key)
        if runs is None:
            if self._branches is None:
                runs = [(0, n, MERGED)]
            else:
                if n % len(self._branches):
                    raise AdapterError(f"layer {name}: batch of {n} does not fit the {len(self._branches)} "
                                       f"branches set on the adapter")
                elements = self._branches * (n // len(self._branches))
                runs = []
                for i, b in enumerate(elements):
                    if runs and runs[-1][2] == b:
                        runs[-1] = (runs[-1][0], i + 1, b)
                    else:
                        runs.append((i, i + 1, b))
            self._cache[key] = runs
        return runs

    # -- dispatch ----------------------------------------------------------------------------------------
    def _make_forward(self, name: str, module: nn.Module, inner: Callable) -> Callable:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if not self._wrapped:  # removed while someone else still holds this wrapper
                return inner(x, *args, **kwargs)
            return self._forward(name, module, inner, x, args, kwargs)

        return forward

    def _count(self, path: str) -> None:
        self.path_counts[path] = self.path_counts.get(path, 0) + 1

    def _dtype(self, x: torch.Tensor) -> torch.dtype:
        dtype = self.compute_dtype or x.dtype
        return torch.float32 if dtype in _STORAGE_ONLY else dtype

    def _forward(self, name: str, module: nn.Module, inner: Callable, x: torch.Tensor, args: tuple,
                 kwargs: dict) -> torch.Tensor:
        layer = self.merger.layer(name)
        conv = isinstance(module, nn.Conv2d)
        n = x.shape[0] if x.dim() > (3 if conv else 1) else 1
        own = self._layer_branches.get(name)
        runs = self._runs(n, name) if own is None else [(0, n, own)]
        grad = torch.is_grad_enabled()
        learned = any(m is not None and m.requires_grad for m in map(layer.mask, layer.tags))
        masks_path = self.constant_path == "masks" and own in (None, MERGED)
        if masks_path or (grad and learned and any(b == MERGED for _, _, b in runs)):
            # The masks need a gradient here (or the old path was asked for): the per-element mask path.
            out = inner(x, *args, **kwargs)
            if len(runs) == 1 and runs[0][2] == MERGED:
                self._count("masked")
                delta = self._delta(layer, module, x, self._own_masks)
            else:
                self._count("rows")
                delta = self._delta(layer, module, x, lambda lay, which, dev, dt: self._mask_rows(lay, which, n, dev, dt))
            # None leaves the output untouched (every element's masks are zero in this layer).
            return out if delta is None else out + delta.to(out.dtype)
        return self._constant(layer, module, inner, x, args, kwargs, runs, conv, grad)

    # -- constant masks ------------------------------------------------------------------------------------
    def _coefficient(self, layer: MergedLayer, branch: Branch, which: str) -> float | torch.Tensor:
        if branch == MERGED:
            return layer.mask(which).detach()
        return branch_weights(branch, layer.tags)[layer.tags.index(which)]

    def _lora_factors(self, layer: MergedLayer, which: str, device: torch.device,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) of one LoRA on (device, dtype): views into the cached concatenation of every LoRA the layer
        has when it has several."""
        present = layer.present
        every = self._factors(layer, present if len(present) > 1 else (which,), device, dtype)
        if len(every[2]) == 1:
            return every[0], every[1]
        i = present.index(which)
        lo, hi = sum(every[2][:i]), sum(every[2][:i + 1])
        return every[0][:, lo:hi], every[1][lo:hi]

    def _run_factors(self, layer: MergedLayer, branch: Branch, device: torch.device,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """ΔW of one run as (B (out, k), A (k, in·kh·kw)) on (device, dtype), or None when it is zero.

        Cached per branch, except for the merger's own masks while they may still change (learned layers)."""
        learned = any(isinstance(m, nn.Parameter) for m in map(layer.mask, layer.tags))
        key = ("run", layer.name, branch, device, dtype)
        cacheable = branch != MERGED or not learned
        if cacheable and key in self._cache:
            return self._cache[key]
        parts: list[tuple[str, float | torch.Tensor]] = []
        for which in layer.present:
            coef = self._coefficient(layer, branch, which)
            if not (isinstance(coef, float) and coef == 0.0):
                parts.append((which, coef))
        result = None
        if parts and all(isinstance(c, float) and c == 1.0 for _, c in parts) and (
                len(parts) == 1 or len(parts) == len(layer.present)):
            if len(parts) > 1:
                B, A, _ = self._factors(layer, layer.present, device, dtype)
                result = (B, A)
            else:
                result = self._lora_factors(layer, parts[0][0], device, dtype)
        elif parts:
            Bs, As = [], []
            for which, coef in parts:
                if isinstance(coef, float):
                    B, A = self._lora_factors(layer, which, device, dtype)
                    Bs.append(B * coef)
                    As.append(A)
                else:
                    B, A = layer.masked_factors(which, coef)
                    Bs.append(B.to(device=device, dtype=dtype))
                    As.append(A.to(device=device, dtype=dtype))
            result = (Bs[0], As[0]) if len(Bs) == 1 else (torch.cat(Bs, 1), torch.cat(As, 0))
        if cacheable:
            self._cache[key] = result
        return result

    def _can_fold(self, module: nn.Module, x: torch.Tensor) -> bool:
        """The module's output is F.linear/conv of its own weight, in the input's dtype and device."""
        w = getattr(module, "weight", None)
        return (isinstance(w, torch.Tensor) and w.dtype in _FOLD_DTYPES and w.dtype == x.dtype
                and w.device == x.device and self.foldable(module))

    @staticmethod
    def _fold_pays(module: nn.Module, x: torch.Tensor, runs: list, factors: list, conv: bool) -> bool:
        """True when folding ΔW into the weight costs less than the low-rank path, in multiply-adds plus
        ``OP_COST`` per operation: per run, W + B·A (out·in·(k + 1)) and the module's product on the run
        (+ one concatenation of the runs), against the module's own product, then per run two thin products
        and the add (tokens·((in + out)·k + out))."""
        n = runs[-1][1]
        if conv:
            tokens = x[0, 0].numel() / (module.stride[0] * module.stride[1])  # output positions, padding aside
        else:
            tokens = x.numel() / (n * x.shape[-1])
        fold = OP_COST * (2 * len(runs) + (len(runs) > 1))
        low = OP_COST
        for (start, stop, _), f in zip(runs, factors):
            if f is None:
                continue
            out_f, rank, in_f = f[0].shape[0], f[0].shape[1], f[1].shape[1]
            fold += out_f * in_f * (rank + 1)
            low += (stop - start) * tokens * ((in_f + out_f) * rank + out_f) + 3 * OP_COST
        return fold < low

    def _constant(self, layer: MergedLayer, module: nn.Module, inner: Callable, x: torch.Tensor, args: tuple,
                  kwargs: dict, runs: list, conv: bool, grad: bool) -> torch.Tensor:
        device = x.device
        if not grad and not args and not kwargs and self.constant_path != "lowrank" and self._can_fold(module, x):
            factors = [self._run_factors(layer, b, device, x.dtype) for _, _, b in runs]
            if all(f is None for f in factors):
                return inner(x)
            if self.constant_path == "fold" or self._fold_pays(module, x, runs, factors, conv):
                self._count("fold")
                return self._folded(module, x, runs, factors, conv)
        dtype = self._dtype(x)
        factors = [self._run_factors(layer, b, device, dtype) for _, _, b in runs]
        out = inner(x, *args, **kwargs)
        if all(f is None for f in factors):
            return out
        self._count("lowrank")
        if len(runs) == 1:
            delta = self._lowrank(layer, module, x.to(dtype), *factors[0], conv).to(out.dtype)
            return out + delta if grad else out.add_(delta)
        pieces = []
        for (start, stop, _), f in zip(runs, factors):
            if f is None:
                pieces.append(out[start:stop])
                continue
            delta = self._lowrank(layer, module, x[start:stop].to(dtype), *f, conv).to(out.dtype)
            if grad:
                pieces.append(out[start:stop] + delta)
            else:
                out[start:stop].add_(delta)  # a fresh output and no graph: add in place
        return torch.cat(pieces) if grad else out

    def _lowrank(self, layer: MergedLayer, module: nn.Module, x: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                 conv: bool) -> torch.Tensor:
        if conv:
            h = self._conv_down(module, x, A.reshape(A.shape[0], layer.in_channels, *layer.kernel_size))
            return F.conv2d(h, B[:, :, None, None])
        return F.linear(F.linear(x, A), B)

    @staticmethod
    def _folded(module: nn.Module, x: torch.Tensor, runs: list, factors: list, conv: bool) -> torch.Tensor:
        """The module's output with each run's ΔW folded into the weight: what a static patch computes."""
        weight, bias = module.weight, module.bias
        flat = weight.reshape(weight.shape[0], -1)
        outs = []
        for (start, stop, _), f in zip(runs, factors):
            w = weight if f is None else torch.addmm(flat, f[0], f[1]).reshape(weight.shape)
            xr = x if len(runs) == 1 else x[start:stop]
            outs.append(module._conv_forward(xr, w, bias) if conv else F.linear(xr, w, bias))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    # -- masks with gradient -------------------------------------------------------------------------------
    def _factors(self, layer: MergedLayer, which: tuple[str, ...], device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """(B, A, ranks) of the LoRAs tagged ``which`` (one or several, concatenated in that order) on (device,
        dtype), frozen, built once and cached until ``remove``."""
        key = ("factors", layer.name, which, device, dtype)
        cached = self._cache.get(key)
        if cached is None:
            fs = [layer.factors(c) for c in which]
            B = torch.cat([f[0] for f in fs], 1).to(device=device, dtype=dtype)
            A = torch.cat([f[1] for f in fs], 0).to(device=device, dtype=dtype)
            cached = (B, A, tuple(int(f[1].shape[0]) for f in fs))
            self._cache[key] = cached
        return cached

    def _own_masks(self, layer: MergedLayer, which: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Every element is "merged": the layer's own masks, (dim,)."""
        return layer.mask(which).to(device=device, dtype=dtype)

    def _plan(self, device: torch.device, dtype: torch.dtype) -> dict[str, tuple | None]:
        """Per LoRA: (constant mask per element (N, 1), 1.0 where the element is "merged" (N, 1) or None),
        or None when every element's mask of that LoRA is zero. Cached per branch list, device and dtype."""
        key = ("plan", tuple(self._branches), device, dtype)
        plan = self._cache.get(key)
        if plan is None:
            merged = [b == MERGED for b in self._branches]
            tags = self.merger.tags
            weights = [None if b == MERGED else branch_weights(b, tags) for b in self._branches]
            plan = {}
            for slot, which in enumerate(tags):
                consts = [0.0 if w is None else w[slot] for w in weights]
                if not any(merged) and all(c == 0.0 for c in consts):
                    plan[which] = None
                    continue
                const = torch.tensor(consts, device=device, dtype=dtype)[:, None]
                ind = torch.tensor(merged, device=device, dtype=dtype)[:, None] if any(merged) else None
                plan[which] = (const, ind)
            self._cache[key] = plan
        return plan

    def _mask_rows(self, layer: MergedLayer, which: str, n: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor | None:
        """Per-element masks, (n, dim); None when all are zero."""
        own = layer.mask(which)
        if self._branches is None:
            return own.to(device=device, dtype=dtype)
        p = self._plan(device, dtype)[which]
        if p is None:
            return None
        const, ind = p
        # const + ind·m is m exactly for "merged" elements and the constant exactly for the others.
        rows = const.expand(const.shape[0], own.shape[0]) if ind is None else const + ind * own.to(device, dtype)
        if n != rows.shape[0]:
            rows = rows.repeat(n // rows.shape[0], 1)
        return rows

    @staticmethod
    def _shape_mask(mask: torch.Tensor, x: torch.Tensor, conv: bool) -> torch.Tensor:
        """Broadcast (dim,) or (n, dim) against a (n, …, dim) linear or (n, dim, h, w) conv activation."""
        if conv:
            return mask[..., None, None]
        if mask.dim() == 2:
            return mask.reshape(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
        return mask

    def _delta(self, layer: MergedLayer, module: nn.Module, x: torch.Tensor, masks) -> torch.Tensor | None:
        """The low-rank part of the module's output for input x with masks ``masks(layer, which, device,
        dtype)`` ((dim,) or (n, dim), None for zero): (n, …, out) or (n, out, h', w')."""
        device = x.device
        dtype = self._dtype(x)
        xc = x.to(dtype)
        conv = isinstance(module, nn.Conv2d)
        active = []
        for which in layer.present:
            rows = masks(layer, which, device, dtype)
            if rows is not None:
                active.append((which, rows))
        if not active:
            return None
        if layer.kind == RANK and len(active) >= 2:
            # Every LoRA as one rank-(r_c + r_s) LoRA: a fraction of the kernel launches (docs/method.md §2, export
            # form).
            groups = [(tuple(a[0] for a in active), torch.cat([a[1] for a in active], dim=-1))]
        else:
            groups = [((which,), rows) for which, rows in active]
        total = None
        for which, rows in groups:
            m = self._shape_mask(rows, xc, conv)
            B, A, _ = self._factors(layer, which, device, dtype)
            inp = xc * m if layer.kind == IN else xc
            if conv:
                h = self._conv_down(module, inp, A.reshape(A.shape[0], layer.in_channels, *layer.kernel_size))
            else:
                h = F.linear(inp, A)
            if layer.kind == RANK:
                h = h * m
            y = F.conv2d(h, B[:, :, None, None]) if conv else F.linear(h, B)
            if layer.kind == OUT:
                y = y * m
            total = y if total is None else total + y
        return total

    @staticmethod
    def _conv_down(module: nn.Module, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        if getattr(module, "padding_mode", "zeros") != "zeros":
            # Non-zero padding modes pad explicitly first, as the base convolution does.
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            return F.conv2d(x, kernel, None, module.stride, 0, module.dilation)
        return F.conv2d(x, kernel, None, module.stride, module.padding, module.dilation)


def attach(
    merger: Merger,
    modules: Mapping[str, nn.Module],
    compute_dtype: torch.dtype | None = torch.float32,
    foldable: Callable[[nn.Module], bool] = plain_weight,
    constant_path: str = "auto",
) -> Adapter:
    """Attach ``merger`` to ``modules`` and return the adapter; use as ``with attach(m, mods) as adapter:``.

    The wrappers are live as soon as this returns; leaving the ``with`` block (or ``adapter.remove()``)
    removes them.
    """
    return Adapter(merger, modules, compute_dtype, foldable, constant_path).attach()
