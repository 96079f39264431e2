"""What one paper-mode step costs and computes in the real ComfyUI, on the tiny model (issue 11).

* The references live on the model's device, bit-identical to ComfyUI's ``process_latent_in``.
* The no-grad evaluations (content-only / style-only targets and Constyle hops) fold their fixed ΔW into
  ComfyUI's weights for the call; only the evaluation with gradient takes the mask path.
* A model stored in fp8 (ComfyUI's fp8 checkpoints: float8_e4m3fn weights computed in a manual-cast dtype)
  merges: the adapter computes in the model's compute dtype, never in fp8 (before: the adapter was handed
  the storage dtype and the first step failed).
"""

from __future__ import annotations

import comfyhost
import pytest
import tinysdxl
import torch
from nodehelpers import merge_prompt, node, pack_module, read_tiny, tiny_pair

from duolora.config import MergeConfig
from duolora.mergers import build_merger
from duolora.objective import References
from duolora.optimize import optimize


@pytest.fixture(scope="module")
def references(host: comfyhost.Host, tiny_layout):
    """(content LoRA, style LoRA, the host's outputs: latents "7"/"8", prompts "2"/"3"/"4")."""
    content, style = tiny_pair(host, tiny_layout, "bridgestep")
    out = host.execute({**merge_prompt(host, content.name, style.name, mode="weights", references=True),
                        **{f"9{i}": node(host, "PreviewAny", source=[i, 0]) for i in ("2", "3", "4", "7", "8")}}
                       )["outputs"]
    return read_tiny(content.path, tiny_layout), read_tiny(style.path, tiny_layout), out


def _refs(den, out) -> References:
    return References(content=den.prepare_latents(out["7"][0]["samples"]),
                      style=den.prepare_latents(out["8"][0]["samples"]),
                      p_c=out["2"][0], p_s=out["3"][0], p_cs=out["4"][0])


def test_latents_on_the_device_and_no_grad_calls_fold(host: comfyhost.Host, references) -> None:
    bridge = pack_module("nodes.comfy_bridge")
    lc, ls, out = references
    model = tinysdxl.build_tiny_model(seed=0)
    config = MergeConfig(steps=2, constyle_iterations=1)  # the cycle adds a second no-grad call per step
    merger = build_merger("ziprank", lc, ls, config)
    with torch.inference_mode(), bridge.ComfyDenoiser(model, merger, gradient_checkpointing=False) as den:
        refs = _refs(den, out)
        samples = out["7"][0]["samples"]
        want = model.model.process_latent_in(samples.float())
        for i, x in enumerate(refs.content):
            assert x.device == den.device and x.dtype == torch.float32 and torch.equal(x, want[i:i + 1])
        assert den.activation_dtype == torch.float32
        result = optimize(merger, den, refs, config)
        counts = dict(den.adapter.path_counts)
    n_attn = len(merger.learned_layers())
    # Per step: 2 no-grad calls × 560 attention projections with constant masks (ΔW folded into ComfyUI's
    # weight where that is cheaper, else the low-rank path without masks), 1 call with gradient on the mask
    # path; never the per-element mask rows.
    assert counts["masked"] == 2 * n_attn and "rows" not in counts, counts
    assert counts.get("fold", 0) + counts.get("lowrank", 0) == 2 * 2 * n_attn and counts["fold"] >= n_attn, counts
    assert result.steps_done == 2 and all(torch.isfinite(torch.tensor(result.history["total"])))


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="torch without float8")
def test_an_fp8_stored_model_merges_in_its_compute_dtype(host: comfyhost.Host, references) -> None:
    bridge = pack_module("nodes.comfy_bridge")
    lc, ls, out = references
    model = tinysdxl.build_tiny_model(seed=0, dtype=torch.float8_e4m3fn, manual_cast_dtype=torch.float32)
    to_q = model.model.diffusion_model.input_blocks[4][1].transformer_blocks[0].attn1.to_q
    assert to_q.weight.dtype == torch.float8_e4m3fn and to_q.comfy_cast_weights
    config = MergeConfig(steps=2)
    merger = build_merger("ziprank", lc, ls, config)
    with torch.inference_mode(), bridge.ComfyDenoiser(model, merger, gradient_checkpointing=True) as den:
        assert den.activation_dtype == torch.float32 and den.adapter.compute_dtype == torch.float32
        before = [p.detach().clone() for p in merger.mask_parameters()]
        result = optimize(merger, den, _refs(den, out), config)
        counts = dict(den.adapter.path_counts)
    assert result.steps_done == 2 and all(torch.isfinite(torch.tensor(v)).all() for v in result.history.values())
    assert any(not torch.equal(b, p) for b, p in zip(before, merger.mask_parameters(), strict=True))
    # ComfyUI casts these weights per forward: nothing is folded into them; the low-rank path is added.
    assert "fold" not in counts and counts["lowrank"] > 0 and counts["masked"] > 0, counts
