"""Evaluate a merger inside any torch model, with masks that differ per batch element.

For every canonical layer name given with its module (``nn.Linear`` or ``nn.Conv2d``, subclasses such as
ComfyUI's ops included) a forward hook adds the low-rank path of both LoRAs to the module's output:

    rank masks:  y += ((x·Aᵀ) ⊙ m)·Bᵀ          out masks: y += ((x·Aᵀ)·Bᵀ) ⊙ m          in masks: y += ((x ⊙ m)·Aᵀ)·Bᵀ

(conv: the down projection is a convolution with the base module's kernel size, stride, padding and
dilation, the up projection a 1×1 convolution). No dense ΔW is formed. The mask of each batch element
comes from its *branch* (METHOD.md §4: "all three LoRA configurations are the same adapter with
different masks"):

* ``"merged"``  — the merger's own masks (learned ones carry gradient);
* ``"content"`` — the content LoRA alone, mask (1, 0);
* ``"style"``   — the style LoRA alone, mask (0, 1);
* ``"base"``    — no LoRA at all, mask (0, 0);
* ``(a, b)``    — constant masks (a, b), e.g. (1.0, 1.0) for the plain direct merge.

So ε_m, ε_c and ε_s come from ONE batched forward. Hooks are removed on exit of the context manager,
which restores every module exactly (same parameters, same forward, no attribute left behind).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .mergers import IN, OUT, RANK, MergedLayer, Merger

if TYPE_CHECKING:
    from typing_extensions import Self

Branch = str | tuple[float, float]
MERGED, CONTENT, STYLE, BASE = "merged", "content", "style", "base"
BRANCH_NAMES: tuple[str, ...] = (MERGED, CONTENT, STYLE, BASE)
_CONSTANT = {CONTENT: (1.0, 0.0), STYLE: (0.0, 1.0), BASE: (0.0, 0.0)}


class AdapterError(ValueError):
    """A module or branch the adapter cannot work with; the message names the layer."""


def _check_branch(b: Branch) -> Branch:
    if isinstance(b, str):
        if b not in BRANCH_NAMES:
            raise AdapterError(f"unknown branch {b!r}; use one of {', '.join(BRANCH_NAMES)} or a pair (w_c, w_s)")
        return b
    if isinstance(b, tuple) and len(b) == 2:
        return (float(b[0]), float(b[1]))
    raise AdapterError(f"branch {b!r} must be a name ({', '.join(BRANCH_NAMES)}) or a pair (w_c, w_s)")


class Adapter:
    """Forward hooks that add a merger's low-rank paths to the given modules.

    ``modules``: canonical layer name -> module. Layers of the merger without a module are listed in
    ``missing``, modules without a merger layer in ``unused``; neither is an error (a host model may
    hold more or fewer layers than a LoRA patches). ``compute_dtype`` is the dtype of the low-rank path
    (default float32: inputs are cast on entry and the result cast back to the module's output dtype;
    None computes in the input's dtype). Masks stay float32 parameters of the merger.
    """

    def __init__(
        self,
        merger: Merger,
        modules: Mapping[str, nn.Module],
        compute_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        self.merger = merger
        self.compute_dtype = compute_dtype
        self._targets: dict[str, nn.Module] = {}
        for name, module in modules.items():
            if name in merger:
                self._check_module(name, module, merger.layer(name))
                self._targets[name] = module
        self.attached: list[str] = list(self._targets)
        self.missing: list[str] = [n for n in merger.names if n not in self._targets]
        self.unused: list[str] = [n for n in modules if n not in merger]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._branches: list[Branch] | None = None
        self._cache: dict[tuple, object] = {}

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
        """Register the hooks (idempotent)."""
        if not self._handles:
            for name, module in self._targets.items():
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def remove(self) -> None:
        """Remove every hook and cached tensor; the modules are exactly as before ``attach``."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._cache.clear()

    @property
    def attached_now(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- branches --------------------------------------------------------------------------------------
    def set_branches(self, branches: Sequence[Branch] | None) -> None:
        """One branch per batch element (None: every element is ``"merged"``).

        A module input whose batch is k·len(branches) (e.g. a host that concatenates k copies) uses the
        branches tiled k times, in the order ``torch.cat`` would produce.
        """
        new = None if branches is None else [_check_branch(b) for b in branches]
        if new != self._branches:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "plan"}
        self._branches = new

    @property
    def branches(self) -> list[Branch] | None:
        return None if self._branches is None else list(self._branches)

    # -- the low-rank path -------------------------------------------------------------------------------
    def _factor(self, key: tuple, make, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A frozen factor on (device, dtype), built once by ``make()`` and cached until ``remove``."""
        k = (*key, device, dtype)
        cached = self._cache.get(k)
        if cached is None:
            cached = make().to(device=device, dtype=dtype)
            self._cache[k] = cached
        return cached

    def _plan(self, device: torch.device, dtype: torch.dtype) -> dict[str, tuple | None]:
        """Per LoRA: (constant mask per element (N, 1), 1.0 where the element is "merged" (N, 1) or None),
        or None when every element's mask of that LoRA is zero. Cached per branch list, device and dtype."""
        key = ("plan", device, dtype)
        plan = self._cache.get(key)
        if plan is None:
            merged = [b == MERGED for b in self._branches]
            plan = {}
            for slot, which in enumerate(("c", "s")):
                consts = [0.0 if b == MERGED else (_CONSTANT[b][slot] if isinstance(b, str) else b[slot])
                          for b in self._branches]
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
        """Per-element masks, (n, dim), or (dim,) when no branches are set; None when all are zero."""
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
            if n % rows.shape[0]:
                raise AdapterError(
                    f"layer {layer.name}: batch of {n} does not fit the {rows.shape[0]} branches set on the adapter"
                )
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

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            delta = self._delta(name, module, args[0])
            # None leaves the output untouched (every element's masks are zero in this layer).
            return None if delta is None else output + delta.to(output.dtype)

        return hook

    def _delta(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The low-rank part of the module's output for input x: (n, …, out) or (n, out, h', w')."""
        layer = self.merger.layer(name)
        device = x.device
        dtype = self.compute_dtype or x.dtype
        xc = x.to(dtype)
        conv = isinstance(module, nn.Conv2d)
        n = x.shape[0] if x.dim() > (3 if conv else 1) else 1
        active = []
        for which in ("c", "s"):
            if layer.factors(which) is not None:
                rows = self._mask_rows(layer, which, n, device, dtype)
                if rows is not None:
                    active.append((which, rows))
        if not active:
            return None
        if layer.kind == RANK and len(active) == 2:
            # Both LoRAs as one rank-(r_c + r_s) LoRA: half the kernel launches (METHOD.md §2, export form).
            groups = [("cs", torch.cat([active[0][1], active[1][1]], dim=-1))]
        else:
            groups = active
        total = None
        for which, rows in groups:
            m = self._shape_mask(rows, xc, conv)
            B = self._factor((name, "B", which), lambda w=which: torch.cat([layer.factors(c)[0] for c in w], 1),
                             device, dtype)
            A = self._factor((name, "A", which), lambda w=which: torch.cat([layer.factors(c)[1] for c in w], 0),
                             device, dtype)
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
) -> Adapter:
    """Attach ``merger`` to ``modules`` and return the adapter; use as ``with attach(m, mods) as adapter:``.

    The hooks are live as soon as this returns; leaving the ``with`` block (or ``adapter.remove()``)
    removes them.
    """
    return Adapter(merger, modules, compute_dtype).attach()
