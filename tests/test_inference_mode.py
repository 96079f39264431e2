"""The merge under the host's ``torch.inference_mode()`` (how ComfyUI runs every node), on the real tiny model.

The fault this guards against: on CUDA the bridge's move of the merger to the model's device, made while the
node still ran under inference mode, turned the masks into inference tensors and the first paper step died in
``layer_prior_loss`` ("abs(): functions with out=... arguments don't support automatic differentiation").
On a CPU a move to the same device is a no-op, so these tests force a real re-creation of every merger
tensor (a float64 merger that must become float32) and check every tensor the merge makes under the host's
inference mode: merger, latents, conditionings, Adam's state. And only the masks learn: no UNet weight takes
a gradient.
"""

from __future__ import annotations

import comfyhost
import torch
from nodehelpers import MERGE_ID, merge_prompt, node, pack_module, read_tiny, tiny_pair

from duolora.config import MergeConfig
from duolora.mergers import build_merger
from duolora.objective import References
from duolora.optimize import optimize


def test_a_merger_moved_under_inference_mode_still_learns(host: comfyhost.Host, tiny_layout) -> None:
    bridge = pack_module("nodes.comfy_bridge")
    content, style = tiny_pair(host, tiny_layout, "infmode")
    out = host.execute({**merge_prompt(host, content.name, style.name, mode="weights", references=True),
                        **{f"9{i}": node(host, "PreviewAny", source=[i, 0]) for i in ("1", "2", "3", "4", "7", "8")}}
                       )["outputs"]
    model = out["1"][0]
    lc, ls = read_tiny(content.path, tiny_layout), read_tiny(style.path, tiny_layout)
    config = MergeConfig(steps=2)  # paper mode, priors and Constyle on: every term of the objective
    with torch.inference_mode():  # what ComfyUI's executor does around a node
        merger = build_merger("ziprank", lc, ls, config).double()  # the bridge must re-create every tensor
        with bridge.ComfyDenoiser(model, merger, gradient_checkpointing=True) as den:
            refs = References(content=den.prepare_latents(out["7"][0]["samples"]),
                              style=den.prepare_latents(out["8"][0]["samples"]),
                              p_c=out["2"][0], p_s=out["3"][0], p_cs=out["4"][0])
            made = {"latent": refs.content[0], **{f"mask {n}": p for n, p in merger.named_parameters()},
                    **{f"factor {n}": b for n, b in merger.named_buffers()}}
            made.update({f"cond {k}": v.cond for k, v in den._encode(out["2"][0], refs.content[0]).items()
                         if isinstance(getattr(v, "cond", None), torch.Tensor)})
            inference = sorted(name for name, t in made.items() if t.is_inference())
            assert inference == [], inference[:5]
            assert {p.dtype for p in merger.parameters()} == {torch.float32}
            result = optimize(merger, den, refs, config)
    assert result.steps_done == 2 and len(result.history["prior"]) == 2
    # The masks moved: the step really learned (Adam's state is ordinary tensors too, or step 2 would fail).
    assert all(p.grad is not None and not p.grad.is_inference() for p in merger.mask_parameters())
    assert all(torch.isfinite(torch.tensor(v)).all() for v in result.history["total"])


def test_no_unet_weight_takes_a_gradient(host: comfyhost.Host, tiny_layout) -> None:
    content, style = tiny_pair(host, tiny_layout, "nograd")
    prompt = merge_prompt(host, content.name, style.name, steps=2, lora_dtype="fp32")
    prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
    prompt["14"] = node(host, "PreviewAny", source=["1", 0])
    # The checkpoint node's MODEL is built once per prompt; read its flags before the merge runs by a
    # separate prompt that only loads it (same seed, same construction).
    flags_before = [p.requires_grad for p in host.execute(
        {"1": prompt["1"], "14": prompt["14"]})["outputs"]["1"][0].model.parameters()]
    out = host.execute(prompt)["outputs"]
    model = out["1"][0].model
    params = list(model.parameters())
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad == [], f"{len(with_grad)} of {len(params)} UNet parameters hold a .grad, e.g. {with_grad[:3]}"
    assert [p.requires_grad for p in params] == flags_before
    assert out[MERGE_ID][1].steps_done == 2
