"""Engine tests of duolora.mergers: exact export, pruning, equivalences, parameter counts (Theorem 1:
test_theorem1.py).

All LoRAs here are synthetic (random factors with a decaying spectrum, see engine_toys.py).
"""

from __future__ import annotations

import pytest
import torch
from engine_toys import (
    CONV,
    K2,
    O_B1,
    ONLY_C,
    ONLY_S,
    SHAPES,
    TE,
    V_B0,
    Q,
    randomise_masks,
    single_thread,  # noqa: F401 - autouse fixture
    small_loras,
    synthetic_layer,
)

from duolora import sdxl
from duolora.config import METHODS, MergeConfig
from duolora.lora import LoRA, LowRank
from duolora.mergers import (
    MergerError,
    ZipLoRAMerger,
    ZipRankMerger,
    build_merger,
    parameter_counts,
    print_parameter_counts,
    svd_refactor,
    svd_refactor_many,
)

VARIANTS = [("ziprank", "svd"), ("ziprank", "raw"), ("ziplora_out", "svd"), ("ziplora_in", "svd"),
            ("direct", "svd"), ("b_lora", "svd")]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("scope", ["attention", "all"])
@pytest.mark.parametrize(("method", "basis"), VARIANTS)
def test_export_reproduces_the_merged_delta_exactly(method: str, basis: str, scope: str) -> None:
    content, style = small_loras()
    merger = build_merger(method, content, style, MergeConfig(method=method, basis=basis, scope=scope))
    randomise_masks(merger)
    exported = merger.export(prune_threshold=0.0)
    for name, layer in merger.items():
        dense = merger.delta(name)
        if name in exported.layers:
            lr = exported.layers[name]
            assert lr.is_conv == (name == CONV)
            assert rel_err(lr.delta(), dense) <= 1e-5, name
        else:
            assert float(dense.abs().max()) == 0.0, name
    learned = merger.learned_layers()
    for layer in learned:
        assert exported.layers[layer.name].rank == layer.rank("c") + layer.rank("s")
    assert (CONV in [layer.name for layer in learned]) == (scope == "all" and method not in ("direct", "b_lora"))


def test_pruning_removes_exactly_the_components_below_threshold() -> None:
    content, style = small_loras(rank_c=6, rank_s=5)
    merger = build_merger("ziprank", content, style, MergeConfig(scope="all"))
    randomise_masks(merger)
    small = torch.tensor([5e-4, -9e-4, 0.0, 1e-3])  # the last one sits on the threshold: kept
    expected: dict[str, int] = {}
    with torch.no_grad():
        for i, layer in enumerate(merger.learned_layers()):
            n_c, n_s = i % 5, (i + 2) % 5  # how many of `small` go into each mask
            layer.m_c[:n_c] = small[:n_c]
            layer.m_s[:n_s] = small[:n_s]
            dropped = sum(1 for v in small[:n_c] if abs(v) < 1e-3) + sum(1 for v in small[:n_s] if abs(v) < 1e-3)
            expected[layer.name] = layer.rank("c") + layer.rank("s") - dropped
    exported = merger.export()  # default threshold 1e-3
    total_dropped = 0
    for layer in merger.learned_layers():
        assert exported.layers[layer.name].rank == expected[layer.name], layer.name
        total_dropped += layer.rank("c") + layer.rank("s") - expected[layer.name]
        with torch.no_grad():
            pruned = {w: torch.where(layer.mask(w).abs() < 1e-3, 0.0, layer.mask(w)) for w in "cs"}
            ref = sum(mf[0] @ mf[1] for mf in (layer.masked_factors(w, pruned[w]) for w in "cs"))
        assert rel_err(exported.layers[layer.name].delta().reshape(ref.shape), ref) <= 1e-5
    # 5 learned layers get (0,2), (1,3), (2,4), (3,0), (4,1) small entries; only 1e-3 (4th) is kept.
    assert len(expected) == 5 and total_dropped == 2 + 4 + 5 + 3 + 4
    kept = merger.kept_ranks()
    assert all(sum(kept[n]) == exported.layers[n].rank for n in expected)


def test_pruning_feature_masks_drops_components_only_when_all_their_features_go() -> None:
    content, style = small_loras()
    for side in ("out", "in"):
        merger = ZipLoRAMerger(content, style, side=side)
        randomise_masks(merger)
        layer = merger.layer(Q)
        with torch.no_grad():
            layer.m_c[:5] = 1e-4
            partial = merger.export().layers[Q]
            layer.m_c[:] = 5e-4  # every content feature below threshold
            none_left = merger.export().layers[Q]
        assert partial.rank == layer.rank("c") + layer.rank("s")
        assert none_left.rank == layer.rank("s")
        with torch.no_grad():
            ref = layer.masked_factors("s")[0] @ layer.masked_factors("s")[1]
        assert rel_err(none_left.delta(), ref) <= 1e-5


