"""LoRA files shaped like those in the field: every scale a file means, every key spelling, every layer
accounted for — each kind of fault as a table, with the right values. Sections 8–12: rank-0 layers, OneTrainer's
OMI keys, LyCORIS Tucker convs, PEFT save_pretrained folders, and messages that name what is wrong.

Every LoRA here is SYNTHETIC (seeded noise with SDXL's real layer names and shapes), built by the test in the
shape a writer produces (diffusers/PEFT, kohya, OneTrainer, ComfyUI, LyCORIS): no real SDXL LoRA is small enough
to ship (shared/fixtures/SOURCES.md). What each writer and its own loader do was read in their sources:
diffusers ``loaders/lora_base.py`` + ``utils/peft_utils.py`` and peft ``LoraConfig``/``get_pattern_key``
(lora_adapter_metadata), kohya sd-scripts ``networks/lora.py`` (alpha = rank without ``.alpha``), ComfyUI
``comfy/lora.py`` + ``comfy/weight_adapter/lora.py`` in 0.3.75 and 0.8.0 (alpha tensors, ``.diff``/``.diff_b``/
``w_norm``/``b_norm``, text projection keys, ``lora_mid``), OneTrainer ``modules/util/convert/lora`` (OMI key
sets), LyCORIS LoCon ``use_tucker``, peft ``save_pretrained`` (adapter_model.safetensors + adapter_config.json).
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
from lorafiles import (
    ADM,
    CONV,
    DORA_KINDS,
    K2,
    SUFFIXES,
    TE1_Q,
    TE2_FC1,
    Q,
    dora_case,
    factors,
    factors_any,
    onetrainer_sdxl,
    pair,
    peft_file,
    rich_file,
)
from safetensors import SafetensorError, safe_open

from duolora import cli, solver
from duolora import formats as F
from duolora.config import MergeConfig
from duolora.inspect import format_summary, inspect_file
from duolora.lora import LoRA, LowRank, SkippedKey, fold_alpha
from duolora.mergers import build_merger
from duolora.sdxl import SDXL_LAYOUT
from duolora.synthetic import synthetic_lora


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


# ============================================================================ 1. scales outside the tensors
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


TE_SPELLINGS = {  # "clip_l." / "clip_g.": OneTrainer's OMI format
    "te1": ("te1.", "text_encoder.", "text_encoders.clip_l.transformer.", "clip_l.transformer.", "clip_l.",
            "conditioner.embedders.0.transformer.", "text_encoder.base_model.model.", "lora_te1_", "lora_te_"),
    "te2": ("te2.", "text_encoder_2.", "text_encoders.clip_g.transformer.", "clip_g.transformer.", "clip_g.",
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


@pytest.mark.parametrize("method", ["direct", "ziprank"])
def test_cli_and_merge_files_write_one_identical_file_once(method: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    c_path, _ = rich_file(tmp_path / "c.safetensors", seed=1)
    s_path, _ = rich_file(tmp_path / "s.safetensors", seed=2)
    written = []
    save = F.save_state_dict

    def counted(tensors, path, *args, **kwargs):
        written.append(Path(path).name)
        return save(tensors, path, *args, **kwargs)

    monkeypatch.setattr("duolora.formats.write.save_state_dict", counted)  # save_lora calls it there
    code, _, err = run_main("merge", str(c_path), str(s_path), "-o", str(tmp_path / "cli.safetensors"),
                            "--method", method, "--w-c", "0.5", "--w-s", "2", "--dtype", "fp32", "--quiet")
    assert code == 0, err
    with safe_open(tmp_path / "cli.safetensors", "pt") as f:
        config = MergeConfig.from_dict(json.loads(f.metadata()["duolora_config"]))
    assert (config.method, config.w_c, config.w_s) == (method, 0.5, 2.0)
    from duolora import engine

    engine.merge_files(c_path, s_path, tmp_path / "engine.safetensors", config, dtype=torch.float32)
    assert written == ["cli.safetensors", "engine.safetensors"]  # one write each, nothing read back and rewritten
    with safe_open(tmp_path / "cli.safetensors", "pt") as a, safe_open(tmp_path / "engine.safetensors", "pt") as b:
        assert a.metadata() == b.metadata()
        assert sorted(a.keys()) == sorted(b.keys())
        assert sum(k.endswith((".diff", ".diff_b")) for k in a.keys()) == 6  # noqa: SIM118
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118


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
    """76 Flux.1-named layers at hidden size 32 (a model built like Flux.1 at other widths): one summary, read with
    Flux.1's table at those widths, as a merge reads it."""
    t = {}
    for i in range(19):
        t.update(LF.kohya_layer(f"lora_unet_double_blocks_{i}_img_attn_qkv", 96, 32, rank=1))
        t.update(LF.kohya_layer(f"lora_unet_double_blocks_{i}_txt_mlp_0", 128, 32, rank=1))
    for i in range(38):
        t.update(LF.kohya_layer(f"lora_unet_single_blocks_{i}_linear1", 224, 32, rank=1))
    path = LF.write(tmp_path / "flux.safetensors", t)
    lines = format_summary(inspect_file(path)).splitlines()
    assert len(lines) == 17  # 76 layers, not one line each
    assert [lines[2], lines[4], lines[5], *lines[13:]] == [
        "base model:          Flux.1",
        "  UNet attention:    57",
        "  other UNet:        19",
        "not merged:          0",
        "NaN/Inf tensors:     0",
        "for a merge:         usable",
        ("note: a Flux.1 LoRA: duolora merge merges it weights-only with another Flux.1 LoRA; so does ZipRank Merge in "
         "mode 'weights'."),
    ]


