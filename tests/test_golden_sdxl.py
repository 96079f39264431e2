"""Golden hashes of SDXL results: a fixed pair merged through ``duolora.engine.run_merge`` in every mode and
method, and the file formats' writing and reading of every key style.

The hashes were taken before the layer tables became family-neutral data (``duolora.layout`` and
``duolora.families``); SDXL must come out bit-identical whatever else a family adds. A hash changes only when
an SDXL result changes: update one only for a change that is meant to alter SDXL merges or files, and say so.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from engine_toys import single_thread, toy_references, toy_setup  # noqa: F401 - autouse fixture
from safetensors import safe_open
from test_engine import ToyModel, inputs

from duolora import engine, formats
from duolora.config import METHODS, MergeConfig
from duolora.lora import LoRA
from duolora.sdxl import SDXL_LAYOUT, block_of
from duolora.solver import FastModeError
from duolora.synthetic import synthetic_lora


def tensor_digest(h, t: torch.Tensor) -> None:
    t = t.detach().contiguous().cpu()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def lora_digest(lora: LoRA) -> str:
    """Every layer's up and down (in layer order), every patch, and the scales: the LoRA as data."""
    h = hashlib.sha256()
    for name, lr in lora.layers.items():
        h.update(name.encode())
        tensor_digest(h, lr.up)
        tensor_digest(h, lr.down)
    for name in sorted(lora.patches):
        h.update(name.encode())
        tensor_digest(h, lora.patches[name])
    h.update(json.dumps({k: repr(v) for k, v in lora.scales.items()}, sort_keys=True).encode())
    h.update(str(lora.key_style).encode() + str(lora.base).encode())
    return h.hexdigest()[:16]


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        tensor_digest(h, tensors[key])
    return h.hexdigest()[:16]


