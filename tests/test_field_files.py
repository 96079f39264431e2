"""LoRA files shaped like those in the field (issue 15): every scale a file means, every key spelling, every
layer accounted for — each kind of fault as a table, with the issue's right values.

Every LoRA here is SYNTHETIC (seeded noise with SDXL's real layer names and shapes), built by the test in the
shape a writer produces (diffusers/PEFT, kohya, OneTrainer, ComfyUI, LyCORIS): no real SDXL LoRA is small enough
to ship (shared/fixtures/SOURCES.md). What each writer and its own loader do was read in their sources:
diffusers ``loaders/lora_base.py`` + ``utils/peft_utils.py`` and peft ``LoraConfig``/``get_pattern_key``
(lora_adapter_metadata), kohya sd-scripts ``networks/lora.py`` (alpha = rank without ``.alpha``), ComfyUI
``comfy/lora.py`` + ``comfy/weight_adapter/lora.py`` in 0.3.75 and 0.8.0 (alpha tensors, ``.diff``/``.diff_b``/
``w_norm``/``b_norm``, text projection keys).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path

import lorafiles as LF
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from duolora import cli
from duolora import formats as F
from duolora.config import MergeConfig
from duolora.inspect import format_summary, inspect_file
from duolora.lora import LoRA, LowRank
from duolora.mergers import build_merger
from duolora.sdxl import ATTENTION_BLOCKS, SDXL_LAYOUT, block_of
from duolora.synthetic import synthetic_lora

Q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"  # (640, 640)
K2 = "middle_block.1.transformer_blocks.9.attn2.to_k"  # (1280, 2048)
CONV = "output_blocks.2.2.conv"  # (1280, 1280, 3, 3)
ADM = "label_emb.0.0"  # (1280, 2816)
TE1_Q = "te1.text_model.encoder.layers.0.self_attn.q_proj"  # (768, 768)
TE2_FC1 = "te2.text_model.encoder.layers.31.mlp.fc1"  # (5120, 1280)

SUFFIXES = {
    "lora_down/up": (".lora_down.weight", ".lora_up.weight"),
    "lora_A/B": (".lora_A.weight", ".lora_B.weight"),
    "lora.down/up": (".lora.down.weight", ".lora.up.weight"),
}


def factors(name: str, rank: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of seeded noise for the SDXL layer ``name`` (conv: down (r, in, kh, kw), up (out, r, 1, 1))."""
    shape = SDXL_LAYOUT[name].shape
    g = torch.Generator().manual_seed(seed)
    down = (torch.randn(rank, *shape[1:], generator=g) / math.sqrt(math.prod(shape[1:]))).to(dtype)
    up = (0.02 * torch.randn(shape[0], rank, *((1, 1) if len(shape) == 4 else ()), generator=g)).to(dtype)
    return up, down