def test_inspect_says_plainly_when_the_family_is_unknown(tmp_path: Path) -> None:
    t = {}
    for i in range(300):
        t.update(LF.kohya_layer(f"net.layer{i}.proj", 16, 16, rank=1))
    lines = format_summary(inspect_file(LF.write(tmp_path / "odd.safetensors", t))).splitlines()
    assert len(lines) < 25
    assert lines[-1] == ("note: this is a LoRA for a model family DuoLoRA does not know, not for SDXL, SD1.x or "
                         "SD2.x: none of its 300 layers is one of theirs. DuoLoRA merges SDXL LoRAs.")


# ============================================================================== 8. rank-0 layers
def merged_delta(path: Path, name: str) -> torch.Tensor:
    return F.load_lora(path).layers[name].delta(torch.float64)


def style_file(folder: Path, names: tuple[str, ...] = (Q, K2, CONV, TE1_Q), seed: int = 9) -> Path:
    """A plain kohya SDXL style LoRA (rank 2, alpha = rank) sharing ``names`` with the content files here."""
    lora = LoRA(layers={n: LowRank(*factors(n, 2, seed=seed + i)) for i, n in enumerate(names)}, base="sdxl")
    return F.save_lora(lora, folder / "style.safetensors", overwrite=True)


RANK_ZERO = {  # case -> (layer, spelling): every spelling a pruned layer takes
    "kohya with .alpha": (K2, "kohya+alpha"),
    "kohya without .alpha": (K2, "kohya"),
    "diffusers/PEFT lora_A/lora_B": (K2, "peft"),
    "conv": (CONV, "kohya+alpha"),
    "LyCORIS Tucker conv": (CONV, "tucker"),
    "text encoder": (TE1_Q, "kohya+alpha"),
}


def rank_zero_file(path: Path, case: str) -> tuple[Path, torch.Tensor]:
    """A kohya SDXL LoRA with a rank-4 attn1.to_q (alpha 8: scale 2) and the rank-0 layer of ``case``."""
    up, down = factors(Q, 4, seed=1)
    sd = {**pair(LF.SDXL_TO_Q_KOHYA, "lora_down/up", up, down, torch.tensor(8.0)), **LF.rank_zero(*RANK_ZERO[case])}
    return LF.write(path, sd), 2.0 * up.double() @ down.double()


@pytest.mark.parametrize("case", list(RANK_ZERO))
def test_rank_zero_layer_contributes_nothing_and_is_named(case: str, tmp_path: Path) -> None:
    path, q_delta = rank_zero_file(tmp_path / "pruned.safetensors", case)
    name, spelling = RANK_ZERO[case]
    keys = sorted(LF.rank_zero(name, spelling))  # a safetensors file lists its keys sorted
    module = F.split_key(keys[0])[0]
    lora = F.load_lora(path)
    assert list(lora.layers) == [Q] and torch.equal(lora.layers[Q].delta(torch.float64), q_delta)
    assert lora.skipped == [SkippedKey(k, F.RANK_ZERO_REASON, "ignored", module=module) for k in keys]
    assert F.not_merged_lines(lora) == [f"1 × {F.RANK_ZERO_REASON} (e.g. '{module}')"]
    assert F.one_line_summary(lora) == "kohya_ldm · SDXL · 1 layers · rank 4 · not merged: 1 rank-0 layer"
    info = inspect_file(path)
    assert (info["for_merge"], info["ranks"], info["not_merged"][0]["count"]) == (None, [4], 1)
    style = style_file(tmp_path)
    for method in ("direct", "ziprank"):
        out = tmp_path / f"{method}.safetensors"
        code, _, err = run_main("merge", str(path), str(style), "-o", str(out), "--method", method, "--dtype",
                                "fp32", "--quiet", "--scope", "all")
        assert (code, err.splitlines()) == (0, [(f"note: content pruned.safetensors: not merged: "
                                                f"{F.not_merged_lines(lora)[0]}")]), method
        # the rank-0 layer is absent from the content: the style's layer passes through unchanged
        want = F.load_lora(style).layers[name].delta(torch.float64)
        assert rel_error(merged_delta(out, name), want) < 1e-6, method
    sd = F.lora_to_state_dict(F.load_lora(tmp_path / "direct.safetensors"), "kohya_ldm")
    assert all(t.shape[0] > 0 for k, t in sd.items() if k.endswith(".lora_down.weight"))