def file_digest(path, result: engine.MergeResult) -> str:
    """The written tensors and metadata (safetensors orders a header's metadata arbitrarily, so the bytes of
    two equal files may differ) and the merge's history."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        metadata = f.metadata()
    h = hashlib.sha256(state_digest(tensors).encode())
    h.update(json.dumps(metadata, sort_keys=True).encode())
    h.update(json.dumps(result.history, sort_keys=True).encode())
    return h.hexdigest()[:16]


def result_digest(result: engine.MergeResult) -> str:
    h = hashlib.sha256(lora_digest(result.merged).encode())
    h.update(json.dumps(result.history, sort_keys=True).encode())
    if result.merger is not None:
        for key, value in result.merger.state_dict().items():
            h.update(key.encode())
            tensor_digest(h, value)
    return h.hexdigest()[:16]


# run_merge on the engine's toy denoiser (SDXL canonical names), every mode × method that runs; the fast
# modes refuse the feature-mask methods (FastModeError), which the digest records as "refused".
MODE_METHOD_DIGESTS: dict[tuple[str, str], str] = {
    ('paper', 'ziprank'): '9ee2d1c9ca74ed64',
    ('paper', 'ziplora_out'): '0e26b644784a2416',
    ('paper', 'ziplora_in'): 'e79b651cc6751dc9',
    ('paper', 'direct'): '6be0734abbfac7c1',
    ('paper', 'b_lora'): '14831ad4d7e5501d',
    ('layerwise', 'ziprank'): 'c26831cd1124e235',
    ('layerwise', 'ziplora_out'): 'refused',
    ('layerwise', 'ziplora_in'): 'refused',
    ('layerwise', 'direct'): '6be0734abbfac7c1',
    ('layerwise', 'b_lora'): '14831ad4d7e5501d',
    ('weights_only', 'ziprank'): '9051b42f16fdd3a2',
    ('weights_only', 'ziplora_out'): 'refused',
    ('weights_only', 'ziplora_in'): 'refused',
    ('weights_only', 'direct'): '6be0734abbfac7c1',
    ('weights_only', 'b_lora'): '14831ad4d7e5501d',
    ('layerwise_paper', 'ziprank'): 'b57609f14b796b45',
    ('layerwise_paper', 'ziplora_out'): 'refused',
    ('layerwise_paper', 'ziplora_in'): 'refused',
    ('layerwise_paper', 'direct'): '6be0734abbfac7c1',
    ('layerwise_paper', 'b_lora'): '14831ad4d7e5501d',
}
# The same with the priors' other settings a merge may use: Constyle on, prior init, another preset, custom.
VARIANT_DIGESTS: dict[str, str] = {
    'constyle': '5395f666c4f496a4',
    'prior_init_hinge': 'd4b8fb93ce025c71',
    'code_literal': 'fea1df8a23db5dcb',
    'custom': '6018a80dcbfec763',
    'weights_scope_all': 'a5e3e6cc6e5967d9',
}
VARIANTS: dict[str, dict] = {
    "constyle": {"objective": "paper", "constyle_iterations": 1},
    "prior_init_hinge": {"objective": "paper", "prior_init": True, "prior_loss_kind": "hinge"},
    "code_literal": {"objective": "paper", "prior_preset": "code_literal", "prior_loss_kind": "code_compat"},
    "custom": {"objective": "layerwise", "prior_preset": "custom",
               "custom_prior": "content: input_blocks.4.1; style: middle_block.1, output_blocks.3.1"},
    "weights_scope_all": {"objective": "weights_only", "scope": "all", "fast_keep": 0.5, "max_rank": 5},
}


def _run(objective: str, method: str, **overrides) -> str:
    model, content, style = toy_setup()
    config = MergeConfig(objective=objective, method=method, steps=3, **overrides)
    try:
        result = engine.run_merge(content, style, config, open_denoiser=ToyModel(model), references=inputs())
    except FastModeError:
        return "refused"
    return result_digest(result)


@pytest.mark.parametrize(("objective", "method"), list(MODE_METHOD_DIGESTS))
def test_every_mode_and_method_merges_sdxl_bit_identically(objective: str, method: str) -> None:
    assert set(METHODS) == {m for _, m in MODE_METHOD_DIGESTS}
    assert _run(objective, method) == MODE_METHOD_DIGESTS[(objective, method)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prior_settings_merge_sdxl_bit_identically(variant: str) -> None:
    overrides = dict(VARIANTS[variant])
    objective = overrides.pop("objective")
    assert _run(objective, "ziprank", **overrides) == VARIANT_DIGESTS[variant]


# ---------------------------------------------------------------------------------------------- files
_BLOCKS = ("input_blocks.4.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1", "output_blocks.3.1")


def _file_pair(tmp_path) -> tuple[str, str, LoRA]:
    """A content and a style file over a slice of the real SDXL table (first transformer of five attention
    blocks, their proj_in/ff layers, one conv, two text-encoder layers), at rank 2 and 3, with bias/norm
    differences on the content side."""
    keep = {n for n in SDXL_LAYOUT.unet_layers() if block_of(n) in _BLOCKS
            and (".transformer_blocks.0." in n or n.endswith((".proj_in", ".proj_out")))}
    keep |= {"input_blocks.4.0.in_layers.2", "te1.text_model.encoder.layers.0.self_attn.q_proj",
             "te2.text_model.encoder.layers.3.mlp.fc1"}

    def make(seed: int, rank: int) -> LoRA:
        lora = synthetic_lora(SDXL_LAYOUT, rank=rank, scope="all", text_encoder=True, seed=seed, decay=0.8)
        lora.layers = {n: lr for n, lr in lora.layers.items() if n in keep}
        lora.alphas = {n: lora.alphas[n] for n in lora.layers}
        return lora

    content, style = make(1, 2), make(2, 3)
    g = torch.Generator().manual_seed(7)
    content.patches = {"input_blocks.4.1.proj_in.bias": torch.randn(640, generator=g) * 0.01,
                       "input_blocks.4.1.norm.weight": torch.randn(640, generator=g) * 0.01}
    paths = []
    for name, lora in (("content", content), ("style", style)):
        p = tmp_path / f"{name}.safetensors"
        formats.save_lora(lora, p, key_style="kohya_ldm", dtype=torch.float16)
        paths.append(str(p))
    return paths[0], paths[1], content


FILE_MERGE_DIGESTS: dict[str, str] = {
    'ziprank': '01e87667e72290a4',
    'direct': '244efaebc0b96b04',
    'b_lora': 'd71e3a3cb9411275',
}


@pytest.mark.parametrize("method", list(FILE_MERGE_DIGESTS))
def test_file_merges_write_sdxl_files_bit_identically(tmp_path, method: str) -> None:
    content, style, _ = _file_pair(tmp_path)
    out = tmp_path / "merged.safetensors"
    config = MergeConfig(objective="weights_only", method=method)
    result = engine.run_merge(content, style, config, output=engine.OutputFile(out))
    # The file carries the content's bias/norm differences with the merged layers (one write).
    with safe_open(str(out), framework="pt") as f:
        carried = sorted(k for k in f.keys() if k.endswith((".diff", ".diff_b")))  # noqa: SIM118
    assert carried == ["lora_unet_input_blocks_4_1_norm.diff", "lora_unet_input_blocks_4_1_proj_in.diff_b"]
    assert file_digest(out, result) == FILE_MERGE_DIGESTS[method]


KEY_STYLE_DIGESTS: dict[str, tuple[str, str]] = {
    'kohya_ldm': ('167b05fb65df77d6', 'b969b77cf46bfc3d'),
    'kohya_diffusers': ('b8ccc54ccf17211b', '04bb38a1cc0b64bf'),
    'diffusers_peft': ('ede0a7a6625e2cdc', 'a4b442acd098839a'),
    'diffusers': ('7a1dde371b8f6b9c', 'd2fe05c4b8c09ce8'),
    'diffusers_attn_procs': ('d11053aa0f3c61d6', 'e5f2a4732d52d4ac'),
    'comfyui': ('1ba55d89934baded', '1046f64c3cc60234'),
}


@pytest.mark.parametrize("key_style", list(KEY_STYLE_DIGESTS))
def test_every_key_style_writes_and_reads_sdxl_bit_identically(tmp_path, key_style: str) -> None:
    """(digest of the written tensors, digest of the LoRA read back from the saved file)."""
    _, _, content = _file_pair(tmp_path)
    tensors = formats.lora_to_state_dict(content, key_style, dtype=torch.bfloat16, layout=SDXL_LAYOUT)
    path = tmp_path / f"{key_style}.safetensors"
    formats.save_state_dict(tensors, path)
    back = formats.load_lora(path)
    assert (state_digest(tensors), lora_digest(back)) == KEY_STYLE_DIGESTS[key_style]