def pair(module: str, suffix: str, up: torch.Tensor, down: torch.Tensor,
         alpha: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    d, u = SUFFIXES[suffix]
    t = {module + d: down, module + u: up}
    if alpha is not None:
        t[module + ".alpha"] = alpha
    return t


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


# ============================================================================ 1. scales outside the tensors
def peft_file(path: Path, metadata: dict | None, names: tuple[str, ...] = (Q, K2), rank: int = 16,
              ranks: dict[str, int] | None = None, dtype: torch.dtype = torch.float16) -> tuple[Path, dict]:
    """A diffusers/PEFT SDXL LoRA (unet.<diffusers path>.lora_A/B, no .alpha) with lora_adapter_metadata."""
    tensors, raw = {}, {}
    for i, name in enumerate(names):
        layer = SDXL_LAYOUT[name]
        module = (layer.diffusers if layer.is_text_encoder else "unet." + layer.diffusers)
        up, down = factors(name, (ranks or {}).get(name, rank), seed=i, dtype=dtype)
        tensors.update(pair(module, "lora_A/B", up, down))
        raw[name] = (up.float(), down.float())
    md = {F.PEFT_METADATA_KEY: json.dumps(metadata)} if metadata is not None else None
    save_file(tensors, os.fspath(path), metadata=md)
    return path, raw


UNET_R16_A64 = {"unet.r": 16, "unet.lora_alpha": 64, "unet.target_modules": ["to_q", "to_k"], "unet.use_dora": False}


@pytest.mark.parametrize(
    ("case", "metadata", "ranks", "expected"),
    [
        # the issue's file: lora_alpha 64 / r 16 means ΔW = 4·B·A
        ("issue: unet.r 16, unet.lora_alpha 64", UNET_R16_A64, {}, {Q: 4.0, K2: 4.0}),
        ("alpha_pattern (PEFT: first pattern matching the module's end)",
         {"unet.r": 16, "unet.lora_alpha": 16, "unet.alpha_pattern": {"attn1.to_q": 32, "to_q": 64}}, {},
         {Q: 2.0, K2: 1.0}),
        ("rank_pattern for a rank-8 layer",
         {"unet.r": 16, "unet.lora_alpha": 32, "unet.rank_pattern": {"mid_block.attentions.0.transformer_blocks.9"
                                                                     ".attn2.to_k": 8}}, {K2: 8},
         {Q: 2.0, K2: 4.0}),
        ("use_rslora: lora_alpha / √r", {"unet.r": 16, "unet.lora_alpha": 64, "unet.use_rslora": True}, {},
         {Q: 16.0, K2: 16.0}),
        ("keys without a component prefix cover every module", {"r": 16, "lora_alpha": 8}, {}, {Q: 0.5, K2: 0.5}),
        ("no lora_alpha: peft's default 8", {"unet.r": 16}, {}, {Q: 0.5, K2: 0.5}),
        ("no metadata: scale 1", None, {}, {Q: 1.0, K2: 1.0}),
    ],
)
def test_peft_metadata_scale(case: str, metadata: dict | None, ranks: dict, expected: dict, tmp_path: Path) -> None:
    path, raw = peft_file(tmp_path / "peft.safetensors", metadata, ranks=ranks)
    lora = F.load_lora(path)
    assert lora.scales == expected, case
    for name, scale in expected.items():
        up, down = raw[name]
        assert torch.equal(lora.layers[name].up, up * scale) and torch.equal(lora.layers[name].down, down), name
    source = "peft_metadata" if metadata is not None else "none"
    assert set(lora.scale_sources.values()) == {source}
    # the header-only read (inspect) gives the same scales
    assert F.read_lora(path, load_tensors=False).scales == expected


def test_peft_metadata_text_encoder_prefixes(tmp_path: Path) -> None:
    md = {"unet.r": 16, "unet.lora_alpha": 16, "text_encoder.r": 16, "text_encoder.lora_alpha": 8,
          "text_encoder_2.r": 16, "text_encoder_2.lora_alpha": 32}
    path, _ = peft_file(tmp_path / "te.safetensors", md, names=(Q, TE1_Q, TE2_FC1))
    assert F.load_lora(path).scales == {Q: 1.0, TE1_Q: 0.5, TE2_FC1: 2.0}


def test_inspect_says_where_the_scale_came_from(tmp_path: Path) -> None:
    path, _ = peft_file(tmp_path / "peft.safetensors", UNET_R16_A64)
    info = inspect_file(path)
    assert (info["scales"], info["scale_sources"], info["scale_details"]) == (
        [4.0], {"peft_metadata": 2}, ["unet: lora_alpha 64 / r 16"])
    lines = format_summary(info).splitlines()
    assert lines[9] == ("alpha:               from the header's lora_adapter_metadata (unet: lora_alpha 64 / r 16) "
                        "· scale 4")
    assert F.one_line_summary(F.read_lora(path)) == (
        "diffusers_peft · SDXL · 2 layers · rank 16 · scale 4 from lora_adapter_metadata")


ALPHA_VALUE, ALPHA_RANK = 8.0, 4


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-d", "(1,)", "(1,1)"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                   torch.int32, torch.float8_e4m3fn, torch.float8_e5m2],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_alpha_tensor_of_any_shape_and_dtype(shape: tuple, dtype: torch.dtype, tmp_path: Path) -> None:
    up, down = factors(Q, ALPHA_RANK, seed=3)
    alpha = torch.full(shape, ALPHA_VALUE).to(dtype)
    lora = F.load_lora(LF.write(tmp_path / "a.safetensors", pair(LF.SDXL_TO_Q_KOHYA, "lora_down/up", up, down, alpha)))
    assert (lora.alphas[Q], lora.scales[Q], lora.scale_sources[Q]) == (8.0, 2.0, "alpha_tensor")
    assert torch.equal(lora.layers[Q].up, up * 2.0)


def test_alpha_with_more_than_one_value_is_refused(tmp_path: Path) -> None:
    up, down = factors(Q, 4, seed=3)
    path = LF.write(tmp_path / "a4.safetensors", pair(LF.SDXL_TO_Q_KOHYA, "lora_down/up", up, down, torch.full((4,), 8.0)))
    with pytest.raises(F.MalformedLoRAError) as e:
        F.read_lora(path)
    assert str(e.value) == (f"a4.safetensors: the .alpha of '{LF.SDXL_TO_Q_KOHYA}' should hold one number but has "
                            "shape (4,) (ComfyUI and kohya cannot read it either). Re-export the file.")


def test_kohya_network_alpha_metadata_is_not_applied(tmp_path: Path) -> None:
    # kohya's loader sets alpha = rank for modules without .alpha (networks/lora.py "support old LoRA without
    # alpha"), ComfyUI uses scale 1: the metadata's ss_network_alpha is only a training record.
    up, down = factors(Q, 4, seed=3)
    path = LF.write(tmp_path / "old.safetensors", pair(LF.SDXL_TO_Q_KOHYA, "lora_down/up", up, down),
                    metadata={"ss_network_alpha": "8", "ss_network_dim": "4"})
    lora = F.load_lora(path)
    assert (lora.scales[Q], lora.scale_sources[Q]) == (1.0, "none")
    assert torch.equal(lora.layers[Q].up, up)
    note = ("the metadata's ss_network_alpha 8 is not applied to the 1 layers without .alpha: kohya's and "
            "ComfyUI's loaders use scale 1 (alpha = rank) for them")
    assert F.summary(lora)["scale_note"] == note
    assert format_summary(inspect_file(path)).splitlines()[9] == (
        f"alpha:               none: no .alpha tensor or lora_adapter_metadata · scale 1; {note}")
    assert F.one_line_summary(lora).endswith(" · ss_network_alpha 8 not applied")


@pytest.mark.parametrize(
    ("case", "alpha", "metadata", "message"),
    [
        ("alpha tensor and metadata agree", 64.0, UNET_R16_A64, None),
        ("alpha tensor and metadata disagree", 16.0, UNET_R16_A64,
         ("x.safetensors: layer 'unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q' has an .alpha tensor "
         "(16, scale 1) and its header's lora_adapter_metadata says lora_alpha 64 / r 16 (scale 4). diffusers refuses a "
         "file with both and ComfyUI applies only the tensor, so what the file means is ambiguous. Re-export the LoRA.")),
        ("metadata r is not the tensors' rank", None, {"unet.r": 8, "unet.lora_alpha": 8},
         ("x.safetensors: layer 'unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q' has rank 16, but its "
         "header's lora_adapter_metadata says r = 8 for it, so diffusers could not load this file either and its scale "
         "is unknown. Re-export the LoRA.")),
        ("metadata is not JSON", None, "{unet.r: 16",
         ("x.safetensors: its header's lora_adapter_metadata is not a JSON object (Expecting property name enclosed in "
         "double quotes: line 1 column 2 (char 1)), so the scale its writer meant (PEFT lora_alpha / r) cannot be "
         "read. Re-export the LoRA.")),
    ],
)
def test_scale_conflicts_are_refused(case: str, alpha: float | None, metadata, message: str | None,
                                     tmp_path: Path) -> None:
    up, down = factors(Q, 16, seed=1)
    t = pair("unet." + SDXL_LAYOUT[Q].diffusers, "lora_A/B", up, down,
             torch.tensor(alpha) if alpha is not None else None)
    raw = metadata if isinstance(metadata, str) else json.dumps(metadata)
    path = LF.write(tmp_path / "x.safetensors", t, metadata={F.PEFT_METADATA_KEY: raw})
    if message is None:
        assert F.load_lora(path).scales == {Q: 4.0}
        return
    with pytest.raises(F.MalformedLoRAError) as e:
        F.read_lora(path)
    assert str(e.value) == message, case


def test_merge_applies_the_metadata_scale(tmp_path: Path) -> None:
    """``duolora merge`` streams layers: the scale in the header reaches every streamed layer (ΔW = 4·B·A)."""
    content, raw = peft_file(tmp_path / "content.safetensors", UNET_R16_A64)
    style = F.save_lora(LoRA(layers={n: LowRank(*factors(n, 4, seed=7)) for n in (Q, K2)}, base="sdxl"),
                        tmp_path / "style.safetensors")
    out = tmp_path / "merged.safetensors"
    code, _, err = run_main("merge", str(content), str(style), "-o", str(out), "--method", "direct", "--dtype",
                            "fp32", "--quiet")
    assert (code, err) == (0, "")
    merged, s = F.load_lora(out), F.load_lora(style)
    for name, (up, down) in raw.items():
        expected = 4.0 * (up @ down).double() + s.layers[name].delta().double()
        got = merged.layers[name].delta().double()
        assert float((got - expected).norm() / expected.norm()) < 1e-6, name


# =================================================================================== 2. key spellings
UNET_NAMES = (Q, K2, CONV, ADM)
DOTTED = ("", "unet.", "diffusion_model.", "model.diffusion_model.", "base_model.model.", "unet.base_model.model.")
UNDERSCORE = ("lora_unet_", "lycoris_")
SPELLINGS = [(p, path, s) for p in DOTTED + UNDERSCORE for path in ("ldm", "diffusers") for s in SUFFIXES]


def spelled(name: str, prefix: str, path: str) -> str:
    layer = SDXL_LAYOUT[name]
    body = layer.name if path == "ldm" else layer.diffusers
    return prefix + (body.replace(".", "_") if prefix in UNDERSCORE else body)


@pytest.mark.parametrize(("prefix", "path", "suffix"), SPELLINGS,
                         ids=[f"{p or 'bare '}{path}-{s}" for p, path, s in SPELLINGS])
def test_every_unet_spelling_resolves(prefix: str, path: str, suffix: str) -> None:
    assert len(SPELLINGS) == 48
    sd, raw = {}, {}
    for i, name in enumerate(UNET_NAMES):
        up, down = factors(name, 3, seed=i)
        sd.update(pair(spelled(name, prefix, path), suffix, up, down))
        raw[name] = (up, down)
    lora = F.state_dict_to_lora(sd, {}, "spelled.safetensors")
    assert (lora.base, sorted(lora.layers), lora.skipped) == ("sdxl", sorted(UNET_NAMES), [])
    for name, (up, down) in raw.items():
        assert torch.equal(lora.layers[name].up, up) and torch.equal(lora.layers[name].down, down), name
    assert lora.key_style != "unknown" and "+" not in lora.key_style


TE_SPELLINGS = {
    "te1": ("te1.", "text_encoder.", "text_encoders.clip_l.transformer.", "clip_l.transformer.",
            "conditioner.embedders.0.transformer.", "text_encoder.base_model.model.", "lora_te1_", "lora_te_"),
    "te2": ("te2.", "text_encoder_2.", "text_encoders.clip_g.transformer.", "clip_g.transformer.",
            "text_encoder_2.base_model.model.", "lora_te2_"),
}
TE_CASES = [(w, p, s) for w, ps in TE_SPELLINGS.items() for p in ps for s in (*SUFFIXES, "lora_linear_layer")]


@pytest.mark.parametrize(("which", "prefix", "suffix"), TE_CASES, ids=[f"{w}-{p}-{s}" for w, p, s in TE_CASES])
def test_every_text_encoder_spelling_resolves(which: str, prefix: str, suffix: str) -> None:
    name = TE1_Q if which == "te1" else TE2_FC1
    other = TE2_FC1 if which == "te1" else TE1_Q  # the other encoder in kohya spelling: the file is SDXL's
    path = name.split(".", 1)[1]
    module = prefix + (path.replace(".", "_") if prefix.startswith("lora_") else path)
    up, down = factors(name, 2, seed=1)
    if suffix == "lora_linear_layer":
        sd = {module + ".lora_linear_layer.down.weight": down, module + ".lora_linear_layer.up.weight": up}
    else:
        sd = pair(module, suffix, up, down)
    sd.update(pair(SDXL_LAYOUT[other].kohya, "lora_down/up", *factors(other, 2, seed=2)))
    lora = F.state_dict_to_lora(sd, {}, "te.safetensors")
    assert (lora.base, sorted(lora.layers), lora.skipped) == ("sdxl", sorted((name, other)), [])
    assert torch.equal(lora.layers[name].up, up) and torch.equal(lora.layers[name].down, down)


def onetrainer_sdxl(path: Path) -> Path:
    """OneTrainer's SDXL LoRA: unet. + LDM path + kohya suffixes, 722 transformer layers, fp16, rank 4, alpha 1."""
    names = [n for n in SDXL_LAYOUT.unet_layers() if block_of(n) in ATTENTION_BLOCKS]
    tensors = {}
    for i, name in enumerate(names):
        up, down = factors(name, 4, seed=i, dtype=torch.float16)
        tensors.update(pair("unet." + name, "lora_down/up", up, down, torch.tensor(1.0, dtype=torch.float16)))
    return LF.write(path, tensors, metadata={"ss_base_model_version": "sdxl_base_v1-0"})


def test_onetrainer_sdxl_file_resolves_722_layers(tmp_path: Path) -> None:
    path = onetrainer_sdxl(tmp_path / "onetrainer.safetensors")
    lora = F.load_lora(path)
    assert len(lora.layers) == 722  # 70 transformer blocks × 10 projections + 11 × proj_in/proj_out
    assert (lora.base, lora.key_style, lora.ranks(), lora.dtype, lora.skipped) == (
        "sdxl", "unet.<ldm>.lora_down", [4], torch.float16, [])
    assert set(lora.scales.values()) == {0.25}  # alpha 1 / rank 4
    with safe_open(os.fspath(path), "pt") as f:
        up = f.get_tensor("unet.input_blocks.4.1.transformer_blocks.0.attn1.to_v.lora_up.weight")
    assert torch.equal(lora.layers["input_blocks.4.1.transformer_blocks.0.attn1.to_v"].up, up.float() * 0.25)


@pytest.mark.parametrize(
    ("case", "modules", "metadata", "error", "message"),
    [
        ("a known layer behind an unknown prefix", ["my_tool.input_blocks.4.1.transformer_blocks.0.attn1.to_q"], {},
         F.UnknownKeyStyleError,
         ("x.safetensors: none of its 1 layers is spelled in a way DuoLoRA reads: e.g. 'my_tool.input_blocks.4.1."
         "transformer_blocks.0.attn1.to_q' is SDXL's layer 'input_blocks.4.1.transformer_blocks.0.attn1.to_q' behind "
         "the prefix 'my_tool.', which DuoLoRA does not recognise. Export the LoRA again in kohya (lora_unet_…) or "
         "diffusers (unet.…) format; the README's 'LoRA files it reads' lists every spelling DuoLoRA reads.")),
        ("metadata says SDXL, names unknown", ["unet.blk3.attn.q", "unet.blk3.attn.k"],
         {"ss_base_model_version": "sdxl_base_v1-0"}, F.UnknownKeyStyleError,
         ("x.safetensors: its metadata says it is for SDXL, but none of its 2 layer names (e.g. 'unet.blk3.attn.k', "
         "'unet.blk3.attn.q') is a spelling of a SDXL layer DuoLoRA recognises. Export the LoRA again in kohya "
         "(lora_unet_…) or diffusers (unet.…) format; the README's 'LoRA files it reads' lists every spelling "
         "DuoLoRA reads.")),
        ("no claim, unknown names: another family", ["net.blk3.attn.q"], {}, F.WrongBaseModelError,
         ("x.safetensors: this LoRA is not for SDXL: none of its 1 layers (e.g. 'net.blk3.attn.q') exists in SDXL, "
         "SD1.x or SD2.x; it was probably made for another model family. Pick a LoRA trained for SDXL.")),
    ],
)
def test_nothing_resolves_names_the_spelling(case: str, modules: list[str], metadata: dict, error: type,
                                             message: str, tmp_path: Path) -> None:
    t = {}
    for m in modules:
        t.update(pair(m, "lora_down/up", torch.zeros(640, 2), torch.zeros(2, 640)))
    with pytest.raises(error) as e:
        F.load_lora(LF.write(tmp_path / "x.safetensors", t, metadata=metadata))
    assert str(e.value) == message, case


# ============================================================================================ 3. DoRA
def dora_case(kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    peft = "unet." + SDXL_LAYOUT[Q].diffusers
    up, down = factors(Q, 4, seed=1)
    mag = torch.ones(640)
    if kind == "peft lora_magnitude_vector":
        return {**pair(peft, "lora_A/B", up, down), peft + ".lora_magnitude_vector": mag}, {}
    if kind == "peft .lora_magnitude_vector.weight":
        return {**pair(peft, "lora_A/B", up, down), peft + ".lora_magnitude_vector.weight": mag}, {}
    if kind == "peft in-memory .lora_magnitude_vector.default.weight":
        return {peft + ".lora_A.default.weight": down, peft + ".lora_B.default.weight": up,
                peft + ".lora_magnitude_vector.default.weight": mag}, {}
    if kind == "kohya names keeping lora_magnitude_vector":
        return {**pair(LF.SDXL_TO_Q_KOHYA, "lora_down/up", up, down, torch.tensor(4.0)),
                LF.SDXL_TO_Q_KOHYA + ".lora_magnitude_vector": mag}, {}
    if kind == "kohya/LyCORIS dora_scale":
        return {**pair(LF.SDXL_TO_Q_KOHYA, "lora_down/up", up, down, torch.tensor(4.0)),
                LF.SDXL_TO_Q_KOHYA + ".dora_scale": mag.reshape(1, 640)}, {}
    assert kind == "metadata use_dora only"
    return pair(peft, "lora_A/B", up, down), {F.PEFT_METADATA_KEY: json.dumps({"unet.r": 4, "unet.lora_alpha": 4,
                                                                               "unet.use_dora": True})}


DORA_KINDS = ["peft lora_magnitude_vector", "peft .lora_magnitude_vector.weight",
              "peft in-memory .lora_magnitude_vector.default.weight", "kohya names keeping lora_magnitude_vector",
              "kohya/LyCORIS dora_scale", "metadata use_dora only"]


@pytest.mark.parametrize("kind", DORA_KINDS)
def test_dora_is_refused_by_name_in_every_spelling(kind: str, tmp_path: Path) -> None:
    tensors, metadata = dora_case(kind)
    path = LF.write(tmp_path / "dora.safetensors", tensors, metadata=metadata)
    with pytest.raises(F.UnsupportedAdapterError) as e:
        F.read_lora(path)
    evidence = {"kohya/LyCORIS dora_scale": "its dora_scale tensors",
                "metadata use_dora only": "its lora_adapter_metadata says use_dora"}.get(
        kind, "its lora_magnitude_vector tensors")
    assert str(e.value) == (
        "dora.safetensors is a DoRA (weight-decomposed LoRA) file with 1 modules, made for SDXL, not a low-rank "
        f"LoRA. Besides its low-rank factors it stores a magnitude per output channel ({evidence}) that rescales "
        "every patched weight after the low-rank update, so its effect is not a low-rank ΔW and DuoLoRA cannot "
        "merge it. Use the same subject or style as a plain LoRA (trained with DoRA off) instead. Do not delete "
        "the magnitude tensors to make it load: without them the file is a different LoRA.")
    assert (e.value.algorithm, e.value.base) == ("DoRA", "sdxl")


REFUSED = {
    "unknown tensor names": lambda: {**pair(LF.SDXL_TO_Q_KOHYA, "lora_down/up", *factors(Q, 2, 1)),
                                     "tool.scale": torch.ones(3)},
    "alpha without factors": lambda: {**pair(LF.SDXL_TO_Q_KOHYA, "lora_down/up", *factors(Q, 2, 1)),
                                      "lora_unet_x.alpha": torch.tensor(1.0)},
    "LoHa": lambda: {f"{LF.SDXL_TO_Q_KOHYA}.hada_w1_a": torch.zeros(640, 2), f"{LF.SDXL_TO_Q_KOHYA}.hada_w1_b":
                     torch.zeros(2, 640)},
    "full .diff": lambda: {f"{LF.SDXL_TO_Q_KOHYA}.diff": torch.zeros(640, 640)},
    **{f"DoRA: {k}": (lambda k=k: dora_case(k)[0]) for k in DORA_KINDS[:-1]},
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_no_refusal_advises_deleting_tensors(case: str, tmp_path: Path) -> None:
    with pytest.raises(F.LoRAError) as e:
        F.load_lora(LF.write(tmp_path / "r.safetensors", REFUSED[case]()))
    text = str(e.value).lower()
    assert "remove" not in text, text
    assert "delete" not in text or "do not delete" in text, text


# ==================================================== 4. what ComfyUI applies survives the merge or is said
def rich_file(path: Path, seed: int, scale: float = 1.0) -> tuple[Path, dict[str, torch.Tensor]]:
    """An SDXL kohya LoRA with what ComfyUI's own training/extraction and OneTrainer also write: a text
    projection layer, bias and norm differences in every spelling, and a bundled embedding."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name in (Q, "te2.text_projection"):
        t.update(pair(SDXL_LAYOUT[name].kohya, "lora_down/up", *factors_any(name, 2, seed)))
    diffs = {
        "input_blocks.4.1.proj_in.bias": ("lora_unet_input_blocks_4_1_proj_in.diff_b", (640,)),
        "input_blocks.4.1.norm.weight": ("diffusion_model.input_blocks.4.1.norm.diff", (640,)),
        "out.0.weight": ("lora_unet_out_0.w_norm", (320,)),
        "out.0.bias": ("lora_unet_out_0.b_norm", (320,)),
        "input_blocks.0.0.bias": ("diffusion_model.input_blocks.0.0.bias.diff", (320,)),
        "te1.text_model.final_layer_norm.weight": ("text_encoders.clip_l.transformer.text_model.final_layer_norm.diff",
                                                   (768,)),
    }
    values = {}
    for param, (key, shape) in diffs.items():
        values[param] = scale * torch.randn(shape, generator=g)
        t[key] = values[param]
    t["bundle_emb.sks.string_to_param.*"] = torch.zeros(1, 768)
    return LF.write(path, t), values


def factors_any(name: str, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = SDXL_LAYOUT[name].shape
    g = torch.Generator().manual_seed(seed)
    return 0.02 * torch.randn(shape[0], rank, generator=g), torch.randn(rank, shape[1], generator=g) / 40


def test_rich_file_reads_every_part(tmp_path: Path) -> None:
    path, values = rich_file(tmp_path / "rich.safetensors", seed=1)
    lora = F.load_lora(path)
    assert sorted(lora.layers) == sorted([Q, "te2.text_projection"])
    assert lora.patches.keys() == values.keys()
    assert all(torch.equal(lora.patches[k], v) for k, v in values.items())
    assert F.not_merged_lines(lora) == [f"1 × {F.EMBEDDING_REASON} (e.g. 'bundle_emb.sks.string_to_param.*')"]
    assert F.one_line_summary(lora) == ("kohya_ldm · SDXL · 2 layers (1 text encoder) · rank 2 · 6 bias/norm "
                                        "differences · not merged: 1 embedded token")


def expected_patches(a: dict, b: dict, w_c: float, w_s: float) -> dict[str, torch.Tensor]:
    return {k: (w_c * a[k] + w_s * b[k]) if k in a and k in b else (a.get(k, b.get(k))) for k in {*a, *b}}


def test_node_merge_carries_patches_and_text_projection(tmp_path: Path) -> None:
    c_path, c_vals = rich_file(tmp_path / "c.safetensors", seed=1)
    s_path, s_vals = rich_file(tmp_path / "s.safetensors", seed=2)
    s_vals.pop("out.0.bias")
    c, s = F.load_lora(c_path), F.load_lora(s_path)
    del s.patches["out.0.bias"]
    merger = build_merger("ziprank", c, s, MergeConfig(w_c=0.5, w_s=2.0))
    exported = merger.export()
    want = expected_patches(c_vals, s_vals, 0.5, 2.0)
    assert exported.patches.keys() == want.keys()
    assert all(torch.allclose(exported.patches[k], v, rtol=1e-6, atol=0) for k, v in want.items())
    sd = F.lora_to_state_dict(exported, "kohya_ldm", dtype=torch.float32)
    assert torch.equal(sd["lora_unet_input_blocks_4_1_proj_in.diff_b"], exported.patches["input_blocks.4.1.proj_in.bias"])
    assert torch.equal(sd["lora_unet_out_0.diff_b"], c_vals["out.0.bias"])  # only the content file patches it
    assert "text_encoders.clip_l.transformer.text_model.final_layer_norm.diff" in sd
    assert "lora_te2_text_projection.lora_up.weight" in sd  # a text-encoder layer: the plain sum, rank 2 + 2
    back = F.state_dict_to_lora(sd, {}, "merged.safetensors")
    torch.testing.assert_close(back.layers["te2.text_projection"].delta(),
                               0.5 * c.layers["te2.text_projection"].delta() + 2 * s.layers["te2.text_projection"].delta(),
                               rtol=1e-5, atol=1e-9)


def test_cli_merge_carries_patches_and_says_what_is_not_merged(tmp_path: Path) -> None:
    c_path, c_vals = rich_file(tmp_path / "c.safetensors", seed=1)
    s_path, s_vals = rich_file(tmp_path / "s.safetensors", seed=2)
    out = tmp_path / "merged.safetensors"
    code, stdout, err = run_main("merge", str(c_path), str(s_path), "-o", str(out), "--method", "direct",
                                 "--w-c", "0.5", "--w-s", "2", "--dtype", "fp32")
    assert code == 0, err
    assert stdout.splitlines()[1] == ("carried 6 bias/norm differences of the inputs (summed like layers outside "
                                      "the learned scope)")
    assert err.splitlines() == [
        f"note: content c.safetensors: not merged: 1 × {F.EMBEDDING_REASON} (e.g. 'bundle_emb.sks.string_to_param.*')",
        f"note: style s.safetensors: not merged: 1 × {F.EMBEDDING_REASON} (e.g. 'bundle_emb.sks.string_to_param.*')",
    ]
    merged = F.load_lora(out)
    want = expected_patches(c_vals, s_vals, 0.5, 2.0)
    assert merged.patches.keys() == want.keys()
    assert all(torch.allclose(merged.patches[k], v, rtol=1e-6, atol=0) for k, v in want.items())
    assert sorted(merged.layers) == sorted([Q, "te2.text_projection"])
    assert merged.skipped == []


# ========================================================== 5. a few unknown modules in an SDXL file
@pytest.mark.parametrize(("n_unknown", "refused"), [(1, False), (10, False), (186, False), (187, True)])
def test_few_unknown_modules_load_many_refuse(n_unknown: int, refused: bool, tmp_path: Path) -> None:
    sd = F.lora_to_state_dict(synthetic_lora(rank=1, seed=4), "kohya_ldm")  # the 560 attention layers
    for i in range(n_unknown):
        sd.update(LF.kohya_layer(f"lora_unet_extra_adapter_{i:03d}_proj", 8, 8, rank=1))
    path = LF.write(tmp_path / "partly.safetensors", sd)
    total = 560 + n_unknown
    assert (n_unknown >= F.UNKNOWN_SHARE_REFUSED * total) is refused  # 186/746 = 24.9 %, 187/747 = 25.03 %
    if refused:
        with pytest.raises(F.LayerMismatchError) as e:
            F.load_lora(path)
        assert str(e.value) == (
            "partly.safetensors: 187 of its 747 layers do not exist in SDXL (e.g. 'lora_unet_extra_adapter_000_proj', "
            "'lora_unet_extra_adapter_001_proj', 'lora_unet_extra_adapter_002_proj' and 184 more). A LoRA with this "
            "many unknown layers was made for a different model. Pick a LoRA trained for SDXL.")
        assert inspect_file(path)["for_merge"] == str(e.value)
        return
    lora = F.load_lora(path)
    assert len(lora.layers) == 560
    more = f" and {n_unknown - 3} more" if n_unknown > 3 else ""
    shown = ", ".join(f"'lora_unet_extra_adapter_{i:03d}_proj'" for i in range(min(3, n_unknown)))
    assert F.not_merged_lines(lora) == [
        f"{n_unknown} × layer that does not exist in SDXL: left out of the merge (e.g. {shown}{more})"]
    assert F.one_line_summary(lora).endswith(
        f" · not merged: {n_unknown} layer{'s' if n_unknown > 1 else ''} not in the base model")


def test_few_unrecognised_spellings_load_and_are_named(tmp_path: Path) -> None:
    sd = F.lora_to_state_dict(synthetic_lora(rank=1, seed=4), "kohya_ldm")
    for n in (Q, K2):
        sd = {("my_tool." + n + k[len(SDXL_LAYOUT[n].kohya):] if k.startswith(SDXL_LAYOUT[n].kohya + ".") else k): v
              for k, v in sd.items()}
    lora = F.load_lora(LF.write(tmp_path / "two.safetensors", sd))
    assert len(lora.layers) == 558
    assert F.not_merged_lines(lora) == [f"2 × {F.UNKNOWN_SPELLING_REASON} (e.g. 'my_tool.{Q}', 'my_tool.{K2}')"]


# ============================================================== 6. the merged file's scale in every dtype
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -24,  # a merge computes in float32
                 torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float8_e5m2: 2.0 ** -3}
WRITER_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("rank", [4, 257, 320])
@pytest.mark.parametrize("dtype", WRITER_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_written_alpha_is_the_rank_exactly(dtype: torch.dtype, rank: int) -> None:
    # alpha 1 folded in (a kohya default): up is rank× smaller than the trainer stored it
    lora = LoRA(layers={n: LowRank(factors(n, rank, seed=1)[0] / rank, factors(n, rank, seed=1)[1])
                        for n in (Q, K2, CONV)}, base="sdxl")
    sd = F.lora_to_state_dict(lora, "kohya_ldm", dtype=dtype)
    for name, lr in lora.layers.items():
        module = SDXL_LAYOUT[name].kohya
        alpha, down, up = (sd[module + s] for s in (".alpha", ".lora_down.weight", ".lora_up.weight"))
        assert alpha.item() / down.shape[0] == 1.0, (name, alpha.dtype, alpha.item())  # what ComfyUI computes
        assert (up.dtype, down.dtype) == (dtype, dtype)
        if dtype in UNIT_ROUNDOFF:  # float8 e4m3 has no number below 2⁻⁹: see formats.output_dtype
            got = (up.double().flatten(1) @ down.double().flatten(1)) * (alpha.item() / rank)
            assert rel_error(got, lr.delta(torch.float64).flatten(1)) <= UNIT_ROUNDOFF[dtype], name


def test_merges_never_write_float8() -> None:
    assert F.output_dtype(None, torch.float8_e4m3fn) == torch.bfloat16
    assert F.output_dtype(None, torch.float8_e5m2) == torch.bfloat16
    assert (F.output_dtype(None, torch.float16), F.output_dtype(None, None)) == (torch.float16, torch.float16)
    assert F.output_dtype(torch.float32, torch.float8_e4m3fn) == torch.float32


CLI_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
              "auto from float8 e4m3": torch.bfloat16, "auto from float64": torch.float64}


@pytest.mark.parametrize(("rank_c", "rank_s"), [(128, 129), (160, 160)], ids=["rank 257", "rank 320"])
@pytest.mark.parametrize("option", list(CLI_DTYPES))
def test_cli_merge_writes_alpha_equal_to_rank(option: str, rank_c: int, rank_s: int, tmp_path: Path) -> None:
    in_dtype = {"auto from float8 e4m3": torch.float8_e4m3fn, "auto from float64": torch.float64}.get(option)
    sources = []
    for role, rank, seed in (("c", rank_c, 1), ("s", rank_s, 2)):
        lora = LoRA(layers={n: LowRank(*factors(n, rank, seed=seed)) for n in (Q, K2, CONV)}, base="sdxl")
        sources.append(F.save_lora(lora, tmp_path / f"{role}.safetensors", dtype=in_dtype or torch.float16))
    out = tmp_path / "merged.safetensors"
    dtype_arg = [] if in_dtype else ["--dtype", option]
    code, _, err = run_main("merge", *map(str, sources), "-o", str(out), "--method", "direct", "--quiet", *dtype_arg)
    assert (code, err) == (0, "")
    c, s = (F.load_lora(p) for p in sources)
    want_dtype = CLI_DTYPES[option]
    with safe_open(os.fspath(out), "pt") as f:
        for name in (Q, K2, CONV):
            module = SDXL_LAYOUT[name].kohya
            alpha, down, up = (f.get_tensor(module + s) for s in (".alpha", ".lora_down.weight", ".lora_up.weight"))
            assert down.shape[0] == rank_c + rank_s
            assert alpha.item() / down.shape[0] == 1.0, (name, alpha.dtype)
            assert up.dtype == down.dtype == want_dtype
            merged = up.double().flatten(1) @ down.double().flatten(1)
            want = (c.layers[name].delta(torch.float64) + s.layers[name].delta(torch.float64)).flatten(1)
            assert rel_error(merged, want) <= UNIT_ROUNDOFF[want_dtype], name


# =============================================== 7. inspect on a file with hundreds of unknown layers
def test_inspect_summarises_hundreds_of_unknown_layers(tmp_path: Path) -> None:
    t = {}
    for i in range(19):
        t.update(LF.kohya_layer(f"lora_unet_double_blocks_{i}_img_attn_qkv", 96, 32, rank=1))
        t.update(LF.kohya_layer(f"lora_unet_double_blocks_{i}_txt_mlp_0", 128, 32, rank=1))
    for i in range(38):
        t.update(LF.kohya_layer(f"lora_unet_single_blocks_{i}_linear1", 224, 32, rank=1))
    path = LF.write(tmp_path / "flux.safetensors", t)
    lines = format_summary(inspect_file(path)).splitlines()
    assert len(lines) == 18  # 76 layers, not one line each
    assert lines[13:] == [
        "not merged:          76 (counted by module)",
        ("  76 × layer that does not exist in SDXL: left out of the merge (e.g. 'lora_unet_double_blocks_0_img_attn_qkv', "
        "'lora_unet_double_blocks_0_txt_mlp_0', 'lora_unet_double_blocks_10_img_attn_qkv' and 73 more)"),
        "NaN/Inf tensors:     0",
        ("for a merge:         refused: flux.safetensors: this LoRA is not for SDXL: none of its 76 layers (e.g. "
        "'lora_unet_double_blocks_0_img_attn_qkv', 'lora_unet_double_blocks_0_txt_mlp_0' and 74 more) exists in SDXL, "
        "SD1.x or SD2.x; it was probably made for another model family (its layer names look like Flux ones). Pick a "
        "LoRA trained for SDXL."),
        ("note: this is a LoRA for Flux (its layer names look like Flux ones), not for SDXL, SD1.x or SD2.x: none of "
        "its 76 layers is one of theirs. DuoLoRA merges SDXL LoRAs."),
    ]


def test_inspect_says_plainly_when_the_family_is_unknown(tmp_path: Path) -> None:
    t = {}
    for i in range(300):
        t.update(LF.kohya_layer(f"net.layer{i}.proj", 16, 16, rank=1))
    lines = format_summary(inspect_file(LF.write(tmp_path / "odd.safetensors", t))).splitlines()
    assert len(lines) < 25
    assert lines[-1] == ("note: this is a LoRA for a model family DuoLoRA does not know, not for SDXL, SD1.x or "
                         "SD2.x: none of its 300 layers is one of theirs. DuoLoRA merges SDXL LoRAs.")


# =========================================== done when: inspect, merge and the loaders agree on every file
def agreement_files(folder: Path) -> dict[str, Path]:
    files = {
        "peft metadata": peft_file(folder / "peft.safetensors", UNET_R16_A64)[0],
        "onetrainer": onetrainer_sdxl(folder / "onetrainer.safetensors"),
        "rich": rich_file(folder / "rich.safetensors", seed=1)[0],
    }
    sd = F.lora_to_state_dict(synthetic_lora(rank=1, seed=4), "kohya_ldm")
    files["few unknown"] = LF.write(folder / "few.safetensors", {**sd, **LF.kohya_layer("lora_unet_extra_proj", 8, 8, 1)})
    many = dict(sd)
    for i in range(200):
        many.update(LF.kohya_layer(f"lora_unet_extra_{i}_proj", 8, 8, 1))
    files["many unknown"] = LF.write(folder / "many.safetensors", many)
    files["dora"] = LF.write(folder / "dora.safetensors", dora_case("peft lora_magnitude_vector")[0])
    files["unknown prefix"] = LF.write(folder / "prefix.safetensors", pair(
        "my_tool." + Q, "lora_down/up", *factors(Q, 2, 1)))
    files["old kohya"] = LF.write(folder / "old.safetensors", pair(LF.SDXL_TO_Q_KOHYA, "lora_down/up", *factors(Q, 2, 1)),
                                  metadata={"ss_network_alpha": "1"})
    return files


def test_inspect_merge_and_loader_agree_on_every_file(tmp_path: Path) -> None:
    style = F.save_lora(LoRA(layers={Q: LowRank(*factors(Q, 2, seed=9))}, base="sdxl"), tmp_path / "style.safetensors")
    for case, path in agreement_files(tmp_path).items():
        out = tmp_path / f"out_{path.stem}.safetensors"
        code, _, err = run_main("merge", str(path), str(style), "-o", str(out), "--method", "direct", "--quiet")
        try:
            info = inspect_file(path)
        except F.LoRAError as e:  # unreadable: inspect, merge and load_lora give the same message
            assert (code, err) == (2, f"error: {e}\n"), case
            with pytest.raises(F.LoRAError) as again:
                F.load_lora(path)
            assert str(again.value) == str(e), case
            continue
        if info["for_merge"] is not None:
            assert (code, err) == (2, f"error: {info['for_merge']}\n"), case
            with pytest.raises(F.LoRAError) as e:
                F.load_lora(path)
            assert str(e.value) == info["for_merge"], case
            continue
        assert code == 0, (case, err)
        lora = F.read_lora(path)
        notes = [f"note: content {path.name}: not merged: {line}" for line in F.not_merged_lines(info)]
        if info["scale_note"]:
            notes.append(f"note: content {path.name}: {info['scale_note']}")
        assert err.splitlines() == notes, case
        summary = F.one_line_summary(lora)  # what the loader nodes show
        n = sum(g["count"] for g in info["not_merged"])
        assert (" · not merged: " in summary) == (n > 0), case
        assert F.not_merged(lora) == info["not_merged"], case
        assert len(F.load_lora(path).layers) == info["layers"], case
