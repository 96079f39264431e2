"""A merge of ONE content LoRA and one style LoRA stays bit for bit what it was before the engine took K content
LoRAs: a fixed pair merged through ``duolora.engine.run_merge`` in every mode, with every method and four
settings, hashed (the export's factors and bias/norm differences, the masks, the loss history, the component
counts, the export's metadata and the Merge Report's text), and from files through the streamed weights-only
merge (the written tensors and metadata). The digests were computed with the two-LoRA engine (single
thread, x86-64 CPU torch) and are compared exactly; run this file as a script to print today's digests.

A digest that changes means a one-pair merge now gives a different result: find the arithmetic that changed
(an operation order, a batching, a random draw) rather than updating the number.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from engine_toys import ToyModel, single_thread, toy_references, toy_setup  # noqa: F401 - autouse fixture
from safetensors import safe_open

from duolora import engine, formats
from duolora.config import METHODS, MergeConfig
from duolora.report import build_report
from duolora.solver import FastModeError
from duolora.synthetic import synthetic_lora

OBJECTIVES = ("weights_only", "layerwise", "paper", "layerwise_paper")
# Four settings: the defaults; every optional term on (prior initialisation, Constyle ×2, similarity, fast
# keep, rank budget) over every shared layer in the raw basis with a higher prune threshold; and the two other
# prior-loss forms, whose fast-mode solves take other paths.
VARIANTS: dict[str, dict] = {
    "defaults": {},
    "everything": {"prior_init": True, "constyle_iterations": 2, "lambda_sim": 0.01, "scope": "all",
                   "basis": "raw", "prior_push": "both", "cycle_scale": "fixed", "fast_keep": 0.5, "max_rank": 5,
                   "prune_threshold": 0.05},
    "hinge": {"prior_loss_kind": "hinge", "prior_init": True, "margin": 0.2},
    "code_compat": {"prior_loss_kind": "code_compat", "scope": "all"},
}
STEPS = 3
PATCH = "input_blocks.4.1.norm.bias"  # a bias difference both LoRAs carry
ONLY_STYLE_PATCH = "output_blocks.3.1.norm.weight"


def golden_pair():
    """(model, content, style): engine_toys.toy_setup's pair with bias/norm differences added."""
    model, content, style = toy_setup()
    g = torch.Generator().manual_seed(5)
    content.patches = {PATCH: torch.randn(32, generator=g)}
    style.patches = {PATCH: torch.randn(32, generator=g), ONLY_STYLE_PATCH: torch.randn(32, generator=g)}
    return model, content, style


def _inputs() -> engine.ReferenceInputs:
    refs = toy_references()
    return engine.ReferenceInputs(content_latents=torch.cat(refs.content), style_latents=torch.cat(refs.style),
                                  content_prompt=refs.p_c, style_prompt=refs.p_s, combined_prompt=refs.p_cs)


class _Digest:
    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def text(self, s: str) -> None:
        data = s.encode()
        self.h.update(struct.pack("<Q", len(data)) + data)

    def tensor(self, t: torch.Tensor) -> None:
        self.text(f"{t.dtype}{tuple(t.shape)}")
        t = t.detach().cpu().contiguous().reshape(-1)
        self.h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    def floats(self, values) -> None:
        self.h.update(struct.pack(f"<{len(values)}d", *values))

    def hexdigest(self) -> str:
        return self.h.hexdigest()[:20]


def _result_digest(result) -> str:
    d = _Digest()
    merged = result.merged
    for name in sorted(merged.layers):
        d.text(name)
        d.tensor(merged.layers[name].up)
        d.tensor(merged.layers[name].down)
    for name in sorted(merged.patches):
        d.text(name)
        d.tensor(merged.patches[name])
    d.text(json.dumps(merged.metadata, sort_keys=True))
    d.text(f"{merged.key_style}|{merged.base}|{merged.dtype}")
    if result.merger is not None:
        for key, value in result.merger.state_dict().items():
            d.text(key)
            d.tensor(value)
        d.text(build_report(result.merger, result.history, roles=result.config.roles(),
                            prune_threshold=result.config.prune_threshold).text())
    for key in sorted(result.history):
        d.text(key)
        d.floats(result.history[key])
    d.text(f"{result.steps_done}|{result.total_components}|{result.kept_components}|{result.cancelled}")
    return d.hexdigest()