@pytest.mark.parametrize(("method", "basis"), [v for v in VARIANTS if v[0] not in ("direct", "b_lora")])
def test_all_masks_one_equals_the_direct_merge(method: str, basis: str) -> None:
    content, style = small_loras()
    cfg = MergeConfig(method=method, basis=basis, scope="all")
    merger, direct = build_merger(method, content, style, cfg), build_merger("direct", content, style, cfg)
    assert all(bool((p == 1).all()) for p in merger.mask_parameters())
    for name in direct.names:
        assert rel_err(merger.delta(name), direct.delta(name)) <= 1e-5, name
        if name in content.layers and name in style.layers:
            ref = content.layers[name].delta() + style.layers[name].delta()
            assert rel_err(direct.delta(name), ref) <= 1e-6


def test_ziprank_svd_equals_raw_at_init_and_is_an_svd() -> None:
    content, style = small_loras(rank_c=5, rank_s=4)
    svd = ZipRankMerger(content, style, basis="svd", scope="all")
    raw = ZipRankMerger(content, style, basis="raw", scope="all")
    for name in svd.names:
        assert rel_err(svd.delta(name), raw.delta(name)) <= 1e-5
    for layer in svd.learned_layers():
        for w in "cs":
            B, A = layer.factors(w)
            sig = torch.linalg.svdvals(B.double() @ A.double())[: B.shape[1]]
            gram_b, gram_a = B.T.double() @ B.double(), A.double() @ A.T.double()
            # B'ᵀB' = A'A'ᵀ = diag(σ): the columns are the singular directions, scaled by σ^½.
            assert float((gram_b - torch.diag(sig)).abs().max()) <= 1e-5 * float(sig[0])
            assert float((gram_a - torch.diag(sig)).abs().max()) <= 1e-5 * float(sig[0])


def test_direct_weights_pass_through_and_text_encoder() -> None:
    content, style = small_loras()
    cfg = MergeConfig(method="ziprank", w_c=0.5, w_s=2.0)
    merger = build_merger("ziprank", content, style, cfg)
    assert not merger.layer(TE).learned and not merger.layer(CONV).learned
    for name in (TE, CONV):  # text encoder and out-of-scope shared layer: direct merge with (w_c, w_s)
        ref = 0.5 * content.layers[name].delta() + 2.0 * style.layers[name].delta()
        assert rel_err(merger.delta(name), ref) <= 1e-6
    assert rel_err(merger.delta(ONLY_C), content.layers[ONLY_C].delta()) <= 1e-7  # unchanged
    assert rel_err(merger.delta(ONLY_S), style.layers[ONLY_S].delta()) <= 1e-7
    # Learned: the four shared attention projections, each with r_c + r_s = 4 + 3 mask entries.
    assert sorted(layer.name for layer in merger.learned_layers()) == sorted([Q, K2, V_B0, O_B1])
    assert merger.trainable_parameters() == 4 * (4 + 3)


def test_b_lora_selects_one_block_from_each_lora() -> None:
    content, style = small_loras()
    merger = build_merger("b_lora", content, style)
    assert merger.trainable_parameters() == 0
    assert rel_err(merger.delta(V_B0), content.layers[V_B0].delta()) <= 1e-7
    assert rel_err(merger.delta(O_B1), style.layers[O_B1].delta()) <= 1e-7
    for name in (Q, K2, CONV, ONLY_C, ONLY_S):
        assert float(merger.delta(name).abs().max()) == 0.0
    exported = merger.export()
    assert sorted(exported.layers) == sorted([V_B0, O_B1, TE])
    assert exported.layers[V_B0].rank == 4 and exported.layers[O_B1].rank == 3


def test_trainable_parameters_on_toy_shapes() -> None:
    content, style = small_loras(rank_c=4, rank_s=3)
    attn = [Q, K2, V_B0, O_B1]
    counts = {m: build_merger(m, content, style, MergeConfig(method=m)).trainable_parameters() for m in METHODS}
    assert counts == {
        "ziprank": 4 * (4 + 3),
        "ziplora_out": sum(2 * SHAPES[n][0] for n in attn),  # 96
        "ziplora_in": sum(2 * SHAPES[n][1] for n in attn),  # 92
        "direct": 0,
        "b_lora": 0,
    }
    shapes = [(n, SHAPES[n][0], SHAPES[n][1]) for n in attn]
    assert parameter_counts(4, 3, shapes=shapes) == counts


def _meta_lora(rank: int) -> LoRA:
    layers = {
        name: LowRank(torch.empty(layer.shape[0], rank, device="meta"), torch.empty(rank, layer.shape[1], device="meta"))
        for name, layer in sdxl.unet_layers(sdxl.SDXL).items()
        if layer.is_attention
    }
    return LoRA(layers=layers)


@pytest.mark.skipif(not hasattr(sdxl, "unet_layers"), reason="duolora.sdxl.unet_layers not available yet")
def test_sdxl_attention_parameter_counts(capsys: pytest.CaptureFixture[str]) -> None:
    expected = {"ziprank": 71_680, "ziplora_out": 1_331_200, "ziplora_in": 1_571_840, "direct": 0, "b_lora": 0}
    assert parameter_counts(64) == expected
    # The built mergers agree; factors live on the meta device, so nothing full-size is allocated.
    meta = _meta_lora(64)
    assert len(meta.layers) == 560
    for method in ("ziprank", "ziplora_out", "ziplora_in"):
        merger = build_merger(method, meta, meta, MergeConfig(method=method))
        assert merger.trainable_parameters() == expected[method], method
    assert print_parameter_counts(64) == 0
    out = capsys.readouterr().out
    assert "560 layers" in out and "71,680" in out and "1,331,200" in out and "1,571,840" in out
    assert "18.6×" in out


