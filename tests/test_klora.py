"""Engine tests of duolora.klora: K-LoRA's rule against a dense, direct implementation (engine_toys.dense_klora),
the statistics computed a block at a time, the progress of a σ on a schedule, and the patch on a toy model whose
output must equal the model with each layer's chosen ΔW added to its weight."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from engine_toys import (
    CTX,
    LATENT,
    dense_klora,
    single_thread,  # noqa: F401 - autouse fixture
    toy_setup,
)

from duolora.klora import KLoRA, KLoRAError, _largest, schedule_progress, top_k_abs
from duolora.lora import LoRA, LowRank
from duolora.sdxl import is_attention_projection

PROGRESS = (0.0, 0.2, 0.45, 0.7, 1.0)


def jittered(lora: LoRA, seed: int) -> LoRA:
    """The same LoRA with every layer's ΔW scaled by its own factor e^(0.6·N(0,1)): layers of different
    strengths, so the rule's choice differs between layers at one step (the toy's layers share one spectrum)."""
    g = torch.Generator().manual_seed(seed)
    layers = {n: LowRank(v.up * float(torch.exp(0.6 * torch.randn((), generator=g))), v.down)
              for n, v in lora.layers.items()}
    return LoRA(layers=layers, source=lora.source, key_style=lora.key_style, base=lora.base)


@pytest.fixture(scope="module")
def toy():
    model, content, style = toy_setup()
    return model, jittered(content, 5), jittered(style, 6)


def test_rule_equals_the_dense_rule_at_every_progress(toy) -> None:
    _, content, style = toy
    klora = KLoRA(content, style)
    attention = [n for n in content.layers if n in style.layers and is_attention_projection(n)]
    assert sorted(klora.statistics) == sorted(attention) and len(attention) == 32
    seen = set()
    for p in PROGRESS:
        expected, margin = dense_klora(content, style, p)
        # No decision of the oracle is within float32 rounding of a tie, so both must agree on every layer.
        assert min(abs(m) for m in margin.values()) > 1e-3
        assert klora.choose(p) == expected
        seen.add(tuple(sorted(expected.items())))
    # The probes are discriminating: the choice changes across the run and differs between layers.
    assert len(seen) == len(PROGRESS)
    assert 0 < sum(v == "content" for v in klora.choose(0.45).values()) < 32


def test_statistics_match_the_dense_product(toy) -> None:
    _, content, style = toy
    klora = KLoRA(content, style)
    sum_c = sum_s = 0.0
    for name, st in klora.statistics.items():
        c, s = content.layers[name], style.layers[name]
        assert st.k == c.rank * s.rank == 48
        for lr, top, total in ((c, st.top_c, st.abs_c), (s, st.top_s, st.abs_s)):
            dense = lr.delta(torch.float64).abs().flatten()
            assert top == pytest.approx(float(dense.sort(descending=True).values[:st.k].sum()), rel=1e-6)
            assert total == pytest.approx(float(dense.sum()), rel=1e-6)
        sum_c += st.abs_c
        sum_s += st.abs_s
    assert klora.gamma == pytest.approx(sum_c / sum_s, rel=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 100, 1 << 24])
def test_top_k_a_block_of_rows_at_a_time_equals_all_at_once(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(37, 5, generator=g), torch.randn(5, 23, generator=g)
    dense = (B.double() @ A.double()).abs().flatten()
    for k in (1, 25, 37 * 23, 10_000):
        top, total = top_k_abs(B, A, k, chunk_elements=chunk)
        assert top == pytest.approx(float(dense.sort(descending=True).values[:k].sum()), rel=1e-6)
        assert total == pytest.approx(float(dense.sum()), rel=1e-6)


@pytest.mark.parametrize("kind", ["random", "ties", "zeros"])
def test_the_k_largest_through_group_maxima_are_the_k_largest(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    values = {"random": torch.rand(50_000, generator=g),
              "ties": torch.randint(0, 5, (50_000,), generator=g).float(),
              "zeros": torch.cat([torch.ones(7), torch.zeros(49_993)])}[kind]
    for k in (1, 10, 300, 12_499, 49_999, 50_000, 60_000):
        got = _largest(values, k)
        want = values.sort(descending=True).values[:k]
        assert got.numel() == want.numel() and torch.equal(got.sort(descending=True).values, want), k


def test_the_content_share_falls_as_sampling_proceeds(toy) -> None:
    _, content, style = toy
    klora = KLoRA(content, style)
    shares = [klora.content_share(p) for p in [i / 20 for i in range(21)]]
    assert all(a >= b for a, b in itertools.pairwise(shares))
    for p, share in ((0.0, shares[0]), (1.0, shares[-1])):
        assert share == sum(v == "content" for v in dense_klora(content, style, p)[0].values()) / 32
    assert shares[0] - shares[-1] >= 0.25
    # β alone sets the first step; a larger α hands more layers to the style LoRA by the end.
    assert KLoRA(content, style, alpha=3.0).content_share(1.0) < shares[-1]
    assert KLoRA(content, style, alpha=0.0).content_share(1.0) == shares[0]


def test_schedule_progress() -> None:
    schedule = [14.6, 7.0, 3.0, 1.0, 0.0]  # 4 steps
    assert [schedule_progress(s, schedule) for s in schedule[:-1]] == [0.0, 0.25, 0.5, 0.75]
    assert schedule_progress(5.0, schedule) == pytest.approx(0.375)  # halfway between 7 and 3: step 1.5 of 4
    assert schedule_progress(20.0, schedule) == 0.0
    assert schedule_progress(0.0, schedule) == 1.0
    assert schedule_progress(-1.0, schedule) == 1.0
    assert schedule_progress(3.0, [3.0]) == 0.0


def test_patch_output_equals_each_layer_with_its_chosen_delta_w_added(toy) -> None:
    model, content, style = toy
    klora = KLoRA(content, style)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, LATENT, 8, 8, generator=g)
    sigma = torch.tensor([2.0, 2.0])
    ctx = torch.randn(2, 5, CTX, generator=g)
    modules = model.lora_modules()
    with torch.no_grad():
        base = model(x, sigma, ctx)
        patch = klora.patch(modules)
        with patch:
            outs = {}
            for p in PROGRESS:
                patch.set_progress(p)
                outs[p] = model(x, sigma, ctx)
        after = model(x, sigma, ctx)
    assert torch.equal(after, base)  # removed: the model is exactly as before
    assert all("forward" not in m.__dict__ for m in modules.values())
    # Only the adapter's low-rank path ran: no ΔW was folded into a weight.
    assert set(patch.adapter.path_counts) == {"lowrank"}
    for p in PROGRESS:
        choice, _ = dense_klora(content, style, p)
        reference = _dense_model(model, content, style, choice)
        with torch.no_grad():
            want = reference(x, sigma, ctx)
        assert torch.allclose(outs[p], want, atol=1e-5, rtol=1e-5), (p, float((outs[p] - want).abs().max()))
        assert not torch.allclose(outs[p], base, atol=1e-3)


def _dense_model(model, content: LoRA, style: LoRA, choice: dict[str, str]):
    """A copy of the toy model with ΔW added to each weight: the chosen LoRA in the rule's layers, both LoRAs
    where both patch a layer outside the rule, the one LoRA where only one does."""
    import copy

    dense = copy.deepcopy(model)
    mods = dense.lora_modules()
    with torch.no_grad():
        for name, module in mods.items():
            parts = [lora.layers[name] for lora in (content, style) if name in lora.layers]
            if name in choice:
                parts = [(content if choice[name] == "content" else style).layers[name]]
            for lr in parts:
                module.weight += lr.delta().reshape(module.weight.shape)
    return dense


def test_layers_outside_the_rule_sum_both_loras(toy) -> None:
    _, content, style = toy
    klora = KLoRA(content, style)
    ff = "input_blocks.4.1.transformer_blocks.0.ff.net.2"
    assert ff not in klora.statistics and ff in klora.merger
    layer = klora.merger.layer(ff)
    assert torch.equal(layer.m_c, torch.ones(layer.rank("c"))) and torch.equal(layer.m_s, torch.ones(layer.rank("s")))
    everywhere = KLoRA(content, style, scope="all")
    # scope "all": every UNet layer both LoRAs patch (32 projections, 3 shared ff layers, 2 conv layers).
    assert len(everywhere.statistics) == 37 and ff in everywhere.statistics
    assert everywhere.choose(0.3) == dense_klora(content, style, 0.3, scope="all")[0]


def test_one_lora_zero_in_every_rule_layer_leaves_the_other_one() -> None:
    _, content, style = toy_setup()
    zero = LoRA(layers={n: LowRank(torch.zeros_like(v.up), v.down) for n, v in style.layers.items()}, source="zero")
    assert set(KLoRA(content, zero).choose(1.0).values()) == {"content"}
    assert set(KLoRA(zero, style).choose(0.0).values()) == {"style"}
    assert math.isinf(KLoRA(content, zero).gamma)


def test_errors_name_the_files_and_what_to_do() -> None:
    _, content, style = toy_setup()
    te_only = LoRA(layers={"te1.text_model.encoder.layers.0.self_attn.q_proj": LowRank(torch.ones(4, 2), torch.ones(2, 4))},
                   source="/loras/te_only.safetensors")
    with pytest.raises(KLoRAError, match=r"^the content LoRA 'content.safetensors' and the style LoRA "
                                         r"'te_only.safetensors' share no attention layer of the UNet, so K-LoRA has "
                                         r"no layer to choose in; try scope 'all' or check that both LoRAs are for the "
                                         r"same base model$"):
        KLoRA(content, te_only)
    with pytest.raises(KLoRAError, match=r"^K-LoRA's beta must be a finite number ≥ 0, got -0.5$"):
        KLoRA(content, style, beta=-0.5)