def merge_case(method: str, objective: str, variant: str) -> str:
    """The digest of one in-memory merge, or 'refused: <message>'."""
    model, content, style = golden_pair()
    config = MergeConfig(method=method, objective=objective, steps=STEPS, **VARIANTS[variant])
    try:
        result = engine.run_merge(content, style, config, open_denoiser=ToyModel(model), references=_inputs())
    except FastModeError as e:
        return f"refused: {str(e)[:40]}"
    return _result_digest(result)


def file_case(tmp: Path, layout, method: str, variant: str) -> str:
    """The digest of a streamed weights-only merge of two synthetic LoRAs on the tiny SDXL layout, written to
    files (the content one with text-encoder layers; chunks of 97 layers)."""
    content = synthetic_lora(layout, rank=4, seed=11, std=0.2, text_encoder=True)
    style = synthetic_lora(layout, rank=6, seed=12, std=0.2)
    paths = []
    for lora, name in ((content, "content"), (style, "style")):
        path = tmp / f"golden_{name}.safetensors"
        formats.save_lora(lora, path, dtype=torch.float32, layout=layout, overwrite=True)
        paths.append(path)
    out = tmp / f"golden_{method}_{variant}.safetensors"
    config = MergeConfig(method=method, objective="weights_only", **VARIANTS[variant])
    result = engine.run_merge(paths[0], paths[1], config, layout=layout, chunk_layers=97,
                              output=engine.OutputFile(out, dtype=torch.float16, overwrite=True))
    d = _Digest()
    with safe_open(str(out), framework="pt") as f:
        for key in sorted(f.keys()):
            d.text(key)
            d.tensor(f.get_tensor(key))
        metadata = dict(f.metadata())
    # The config's JSON is left out: it lists every MergeConfig field, which other work may add to.
    metadata.pop("duolora_config", None)
    d.text(json.dumps(metadata, sort_keys=True))
    for key in sorted(result.history):
        d.text(key)
        d.floats(result.history[key])
    d.text(f"{result.total_components}|{result.kept_components}")
    return d.hexdigest()


FILE_METHODS = ("ziprank", "direct", "b_lora")