def test_all_layers_rank_zero_is_refused_in_one_line(tmp_path: Path) -> None:
    path = LF.write(tmp_path / "empty.safetensors", {**LF.rank_zero(Q, "kohya+alpha"), **LF.rank_zero(K2, "kohya")})
    message = ("empty.safetensors: all 2 of its layers have rank 0 (lora_down (0, in), lora_up (out, 0), e.g. "
               f"'{LF.SDXL_TO_Q_KOHYA}', '{SDXL_LAYOUT[K2].kohya}'), so it changes nothing and there is nothing to "
               "merge. Pick a LoRA file that has layers (a tool that pruned this one removed every component).")
    with pytest.raises(F.EmptyLoRAError) as e:
        F.load_lora(path)
    assert str(e.value) == message
    assert inspect_file(path)["for_merge"] == message
    code, _, err = run_main("merge", str(path), str(style_file(tmp_path)), "-o", str(tmp_path / "o.safetensors"))
    assert (code, err) == (2, f"error: {message}\n")


def test_rank_zero_in_memory_reaches_no_division_or_reshape(tmp_path: Path) -> None:
    """Every engine site that divides by a rank or reshapes a factor, with rank-0 factors."""
    conv = LowRank(torch.zeros(1280, 0, 1, 1), torch.zeros(0, 1280, 3, 3))
    lin = LowRank(torch.zeros(640, 0), torch.zeros(0, 640))
    assert (tuple(conv.A.shape), tuple(lin.A.shape)) == ((0, 11520), (0, 640))
    assert torch.equal(conv.delta(), torch.zeros(1280, 1280, 3, 3)) and torch.equal(lin.delta(), torch.zeros(640, 640))
    assert fold_alpha(lin.up, lin.down, 8.0) is lin.up
    assert conv.with_factors(conv.B, conv.A).weight_shape == (1280, 1280, 3, 3)
    # the writer leaves a rank-0 layer out: alpha = rank = 0 would make a loader divide by zero
    c = LoRA(layers={Q: LowRank(*factors(Q, 3, 1)), K2: LowRank(*factors(K2, 0, 2)), CONV: conv}, base="sdxl")
    assert {k.rsplit(".", 2)[0] for k in F.lora_to_state_dict(c)} == {LF.SDXL_TO_Q_KOHYA}
    with pytest.raises(F.EmptyLoRAError) as e:
        F.save_lora(LoRA(layers={CONV: conv}, base="sdxl"), tmp_path / "x.safetensors")
    assert str(e.value) == "<in-memory LoRA> has no layers of rank 1 or more; nothing to save to x.safetensors."
    # every merger treats a rank-0 layer as absent, also on both sides of a learned layer
    s = LoRA(layers={Q: LowRank(*factors(Q, 2, 3)), K2: LowRank(*factors(K2, 0, 4)), CONV: LowRank(*factors(CONV, 2, 5))},
             base="sdxl")
    for method in ("direct", "ziprank", "ziplora_out", "ziplora_in", "b_lora"):
        config = MergeConfig(method=method, scope="all")
        got = build_merger(method, c, s, config).export()
        want = build_merger(method, c.without_empty_layers(), s.without_empty_layers(), config).export()
        assert got.layers.keys() == want.layers.keys() == {Q, CONV} - ({Q, CONV} if method == "b_lora" else set())
        assert all(torch.equal(got.layers[n].delta(), want.layers[n].delta()) for n in got.layers), method
    solved = solver.merge_weights_only(c, s, MergeConfig(scope="all")).merger.export()
    assert set(solved.layers) == {Q, CONV}


@pytest.mark.parametrize("kind", ["share_hinge", "hinge", "code_compat"])
@pytest.mark.parametrize("zeros", ["both factors", "lora_up (saved before training)"])
def test_zero_valued_layers_get_finite_masks(zeros: str, kind: str) -> None:
    """Both LoRAs' ΔW zero on a learned layer: the weights-only problem is constant there (P = 0); the solve
    must still give masks in [0, 1], not 0/0 from its preconditioner."""
    down = torch.zeros(2, 640) if zeros == "both factors" else factors(Q, 2, 1)[1]
    c = LoRA(layers={Q: LowRank(torch.zeros(640, 2), down), K2: LowRank(*factors(K2, 2, 2))}, base="sdxl")
    s = LoRA(layers={Q: LowRank(torch.zeros(640, 3), torch.zeros(3, 640)), K2: LowRank(*factors(K2, 2, 3))}, base="sdxl")
    result = solver.merge_weights_only(c, s, MergeConfig(prior_loss_kind=kind))
    for name in (Q, K2):
        masks = torch.cat([result.merger.layer(name).m_c.detach(), result.merger.layer(name).m_s.detach()])
        assert bool(((masks >= 0) & (masks <= 1)).all()), (name, masks)
    assert all(math.isfinite(v) for pair_ in result.history.values() for v in pair_)
    assert torch.equal(result.merger.export().layers.get(Q, LowRank(torch.zeros(640, 0), torch.zeros(0, 640))).delta(),
                       torch.zeros(640, 640))


