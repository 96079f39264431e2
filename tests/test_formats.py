"""duolora.formats: every key style round-trips, alpha handling, and every validation error's exact message.

All SDXL LoRAs here are synthetic (seeded noise with SDXL's real layer names and shapes, duolora.synthetic);
malformed inputs are made by each test.
"""

from __future__ import annotations

import os
import stat
import zlib
from pathlib import Path

import lorafiles as LF
import pytest
import torch
from safetensors import safe_open

from duolora import formats as F
from duolora.formats import (
    EmptyLoRAError,
    LayerMismatchError,
    MalformedLoRAError,
    MissingFileError,
    NonFiniteError,
    NotALoRAError,
    NotSafetensorsError,
    OutputExistsError,
    PickleFileError,
    RankMismatchError,
    UnknownKeyStyleError,
    UnsupportedAdapterError,
    WrongBaseModelError,
    load_lora,
    lora_to_state_dict,
    one_line_summary,
    read_lora,
    save_lora,
    state_dict_to_lora,
    summary,
)
from duolora.lora import LoRA, LowRank
from duolora.sdxl import SD15_LAYOUT, SD21_LAYOUT, SDXL, UNetConfig, layout_for
from duolora.synthetic import synthetic_lora

ATTN_Q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
ATTN_OUT = "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0"
TE2_Q = "te2.text_model.encoder.layers.0.self_attn.q_proj"
CONV = "input_blocks.1.0.in_layers.2"


def per_layer_rank(name: str) -> int:
    """Ranks 2..6, different between layers (real files may vary the rank per layer)."""
    return 2 + zlib.crc32(name.encode()) % 5


@pytest.fixture(scope="module")
def everything() -> LoRA:
    """Synthetic SDXL LoRA on all 794 UNet layers (51 convs) and both text encoders (264 layers)."""
    return synthetic_lora(rank=per_layer_rank, scope="all", text_encoder=True, seed=1)


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("style", F.KEY_STYLES)
def test_every_style_round_trips_exactly(everything: LoRA, style: str, tmp_path: Path) -> None:
    path = save_lora(everything, tmp_path / f"{style}.safetensors", key_style=style)
    back = load_lora(path)
    assert back.key_style == style
    assert back.base == "sdxl"
    assert back.skipped == []
    assert sorted(back.layers) == sorted(everything.layers)
    assert len(back.layers) == 794 + 264
    assert sum(lr.is_conv for lr in back.layers.values()) == 51
    assert back.ranks() == [2, 3, 4, 5, 6]
    for name, lr in everything.layers.items():
        got = back.layers[name]
        assert got.up.dtype == torch.float32
        assert torch.equal(got.up, lr.up), name
        assert torch.equal(got.down, lr.down), name


EXPECTED_KEYS = {
    "kohya_ldm": ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
                  "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"),
    "kohya_diffusers": ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"),
    "diffusers_peft": ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
                       "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"),
    "diffusers": ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight",
                  "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight"),
    "diffusers_attn_procs": ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
                             "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight"),
    "comfyui": ("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_down.weight",
                "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight"),
}


@pytest.mark.parametrize("style", F.KEY_STYLES)
def test_written_key_spelling(style: str) -> None:
    lora = synthetic_lora(rank=2, text_encoder=True)
    sd = lora_to_state_dict(lora, style)
    unet_key, te_key = EXPECTED_KEYS[style]
    assert unet_key in sd
    assert te_key in sd
    # 4 tensors per layer with alpha (kohya, ComfyUI), 2 without (diffusers styles)
    per_layer = 3 if style in ("kohya_ldm", "kohya_diffusers", "comfyui") else 2
    assert len(sd) == per_layer * (560 + 264)


def test_attention_processor_spells_to_out_without_index() -> None:
    sd = lora_to_state_dict(synthetic_lora(rank=2), "diffusers_attn_procs")
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight" in sd


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("unet.", ""),  # PEFT without the unet. prefix
        ("unet.", "base_model.model."),
        ("unet.", "unet.base_model.model."),
    ],
)
def test_peft_prefix_variants_read_the_same(old: str, new: str) -> None:
    lora = synthetic_lora(rank=3, seed=2)
    sd = {(new + k[len(old):] if k.startswith(old) else k): v
          for k, v in lora_to_state_dict(lora, "diffusers_peft").items()}
    back = state_dict_to_lora(sd, {}, "renamed.safetensors")
    assert back.key_style == "diffusers_peft"
    assert back.base == "sdxl"
    assert len(back.layers) == 560
    assert all(torch.equal(back.layers[k].up, v.up) for k, v in lora.layers.items())