# Computed with the two-LoRA engine (see the module docstring). Keys: method/objective/variant, and
# file/method/variant for the streamed merges.
EXPECTED: dict[str, str] = {
    "ziprank/weights_only/defaults": "0115dbc4fe45011716d5",
    "ziprank/weights_only/everything": "e02b308796e73ea9f8bd",
    "ziprank/weights_only/hinge": "2c3d6555f6e5909be933",
    "ziprank/weights_only/code_compat": "f40e17338e1e4ce495e2",
    "ziprank/layerwise/defaults": "125b90a22ba59a1773ab",
    "ziprank/layerwise/everything": "542b7f05dae595a7098f",
    "ziprank/layerwise/hinge": "00b0f4e389b467ec343f",
    "ziprank/layerwise/code_compat": "da6a3f65548a3f44e2cc",
    "ziprank/paper/defaults": "10e304e7d24d22e13524",
    "ziprank/paper/everything": "37848a961fd81c82e309",
    "ziprank/paper/hinge": "78225b0f85549b8e8f11",
    "ziprank/paper/code_compat": "6f942e2bdf67ee421ca4",
    "ziprank/layerwise_paper/defaults": "95497650f4d3bc651f76",
    "ziprank/layerwise_paper/everything": "3ed17be2a75311bb9db3",
    "ziprank/layerwise_paper/hinge": "88dd469e702949c95a38",
    "ziprank/layerwise_paper/code_compat": "2204248750a8ee612c69",
    "ziplora_out/weights_only/defaults": "refused: the 'weights' mode solves ZipRank's rank",
    "ziplora_out/weights_only/everything": "refused: the 'weights' mode solves ZipRank's rank",
    "ziplora_out/weights_only/hinge": "refused: the 'weights' mode solves ZipRank's rank",
    "ziplora_out/weights_only/code_compat": "refused: the 'weights' mode solves ZipRank's rank",
    "ziplora_out/layerwise/defaults": "refused: the 'layerwise' mode solves ZipRank's ra",
    "ziplora_out/layerwise/everything": "refused: the 'layerwise' mode solves ZipRank's ra",
    "ziplora_out/layerwise/hinge": "refused: the 'layerwise' mode solves ZipRank's ra",
    "ziplora_out/layerwise/code_compat": "refused: the 'layerwise' mode solves ZipRank's ra",
    "ziplora_out/paper/defaults": "c6d815880ec5f7c0864d",
    "ziplora_out/paper/everything": "3ac5b4d04ec04c29cdce",
    "ziplora_out/paper/hinge": "afa1d03cb12f019837ae",
    "ziplora_out/paper/code_compat": "e28d98b1b2af3cfb6d60",
    "ziplora_out/layerwise_paper/defaults": "refused: the 'layerwise' mode solves ZipRank's ra",
    "ziplora_out/layerwise_paper/everything": "refused: the 'layerwise' mode solves ZipRank's ra",
    "ziplora_out/layerwise_paper/hinge": "refused: the 'layerwise' mode solves ZipRank's ra",
    "ziplora_out/layerwise_paper/code_compat": "refused: the 'layerwise' mode solves ZipRank's ra",
    "ziplora_in/weights_only/defaults": "refused: the 'weights' mode solves ZipRank's rank",
    "ziplora_in/weights_only/everything": "refused: the 'weights' mode solves ZipRank's rank",
    "ziplora_in/weights_only/hinge": "refused: the 'weights' mode solves ZipRank's rank",
    "ziplora_in/weights_only/code_compat": "refused: the 'weights' mode solves ZipRank's rank",
    "ziplora_in/layerwise/defaults": "refused: the 'layerwise' mode solves ZipRank's ra",
    "ziplora_in/layerwise/everything": "refused: the 'layerwise' mode solves ZipRank's ra",
    "ziplora_in/layerwise/hinge": "refused: the 'layerwise' mode solves ZipRank's ra",
    "ziplora_in/layerwise/code_compat": "refused: the 'layerwise' mode solves ZipRank's ra",
    "ziplora_in/paper/defaults": "f2f4fab551c873252c5d",
    "ziplora_in/paper/everything": "dd7b571eea0daf00c371",
    "ziplora_in/paper/hinge": "7be70bd91b6749062484",
    "ziplora_in/paper/code_compat": "1b1de8b76d15823bf3b0",
    "ziplora_in/layerwise_paper/defaults": "refused: the 'layerwise' mode solves ZipRank's ra",
    "ziplora_in/layerwise_paper/everything": "refused: the 'layerwise' mode solves ZipRank's ra",
    "ziplora_in/layerwise_paper/hinge": "refused: the 'layerwise' mode solves ZipRank's ra",
    "ziplora_in/layerwise_paper/code_compat": "refused: the 'layerwise' mode solves ZipRank's ra",
    "direct/weights_only/defaults": "508027fda2f34985d99d",
    "direct/weights_only/everything": "818d1e0cd18d9c46310a",
    "direct/weights_only/hinge": "508027fda2f34985d99d",
    "direct/weights_only/code_compat": "28b9e9e2b1a3f850c71d",
    "direct/layerwise/defaults": "508027fda2f34985d99d",
    "direct/layerwise/everything": "818d1e0cd18d9c46310a",
    "direct/layerwise/hinge": "508027fda2f34985d99d",
    "direct/layerwise/code_compat": "28b9e9e2b1a3f850c71d",
    "direct/paper/defaults": "508027fda2f34985d99d",
    "direct/paper/everything": "818d1e0cd18d9c46310a",
    "direct/paper/hinge": "508027fda2f34985d99d",
    "direct/paper/code_compat": "28b9e9e2b1a3f850c71d",
    "direct/layerwise_paper/defaults": "508027fda2f34985d99d",
    "direct/layerwise_paper/everything": "818d1e0cd18d9c46310a",
    "direct/layerwise_paper/hinge": "508027fda2f34985d99d",
    "direct/layerwise_paper/code_compat": "28b9e9e2b1a3f850c71d",
    "b_lora/weights_only/defaults": "ec95874fe65a72d932c3",
    "b_lora/weights_only/everything": "31f442705d41b9c4d1c0",
    "b_lora/weights_only/hinge": "ec95874fe65a72d932c3",
    "b_lora/weights_only/code_compat": "1501693a3b1d8cf4c530",
    "b_lora/layerwise/defaults": "ec95874fe65a72d932c3",
    "b_lora/layerwise/everything": "31f442705d41b9c4d1c0",
    "b_lora/layerwise/hinge": "ec95874fe65a72d932c3",
    "b_lora/layerwise/code_compat": "1501693a3b1d8cf4c530",
    "b_lora/paper/defaults": "ec95874fe65a72d932c3",
    "b_lora/paper/everything": "31f442705d41b9c4d1c0",
    "b_lora/paper/hinge": "ec95874fe65a72d932c3",
    "b_lora/paper/code_compat": "1501693a3b1d8cf4c530",
    "b_lora/layerwise_paper/defaults": "ec95874fe65a72d932c3",
    "b_lora/layerwise_paper/everything": "31f442705d41b9c4d1c0",
    "b_lora/layerwise_paper/hinge": "ec95874fe65a72d932c3",
    "b_lora/layerwise_paper/code_compat": "1501693a3b1d8cf4c530",
    "file/ziprank/defaults": "20aaf960bd2b361573ff",
    "file/ziprank/everything": "4b4399f3e6b863c9b0c1",
    "file/ziprank/hinge": "4c032fa3385a07f0d5fc",
    "file/ziprank/code_compat": "233c8f95d2b8c0a89bfc",
    "file/direct/defaults": "cb1b360c1f04fe2ba29a",
    "file/direct/everything": "ae59239dcb1152477b6a",
    "file/direct/hinge": "cb1b360c1f04fe2ba29a",
    "file/direct/code_compat": "ce29b5da6aa66788c551",
    "file/b_lora/defaults": "aa5949be367e485da4e7",
    "file/b_lora/everything": "523206b5711f2f60dd34",
    "file/b_lora/hinge": "aa5949be367e485da4e7",
    "file/b_lora/code_compat": "b7b540d2d7463eaf78b1",
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("method", METHODS)
def test_one_pair_merges_exactly_as_before(method: str, objective: str, variant: str) -> None:
    assert merge_case(method, objective, variant) == EXPECTED[f"{method}/{objective}/{variant}"]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", FILE_METHODS)
def test_one_pair_file_merges_exactly_as_before(method: str, variant: str, tmp_path: Path, tiny_layout) -> None:
    assert file_case(tmp_path, tiny_layout, method, variant) == EXPECTED[f"file/{method}/{variant}"]


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    digests = {}
    for m in METHODS:
        for o in OBJECTIVES:
            for v in VARIANTS:
                digests[f"{m}/{o}/{v}"] = merge_case(m, o, v)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "devtools"))
    import tinysdxl

    from duolora import sdxl

    layout = sdxl.layout_for(sdxl.UNetConfig.from_comfy(tinysdxl.TINY_UNET_CONFIG), te_dims=tinysdxl.TINY_TE_DIMS)
    with tempfile.TemporaryDirectory() as tmp:
        for m in FILE_METHODS:
            for v in VARIANTS:
                digests[f"file/{m}/{v}"] = file_case(Path(tmp), layout, m, v)
    json.dump(digests, sys.stdout, indent=4)
    print()