# ======================================================================= 9. OneTrainer's OMI keys
def test_omi_file_reads_as_its_kohya_twin(tmp_path: Path) -> None:
    """OneTrainer's enable_omi_format file reads exactly as the same tensors under kohya names (OneTrainer's own
    key sets map clip_l./clip_g./unet. one-to-one to lora_te1_/lora_te2_/lora_unet_)."""
    omi, kohya = LF.omi_sdxl()
    a, b = (F.load_lora(LF.write(tmp_path / f"{n}.safetensors", sd)) for n, sd in (("omi", omi), ("kohya", kohya)))
    assert list(a.layers) == list(b.layers) and len(a.layers) == 28
    assert all(torch.equal(a.layers[n].up, b.layers[n].up) and torch.equal(a.layers[n].down, b.layers[n].down)
               for n in a.layers)
    assert (a.scales, a.alphas) == (b.scales, b.alphas) and set(a.scales.values()) == {0.5}
    assert (a.key_style, a.skipped) == ("unet.<ldm>.lora_down", b.skipped)
    assert [s.reason for s in a.skipped] == [F.EMBEDDING_REASON] * 2
    info = inspect_file(tmp_path / "omi.safetensors")
    assert (info["counts"], info["for_merge"]) == (
        {"unet_attention": 2, "unet_other": 1, "te1": 12, "te2": 13}, None)  # te2: 12 + its text projection


@pytest.mark.parametrize("module", ["clip_g.text_projection", "clip_l.text_projection", "lora_te2_text_projection",
                                    "text_encoders.clip_g.transformer.text_projection"])
def test_text_projection_spellings(module: str, tmp_path: Path) -> None:
    name = ("te1." if "clip_l" in module else "te2.") + "text_projection"
    up, down = factors_any(name, 2, seed=3)
    sd = {**pair(module, "lora_down/up", up, down), **pair(LF.SDXL_TO_Q_KOHYA, "lora_down/up", *factors(Q, 2, 1))}
    lora = F.load_lora(LF.write(tmp_path / "p.safetensors", sd))
    assert (sorted(lora.layers), lora.skipped) == (sorted([Q, name]), [])
    assert torch.equal(lora.layers[name].up, up) and torch.equal(lora.layers[name].down, down)


def test_omi_merge_sums_the_text_encoders(tmp_path: Path) -> None:
    omi, _ = LF.omi_sdxl()
    path = LF.write(tmp_path / "omi.safetensors", omi)
    style = style_file(tmp_path, names=(Q, TE1_Q, "te2.text_projection"))
    out = tmp_path / "merged.safetensors"
    code, _, err = run_main("merge", str(path), str(style), "-o", str(out), "--method", "direct", "--dtype", "fp32",
                            "--quiet")
    assert code == 0, err
    c, s = F.load_lora(path), F.load_lora(style)
    for name in (TE1_Q, "te2.text_projection", "te2.text_model.encoder.layers.11.mlp.fc2"):
        want = c.layers[name].delta(torch.float64) + (s.layers[name].delta(torch.float64) if name in s.layers else 0)
        assert rel_error(merged_delta(out, name), want) < 1e-6, name


# ================================================================= 10. LyCORIS LoCon Tucker convs
TUCKER_CONVS = {  # SDXL 3×3 convs: a res-block conv, a downsampler, an upsampler
    "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
    "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
    CONV: "up_blocks.0.upsamplers.0.conv",
}
TUCKER_SPELLINGS = {
    "kohya LDM names": lambda n: "lora_unet_" + n.replace(".", "_"),
    "kohya diffusers names (LyCORIS)": lambda n: "lora_unet_" + TUCKER_CONVS[n].replace(".", "_"),
    "lycoris_ (SimpleTuner)": lambda n: "lycoris_" + TUCKER_CONVS[n].replace(".", "_"),
    "ComfyUI diffusion_model.": lambda n: "diffusion_model." + n,
}