def test_build_merger_errors_name_the_problem() -> None:
    content, style = small_loras()
    with pytest.raises(MergerError, match="unknown merge method 'zip'; choose one of ziprank"):
        build_merger("zip", content, style)
    bad = LoRA(layers={Q: synthetic_layer((12, 10), 3, torch.Generator().manual_seed(0))}, source="bad.safetensors")
    with pytest.raises(MergerError, match=r"layer input_blocks.4.1.transformer_blocks.0.attn1.to_q: the content "
                                          r"LoRA 'content.safetensors' patches a weight of shape \(12, 12\) but the "
                                          r"style LoRA 'bad.safetensors' one of shape \(12, 10\)"):
        build_merger("ziprank", content, bad)
    conv_only = LoRA(layers={CONV: content.layers[CONV]}, source="c.safetensors")
    with pytest.raises(MergerError, match="share no attention layer, so ziprank has nothing to learn; try scope='all'"):
        build_merger("ziprank", conv_only, conv_only)
    assert build_merger("ziprank", conv_only, conv_only, MergeConfig(scope="all")).trainable_parameters() == 8


def test_svd_refactor_is_exact_and_inputs_untouched() -> None:
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(30, 6, generator=g), torch.randn(6, 40, generator=g)
    B0, A0 = B.clone(), A.clone()
    Bn, An = svd_refactor(B, A)
    assert rel_err(Bn @ An, B @ A) <= 1e-6
    assert torch.equal(B, B0) and torch.equal(A, A0)
    content, style = small_loras()
    before = {(t, n): (v.up.clone(), v.down.clone()) for t, lora in (("c", content), ("s", style))
              for n, v in lora.layers.items()}
    merger = build_merger("ziprank", content, style)
    randomise_masks(merger)
    merger.export()
    after = {(t, n): (v.up, v.down) for t, lora in (("c", content), ("s", style)) for n, v in lora.layers.items()}
    assert len(before) == 14
    assert all(torch.equal(before[k][0], after[k][0]) and torch.equal(before[k][1], after[k][1]) for k in before)


def test_batched_svd_refactor_equals_the_per_layer_one() -> None:
    """svd_refactor_many (one batched QR/SVD per shape) gives each pair what svd_refactor gives it alone, to
    float32 rounding, whatever the order of the shapes and however a shape's pairs are split into batches."""
    g = torch.Generator().manual_seed(7)
    shapes = [(64, 8, 96), (48, 8, 32), (64, 8, 96), (48, 6, 32), (64, 8, 96), (48, 8, 32), (64, 8, 96)] * 2
    pairs = [(torch.randn(o, r, generator=g) * 0.1, torch.randn(r, n, generator=g)) for o, r, n in shapes]
    pairs.append((pairs[0][0].double(), pairs[0][1].half()))  # dtypes are cast to float32 first
    originals = [(B.clone(), A.clone()) for B, A in pairs]
    for batch in (3, 64):
        batched = svd_refactor_many(pairs, batch=batch)
        assert len(batched) == len(pairs)
        worst = 0.0
        for (B, A), (Bb, Ab) in zip(pairs, batched):
            Bp, Ap = svd_refactor(B, A)
            assert Bb.shape == Bp.shape == (B.shape[0], B.shape[1]) and Ab.shape == Ap.shape == A.shape
            assert Bb.dtype == Ab.dtype == torch.float32
            worst = max(worst, rel_err(Bb, Bp), rel_err(Ab, Ap))
            assert rel_err(Bb @ Ab, B.float() @ A.float()) <= 1e-6
        # Measured: 0 (LAPACK factors each matrix of a batch alone). Float32 rounding allows ~1e-7.
        assert worst <= 1e-6, worst
    assert all(torch.equal(B, B0) and torch.equal(A, A0) for (B, A), (B0, A0) in zip(pairs, originals))
    meta = svd_refactor_many([(torch.empty(640, 64, device="meta"), torch.empty(64, 2048, device="meta"))])
    assert [(t.shape, t.device.type) for t in meta[0]] == [((640, 64), "meta"), ((64, 2048), "meta")]


def test_ziprank_merger_factors_are_the_per_layer_svd_basis() -> None:
    content, style = small_loras(rank_c=6, rank_s=5)
    merger = build_merger("ziprank", content, style)
    learned = merger.learned_layers()
    assert learned
    for layer in learned:
        for which, lora in (("c", content), ("s", style)):
            lr = lora.layers[layer.name]
            B, A = layer.factors(which)
            Bp, Ap = svd_refactor(lr.B, lr.A)
            assert rel_err(B, Bp) <= 1e-6 and rel_err(A, Ap) <= 1e-6
    assert merger._svd_factors == {}  # every batched factor pair went into its layer