def test_peft_default_adapter_suffix_reads() -> None:
    lora = synthetic_lora(rank=3, seed=2)
    sd = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
          for k, v in lora_to_state_dict(lora, "diffusers_peft").items()}
    back = state_dict_to_lora(sd, {}, "peft_default.safetensors")
    assert len(back.layers) == 560
    assert back.key_style == "diffusers_peft"


def test_alpha_is_folded_into_up_on_read(tmp_path: Path) -> None:
    t = LF.kohya_layer(LF.SDXL_TO_Q_KOHYA, 640, 640, rank=4, alpha=2.0, seed=3)
    t.update(LF.kohya_layer(LF.SDXL_TO_K_KOHYA, 640, 2048, rank=4, alpha=None, seed=4))
    lora = load_lora(LF.write(tmp_path / "alpha.safetensors", t))
    q = lora.layers[ATTN_Q]
    assert torch.equal(q.up, t[f"{LF.SDXL_TO_Q_KOHYA}.lora_up.weight"] * 0.5)  # alpha/rank = 2/4
    assert torch.equal(q.down, t[f"{LF.SDXL_TO_Q_KOHYA}.lora_down.weight"])
    assert torch.equal(lora.layers[LF.SDXL_TO_K].up, t[f"{LF.SDXL_TO_K_KOHYA}.lora_up.weight"])  # no alpha: 1
    assert lora.alphas == {ATTN_Q: 2.0, LF.SDXL_TO_K: None}


def test_written_alpha_is_rank_and_alpha_override_keeps_delta(tmp_path: Path) -> None:
    lora = synthetic_lora(rank=per_layer_rank, seed=5)
    plain = save_lora(lora, tmp_path / "plain.safetensors")
    with safe_open(os.fspath(plain), "pt") as f:
        a = f.get_tensor("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha")
    assert float(a) == per_layer_rank(ATTN_Q)

    over = save_lora(lora, tmp_path / "alpha8.safetensors", alpha=8.0)
    with safe_open(os.fspath(over), "pt") as f:
        a = f.get_tensor("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha")
        up = f.get_tensor("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight")
    r = per_layer_rank(ATTN_Q)
    assert float(a) == 8.0
    torch.testing.assert_close(up, lora.layers[ATTN_Q].up * (r / 8.0), rtol=1e-6, atol=0)
    back = load_lora(over)
    for name, lr in lora.layers.items():  # up·(r/8) written, ·(8/r) read back: equal to float32 rounding
        torch.testing.assert_close(back.layers[name].up, lr.up, rtol=1e-6, atol=0)
        assert torch.equal(back.layers[name].down, lr.down)