@pytest.mark.parametrize("alpha", [None, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("spelling", list(TUCKER_SPELLINGS))
def test_tucker_conv_folds_exactly(spelling: str, dtype: torch.dtype, alpha: float | None, tmp_path: Path) -> None:
    """A LoCon file (plain linear layers + Tucker convs): each conv reads as up·down' with the dense ΔW of
    the three convs to float32 rounding, scale alpha / rank included."""
    sd, dense = pair(LF.SDXL_TO_Q_KOHYA, "lora_down/up", *factors(Q, 4, 1)), {}
    for i, name in enumerate(TUCKER_CONVS):
        t, dense[name] = LF.tucker_conv(TUCKER_SPELLINGS[spelling](name), name, 4, seed=i, alpha=alpha, dtype=dtype)
        sd.update(t)
    path = LF.write(tmp_path / "locon.safetensors", sd)
    lora = F.load_lora(path)
    assert (sorted(lora.layers), lora.skipped) == (sorted([Q, *TUCKER_CONVS]), [])
    for name, want in dense.items():
        lr = lora.layers[name]
        assert (tuple(lr.up.shape), tuple(lr.down.shape)) == ((want.shape[0], 4, 1, 1), (4, *want.shape[1:]))
        assert rel_error(lr.delta(torch.float64), want) < 1e-6, name
        assert lora.scales[name] == (alpha / 4 if alpha else 1.0)
    info = inspect_file(path)
    assert (info["for_merge"], info["conv_layers"], info["layers"]) == (None, 3, 4)
    style = style_file(tmp_path, names=(Q, CONV))
    out = tmp_path / "merged.safetensors"
    code, _, err = run_main("merge", str(path), str(style), "-o", str(out), "--method", "direct", "--dtype", "fp32",
                            "--quiet")
    assert (code, err) == (0, "")
    want = dense[CONV] + F.load_lora(style).layers[CONV].delta(torch.float64)
    assert rel_error(merged_delta(out, CONV), want) < 1e-6


def test_tucker_dense_delta_is_the_three_convs() -> None:
    """The oracle: the dense ΔW of tucker_conv applies what lora_up(lora_mid(lora_down(x))) computes."""
    name = "input_blocks.1.0.in_layers.2"
    t, dense = LF.tucker_conv("m", name, 3, seed=5, alpha=6.0)
    x = torch.randn(2, 320, 9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = torch.nn.functional.conv2d(x, t["m.lora_down.weight"].double())
    h = torch.nn.functional.conv2d(h, t["m.lora_mid.weight"].double(), padding=1)
    y = torch.nn.functional.conv2d(h, t["m.lora_up.weight"].double()) * 2.0  # alpha 6 / rank 3
    assert rel_error(torch.nn.functional.conv2d(x, dense, padding=1), y) < 1e-12


@pytest.mark.parametrize(("case", "mid_shape", "error", "message"), [
    ("lora_mid of another rank", (4, 5, 3, 3), F.RankMismatchError,
     ("t.safetensors: layer 'lora_unet_output_blocks_2_2_conv' has a lora_mid of shape (4, 5, 3, 3) but a lora_down of "
     "rank 4 (4, 1280, 1, 1); lora_mid's second dimension must be lora_down's rank. The file is damaged; re-download "
     "or re-export it.")),
    ("lora_mid of two dimensions", (4, 4), F.MalformedLoRAError,
     ("t.safetensors: layer 'lora_unet_output_blocks_2_2_conv' has a lora_mid of shape (4, 4) with a lora_down of shape "
     "(4, 1280, 1, 1); a LyCORIS Tucker layer needs lora_down (rank, in, 1, 1) and lora_mid (rank, rank, kh, kw). "
     "Re-export the file.")),
])
def test_malformed_tucker_is_refused_in_one_line(case: str, mid_shape: tuple, error: type, message: str,
                                                 tmp_path: Path) -> None:
    t, _ = LF.tucker_conv(SDXL_LAYOUT[CONV].kohya, CONV, 4, seed=1)
    t[f"{SDXL_LAYOUT[CONV].kohya}.lora_mid.weight"] = torch.zeros(mid_shape)
    with pytest.raises(error) as e:
        F.read_lora(LF.write(tmp_path / "t.safetensors", t))
    assert str(e.value) == message, case


def test_adapter_refusal_counts_the_whole_file(tmp_path: Path) -> None:
    """A file with a few LoHa modules among plain LoRA layers is refused, and says how many of its modules are
    LoHa rather than counting only those as if they were the file."""
    sd = {**pair(LF.SDXL_TO_Q_KOHYA, "lora_down/up", *factors(Q, 2, 1)),
          **pair(SDXL_LAYOUT[K2].kohya, "lora_down/up", *factors(K2, 2, 2)),
          **pair(SDXL_LAYOUT[CONV].kohya, "lora_down/up", *factors(CONV, 2, 3))}
    for name in (TE1_Q, ADM):
        out_f, in_f = SDXL_LAYOUT[name].shape
        sd.update({f"{SDXL_LAYOUT[name].kohya}.hada_w1_a": torch.zeros(out_f, 2),
                   f"{SDXL_LAYOUT[name].kohya}.hada_w1_b": torch.zeros(2, in_f)})
    with pytest.raises(F.UnsupportedAdapterError) as e:
        F.read_lora(LF.write(tmp_path / "mixed.safetensors", sd))
    assert str(e.value) == (
        "mixed.safetensors is a LyCORIS LoHa (Hadamard-product) file, made for SDXL, not a low-rank LoRA: 2 of its 5 "
        "modules are LoHa modules (the other 3 are low-rank LoRA layers). DuoLoRA merges only low-rank LoRA layers "
        "(lora_down/lora_up or lora_A/lora_B): use a standard LoRA, or convert this LoHa to one first.")


# ======================================================= 11. PEFT save_pretrained folders (adapter_config.json)
PEFT_CONFIGS = [  # (case, adapter_config.json scale entries, ranks, expected scale per layer) — peft's own rules
    ("the reported file: lora_alpha 32 / r 16 (read at scale 1 it was 0.5× the intended ΔW)",
     {"r": 16, "lora_alpha": 32}, {}, {Q: 2.0, K2: 2.0, CONV: 2.0}),
    ("alpha_pattern: first pattern matching the module name's end",
     {"r": 16, "lora_alpha": 16, "alpha_pattern": {"attn1.to_q": 64, "to_q": 8}}, {}, {Q: 4.0, K2: 1.0, CONV: 1.0}),
    ("rank_pattern for a rank-4 conv", {"r": 16, "lora_alpha": 32, "rank_pattern": {"up_blocks.0.upsamplers.0.conv": 4}},
     {CONV: 4}, {Q: 2.0, K2: 2.0, CONV: 8.0}),
    ("use_rslora: lora_alpha / √r", {"r": 16, "lora_alpha": 8, "use_rslora": True}, {}, {Q: 2.0, K2: 2.0, CONV: 2.0}),
    ("no lora_alpha: peft's default 8", {"r": 16}, {}, {Q: 0.5, K2: 0.5, CONV: 0.5}),
]


@pytest.mark.parametrize(("case", "config", "ranks", "expected"), PEFT_CONFIGS, ids=[c[0][:40] for c in PEFT_CONFIGS])
def test_peft_folder_scale_comes_from_its_config(case: str, config: dict, ranks: dict, expected: dict,
                                                 tmp_path: Path) -> None:
    path, raw = LF.peft_folder(tmp_path / "adapter", {k: v for k, v in config.items()}, ranks=ranks)
    lora = F.load_lora(path)
    assert (lora.scales, set(lora.scale_sources.values())) == (expected, {"peft_config"}), case
    for name, scale in expected.items():
        up, down = raw[name]
        assert torch.equal(lora.layers[name].up, up * scale) and torch.equal(lora.layers[name].down, down), name
    assert F.read_lora(path, load_tensors=False).scales == expected  # inspect's header-only read


def test_peft_folder_says_where_the_scale_came_from(tmp_path: Path) -> None:
    path, raw = LF.peft_folder(tmp_path / "adapter", {"r": 16, "lora_alpha": 32})
    info = inspect_file(path)
    assert format_summary(info).splitlines()[9] == (
        "alpha:               from the adapter_config.json beside the file (lora_alpha 32 / r 16) · scale 2")
    origin = "scale 2 from the adapter_config.json beside it (lora_alpha 32 / r 16), as PEFT applies it"
    assert (info["scale_origin"], info["scale_note"], info["for_merge"]) == (origin, None, None)
    assert F.one_line_summary(F.read_lora(path)) == (
        "diffusers_peft · SDXL · 3 layers · rank 16 · scale 2 from adapter_config.json")
    style = style_file(tmp_path)
    out = tmp_path / "merged.safetensors"
    code, _, err = run_main("merge", str(path), str(style), "-o", str(out), "--method", "direct", "--dtype", "fp32",
                            "--quiet")
    assert (code, err) == (0, f"note: content adapter_model.safetensors: {origin}\n")
    s = F.load_lora(style)
    for name, (up, down) in raw.items():
        want = 2.0 * up.double().flatten(1) @ down.double().flatten(1) + s.layers[name].delta(torch.float64).flatten(1)
        assert rel_error(merged_delta(out, name).flatten(1), want) < 1e-6, name


@pytest.mark.parametrize("case", ["adapter_model.safetensors without its adapter_config.json",
                                  "base_model.model. keys renamed away from adapter_config.json"])
def test_peft_adapter_without_its_config_says_the_scale_may_be_missing(case: str, tmp_path: Path) -> None:
    renamed = case.startswith("base_model")
    path, _ = LF.peft_folder(tmp_path / "adapter", {"r": 16, "lora_alpha": 32} if renamed else None,
                             file_name="my_adapter.safetensors" if renamed else "adapter_model.safetensors")
    lora = F.load_lora(path)
    assert (set(lora.scales.values()), set(lora.scale_sources.values())) == ({1.0}, {"peft_config_missing"})
    info = inspect_file(path)
    assert info["scale_note"] == F.PEFT_CONFIG_MISSING_NOTE
    assert format_summary(info).splitlines()[9] == (
        "alpha:               none: no .alpha tensor, lora_adapter_metadata or adapter_config.json beside the file "
        f"· scale 1; {F.PEFT_CONFIG_MISSING_NOTE}")
    assert F.one_line_summary(lora).endswith(" · PEFT adapter without its adapter_config.json: scale may be missing")
    code, _, err = run_main("merge", str(path), str(style_file(tmp_path)), "-o", str(tmp_path / "m.safetensors"),
                            "--quiet")
    assert (code, err) == (0, f"note: content {path.name}: {F.PEFT_CONFIG_MISSING_NOTE}\n")


def test_diffusers_file_without_metadata_is_not_taken_for_a_peft_adapter(tmp_path: Path) -> None:
    path, _ = peft_file(tmp_path / "pytorch_lora_weights.safetensors", None)  # unet.… lora_A: scale 1 is right
    assert (F.summary(F.load_lora(path))["scale_note"], F.load_lora(path).scale_sources[Q]) == (None, "none")


PEFT_REFUSED = [
    ("use_dora", {"r": 16, "lora_alpha": 16, "use_dora": True}, None, F.UnsupportedAdapterError,
     ("adapter_model.safetensors is a DoRA (weight-decomposed LoRA) file with 3 modules, made for SDXL, not a low-rank "
     "LoRA. Besides its low-rank factors it stores a magnitude per output channel (the adapter_config.json beside it "
     "says use_dora) that rescales every patched weight after the low-rank update, so its effect is not a low-rank ΔW "
     "and DuoLoRA cannot merge it. Use the same subject or style as a plain LoRA (trained with DoRA off) instead. Do "
     "not delete the magnitude tensors to make it load: without them the file is a different LoRA.")),
    ("peft_type LOHA", {"peft_type": "LOHA"}, None, F.UnsupportedAdapterError,
     ("adapter_model.safetensors: the adapter_config.json beside it says peft_type 'LOHA', a PEFT adapter that is not "
     "a LoRA, so its tensors do not mean ΔW = lora_B·lora_A. DuoLoRA merges only low-rank LoRA layers: use a LoRA "
     "adapter (peft_type LORA) instead.")),
    ("r is not the tensors' rank", {"r": 8, "lora_alpha": 16}, None, F.MalformedLoRAError,
     ("adapter_model.safetensors: layer 'base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q' "
     "has rank 16, but the adapter_config.json beside it says r = 8 for it, so PEFT could not load this file either "
     "and its scale is unknown. Re-export the LoRA.")),
    ("config and lora_adapter_metadata disagree", {"r": 16, "lora_alpha": 32}, {"r": 16, "lora_alpha": 16},
     F.MalformedLoRAError,
     ("adapter_model.safetensors: layer 'base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q' "
     "has its header's lora_adapter_metadata says lora_alpha 16 / r 16 (scale 1) and the adapter_config.json beside it "
     "says lora_alpha 32 / r 16 (scale 2). diffusers applies the header's and PEFT the adapter_config.json's, so what "
     "the file means is ambiguous. Re-export the LoRA.")),
]


@pytest.mark.parametrize(("case", "config", "metadata", "error", "message"), PEFT_REFUSED, ids=[c[0] for c in PEFT_REFUSED])
def test_peft_config_contradictions_are_refused(case: str, config: dict, metadata: dict | None, error: type,
                                                message: str, tmp_path: Path) -> None:
    md = {F.PEFT_METADATA_KEY: json.dumps(metadata)} if metadata is not None else None
    path, _ = LF.peft_folder(tmp_path / "adapter", config, metadata=md)
    with pytest.raises(error) as e:
        F.read_lora(path)
    assert str(e.value) == message, case
    assert run_main("inspect", str(path))[::2] == (2, f"error: {message}\n")


def test_unreadable_peft_config_is_named(tmp_path: Path) -> None:
    path, _ = LF.peft_folder(tmp_path / "adapter", {"r": 16})
    (tmp_path / "adapter" / "adapter_config.json").write_text("{r: 16")
    code, _, err = run_main("inspect", str(path))
    assert (code, err) == (2, ("error: adapter_model.safetensors: the adapter_config.json beside it is not a JSON object "
                              "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1)), so the "
                              "scale its writer meant (PEFT lora_alpha / r) cannot be read. Save the adapter again "
                              "with save_pretrained.\n"))


def test_peft_config_agreeing_with_the_header_is_read(tmp_path: Path) -> None:
    md = {F.PEFT_METADATA_KEY: json.dumps({"r": 16, "lora_alpha": 32})}
    path, _ = LF.peft_folder(tmp_path / "adapter", {"r": 16, "lora_alpha": 32}, metadata=md)
    lora = F.load_lora(path)
    assert (set(lora.scales.values()), set(lora.scale_sources.values())) == ({2.0}, {"peft_metadata"})


# ============================================================================ 12. messages that mislead
@pytest.mark.parametrize(("value", "shown"), [
    (16, "16, a number"), (0.5, "0.5, a number"), (True, "true, a boolean"), (None, "null, null"),
    (["a", "b"], '["a", "b"], a list'), ({"img": {"sks dog": 12}}, '{"img": {"sks dog": 12}}, an object'),
])
def test_metadata_that_is_not_strings_is_named_and_the_fix_said(value: object, shown: str, tmp_path: Path) -> None:
    path = LF.with_raw_metadata(
        LF.write(tmp_path / "md.safetensors", pair(LF.SDXL_TO_Q_KOHYA, "lora_down/up", *factors(Q, 2, 1))),
        {"ss_output_name": "md", "ss_tag_frequency": value})
    message = ("md.safetensors: 1 of the 2 metadata values in its header is not a string (e.g. 'ss_tag_frequency': "
               f"{shown}). The safetensors format allows only strings there, so safetensors readers (ComfyUI's "
               "loader too) refuse the file; its tensors are intact. Re-saving it with every metadata value "
               'written as a string ("16", not 16) fixes it.')
    for command in (["inspect", str(path)], ["merge", str(path), str(style_file(tmp_path)), "-o",
                                               str(tmp_path / "o.safetensors")]):
        assert run_main(*command)[::2] == (2, f"error: {message}\n"), command
    with pytest.raises(SafetensorError):
        safe_open(os.fspath(path), "pt")  # what every safetensors reader does with it


def nan_file(path: Path, n: int) -> Path:
    sd = F.lora_to_state_dict(synthetic_lora(rank=1, seed=4), "kohya_ldm")
    names = list(synthetic_lora(rank=1, seed=4).layers)
    for name in names[:n]:
        sd[SDXL_LAYOUT[name].kohya + ".lora_up.weight"][0, 0] = float("nan")
    sd["bundle_emb.sks.string_to_param.*"] = torch.full((1, 768), float("inf"))  # no merge reads it
    return LF.write(path, sd)


@pytest.mark.parametrize("n", [1, 40])
def test_nan_in_many_layers_is_counted_alike_everywhere(n: int, tmp_path: Path) -> None:
    path = nan_file(tmp_path / "nan.safetensors", n)
    names = list(synthetic_lora(rank=1, seed=4).layers)[:n]
    shown = f"layer '{names[0]}' contains" if n == 1 else f"{n} layers ('{names[0]}', '{names[1]}' and {n - 2} more) contain"
    message = (f"nan.safetensors: {shown} NaN or Inf values. The file is damaged (often a training run that "
               "diverged); use another epoch or export.")
    with pytest.raises(F.NonFiniteError) as e:
        F.load_lora(path)  # the nodes' check
    assert (str(e.value), e.value.layers) == (message, names)
    info = inspect_file(path)
    assert (info["for_merge"], len(info["non_finite_keys"])) == (message, n + 1)
    code, _, err = run_main("merge", str(path), str(style_file(tmp_path)), "-o", str(tmp_path / "o.safetensors"))
    assert (code, err) == (2, f"error: {message}\n")


def test_nan_only_where_no_merge_reads_refuses_nothing(tmp_path: Path) -> None:
    path = nan_file(tmp_path / "emb.safetensors", 0)
    info = inspect_file(path)
    assert (info["for_merge"], info["non_finite_keys"]) == (None, ["bundle_emb.sks.string_to_param.*"])


def test_alphas_without_factors_are_ignored_with_a_note(tmp_path: Path) -> None:
    """A kohya SDXL file whose text-encoder factors a tool stripped, leaving their .alpha tensors."""
    sd = pair(LF.SDXL_TO_Q_KOHYA, "lora_down/up", *factors(Q, 2, 1), torch.tensor(2.0))
    stripped = [SDXL_LAYOUT[n].kohya for n in (TE1_Q, TE2_FC1, "te1.text_model.encoder.layers.3.mlp.fc1",
                                                "te2.text_model.encoder.layers.0.self_attn.k_proj")]
    stripped.append("text_encoders.clip_l.transformer.text_model.encoder.layers.5.self_attn.v_proj")  # ComfyUI's
    sd.update({f"{m}.alpha": torch.tensor(4.0) for m in stripped})
    stripped.sort()  # a safetensors file lists its keys sorted
    path = LF.write(tmp_path / "stripped.safetensors", sd)
    lora = F.load_lora(path)
    assert list(lora.layers) == [Q]
    assert F.not_merged_lines(lora) == [(f"5 × {F.ALPHA_ONLY_REASON} (e.g. '{stripped[0]}', '{stripped[1]}', "
                                        f"'{stripped[2]}' and 2 more)")]
    assert F.one_line_summary(lora).endswith(" · not merged: 5 alphas without factors")
    assert inspect_file(path)["for_merge"] is None
    code, _, err = run_main("merge", str(path), str(style_file(tmp_path)), "-o", str(tmp_path / "o.safetensors"),
                            "--quiet")
    assert (code, err) == (0, f"note: content stripped.safetensors: not merged: {F.not_merged_lines(lora)[0]}\n")


def test_a_file_of_only_alphas_is_empty(tmp_path: Path) -> None:
    path = LF.write(tmp_path / "alphas.safetensors", {f"{SDXL_LAYOUT[n].kohya}.alpha": torch.tensor(4.0) for n in (Q, K2)})
    with pytest.raises(F.EmptyLoRAError) as e:
        F.read_lora(path)
    assert str(e.value) == (
        f"alphas.safetensors holds only .alpha tensors (2, e.g. '{LF.SDXL_TO_Q_KOHYA}.alpha', "
        f"'{SDXL_LAYOUT[K2].kohya}.alpha') and no lora_down/lora_up factors: an alpha alone does nothing, so there is "
        "nothing to merge. Pick a LoRA file that has layers.")


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
    files["PEFT folder"] = LF.peft_folder(folder / "peft", {"r": 16, "lora_alpha": 32})[0]
    files["PEFT adapter without its config"] = LF.peft_folder(folder / "peft_bare", None)[0]
    files["OMI"] = LF.write(folder / "omi.safetensors", LF.omi_sdxl()[0])
    files["stripped alphas"] = LF.write(folder / "alphas.safetensors", {
        **pair(LF.SDXL_TO_Q_KOHYA, "lora_down/up", *factors(Q, 2, 1)), f"{SDXL_LAYOUT[TE1_Q].kohya}.alpha": torch.tensor(1.0)})
    files["old kohya"] = LF.write(folder / "old.safetensors", pair(LF.SDXL_TO_Q_KOHYA, "lora_down/up", *factors(Q, 2, 1)),
                                  metadata={"ss_network_alpha": "1"})
    return files


def test_inspect_merge_and_loader_agree_on_every_file(tmp_path: Path) -> None:
    style = F.save_lora(LoRA(layers={Q: LowRank(*factors(Q, 2, seed=9))}, base="sdxl"), tmp_path / "style.safetensors")
    for i, (case, path) in enumerate(agreement_files(tmp_path).items()):
        out = tmp_path / f"out_{i}.safetensors"
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
        notes += [f"note: content {path.name}: {info[k]}" for k in ("scale_origin", "scale_note") if info[k]]
        assert err.splitlines() == notes, case
        summary = F.one_line_summary(lora)  # what the loader nodes show
        n = sum(g["count"] for g in info["not_merged"])
        assert (" · not merged: " in summary) == (n > 0), case
        assert F.not_merged(lora) == info["not_merged"], case
        assert len(F.load_lora(path).layers) == info["layers"], case
