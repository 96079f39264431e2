"""Engine tests of duolora.adapter: exactness per batch element, batching, dtype boundary, clean removal.

LoRAs are synthetic (engine_toys.py); the modules are plain torch modules and a tiny real denoiser.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from engine_toys import (
    CONV,
    K2,
    O_B1,
    ONLY_C,
    ONLY_S,
    ONLY_SHAPES,
    SHAPES,
    TE,
    V_B0,
    Q,
    randomise_masks,
    single_thread,  # noqa: F401 - autouse fixture
    small_loras,
    toy_setup,
)
from torch import nn

from duolora.adapter import CONSTANT_PATHS, AdapterError, attach
from duolora.config import MergeConfig
from duolora.lora import LoRA, LowRank
from duolora.mergers import build_merger

VARIANTS = [("ziprank", "svd"), ("ziprank", "raw"), ("ziplora_out", "svd"), ("ziplora_in", "svd"),
            ("direct", "svd"), ("b_lora", "svd")]
BRANCHES = ["merged", "content", "style", "base", (0.5, 2.0)]


class CastLinear(nn.Linear):
    """A host-style Linear subclass (like ComfyUI's manual-cast ops): weight cast to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


CONV_VARIANTS = [
    {"stride": 2, "padding": 1},
    {"stride": 1, "padding": 2, "dilation": 2},
    {"padding": 1, "padding_mode": "reflect"},
]


def make_modules(conv_kwargs: dict) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    mods: dict[str, nn.Module] = {}
    for name, shape in {**SHAPES, **ONLY_SHAPES}.items():
        if len(shape) == 4:
            mods[name] = nn.Conv2d(shape[1], shape[0], shape[2:], **conv_kwargs)
        elif name == V_B0:
            mods[name] = CastLinear(shape[1], shape[0])
        else:
            mods[name] = nn.Linear(shape[1], shape[0], bias=name != Q)
    for m in mods.values():
        m.requires_grad_(False)
    return mods


def branch_delta(merger, content, style, name: str, branch) -> torch.Tensor:
    """The dense ΔW one batch element should see (reference formula)."""
    zero = torch.zeros(merger.layer(name).weight_shape)
    dc = content.layers[name].delta() if name in content.layers else zero
    ds = style.layers[name].delta() if name in style.layers else zero
    if branch == "merged":
        return merger.delta(name).detach()
    a, b = {"content": (1.0, 0.0), "style": (0.0, 1.0), "base": (0.0, 0.0)}.get(branch, branch)
    return a * dc + b * ds


def dense_apply(module: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The same module with weight ΔW and no bias: the dense formula the low-rank path must match."""
    ref = copy.deepcopy(module)
    ref.weight = nn.Parameter(weight.reshape(ref.weight.shape))
    ref.bias = None
    return nn.Module.__call__(ref, x) if not isinstance(ref, CastLinear) else F.linear(x, ref.weight)


@pytest.mark.parametrize("conv_kwargs", CONV_VARIANTS)
@pytest.mark.parametrize(("method", "basis"), VARIANTS)
def test_each_batch_element_matches_the_dense_formula(method: str, basis: str, conv_kwargs: dict) -> None:
    content, style = small_loras()
    merger = build_merger(method, content, style, MergeConfig(method=method, basis=basis, scope="all"))
    randomise_masks(merger)
    mods = make_modules(conv_kwargs)
    g = torch.Generator().manual_seed(1)
    n = len(BRANCHES)
    inputs = {}
    for name, mod in mods.items():
        if isinstance(mod, nn.Conv2d):
            inputs[name] = torch.randn(n, mod.in_channels, 9, 9, generator=g)
        else:
            inputs[name] = torch.randn(n, 5, mod.in_features, generator=g)
    base = {name: mods[name](x) for name, x in inputs.items()}
    with attach(merger, mods) as adapter:
        assert sorted(adapter.attached) == sorted(mods) and adapter.missing == [] and adapter.unused == []
        adapter.set_branches(BRANCHES)
        adapted = {name: mods[name](x) for name, x in inputs.items()}
    worst = 0.0
    with torch.no_grad():  # the reference side needs no graph
        for name, x in inputs.items():
            for i, branch in enumerate(BRANCHES):
                want = dense_apply(mods[name], branch_delta(merger, content, style, name, branch), x[i : i + 1])
                got = adapted[name][i : i + 1] - base[name][i : i + 1]
                if branch == "base" or float(want.norm()) == 0.0:
                    assert float(got.abs().max()) <= 1e-6, (name, branch)
                else:
                    worst = max(worst, float((got - want).norm() / want.norm()))
    assert worst <= 1e-5


def test_batched_branches_equal_separate_forwards_on_a_real_model() -> None:
    model, content, style = toy_setup()
    merger = build_merger("ziprank", content, style)
    randomise_masks(merger)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.5, 2.0, 7.0])
    ctx = torch.randn(3, 5, 16, generator=g)
    branches = ["merged", "content", "style"]
    with torch.no_grad(), attach(merger, model.lora_modules()) as adapter:
        adapter.set_branches(branches)
        together = model(x, sigma, ctx)
        separate = []
        for i, b in enumerate(branches):
            adapter.set_branches([b])
            separate.append(model(x[i : i + 1], sigma[i : i + 1], ctx[i : i + 1]))
        # A host that concatenates two copies of the batch gets the branches tiled.
        adapter.set_branches(branches)
        tiled = model(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([ctx, ctx]))
    base = model(x, sigma, ctx)
    separate = torch.cat(separate)
    assert float((together - separate).abs().max()) <= 1e-5 * float(separate.abs().max())
    assert float((tiled[:3] - together).abs().max()) <= 1e-5 and float((tiled[3:] - together).abs().max()) <= 1e-5
    for i in range(3):  # every branch really changes the prediction, and differently
        assert float((together[i] - base[i]).abs().max()) > 1e-3
    assert float((together[1] - together[2]).abs().max()) > 1e-3


@pytest.mark.parametrize("path", CONSTANT_PATHS)
def test_a_layer_branch_overrides_every_element_in_that_layer_only(path: str) -> None:
    content, style = small_loras()
    merger = build_merger("ziprank", content, style, MergeConfig(scope="all"))
    randomise_masks(merger)
    mods = make_modules(CONV_VARIANTS[0])
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), attach(merger, mods, constant_path=path) as adapter:
        adapter.set_branches(["merged", "content", "base"])
        per_element = mods[V_B0](x)
        adapter.set_layer_branches({Q: "style", V_B0: (0.5, 2.0)})
        assert adapter.layer_branches == {Q: "style", V_B0: (0.5, 2.0)}
        q, v, o = mods[Q](x), mods[V_B0](x), mods[O_B1](x)
        adapter.set_layer_branches(None)
        o_elements = mods[O_B1](x)
        with pytest.raises(AdapterError, match="unknown branch 'sideways'"):
            adapter.set_layer_branches({Q: "sideways"})
    with torch.no_grad():
        for i in range(3):
            assert torch.allclose(q[i], dense_apply(mods[Q], branch_delta(merger, content, style, Q, "style"), x[i])
                                  + mods[Q](x[i]), atol=1e-5)
            want = dense_apply(mods[V_B0], branch_delta(merger, content, style, V_B0, (0.5, 2.0)), x[i])
            assert torch.allclose(v[i], want + mods[V_B0](x[i]), atol=1e-5)
        assert torch.equal(o, o_elements)  # a layer not named keeps the per-element branches
        assert not torch.allclose(v, per_element, atol=1e-3)


def test_only_merged_elements_carry_gradient() -> None:
    content, style = small_loras()
    merger = build_merger("ziprank", content, style)
    mods = make_modules(CONV_VARIANTS[0])
    x = torch.randn(2, 5, 12)
    with attach(merger, mods) as adapter:
        adapter.set_branches(["content", "style"])
        assert not mods[Q](x).requires_grad  # constant masks: no path to the merger's parameters
        adapter.set_branches(["merged", "content"])
        mods[Q](x).sum().backward()
    assert float(merger.layer(Q).m_c.grad.abs().sum()) > 0 and float(merger.layer(Q).m_s.grad.abs().sum()) > 0


def _snapshot(mod: nn.Module) -> dict:
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
             "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks")
    return {
        "attrs": sorted(vars(mod)),
        "hooks": {h: dict(getattr(mod, h, {})) for h in hooks},
        "params": [(n, id(p), p.detach().clone()) for n, p in mod.named_parameters()],
        "buffers": [(n, id(b)) for n, b in mod.named_buffers()],
        "forward": type(mod).forward,
    }


def _same(a: dict, b: dict) -> bool:
    return (a["attrs"] == b["attrs"] and a["hooks"] == b["hooks"] and a["buffers"] == b["buffers"]
            and a["forward"] is b["forward"]
            and all(n1 == n2 and i1 == i2 and torch.equal(t1, t2)
                    for (n1, i1, t1), (n2, i2, t2) in zip(a["params"], b["params"], strict=True)))


def test_removal_leaves_no_trace_even_after_an_error() -> None:
    model, content, style = toy_setup()
    merger = build_merger("ziplora_out", content, style)
    randomise_masks(merger)
    mods = model.lora_modules()
    x, sigma, ctx = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 3.0]), torch.randn(2, 5, 16)
    before = {n: _snapshot(m) for n, m in model.named_modules()}
    y0 = model(x, sigma, ctx)
    with attach(merger, mods) as adapter:
        assert adapter.attached_now
        y1 = model(x, sigma, ctx)
        # Every module's forward is wrapped (an instance attribute shadowing the class's forward).
        assert sum("forward" in vars(m) for m in mods.values()) == len(mods)
    assert not adapter.attached_now
    with pytest.raises(RuntimeError, match="boom"), attach(merger, mods):
        raise RuntimeError("boom")
    after = {n: _snapshot(m) for n, m in model.named_modules()}
    assert before.keys() == after.keys() and all(_same(before[n], after[n]) for n in before)
    y2 = model(x, sigma, ctx)
    assert torch.equal(y0, y2)
    assert float((y1 - y0).detach().abs().max()) > 1e-3  # the adapter did change the output while attached


def test_low_precision_module_casts_at_the_boundary() -> None:
    content, style = small_loras()
    merger = build_merger("ziprank", content, style)
    randomise_masks(merger)
    lin = nn.Linear(12, 12).requires_grad_(False)
    lin16 = copy.deepcopy(lin).to(torch.bfloat16)
    x = torch.randn(3, 7, 12)
    with attach(merger, {Q: lin}) as adapter:
        adapter.set_branches(["merged", "content", "style"])
        ref = lin(x)
    with attach(merger, {Q: lin16}) as adapter:
        adapter.set_branches(["merged", "content", "style"])
        out = lin16(x.to(torch.bfloat16))
        out.float().pow(2).sum().backward()
    assert out.dtype == torch.bfloat16
    assert float((out.float() - ref).detach().norm() / ref.detach().norm()) <= 2e-2  # bf16 rounding only
    m_c = merger.layer(Q).m_c
    assert m_c.dtype == torch.float32 and m_c.grad is not None and m_c.grad.dtype == torch.float32
    assert float(m_c.grad.abs().sum()) > 0


def test_adapter_errors_name_the_layer() -> None:
    content, style = small_loras()
    merger = build_merger("ziprank", content, style)
    with pytest.raises(AdapterError, match=r"layer input_blocks.4.1.transformer_blocks.0.attn1.to_q: the LoRA "
                                           r"patches a weight of shape \(12, 12\) but the module's is \(12, 11\)"):
        attach(merger, {Q: nn.Linear(11, 12)})
    with pytest.raises(AdapterError, match="neither nn.Linear nor nn.Conv2d"):
        attach(merger, {Q: nn.Conv1d(12, 12, 1)})
    mods = make_modules(CONV_VARIANTS[0])
    with attach(merger, {Q: mods[Q], "not.a.layer": mods[K2]}) as adapter:
        assert adapter.unused == ["not.a.layer"] and len(adapter.missing) == len(merger.names) - 1
        with pytest.raises(AdapterError, match="unknown branch 'mixed'"):
            adapter.set_branches(["mixed"])
        adapter.set_branches(["merged", "content"])
        with pytest.raises(AdapterError, match="batch of 3 does not fit the 2 branches"):
            mods[Q](torch.randn(3, 12))
    assert {CONV, K2, O_B1, ONLY_C, ONLY_S, TE} <= set(merger.names)


# -- the constant-mask paths (issue 11: a step costs what the model costs) ------------------------------------

RUNS = ["content", "content", "style", "style", "base", (0.5, 2.0), "merged"]


@pytest.mark.parametrize("path", CONSTANT_PATHS)
@pytest.mark.parametrize(("method", "basis"), [("ziprank", "svd"), ("ziplora_out", "svd"), ("ziplora_in", "svd")])
def test_every_constant_path_matches_the_dense_formula(method: str, basis: str, path: str) -> None:
    """Without gradients every run of equal branches is one fixed ΔW: folded into the weight, or the low-rank
    path with its masks folded into the factors; each element still matches the dense formula, and the
    module's own weight is never modified."""
    content, style = small_loras()
    merger = build_merger(method, content, style, MergeConfig(method=method, basis=basis, scope="all"))
    randomise_masks(merger)
    mods = make_modules(CONV_VARIANTS[0])
    weights = {name: m.weight.detach().clone() for name, m in mods.items()}
    g = torch.Generator().manual_seed(3)
    n = len(RUNS)
    inputs = {name: torch.randn(n, mod.in_channels, 9, 9, generator=g) if isinstance(mod, nn.Conv2d)
              else torch.randn(n, 5, mod.in_features, generator=g) for name, mod in mods.items()}
    with torch.no_grad():
        base = {name: mods[name](x) for name, x in inputs.items()}
        with attach(merger, mods, constant_path=path) as adapter:
            adapter.set_branches(RUNS)
            adapted = {name: mods[name](x) for name, x in inputs.items()}
        worst = 0.0
        for name, x in inputs.items():
            for i, branch in enumerate(RUNS):
                want = dense_apply(mods[name], branch_delta(merger, content, style, name, branch), x[i : i + 1])
                got = adapted[name][i : i + 1] - base[name][i : i + 1]
                if branch == "base":
                    assert float(got.abs().max()) <= 1e-6, (name, branch)
                else:
                    worst = max(worst, float((got - want).norm() / want.norm()))
    assert worst <= 2e-5
    assert all(torch.equal(mods[name].weight, w) for name, w in weights.items())
    counts = adapter.path_counts
    if path == "masks":  # the per-element mask path, as before issue 11
        assert set(counts) == {"rows"}
    elif path == "lowrank":
        assert set(counts) == {"lowrank"}
    elif path == "fold":
        # Plain torch modules fold; the host-style CastLinear (its forward casts the weight) cannot.
        assert counts["fold"] == len(mods) - 1 and counts["lowrank"] == 1
    else:  # auto: by cost (see the next test); CastLinear cannot fold
        assert counts["fold"] + counts["lowrank"] == len(mods) and counts["fold"] >= 1 and counts["lowrank"] >= 1


def test_auto_folds_where_that_costs_less() -> None:
    """Cost = multiply-adds + OP_COST per operation. A 1024→256 layer, rank 4 + 4, two runs: W + ΔW costs
    2·256·1024·5 ≈ 2.6 M, the low-rank path 2·tokens·(1280·4 + 256): folding pays for 4,096-token runs (a
    UNet's image tokens) and not for 3 tokens (a text context); a 16×16 layer folds even at 3 tokens (the
    low-rank path's extra operations cost more than its arithmetic saves)."""
    g = torch.Generator().manual_seed(2)

    def adapted(out_f: int, in_f: int):
        name = "input_blocks.4.1.transformer_blocks.0.attn2.to_k"
        pair = [LoRA(layers={name: LowRank(torch.randn(out_f, 4, generator=g), torch.randn(4, in_f, generator=g))})
                for _ in range(2)]
        lin = nn.Linear(in_f, out_f).requires_grad_(False)
        return lin, attach(build_merger("ziprank", *pair), {name: lin})

    with torch.no_grad():
        lin, adapter = adapted(256, 1024)
        with adapter:
            adapter.set_branches(["content", "style"])
            lin(torch.randn(2, 3, 1024, generator=g))
            assert adapter.path_counts == {"lowrank": 1}
            lin(torch.randn(2, 4096, 1024, generator=g))
            assert adapter.path_counts == {"lowrank": 1, "fold": 1}
        lin, adapter = adapted(16, 16)
        with adapter:
            adapter.set_branches(["content", "style"])
            lin(torch.randn(2, 3, 16, generator=g))
            assert adapter.path_counts == {"fold": 1}


def test_the_gradient_path_is_the_mask_formula_bit_for_bit() -> None:
    """Every element "merged" with gradient: y + ((x·Aᵀ) ⊙ [m_c, m_s])·Bᵀ, the same operations as before
    issue 11 (so CPU results where the maths is unchanged stay bit-identical), and the same with every path."""
    content, style = small_loras()
    merger = build_merger("ziprank", content, style)
    randomise_masks(merger)
    lin = make_modules(CONV_VARIANTS[0])[Q]
    layer = merger.layer(Q)
    x = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(4))
    A = torch.cat([layer.A_c, layer.A_s])
    B = torch.cat([layer.B_c, layer.B_s], 1)
    want = lin(x) + F.linear(F.linear(x, A) * torch.cat([layer.m_c, layer.m_s]), B)
    for path in CONSTANT_PATHS:
        with attach(merger, {Q: lin}, constant_path=path) as adapter:
            adapter.set_branches(["merged"] * 3)
            got = lin(x)
        assert torch.equal(got, want) and adapter.path_counts == {"masked": 1}, path
        got.sum().backward()
    assert float(layer.m_c.grad.abs().sum()) > 0 and float(layer.m_s.grad.abs().sum()) > 0


class Float8Linear(nn.Linear):
    """ComfyUI's fp8 storage as its manual-cast ops do it: the weight is stored in float8_e4m3fn and cast to
    the input's dtype in every forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class MatmulDtypes(torch.overrides.TorchFunctionMode):
    """Records the dtypes of every tensor argument of F.linear / conv2d / addmm calls."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.linear, F.conv2d, torch.addmm, torch.matmul):
            self.seen.update(a.dtype for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="torch without float8")
def test_fp8_stored_weights_never_reach_the_low_rank_matmuls() -> None:
    content, style = small_loras()
    merger = build_merger("ziprank", content, style)
    randomise_masks(merger)
    lin = Float8Linear(12, 12).requires_grad_(False)
    lin.weight.data = lin.weight.data.to(torch.float8_e4m3fn)
    x = torch.randn(3, 7, 12, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(6))
    ref = nn.Linear(12, 12).requires_grad_(False)
    ref.weight.data, ref.bias.data = lin.weight.data.float(), lin.bias.data.clone()
    with pytest.raises(AdapterError, match="float8_e4m3fn is a storage format"):
        attach(merger, {Q: lin}, compute_dtype=torch.float8_e4m3fn)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), MatmulDtypes() as mode, attach(merger, {Q: lin}, compute_dtype=None) as ad:
            ad.set_branches(["merged", "content", "style"])
            out = lin(x)
        with torch.no_grad(), attach(merger, {Q: ref}) as ad:
            ad.set_branches(["merged", "content", "style"])
            want = ref(x.float())
        assert torch.float8_e4m3fn not in mode.seen and mode.seen <= {torch.bfloat16}, mode.seen
        assert out.dtype == torch.bfloat16
        assert float((out.detach().float() - want).norm() / want.norm()) <= 2e-2  # bf16 rounding only


def test_removal_restores_a_forward_the_module_already_had() -> None:
    content, style = small_loras()
    merger = build_merger("ziprank", content, style)
    lin = make_modules(CONV_VARIANTS[0])[Q]
    own = lin.forward  # e.g. another tool's instance-level wrapper
    lin.forward = lambda x: own(x) * 2.0
    theirs = lin.forward
    with attach(merger, {Q: lin}) as adapter:
        adapter.set_branches(["base"])
        x = torch.randn(1, 12)
        assert torch.equal(lin(x), own(x) * 2.0)  # base branch: their forward, unchanged
    assert lin.forward is theirs
