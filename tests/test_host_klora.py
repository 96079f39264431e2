"""Apply K-LoRA in ComfyUI's real executor: the tiny SDXL model, the pack's loaders and the stock KSampler.

What a layer computed during sampling is recorded with torch's own forward hooks on the UNet's modules (the
pack's code is not touched): at every step, a layer the rule governs must output exactly base + the chosen
LoRA's ΔW, as a direct, dense implementation of the rule (engine_toys.dense_klora) computes from the files.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import comfyhost
import pytest
import tinysdxl
import torch
import torch.nn.functional as F
from engine_toys import dense_klora
from nodehelpers import node, patched_weights, read_tiny, tiny_pair, write_lora

from duolora.klora import schedule_progress
from duolora.sdxl import SDXL_LAYOUT
from duolora.synthetic import synthetic_lora

if TYPE_CHECKING:
    from typing_extensions import Self

STEPS = 3


@pytest.fixture(scope="module")
def pair(host: comfyhost.Host, tiny_layout):
    return tiny_pair(host, tiny_layout, "klora")


def klora_prompt(host: comfyhost.Host, content: str, style: str, *, sampler: str = "euler", klora: bool = True,
                 **widgets) -> dict:
    """Tiny checkpoint → (Apply K-LoRA with the two loaders) → KSampler (``STEPS`` steps) → VAE Decode → Preview."""
    p = {
        "1": node(host, comfyhost.TINY_CHECKPOINT_NODE, seed=0),
        "2": node(host, "CLIPTextEncode", text="a sks dog in zwz style", clip=["1", 1]),
        "3": node(host, "CLIPTextEncode", text="blurry", clip=["1", 1]),
        "4": node(host, "EmptyLatentImage", width=64, height=64, batch_size=1),
    }
    model = ["1", 0]
    if klora:
        p["10"] = node(host, "DuoLoRA_LoadContentLoRA", lora_name=content)
        p["11"] = node(host, "DuoLoRA_LoadStyleLoRA", lora_name=style)
        p["20"] = node(host, "DuoLoRA_ApplyKLoRA", model=model, content_lora=["10", 0], style_lora=["11", 0],
                       **widgets)
        model = ["20", 0]
    p["30"] = node(host, "KSampler", model=model, seed=7, steps=STEPS, cfg=4.0, sampler_name=sampler,
                   scheduler="normal", positive=["2", 0], negative=["3", 0], latent_image=["4", 0], denoise=1.0)
    p["31"] = node(host, "VAEDecode", samples=["30", 0], vae=["1", 2])
    p["32"] = node(host, "PreviewImage", images=["31", 0])
    return p


class LayerRecorder:
    """Inputs and outputs of the named UNet layers at every model call of a prompt, with the call's timestep.

    A global forward pre-hook (torch's ``register_module_forward_pre_hook``) finds the UNet when it first runs
    and puts forward hooks on the named layers; everything is removed on exit."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.calls: list[float] = []  # the UNet's timestep argument, one entry per model call
        self.records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
        self.modules: dict[str, torch.nn.Module] = {}
        self._handles: list = []

    def _unet_call(self, module: torch.nn.Module, args: tuple) -> None:
        if type(module).__name__ != "UNetModel":
            return
        self.calls.append(float(args[1].reshape(-1)[0]))
        if not self.modules:
            named = dict(module.named_modules())
            for name in self.names:
                self.modules[name] = named[name]
                self._handles.append(named[name].register_forward_hook(self._layer_hook(name)))

    def _layer_hook(self, name: str):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.records[name].append((args[0].detach().clone(), output.detach().clone()))
        return hook

    def __enter__(self) -> Self:
        self._handles.append(torch.nn.modules.module.register_module_forward_pre_hook(self._unet_call))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()


def _steps_progress(i: int, sigmas: torch.Tensor) -> float:
    return i / STEPS


def _noise_progress(i: int, sigmas: torch.Tensor) -> float:
    table = tinysdxl.build_tiny_model(seed=0).get_model_object("model_sampling").sigmas
    return schedule_progress(float(sigmas[i]), table.flip(0).tolist())


@pytest.mark.parametrize(("timeline", "progress_of"), [("steps", _steps_progress), ("noise", _noise_progress)])
def test_every_layer_outputs_base_plus_the_chosen_lora_at_every_step(host: comfyhost.Host, pair, tiny_layout,
                                                                     timeline: str, progress_of) -> None:
    import comfy.samplers

    content_file, style_file = pair
    content, style = read_tiny(content_file.path, tiny_layout), read_tiny(style_file.path, tiny_layout)
    sampling = tinysdxl.build_tiny_model(seed=0).get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", STEPS)
    progress = [progress_of(i, sigmas) for i in range(STEPS)]
    choices = [dense_klora(content, style, p)[0] for p in progress]
    # Layers whose choice changes during the run, and layers that keep one LoRA, when there are any.
    flips = [n for n in choices[0] if len({c[n] for c in choices}) > 1]
    steady = [n for n in choices[0] if len({c[n] for c in choices}) == 1]
    assert len(flips) >= 20, "the tiny LoRAs must make the rule change its choice during the run"
    names = flips[:3] + steady[:1]

    prompt = klora_prompt(host, content_file.name, style_file.name, timeline=timeline)
    with LayerRecorder(names) as rec:
        result = host.execute(prompt)
    assert "γ = " in result["outputs"]["20"][1]
    # One model call per step (cond and uncond batched), at the schedule's σ, in order.
    assert len(rec.calls) == STEPS and rec.calls == sorted(rec.calls, reverse=True)
    for name in names:
        module = rec.modules[name]
        assert "forward" not in module.__dict__  # the rule is off the module once the run is over
        assert len(rec.records[name]) == STEPS
        for i, (x, y) in enumerate(rec.records[name]):
            base = F.linear(x, module.weight, module.bias)
            picked = content if choices[i][name] == "content" else style
            other = style if picked is content else content
            want = base + F.linear(x, picked.layers[name].delta())
            assert torch.allclose(y, want, atol=1e-5, rtol=1e-4), (name, i, float((y - want).abs().max()))
            wrong = base + F.linear(x, other.layers[name].delta())
            assert float((y - wrong).abs().max()) > 1e-3, (name, i)


def test_the_original_model_is_unchanged_and_samples_as_before(host: comfyhost.Host, pair) -> None:
    content, style = pair
    plain = host.execute(klora_prompt(host, content.name, style.name, klora=False))["outputs"]["30"][0]["samples"]
    prompt = klora_prompt(host, content.name, style.name)
    # The original MODEL sampled in the same prompt, after the K-LoRA one (a second KSampler on node 1).
    prompt["40"] = {**prompt["30"], "inputs": {**prompt["30"]["inputs"], "model": ["1", 0]}}
    prompt["41"] = node(host, "VAEDecode", samples=["40", 0], vae=["1", 2])
    prompt["42"] = node(host, "PreviewImage", images=["41", 0])
    result = host.execute(prompt)
    with_klora = result["outputs"]["30"][0]["samples"]
    original_after = result["outputs"]["40"][0]["samples"]
    assert torch.equal(original_after, plain)
    assert float((with_klora - plain).abs().max()) > 1e-2

    original = result["outputs"]["1"][0]
    patched = result["outputs"]["20"][0]
    assert patched is not original and patched.model is original.model
    assert not original.get_all_wrappers("apply_model") and not original.get_all_wrappers("outer_sample")
    assert len(patched.get_all_wrappers("apply_model")) == 1
    unet = original.model.diffusion_model
    assert not [n for n, m in unet.named_modules() if "forward" in m.__dict__]
    fresh = tinysdxl.build_tiny_model(seed=0).model.state_dict()
    weights = original.model.state_dict()
    assert weights.keys() == fresh.keys() and all(torch.equal(weights[k], fresh[k]) for k in fresh)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2s_ancestral", "dpmpp_2m"])
def test_any_sampler_runs_it(host: comfyhost.Host, pair, sampler: str) -> None:
    content, style = pair
    plain = host.execute(klora_prompt(host, content.name, style.name, sampler=sampler, klora=False))
    result = host.execute(klora_prompt(host, content.name, style.name, sampler=sampler))
    a, b = (r["outputs"]["30"][0]["samples"] for r in (plain, result))
    assert torch.isfinite(b).all() and float((a - b).abs().max()) > 1e-2
    unet = result["outputs"]["1"][0].model.diffusion_model
    assert not [n for n, m in unet.named_modules() if "forward" in m.__dict__]


def test_cancel_during_sampling_takes_the_rule_off(host: comfyhost.Host, pair) -> None:
    content, style = pair
    prompt = klora_prompt(host, content.name, style.name)
    with LayerRecorder([]) as rec, pytest.raises(comfyhost.ExecutionInterrupted) as info:
        host.execute(prompt, interrupt_after=1)
    assert info.value.node_type == "KSampler" and 1 <= len(rec.calls) < STEPS
    unet = info.value.result["outputs"]["1"][0].model.diffusion_model
    assert not [n for n, m in unet.named_modules() if "forward" in m.__dict__]


def test_a_lora_for_another_model_is_refused_with_a_clear_message(host: comfyhost.Host, pair, tiny_layout) -> None:
    content, _ = pair
    big = write_lora(host, synthetic_lora(SDXL_LAYOUT, rank=2, seed=3), "klora_full_sdxl.safetensors", SDXL_LAYOUT)
    with pytest.raises(comfyhost.NodeExecutionError) as info:
        host.execute(klora_prompt(host, content.name, big.name))
    assert info.value.node_type == "DuoLoRA_ApplyKLoRA"
    message = str(info.value)
    assert "klora_full_sdxl.safetensors: 560 layers do not match" in message
    assert message.endswith("This LoRA was made for a different model.")


def test_bias_and_norm_differences_are_summed_into_the_model(host: comfyhost.Host, pair, tiny_layout) -> None:
    """What is not a low-rank layer is not the rule's to choose: the differences of both files are added."""
    content, style = pair
    g = torch.Generator().manual_seed(4)
    both, only_style = "input_blocks.4.1.norm.weight", "out.0.bias"
    d_c = torch.randn(tiny_layout.param_shape(both), generator=g)
    d_s = {p: torch.randn(tiny_layout.param_shape(p), generator=g) for p in (both, only_style)}
    c = write_lora(host, replace(content.lora, patches={both: d_c}), "klora_patch_c.safetensors", tiny_layout)
    s = write_lora(host, replace(style.lora, patches=d_s), "klora_patch_s.safetensors", tiny_layout)
    result = host.execute(klora_prompt(host, c.name, s.name))
    base = patched_weights(result["outputs"]["1"][0])
    patched = patched_weights(result["outputs"]["20"][0])
    key = {both: "diffusion_model.input_blocks.4.1.norm.weight", only_style: "diffusion_model.out.0.bias"}
    assert torch.allclose(patched[key[both]], base[key[both]] + d_c + d_s[both], atol=1e-6)
    assert torch.allclose(patched[key[only_style]], base[key[only_style]] + d_s[only_style], atol=1e-6)
    changed = {k for k in base if not torch.equal(base[k], patched[k])}
    assert changed == set(key.values())