def test_half_precision_file_keeps_its_dtype(tmp_path: Path) -> None:
    lora = synthetic_lora(rank=4, dtype=torch.float16, seed=6)
    back = load_lora(save_lora(lora, tmp_path / "half.safetensors"))
    assert back.dtype == torch.float16
    assert back.layers[ATTN_Q].up.dtype == torch.float32
    assert torch.equal(back.layers[ATTN_Q].up, lora.layers[ATTN_Q].up)
    with safe_open(os.fspath(tmp_path / "half.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118 - safe_open is not iterable


def test_header_only_read_has_the_same_structure(everything: LoRA, tmp_path: Path) -> None:
    path = save_lora(everything, tmp_path / "x.safetensors")
    full, lazy = read_lora(path), read_lora(path, load_tensors=False)
    assert lazy.layers[CONV].down.device.type == "meta"
    assert {k: v.weight_shape for k, v in lazy.layers.items()} == {k: v.weight_shape for k, v in full.layers.items()}
    assert summary(lazy) == summary(full)


def test_skipped_keys_are_listed_with_reasons(tmp_path: Path) -> None:
    t = LF.kohya_layer(LF.SDXL_TO_Q_KOHYA, 640, 640, rank=4, alpha=4)
    t["lora_unet_input_blocks_4_1_proj_in.diff_b"] = torch.arange(640, dtype=torch.float32)
    t[f"{LF.SDXL_TO_Q_KOHYA}.diff_b"] = torch.zeros(640)  # to_q has no bias in SDXL (nor in ComfyUI's model)
    t["bundle_emb.mytoken.string_to_param.*"] = torch.zeros(1, 768)
    lora = load_lora(LF.write(tmp_path / "extras.safetensors", t))
    assert list(lora.layers) == [ATTN_Q]
    # the bias difference is carried (ComfyUI applies it); the others are reported, not merged
    assert list(lora.patches) == ["input_blocks.4.1.proj_in.bias"]
    assert torch.equal(lora.patches["input_blocks.4.1.proj_in.bias"], torch.arange(640, dtype=torch.float32))
    # safetensors stores keys sorted, so skipped keys come in alphabetical order
    assert [(s.key, s.reason, s.kind) for s in lora.skipped] == [
        ("bundle_emb.mytoken.string_to_param.*", F.EMBEDDING_REASON, "ignored"),
        (f"{LF.SDXL_TO_Q_KOHYA}.diff_b", F.UNKNOWN_PATCH_REASON.format(label="SDXL"), "ignored"),
    ]
    assert one_line_summary(lora) == ("kohya_ldm · SDXL · 1 layers · rank 4 · 1 bias/norm difference · "
                                      "not merged: 1 embedded token, 1 key")


def test_tiny_layout_loads_with_its_own_layout(tmp_path: Path) -> None:
    # the bridge's width-shrunk SDXL (ComfyUI forces num_head_channels 64 on SDXL configs)
    tiny = layout_for(UNetConfig.from_comfy({
        "model_channels": 32, "channel_mult": [1, 2, 4], "num_res_blocks": [2, 2, 2],
        "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "context_dim": 64,
        "num_head_channels": 64, "adm_in_channels": 2816, "use_linear_in_transformer": True,
        "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
    }), te_dims={"te1": (32, 2), "te2": (32, 2)})
    assert tiny.base == "sdxl"
    lora = synthetic_lora(tiny, rank=4, scope="all", text_encoder=True)
    path = save_lora(lora, tmp_path / "tiny.safetensors", layout=tiny)
    back = load_lora(path, layout=tiny)
    assert len(back.layers) == 794 + 4 * 6
    assert back.layers[LF.SDXL_TO_K].weight_shape == (64, 64)
    with pytest.raises(LayerMismatchError) as e:
        load_lora(path)
    assert str(e.value).startswith(
        "tiny.safetensors: 818 layers do not match SDXL: 'time_embed.0' is (128, 32) in the file but "
        "(1280, 320) in SDXL; ")


def test_shared_factor_tensors_can_be_saved(tmp_path: Path) -> None:
    up = torch.randn(640, 8)
    down = torch.randn(4, 640)
    lora = LoRA(layers={ATTN_Q: LowRank(up[:, :4], down), ATTN_OUT: LowRank(up[:, 4:], down)}, base="sdxl")
    back = load_lora(save_lora(lora, tmp_path / "shared.safetensors"))
    assert torch.equal(back.layers[ATTN_OUT].up, up[:, 4:])


def test_synthetic_is_seeded_and_per_layer() -> None:
    a = synthetic_lora(rank=8, seed=3)
    b = synthetic_lora(rank=8, seed=3)
    c = synthetic_lora(rank=8, seed=4)
    wide = synthetic_lora(rank=8, seed=3, scope="all")
    assert torch.equal(a.layers[ATTN_Q].up, b.layers[ATTN_Q].up)
    assert not torch.equal(a.layers[ATTN_Q].up, c.layers[ATTN_Q].up)
    assert torch.equal(a.layers[ATTN_Q].down, wide.layers[ATTN_Q].down)
    assert len(a.layers) == 560 and len(wide.layers) == 794
    assert a.metadata["duolora_synthetic"] == "true"


def test_synthetic_decay_gives_a_decaying_spectrum() -> None:
    lora = synthetic_lora(rank=16, decay=0.7, seed=1)
    s = torch.linalg.svdvals(lora.layers[ATTN_Q].delta())[:16]
    assert s[0] / s[15] > 0.7 ** -12  # 0.7**-15 ≈ 211 for exact decay; random bases blur it a little


# ---------------------------------------------------------------------------------- errors (exact text)
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError) as e:
        load_lora(tmp_path / "nope.safetensors")
    assert str(e.value) == (f"nope.safetensors: file not found ({tmp_path / 'nope.safetensors'}). "
                            "Check the path or the file name.")
    assert e.value.path == os.fspath(tmp_path / "nope.safetensors")


def test_random_bytes_are_not_safetensors(tmp_path: Path) -> None:
    path = LF.random_bytes(tmp_path / "random.safetensors", n=4096, seed=0)
    assert path.read_bytes()[0] != 0x80  # not pickle magic, so the header check is what refuses it
    n = LF.header_length(path)
    with pytest.raises(NotSafetensorsError) as e:
        load_lora(path)
    assert str(e.value) == (
        f"random.safetensors is not a safetensors file (or is truncated/corrupt): its first 8 bytes announce "
        f"a {n}-byte header, but the file has 4096 bytes. Re-download it or export it again as .safetensors.")


def test_tiny_file_is_not_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(NotSafetensorsError) as e:
        read_lora(path)
    assert str(e.value) == ("short.safetensors is not a safetensors file: it has only 3 bytes. "
                            "Re-download it or export it again as .safetensors.")


def test_bad_json_header(tmp_path: Path) -> None:
    path = tmp_path / "badjson.safetensors"
    path.write_bytes((5).to_bytes(8, "little") + b"{nope" + b"\0" * 16)
    with pytest.raises(NotSafetensorsError) as e:
        read_lora(path)
    assert str(e.value).startswith("badjson.safetensors is not a safetensors file (or is corrupt): its header "
                                   "is not valid JSON (")


def test_truncated_copy_of_a_real_file(tmp_path: Path) -> None:
    good = save_lora(synthetic_lora(rank=4), tmp_path / "good.safetensors")
    cut = LF.truncated_copy(good, tmp_path / "cut.safetensors", keep=0.7)
    n = LF.header_length(good)
    described = good.stat().st_size - 8 - n
    present = cut.stat().st_size - 8 - n
    with pytest.raises(NotSafetensorsError) as e:
        load_lora(cut)
    assert str(e.value) == (f"cut.safetensors is truncated: its header describes {described} bytes of tensor "
                            f"data but only {present} are present. Re-download the file or export it again.")


PICKLE_MESSAGE = ("{} is a pickle-based PyTorch file (.ckpt/.pt/.pth/.bin). Loading such a file can run "
                  "arbitrary code, so DuoLoRA never opens it. Convert it to .safetensors (in a trusted, isolated "
                  "environment) and load the .safetensors file instead.")


@pytest.mark.parametrize(
    ("file_name", "zip_container"),
    [("lora.ckpt", True), ("lora.pt", True), ("lora.bin", True), ("renamed.safetensors", True),
     ("legacy_renamed.safetensors", False)],  # caught by the zip / pickle-protocol magic bytes
)
def test_pickle_files_are_refused_without_unpickling(file_name: str, zip_container: bool, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled.marker"
    path = LF.pickle_with_tripwire(tmp_path / file_name, marker, zip_container=zip_container)
    with pytest.raises(PickleFileError) as e:
        load_lora(path)
    assert str(e.value) == PICKLE_MESSAGE.format(file_name)
    assert not marker.exists()
    # the tripwire is real: unpickling the same bytes does create the marker
    # (under a .pt name: torch.load hands *.safetensors names to safetensors)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(path.read_bytes())
    torch.load(copy, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("header_bytes", [640, 896, 1152, 1408])  # 80 02 … to 80 05 …: pickle's magic bytes
def test_header_length_that_looks_like_pickle_magic(header_bytes: int, tmp_path: Path) -> None:
    import json
    import struct

    down, up = torch.randn(1, 640), torch.randn(640, 1)
    header = json.dumps({
        f"{LF.SDXL_TO_Q_KOHYA}.lora_down.weight": {"dtype": "F32", "shape": [1, 640], "data_offsets": [0, 2560]},
        f"{LF.SDXL_TO_Q_KOHYA}.lora_up.weight": {"dtype": "F32", "shape": [640, 1], "data_offsets": [2560, 5120]},
    }).encode()
    header += b" " * (header_bytes - len(header))  # the format pads its header with spaces
    path = tmp_path / "padded.safetensors"
    path.write_bytes(struct.pack("<Q", header_bytes) + header + down.numpy().tobytes() + up.numpy().tobytes())
    assert path.read_bytes()[:2] == bytes([0x80, header_bytes >> 8])
    lora = load_lora(path)
    assert torch.equal(lora.layers[ATTN_Q].down, down) and torch.equal(lora.layers[ATTN_Q].up, up)


def test_checkpoint_is_not_a_lora(tmp_path: Path) -> None:
    path = LF.checkpoint_like(tmp_path / "sd_xl_base.safetensors")
    with pytest.raises(NotALoRAError) as e:
        load_lora(path)
    assert str(e.value) == (
        "sd_xl_base.safetensors is not a LoRA: it is a full Stable Diffusion checkpoint (e.g. key "
        "'model.diffusion_model.input_blocks.0.0.weight'). Load it with a checkpoint loader (Load Checkpoint) "
        "and pick LoRA files for DuoLoRA.")


def test_embedding_is_not_a_lora(tmp_path: Path) -> None:
    path = LF.write(tmp_path / "emb.safetensors", {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)})
    with pytest.raises(NotALoRAError) as e:
        read_lora(path)
    assert str(e.value) == ("emb.safetensors is not a LoRA: it is a textual-inversion embedding (keys 'clip_g', "
                            "'clip_l'). Use it in the prompt as an embedding and pick LoRA files for DuoLoRA.")


def test_unknown_key_style(tmp_path: Path) -> None:
    path = LF.write(tmp_path / "odd.safetensors", {"foo.weight": torch.zeros(2), "bar.scale": torch.zeros(2),
                                                   "baz": torch.zeros(2), "qux.x": torch.zeros(1)})
    with pytest.raises(UnknownKeyStyleError) as e:
        read_lora(path)
    assert str(e.value) == (
        "odd.safetensors: no LoRA layers found; its tensor names match no known LoRA key style (e.g. "
        "'bar.scale', 'baz', 'foo.weight' and 1 more). Supported: kohya (lora_unet_…), diffusers/PEFT "
        "(…lora_A/lora_B, ….lora.down), diffusers attention processors, ComfyUI (diffusion_model.…lora_up).")


def test_unknown_keys_beside_lora_layers(tmp_path: Path) -> None:
    t = LF.kohya_layer(LF.SDXL_TO_Q_KOHYA, 640, 640, rank=4, alpha=4)
    t["some_tool.extra_state"] = torch.zeros(3)
    path = LF.write(tmp_path / "extra.safetensors", t)
    lora = read_lora(path)  # reading reports it ...
    assert [(s.key, s.kind) for s in lora.skipped] == [("some_tool.extra_state", "unknown_key")]
    with pytest.raises(UnknownKeyStyleError) as e:  # ... loading for a merge refuses it
        load_lora(path)
    assert str(e.value) == (
        "extra.safetensors: 1 tensor name is not a LoRA tensor DuoLoRA can read (e.g. 'some_tool.extra_state'). "
        "What it does to the model is unknown, so DuoLoRA refuses the file rather than merge it without it. "
        "Export the LoRA again as a plain kohya or diffusers LoRA.")


def _loha(module: str, out_f: int, in_f: int) -> dict[str, torch.Tensor]:
    return {f"{module}.hada_w1_a": torch.zeros(out_f, 4), f"{module}.hada_w1_b": torch.zeros(4, in_f),
            f"{module}.hada_w2_a": torch.zeros(out_f, 4), f"{module}.hada_w2_b": torch.zeros(4, in_f),
            f"{module}.alpha": torch.tensor(4.0)}


def test_loha_is_refused_by_name(tmp_path: Path) -> None:
    t = {**_loha(LF.SDXL_TO_Q_KOHYA, 640, 640), **_loha(LF.SDXL_TO_K_KOHYA, 640, 2048)}
    path = LF.write(tmp_path / "loha.safetensors", t)
    with pytest.raises(UnsupportedAdapterError) as e:
        read_lora(path)
    assert str(e.value) == (
        "loha.safetensors is a LyCORIS LoHa (Hadamard-product) file with 2 modules, made for SDXL, not a "
        "low-rank LoRA. DuoLoRA merges only low-rank LoRA layers (lora_down/lora_up or lora_A/lora_B): use a "
        "standard LoRA, or convert this LoHa to one first.")
    assert (e.value.algorithm, e.value.base) == ("LoHa", "sdxl")


def test_lokr_is_refused_by_name(tmp_path: Path) -> None:
    m = LF.SDXL_TO_K_KOHYA
    # ΔW = kron(w1, w2): (20·32) × (32·64) = 640 × 2048, SDXL's attn2.to_k
    t = {f"{m}.lokr_w1": torch.zeros(20, 32), f"{m}.lokr_w2_a": torch.zeros(32, 4),
         f"{m}.lokr_w2_b": torch.zeros(4, 64), f"{m}.alpha": torch.tensor(4.0)}
    with pytest.raises(UnsupportedAdapterError) as e:
        load_lora(LF.write(tmp_path / "lokr.safetensors", t))
    assert str(e.value).startswith("lokr.safetensors is a LyCORIS LoKr (Kronecker-product) file with 1 modules, "
                                   "made for SDXL, not a low-rank LoRA.")


def test_dora_is_refused_by_name(tmp_path: Path) -> None:
    t = LF.kohya_layer(LF.SDXL_TO_Q_KOHYA, 640, 640, rank=4, alpha=4)
    t[f"{LF.SDXL_TO_Q_KOHYA}.dora_scale"] = torch.ones(1, 640)
    with pytest.raises(UnsupportedAdapterError) as e:
        load_lora(LF.write(tmp_path / "dora.safetensors", t))
    assert str(e.value).startswith("dora.safetensors is a DoRA (weight-decomposed LoRA) file with 1 modules, made "
                                   "for SDXL, not a low-rank LoRA.")


def test_sd15_lora_is_for_sd1(tmp_path: Path) -> None:
    sd1 = synthetic_lora(SD15_LAYOUT, rank=4, text_encoder=True)
    path = save_lora(sd1, tmp_path / "sd15_style.safetensors", key_style="kohya_diffusers")
    lora = read_lora(path)  # inspect reads it and reports the base ...
    assert (lora.base, lora.key_style, len(lora.layers)) == ("sd1", "kohya_diffusers", 128 + 72)
    assert lora.skipped == []
    with pytest.raises(WrongBaseModelError) as e:  # ... the loaders refuse it
        load_lora(path)
    assert str(e.value) == (
        "sd15_style.safetensors: this LoRA is for SD1.x, not SDXL (its cross-attention layers read 768-wide "
        "text embeddings; SDXL's read 2048). Pick a LoRA trained for SDXL.")
    assert (e.value.base, e.value.expected) == ("sd1", "sdxl")


def test_text_encoder_only_sd1_lora(tmp_path: Path) -> None:
    # CLIP-L layers have the same names and shapes in SD1.x and SDXL; kohya's lora_te_ prefix decides
    t = LF.kohya_layer("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, rank=4, alpha=4)
    path = LF.write(tmp_path / "te_only.safetensors", t)
    assert read_lora(path).base == "sd1"
    with pytest.raises(WrongBaseModelError) as e:
        load_lora(path)
    assert str(e.value) == (
        "te_only.safetensors: this LoRA is for SD1.x, not SDXL (its metadata or its single-text-encoder key "
        "prefix lora_te_ say so). Pick a LoRA trained for SDXL.")
    t = LF.kohya_layer("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, rank=4, alpha=4)
    sdxl = load_lora(LF.write(tmp_path / "te1_only.safetensors", t))
    assert (sdxl.base, list(sdxl.layers)) == ("sdxl", ["te1.text_model.encoder.layers.0.self_attn.q_proj"])


def test_sd21_lora_is_for_sd2(tmp_path: Path) -> None:
    path = save_lora(synthetic_lora(SD21_LAYOUT, rank=4), tmp_path / "sd21.safetensors", key_style="diffusers_peft")
    with pytest.raises(WrongBaseModelError) as e:
        load_lora(path)
    assert str(e.value) == (
        "sd21.safetensors: this LoRA is for SD2.x, not SDXL (its cross-attention layers read 1024-wide "
        "text embeddings; SDXL's read 2048). Pick a LoRA trained for SDXL.")


def test_lora_for_another_model_family(tmp_path: Path) -> None:
    t = {**LF.kohya_layer("lora_unet_double_blocks_0_img_attn_qkv", 9216, 3072, rank=2),
         **LF.kohya_layer("lora_unet_single_blocks_0_linear1", 21504, 3072, rank=2)}
    path = LF.write(tmp_path / "flux.safetensors", t)
    lora = read_lora(path)
    assert (lora.base, len(lora.layers), len(lora.skipped)) == ("flux", 2, 0)
    with pytest.raises(WrongBaseModelError) as e:
        load_lora(path)
    assert str(e.value) == (
        "flux.safetensors: this LoRA is for Flux.1, not SDXL (e.g. its layer 'double_blocks.0.img_attn.qkv' does "
        "not exist in SDXL). Pick a LoRA trained for SDXL.")


def test_layer_with_wrong_shape(tmp_path: Path) -> None:
    sd = lora_to_state_dict(synthetic_lora(rank=4), "kohya_ldm")
    sd[f"{LF.SDXL_TO_K_KOHYA}.lora_down.weight"] = torch.zeros(4, 768)  # SD1.x context width in an SDXL file
    with pytest.raises(LayerMismatchError) as e:
        load_lora(LF.write(tmp_path / "bad_shape.safetensors", sd))
    assert str(e.value) == (
        f"bad_shape.safetensors: 1 layer does not match SDXL: '{LF.SDXL_TO_K}' is (640, 768) in the file but "
        "(640, 2048) in SDXL. This LoRA was made for a different model.")
    assert e.value.layers == [LF.SDXL_TO_K]


def test_layer_missing_from_sdxl(tmp_path: Path) -> None:
    # One layer SDXL does not have (input_blocks.4.1 has 2 transformer blocks) among 560 SDXL layers: the
    # SDXL part loads and the extra layer is named as left out (issue 15, item 5), not "another model".
    sd = lora_to_state_dict(synthetic_lora(rank=4), "kohya_ldm")
    sd.update(LF.kohya_layer("lora_unet_input_blocks_4_1_transformer_blocks_7_attn1_to_q", 640, 640, rank=4))
    lora = load_lora(LF.write(tmp_path / "extra_layer.safetensors", sd))
    assert len(lora.layers) == 560
    assert F.unknown_modules(lora) == ["lora_unet_input_blocks_4_1_transformer_blocks_7_attn1_to_q"]
    assert F.not_merged_lines(lora) == [
        ("1 × layer that does not exist in SDXL: left out of the merge "
         "(e.g. 'lora_unet_input_blocks_4_1_transformer_blocks_7_attn1_to_q')")]


def test_rank_mismatch(tmp_path: Path) -> None:
    t = LF.kohya_layer(LF.SDXL_TO_Q_KOHYA, 640, 640, rank=4, alpha=4)
    t[f"{LF.SDXL_TO_Q_KOHYA}.lora_down.weight"] = torch.zeros(8, 640)
    with pytest.raises(RankMismatchError) as e:
        read_lora(LF.write(tmp_path / "ranks.safetensors", t))
    assert str(e.value) == (
        f"ranks.safetensors: layer '{LF.SDXL_TO_Q_KOHYA}' has an up factor of rank 4 (640, 4) but a down factor "
        "of rank 8 (8, 640); both factors of a LoRA layer must have the same rank. The file is damaged; "
        "re-download or re-export it.")
    assert e.value.layer == LF.SDXL_TO_Q_KOHYA


def test_missing_factor(tmp_path: Path) -> None:
    t = LF.kohya_layer(LF.SDXL_TO_Q_KOHYA, 640, 640, rank=4, alpha=4)
    del t[f"{LF.SDXL_TO_Q_KOHYA}.lora_up.weight"]
    with pytest.raises(MalformedLoRAError) as e:
        read_lora(LF.write(tmp_path / "half.safetensors", t))
    assert str(e.value) == (f"half.safetensors: layer '{LF.SDXL_TO_Q_KOHYA}' has a down tensor but no up tensor, "
                            "so the file is incomplete. Re-download it or export it again.")


def test_nan_layer(tmp_path: Path) -> None:
    sd = lora_to_state_dict(synthetic_lora(rank=4), "comfyui")
    sd[f"diffusion_model.{ATTN_Q}.lora_up.weight"][3, 1] = float("nan")
    path = LF.write(tmp_path / "nan.safetensors", sd)
    assert read_lora(path).layers[ATTN_Q].up.isnan().sum() == 1  # reading keeps it (inspect reports it)
    with pytest.raises(NonFiniteError) as e:
        load_lora(path)
    assert str(e.value) == (f"nan.safetensors: layer '{ATTN_Q}' contains NaN or Inf values. The file is damaged "
                            "(often a training run that diverged); use another epoch or export.")
    assert e.value.layers == [ATTN_Q]


def test_empty_file(tmp_path: Path) -> None:
    path = LF.write(tmp_path / "empty.safetensors", {}, metadata={"ss_output_name": "empty"})
    with pytest.raises(EmptyLoRAError) as e:
        load_lora(path)
    assert str(e.value) == "empty.safetensors contains no tensors at all. Pick a LoRA file that has layers."


def test_layer_spelled_twice(tmp_path: Path) -> None:
    t = {**LF.kohya_layer(LF.SDXL_TO_Q_KOHYA, 640, 640, rank=4),
         **LF.kohya_layer("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 640, 640, rank=4)}
    with pytest.raises(MalformedLoRAError) as e:
        read_lora(LF.write(tmp_path / "twice.safetensors", t))
    assert str(e.value) == (  # keys are read in the file's (sorted) order
        f"twice.safetensors: layer '{ATTN_Q}' appears twice (as "
        f"'lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q' and '{LF.SDXL_TO_Q_KOHYA}'). "
        "A LoRA file must hold each layer once; re-export it.")


# ------------------------------------------------------------------------------------------- writing
def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    lora = synthetic_lora(rank=2)
    path = save_lora(lora, tmp_path / "out.safetensors")
    before = path.read_bytes()
    with pytest.raises(OutputExistsError) as e:
        save_lora(synthetic_lora(rank=2, seed=9), path)
    assert str(e.value) == f"out.safetensors already exists in {tmp_path}; choose another file name or allow overwriting."
    assert isinstance(e.value, FileExistsError)
    assert path.read_bytes() == before
    save_lora(synthetic_lora(rank=2, seed=9), path, overwrite=True)
    assert path.read_bytes() != before


def test_save_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("duolora.formats.write.save_file", broken_save_file)  # where the writer looks it up
    with pytest.raises(OSError, match="disk full"):
        save_lora(synthetic_lora(rank=2), tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_saved_files_get_the_mode_a_plain_write_gives(tmp_path: Path, umask: int) -> None:
    """Written and overwritten files (atomic save through a temporary file) are as readable as a file the same
    process creates with open(): 0o666 less the umask (0o644 under the usual 0o022), never mkstemp's 0o600."""
    old = os.umask(umask)
    try:
        plain = tmp_path / "plain.bin"
        plain.write_bytes(b"")
        path = save_lora(synthetic_lora(rank=2), tmp_path / "out.safetensors")
        first = stat.S_IMODE(path.stat().st_mode)
        save_lora(synthetic_lora(rank=2, seed=3), path, overwrite=True)
        second = stat.S_IMODE(path.stat().st_mode)
    finally:
        os.umask(old)
    assert first == second == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "plain.bin"]


def test_save_metadata_must_be_strings(tmp_path: Path) -> None:
    with pytest.raises(TypeError) as e:
        save_lora(synthetic_lora(rank=2), tmp_path / "m.safetensors", metadata={"steps": 100})  # type: ignore[dict-item]
    assert str(e.value) == "safetensors metadata must map strings to strings; 'steps' -> int"
    assert list(tmp_path.iterdir()) == []


def test_save_merges_metadata(tmp_path: Path) -> None:
    path = save_lora(synthetic_lora(rank=2), tmp_path / "m.safetensors", metadata={"duolora_method": "ziprank"})
    back = read_lora(path)
    assert back.metadata == {"duolora_synthetic": "true", "duolora_synthetic_seed": "0", "duolora_method": "ziprank"}


def test_summary_counts(tmp_path: Path) -> None:
    lora = read_lora(save_lora(synthetic_lora(rank=8, scope="all", text_encoder=True), tmp_path / "s.safetensors"))
    s = summary(lora)
    assert s["counts"] == {"unet_attention": 560, "unet_other": 234, "te1": 72, "te2": 192}
    assert (s["ranks"], s["alphas"], s["dtype"], s["conv_layers"]) == ([8], [8.0], "float32", 51)
    assert one_line_summary(lora) == "kohya_ldm · SDXL · 1058 layers (264 text encoder) · rank 8"


def test_sdxl_config_values_are_the_real_ones() -> None:
    assert (SDXL.model_channels, SDXL.context_dim, SDXL.adm_in_channels) == (320, 2048, 2816)
