"""Small real torch models and synthetic LoRAs for the engine tests (no host, no downloads).

``ToyUNet`` is a few-layer ε-prediction network with a σ input and a text context, whose attention
projections carry SDXL's canonical layer names (two content-prior blocks, two style-prior blocks under
the "paper" preset) and two conv layers; ``ToyDenoiser`` implements ``duolora.objective.Denoiser`` over it.
The LoRAs built here are synthetic: random factors with a decaying spectrum.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from duolora.adapter import Adapter, Branch, attach
from duolora.lora import LoRA, LowRank
from duolora.objective import DiscreteSchedule

DIM, CTX, LATENT = 32, 16, 4


@pytest.fixture(autouse=True)
def single_thread():
    """Run a test on one intra-op thread (restored afterwards). These tensors are tiny: on a shared,
    loaded machine extra threads only spin-wait (measured: 32 s with 2 threads vs 2 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
BLOCKS = {  # canonical block -> resolution level (0: 8×8, 1: 4×4)
    "input_blocks.4.1": 0,  # style prior ("paper")
    "middle_block.1": 1,  # content prior
    "output_blocks.1.1": 1,  # content prior
    "output_blocks.3.1": 0,  # style prior
}
CONV_LAYERS = ("input_blocks.6.0.op", "output_blocks.2.2.conv")


class ToyAttention(nn.Module):
    def __init__(self, dim: int, ctx_dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.heads
        q = self.to_q(x).reshape(n, t, h, d // h).transpose(1, 2)
        k = self.to_k(ctx).reshape(n, ctx.shape[1], h, d // h).transpose(1, 2)
        v = self.to_v(ctx).reshape(n, ctx.shape[1], h, d // h).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](a.transpose(1, 2).reshape(n, t, d))


class ToyTransformer(nn.Module):
    def __init__(self, dim: int, ctx_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = ToyAttention(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = ToyAttention(dim, ctx_dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = x.shape
        t = x.flatten(2).transpose(1, 2)
        h1 = self.norm1(t)
        t = t + self.attn1(h1, h1)
        t = t + self.attn2(self.norm2(t), ctx)
        t = t + self.ff(t)
        return t.transpose(1, 2).reshape(n, c, hh, ww)


class ToyUNet(nn.Module):
    """ε(x_t, σ, context) for 4×8×8 latents; input scaled by 1/√(σ²+1) like SD's EPS models."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():  # seeded weights without touching the caller's global RNG
            torch.manual_seed(seed)
            self.conv_in = nn.Conv2d(LATENT, DIM, 3, padding=1)
            self.time = nn.Sequential(nn.Linear(DIM, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
            self.blocks = nn.ModuleDict({b.replace(".", "_"): ToyTransformer(DIM, CTX) for b in BLOCKS})
            self.down = nn.Conv2d(DIM, DIM, 3, stride=2, padding=1)
            self.up = nn.Conv2d(DIM, DIM, 3, padding=1)
            self.conv_out = nn.Conv2d(DIM, LATENT, 3, padding=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        c_in = 1.0 / torch.sqrt(sigma**2 + 1.0)
        half = DIM // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
        arg = torch.log(sigma.float())[:, None] * 10.0 * freqs[None]
        temb = self.time(torch.cat([arg.sin(), arg.cos()], dim=1))[:, :, None, None]
        h = self.conv_in(x * c_in[:, None, None, None]) + temb
        b = self.blocks
        h = b["input_blocks_4_1"](h, ctx)
        skip = h
        h = self.down(h)
        h = b["middle_block_1"](h, ctx)
        h = b["output_blocks_1_1"](h, ctx)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.up(h) + skip
        h = b["output_blocks_3_1"](h, ctx)
        return self.conv_out(F.silu(h))

    def lora_modules(self) -> dict[str, nn.Module]:
        """Canonical SDXL-style name -> module for every layer the toy LoRAs patch."""
        out: dict[str, nn.Module] = {}
        for block in BLOCKS:
            tb = self.blocks[block.replace(".", "_")]
            for attn in ("attn1", "attn2"):
                a = getattr(tb, attn)
                for proj, mod in (("to_q", a.to_q), ("to_k", a.to_k), ("to_v", a.to_v), ("to_out.0", a.to_out[0])):
                    out[f"{block}.transformer_blocks.0.{attn}.{proj}"] = mod
            out[f"{block}.transformer_blocks.0.ff.net.2"] = tb.ff[2]
        out[CONV_LAYERS[0]] = self.down
        out[CONV_LAYERS[1]] = self.up
        return out


def synthetic_layer(shape: tuple[int, ...], rank: int, g: torch.Generator, scale: float = 1.0,
                    decay: float = 0.7) -> LowRank:
    """Random LoRA layer for a weight of ``shape`` with singular values scale·decay^i, mixed by a random
    invertible r×r matrix so the file's own (raw) basis is not the SVD basis."""
    out_f, in_flat = shape[0], int(torch.tensor(shape[1:]).prod())
    u, _ = torch.linalg.qr(torch.randn(out_f, rank, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_flat, rank, generator=g))
    s = scale * decay ** torch.arange(rank, dtype=torch.float32)
    mix = torch.randn(rank, rank, generator=g) / math.sqrt(rank) + torch.eye(rank)
    B = (u * s.sqrt()) @ mix
    A = torch.linalg.solve(mix, s.sqrt()[:, None] * v.T)
    if len(shape) == 4:
        return LowRank(B.reshape(out_f, rank, 1, 1), A.reshape(rank, *shape[1:]))
    return LowRank(B, A)


def synthetic_lora(modules: dict[str, nn.Module], rank: int, seed: int, scale: float = 1.0,
                   skip: Sequence[str] = (), name: str = "synthetic") -> LoRA:
    """A synthetic LoRA over ``modules`` (canonical name -> Linear/Conv2d), ``rank`` per layer."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for key, mod in modules.items():
        if key in skip:
            continue
        r = min(rank, *mod.weight.shape[:2])
        layers[key] = synthetic_layer(tuple(mod.weight.shape), r, g, scale)
    return LoRA(layers=layers, source=f"{name}.safetensors", key_style="canonical", base="sdxl")


# A hand-made layer set covering every kind of layer a merger sees: attention projections in a B-LoRA
# content block (output_blocks.0.1) and style block (output_blocks.1.1), a conv layer, a text-encoder
# layer, and one layer only each file has.
Q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
K2 = "input_blocks.4.1.transformer_blocks.0.attn2.to_k"
V_B0 = "output_blocks.0.1.transformer_blocks.0.attn1.to_v"
O_B1 = "output_blocks.1.1.transformer_blocks.0.attn2.to_out.0"
CONV = "input_blocks.4.0.in_layers.2"
TE = "te1.text_model.encoder.layers.0.self_attn.q_proj"
ONLY_C = "middle_block.1.transformer_blocks.0.ff.net.2"
ONLY_S = "output_blocks.3.1.transformer_blocks.0.attn1.to_k"
SHAPES = {Q: (12, 12), K2: (12, 10), V_B0: (12, 12), O_B1: (12, 12), CONV: (12, 6, 3, 3), TE: (10, 10)}
ONLY_SHAPES = {ONLY_C: (12, 24), ONLY_S: (12, 12)}


def small_loras(rank_c: int = 4, rank_s: int = 3, seed: int = 0) -> tuple[LoRA, LoRA]:
    """(content, style) synthetic LoRAs over SHAPES, plus ONLY_C in content and ONLY_S in style."""
    g = torch.Generator().manual_seed(seed)
    content = {n: synthetic_layer(s, rank_c, g) for n, s in SHAPES.items()}
    style = {n: synthetic_layer(s, rank_s, g) for n, s in SHAPES.items()}
    content[ONLY_C] = synthetic_layer(ONLY_SHAPES[ONLY_C], rank_c, g)
    style[ONLY_S] = synthetic_layer(ONLY_SHAPES[ONLY_S], rank_s, g)
    return (LoRA(layers=content, source="content.safetensors"), LoRA(layers=style, source="style.safetensors"))


def randomise_masks(merger, seed: int = 0) -> None:
    """Learned masks in ±[0.1, 1.5] (about 30 % negative), so none falls below the pruning threshold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in merger.mask_parameters():
            sign = torch.where(torch.rand(p.shape, generator=g) < 0.3, -1.0, 1.0)
            p.copy_(sign * (0.1 + 1.4 * torch.rand(p.shape, generator=g)))


class ToyDenoiser(DiscreteSchedule):
    """``duolora.objective.Denoiser`` over a ToyUNet with an attached adapter; cond = (1, S, CTX) tensors."""

    def __init__(self, model: ToyUNet, adapter: Adapter) -> None:
        super().__init__(DiscreteSchedule.scaled_linear().sigmas)
        self.model = model
        self.adapter = adapter
        self.calls: list[tuple[int, bool]] = []  # (batch size, grad enabled) per predict call

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Sequence[torch.Tensor],
                branches: Sequence[Branch]) -> torch.Tensor:
        self.calls.append((x_t.shape[0], torch.is_grad_enabled()))
        self.adapter.set_branches(list(branches))
        return self.model(x_t, sigma, torch.cat(list(cond)))


def toy_setup(seed: int = 0, rank_c: int = 8, rank_s: int = 6, scale: float = 1.0):
    """(model, content LoRA, style LoRA) with frozen model weights; the content LoRA lacks one ff layer
    so a pass-through layer exists."""
    model = ToyUNet(seed).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    mods = model.lora_modules()
    content = synthetic_lora(mods, rank_c, seed + 1, scale, skip=["output_blocks.3.1.transformer_blocks.0.ff.net.2"],
                             name="content")
    style = synthetic_lora(mods, rank_s, seed + 2, scale, name="style")
    return model, content, style


def toy_references(seed: int = 0, n_content: int = 2):
    """Content/style latents (4×8×8) and three (1, 5, CTX) prompt contexts."""
    from duolora.objective import References

    g = torch.Generator().manual_seed(100 + seed)
    content = [torch.randn(1, LATENT, 8, 8, generator=g) for _ in range(n_content)]
    style = [torch.randn(1, LATENT, 8, 8, generator=g)]
    p_c, p_s, p_cs = (torch.randn(1, 5, CTX, generator=g) for _ in range(3))
    return References(content=content, style=style, p_c=p_c, p_s=p_s, p_cs=p_cs)


class ToyModel:
    """``open_denoiser`` over a ToyUNet for ``duolora.engine.run_merge``: attaches the merger for the block and
    records each opening's ``needs_grad`` (``opened``) and the denoisers it made (``denoisers``)."""

    def __init__(self, model: ToyUNet) -> None:
        self.model = model
        self.opened: list[bool] = []
        self.denoisers: list[ToyDenoiser] = []

    @contextlib.contextmanager
    def __call__(self, merger, needs_grad: bool) -> Iterator[ToyDenoiser]:
        self.opened.append(needs_grad)
        modules = self.model.lora_modules()
        with attach(merger, modules) as adapter:
            den = ToyDenoiser(self.model, adapter)
            den.modules = modules
            den.prepare_latents = lambda samples: [samples[i:i + 1] for i in range(samples.shape[0])]
            self.denoisers.append(den)
            yield den


def dense_klora(content: LoRA, style: LoRA, progress: float, alpha: float = 1.5, beta: float = 0.5,
                scope: str = "attention") -> tuple[dict[str, str], dict[str, float]]:
    """K-LoRA's rule computed directly from every layer's dense ΔW in float64 (the test oracle of
    ``duolora.klora``): per shared layer in scope, S = sum of the K = r_c·r_s largest |ΔW| entries,
    γ = Σ|ΔW_c| / Σ|ΔW_s| over those layers, content iff S_c > γ·(α·p + β)·S_s.

    Returns (layer -> "content"/"style", layer -> log(S_c / (γ·(α·p + β)·S_s)), the decision's margin)."""
    from duolora.lora import TEXT_ENCODER_PREFIXES
    from duolora.sdxl import is_attention_projection

    shared = [n for n in sorted(set(content.layers) & set(style.layers))
              if not n.startswith(TEXT_ENCODER_PREFIXES) and (scope == "all" or is_attention_projection(n))]
    tops: dict[str, tuple[float, float]] = {}
    sum_c = sum_s = 0.0
    for n in shared:
        c, s = content.layers[n], style.layers[n]
        dc, ds = c.delta(torch.float64).abs().flatten(), s.delta(torch.float64).abs().flatten()
        k = min(c.rank * s.rank, dc.numel())
        tops[n] = (float(dc.sort(descending=True).values[:k].sum()), float(ds.sort(descending=True).values[:k].sum()))
        sum_c += float(dc.sum())
        sum_s += float(ds.sum())
    threshold = sum_c / sum_s * (alpha * progress + beta)
    choice = {n: "content" if tc > threshold * ts else "style" for n, (tc, ts) in tops.items()}
    margin = {n: math.log(tc / (threshold * ts)) for n, (tc, ts) in tops.items()}
    return choice, margin
