"""Activation recording of the layer-wise fast mode (docs/method.md §5; the solve is ``duolora.solver``).

One no-grad forward pass per reference image, batched over a few noise levels, with the content-only model on
the content references and the style-only model on the style references (the target branches of the paper's
L_c and L_s; with several content LoRAs, each content LoRA alone on its own references). Forward pre-hooks on
the patched modules keep, per learned layer, only the r×r statistics K = Σ_tokens h·hᵀ with h = [A_c; A_s]·x
(every LoRA of the layer stacked) — never the in×in second moment of the inputs. The sums stay on the
model's device (float64) for the whole pass, so no hook waits for the device; they reach the CPU together
when the pass is over (``ActivationRecorder.statistics``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import STYLE as STYLE_BRANCH
from .adapter import Adapter, content_branch
from .config import MergeConfig
from .mergers import STYLE_TAG, Merger
from .quadratics import FastModeError, LayerActivations, check_method

if TYPE_CHECKING:
    from typing_extensions import Self

    from .objective import Denoiser, References

# Noise levels per reference in the layer-wise recording pass (one batched forward per reference).
LAYERWISE_TIMESTEPS = 4

ProgressFn = Callable[[int, int], None]


class ActivationRecorder:
    """Forward pre-hooks that accumulate, per learned rank-mask layer, K = Σ_tokens h·hᵀ with h = [A_c; A_s]·x.

    ``modules``: canonical layer name -> module (nn.Linear or nn.Conv2d), the same mapping an ``Adapter``
    takes. Every forward pass counts toward the side set with ``set_side``: "content" ("content2", … for further
    content LoRAs) or "style", the branch that runs. Only r×r projections are kept (never the in×in second
    moment). Hooks are removed on exit; the modules are left exactly as they were.
    """

    def __init__(self, merger: Merger, modules: Mapping[str, nn.Module]) -> None:
        self.merger = merger
        self.modules = {name: mod for name, mod in modules.items()
                        if name in merger and merger.layer(name).learned}
        self.side: str | None = None
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.tokens: dict[str, dict[str, int]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._A: dict[tuple[str, torch.device], torch.Tensor] = {}
        # side (a branch name) -> the tag of the LoRA that runs alone on it
        self._tag_of = {content_branch(i): t for i, t in enumerate(merger.content_tags)}
        self._tag_of[STYLE_BRANCH] = STYLE_TAG

    def set_side(self, side: str) -> None:
        if side not in self._tag_of:
            raise ValueError(f"side must be one of {', '.join(self._tag_of)}, not {side!r}")
        self.side = side

    def __enter__(self) -> Self:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._A.clear()

    def _down(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._A:
            layer = self.merger.layer(name)
            self._A[key] = torch.cat([layer.factors(t)[1] for t in layer.present]).detach().float().to(device)
        return self._A[key]

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if self.side is None:
                return
            x = args[0].detach().float()
            A = self._down(name, x.device)
            if isinstance(module, nn.Conv2d):
                layer = self.merger.layer(name)
                kernel = A.reshape(A.shape[0], layer.in_channels, *layer.kernel_size)
                h = Adapter._conv_down(module, x, kernel)  # (N, n, H', W'): one row per output position
                h = h.permute(0, 2, 3, 1).reshape(-1, A.shape[0])
            else:
                h = F.linear(x, A).reshape(-1, A.shape[0])
            # Accumulated on the model's device (float64): no host sync per layer and call; ``statistics``
            # moves every sum to the CPU in one transfer after the pass.
            k = (h.T @ h).double()
            acc = self.sums.setdefault(name, {})
            acc[self.side] = acc[self.side] + k if self.side in acc else k
            cnt = self.tokens.setdefault(name, {})
            cnt[self.side] = cnt.get(self.side, 0) + h.shape[0]

        return hook

    def statistics(self) -> dict[str, LayerActivations]:
        """Per recorded layer: K of each of its LoRAs as a mean over the tokens of that LoRA's side (E[x xᵀ]
        projected), float64 on the CPU, and the token counts; a layer with a side missing is left out. The sums
        come to the CPU in one transfer per device and matrix size."""
        sums = _to_cpu({(name, side): k for name, acc in self.sums.items() for side, k in acc.items()})
        out = {}
        side_of = {t: side for side, t in self._tag_of.items()}
        for name, acc in self.sums.items():
            sides = [side_of[t] for t in self.merger.layer(name).present]
            if any(side not in acc for side in sides):
                continue
            cnt = self.tokens[name]
            out[name] = LayerActivations({self._tag_of[side]: sums[name, side] / cnt[side] for side in sides},
                                         {self._tag_of[side]: cnt[side] for side in sides})
        return out


def _to_cpu(tensors: Mapping[tuple[str, str], torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """The tensors on the CPU, stacked by (device, shape) so each group crosses to the host in one copy."""
    groups: dict[tuple, list[tuple[str, str]]] = {}
    for key, t in tensors.items():
        groups.setdefault((t.device, tuple(t.shape)), []).append(key)
    out = {}
    for keys in groups.values():
        for key, t in zip(keys, torch.stack([tensors[k] for k in keys]).cpu().unbind(0)):
            out[key] = t
    return out


def reference_sigmas(denoiser: Denoiser, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` noise levels for the recording pass: one per equal stratum of the training timesteps when
    the denoiser exposes its ``sigmas`` (ascending), else ``sample_sigma`` draws. (count,) float32."""
    sigmas = getattr(denoiser, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and sigmas.numel() >= count:
        T = sigmas.numel()
        u = torch.rand(count, generator=generator, dtype=torch.float64)
        idx = ((torch.arange(count, dtype=torch.float64) + u) * T / count).long().clamp(0, T - 1)
        return sigmas[idx].float()
    return torch.stack([torch.as_tensor(denoiser.sample_sigma(generator), dtype=torch.float32).reshape(())
                        for _ in range(count)])


def record_activations(merger: Merger, denoiser: Denoiser, modules: Mapping[str, nn.Module],
                       references: References, config: MergeConfig, timesteps: int = LAYERWISE_TIMESTEPS,
                       progress: ProgressFn | None = None) -> dict[str, LayerActivations]:
    """One no-grad forward pass per reference image, batched over ``timesteps`` noise levels.

    Content references are denoised by the content-only branch under the content prompt, style references
    by the style-only branch under the style prompt (the target branches of L_c and L_s); each further content
    LoRA alone on its own references under its own prompt. σ and ε are drawn from ``config.seed``.
    ``modules`` must be the modules the denoiser's adapter patches (same names).
    """
    check_method(merger.method, "layerwise")
    generator = torch.Generator().manual_seed(int(config.seed))
    subjects = references.subjects
    total = sum(len(sub.latents) for sub in subjects) + len(references.style)
    done = 0
    passes = [(content_branch(i), sub.latents, sub.p_c) for i, sub in enumerate(subjects)]
    passes.append((STYLE_BRANCH, references.style, references.p_s))
    with torch.no_grad(), ActivationRecorder(merger, modules) as rec:
        for branch, latents, cond in passes:
            rec.set_side(branch)
            for x0 in latents:
                sig = reference_sigmas(denoiser, timesteps, generator)
                eps = torch.randn((timesteps, *x0.shape[1:]), generator=generator).to(x0)
                x_t = denoiser.add_noise(x0.expand(timesteps, *x0.shape[1:]), eps, sig.to(x0.device))
                denoiser.predict(x_t, sig.to(x0.device), [cond] * timesteps, [branch] * timesteps)
                done += 1
                if progress is not None:
                    progress(done, total)
    stats = rec.statistics()
    missing = [layer.name for layer in merger.learned_layers() if layer.name not in stats]
    if missing:
        raise FastModeError(
            f"the layer-wise recording saw no input for {len(missing)} learned layer(s) (e.g. {missing[0]}); "
            "the model's modules do not match the LoRA layers. Use mode 'weights' or 'paper'."
        )
    return stats
