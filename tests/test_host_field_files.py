"""What a merged file carries besides its low-rank layers is what ComfyUI applies (issue 15, item 4), checked in
the real ComfyUI 0.3.75 with tiny and meta-device SDXL models.

(a) The bias/norm parameter table (``Layout.norms``, ``Layer.bias``) is exactly the 1-D parameters of ComfyUI's
    SDXL UNet and of its CLIP-L/CLIP-G, and the CLIP extras (text projection, embeddings) have their shapes.
(b) ComfyUI's stock key maps and ``comfy.lora.load_lora`` take every key we write for them — bias and norm
    differences, the text projection, an embedding LoRA — as the patches we mean, and leave nothing unloaded.
The LoRAs are synthetic (seeded noise with the tiny layout's names and shapes).
"""

from __future__ import annotations

import logging

import pytest
import torch

from duolora import formats, sdxl
from duolora.lora import LoRA, LowRank


def patchable(layout: sdxl.Layout, modules: dict[str, sdxl.Layer]) -> dict[str, tuple[int, ...]]:
    """Canonical 1-D parameter -> shape: norm weights and biases, and every bias a layer has."""
    out = {}
    for name, layer in modules.items():
        if layer.kind == "norm":
            out[f"{name}.weight"] = layout.param_shape(f"{name}.weight")
        if layer.bias:
            out[f"{name}.bias"] = layout.param_shape(f"{name}.bias")
    return out


def test_unet_bias_and_norm_table_is_the_real_unet(sdxl_meta) -> None:
    layout = sdxl.SDXL_LAYOUT
    real = {k[len("diffusion_model."):]: tuple(v.shape) for k, v in sdxl_meta.state_dict().items()
            if k.startswith("diffusion_model.") and v.dim() == 1}
    ours = patchable(layout, {**layout.unet_layers(), **layout.norms})
    ours = {k: v for k, v in ours.items() if not k.startswith(("te1.", "te2."))}
    assert ours == real
    # 11 transformers × (norm + 3 per block: 70 blocks) + 17 res-blocks × 2 + the output norm
    assert len(layout.norms) - sum(n.startswith(("te1.", "te2.")) for n in layout.norms) == 11 + 210 + 34 + 1


def test_clip_tables_are_the_real_text_encoders(clip, tiny_layout) -> None:
    state = clip.cond_stage_model.state_dict()
    clips = {"te1": "clip_l", "te2": "clip_g"}
    real = {}
    for key, value in state.items():
        which = next((w for w, c in clips.items() if key.startswith(f"{c}.transformer.")), None)
        if which is not None and value.dim() == 1:
            real[f"{which}.{key.split('.transformer.', 1)[1]}"] = tuple(value.shape)
    te = {k: v for k, v in {**tiny_layout.layers, **tiny_layout.extras, **tiny_layout.norms}.items()
          if k.startswith(("te1.", "te2."))}
    assert patchable(tiny_layout, te) == real
    for name, layer in tiny_layout.extras.items():
        assert tuple(state[layer.model_key].shape) == layer.shape, name


def not_loaded(records: list[logging.LogRecord]) -> set[str]:
    prefix = "lora key not loaded: "
    return {r.getMessage()[len(prefix):] for r in records if r.getMessage().startswith(prefix)}


EXTRAS_LORA = ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "te2.text_projection",
               "te1.text_model.embeddings.token_embedding")
PATCHES = ("input_blocks.4.1.norm.weight", "input_blocks.4.1.proj_in.bias", "out.0.bias",
           "input_blocks.1.0.in_layers.0.weight", "te1.text_model.final_layer_norm.weight",
           "te2.text_model.encoder.layers.0.layer_norm1.bias", "te1.text_model.encoder.layers.0.self_attn.q_proj.bias")


@pytest.mark.parametrize("style", ["kohya_ldm", "comfyui", "kohya_diffusers"])
def test_comfy_applies_everything_we_write(style: str, unet, clip, tiny_layout, caplog) -> None:
    import comfy.lora

    g = torch.Generator().manual_seed(3)
    layers = {}
    for name in EXTRAS_LORA:
        shape = tiny_layout.get(name).shape
        layers[name] = LowRank(torch.randn(shape[0], 2, generator=g), torch.randn(2, shape[1], generator=g))
    patches = {p: torch.randn(tiny_layout.param_shape(p), generator=g) for p in PATCHES}
    lora = LoRA(layers=layers, patches=patches, base="sdxl")
    state = formats.lora_to_state_dict(lora, style, dtype=torch.float32, layout=tiny_layout)
    key_map = comfy.lora.model_lora_keys_unet(unet.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    with caplog.at_level(logging.WARNING):
        loaded = comfy.lora.load_lora(state, key_map)
    assert not_loaded(caplog.records) == set()

    def model_param(param: str) -> str:
        module, _, kind = param.rpartition(".")
        layer = tiny_layout.module(module)
        return layer.model_key[: -len(".weight")] + "." + kind

    assert set(loaded) == {tiny_layout.get(n).model_key for n in layers} | {model_param(p) for p in patches}
    for param, diff in patches.items():
        kind, (value,) = loaded[model_param(param)]
        assert kind == "diff" and torch.equal(value, diff), param
    for name, lr in layers.items():
        up, down, alpha = loaded[tiny_layout.get(name).model_key].weights[:3]
        assert float(alpha) == down.shape[0] and torch.equal(up @ down, lr.up @ lr.down), name


# ------------------------------------------------------------- the field's structures, as ComfyUI applies them
def tiny_factors(layout: sdxl.Layout, name: str, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = layout.get(name).shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[0], rank, generator=g), torch.randn(rank, *shape[1:], generator=g) / 8


def comfy_delta(adapter, weight: torch.Tensor) -> torch.Tensor:
    """The ΔW ComfyUI's own LoRA adapter adds to ``weight`` at strength 1."""
    base = torch.zeros_like(weight)
    return adapter.calculate_weight(base, "w", 1.0, 1.0, None, lambda a: a).clone()


def test_omi_layers_are_the_ones_comfy_patches_for_their_kohya_names(unet, clip, tiny_layout, caplog) -> None:
    """OneTrainer writes an OMI key and its kohya name for the same layer (its convert key sets map
    clip_l./clip_g./unet. to lora_te1_/lora_te2_/lora_unet_). Read as DuoLoRA reads the OMI file and written
    in kohya keys, ComfyUI's stock loader loads every key, onto the model weights it patches for the kohya twin,
    with the same ΔW."""
    import comfy.lora

    names = ["input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.0.in_layers.2",
             "te1.text_model.encoder.layers.0.self_attn.q_proj", "te1.text_model.encoder.layers.1.mlp.fc2",
             "te2.text_model.encoder.layers.0.self_attn.out_proj", "te2.text_projection"]
    omi, twin = {}, {}
    for i, name in enumerate(names):
        up, down = tiny_factors(tiny_layout, name, 2, i)
        up = up.reshape(*up.shape, 1, 1) if down.dim() == 4 else up
        which, path = name.split(".", 1) if name.startswith("te") else ("unet", name)
        prefix = {"unet": "unet.", "te1": "clip_l.", "te2": "clip_g."}[which]
        legacy = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}[which] + path.replace(".", "_")
        for module, out in ((prefix + path, omi), (legacy, twin)):
            out.update({f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up,
                        f"{module}.alpha": torch.tensor(1.0)})
    lora = formats.state_dict_to_lora(omi, {}, "omi.safetensors", layouts=(tiny_layout,))
    assert sorted(lora.layers) == sorted(names) and lora.skipped == []
    key_map = comfy.lora.model_lora_keys_unet(unet.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    with caplog.at_level(logging.WARNING):
        ours = comfy.lora.load_lora(formats.lora_to_state_dict(lora, "kohya_ldm", layout=tiny_layout), key_map)
        theirs = comfy.lora.load_lora(twin, key_map)
    assert not_loaded(caplog.records) == set()
    assert set(ours) == set(theirs) == {tiny_layout.get(n).model_key for n in names}
    weights = {**unet.model.state_dict(), **clip.cond_stage_model.state_dict()}
    for key in ours:
        w = weights[key]
        torch.testing.assert_close(comfy_delta(ours[key], w.float()), comfy_delta(theirs[key], w.float()),
                                   rtol=1e-5, atol=1e-7)


def test_tucker_fold_is_what_comfy_applies(unet, tiny_layout) -> None:
    """A LyCORIS Tucker conv read by ComfyUI's stock loader (lora_mid) adds the same ΔW as DuoLoRA's folded
    plain conv LoRA, and the folded layer, written in kohya keys, loads as a plain LoRA with that ΔW."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(unet.model, {})
    weights = unet.model.state_dict()
    state, names = {}, ["input_blocks.1.0.in_layers.2", "output_blocks.2.2.conv", "middle_block.0.out_layers.3"]
    g = torch.Generator().manual_seed(7)
    for name in names:
        out_f, in_f, kh, kw = tiny_layout.get(name).shape
        module = tiny_layout.get(name).kohya
        state.update({f"{module}.lora_down.weight": torch.randn(3, in_f, 1, 1, generator=g),
                      f"{module}.lora_mid.weight": torch.randn(3, 3, kh, kw, generator=g),
                      f"{module}.lora_up.weight": torch.randn(out_f, 3, 1, 1, generator=g) / 4,
                      f"{module}.alpha": torch.tensor(2.0)})
    lora = formats.state_dict_to_lora(state, {}, "tucker.safetensors", layouts=(tiny_layout,))
    theirs = comfy.lora.load_lora(state, key_map)
    ours = comfy.lora.load_lora(formats.lora_to_state_dict(lora, "kohya_ldm", layout=tiny_layout), key_map)
    for name in names:
        key = tiny_layout.get(name).model_key
        w = weights[key].float()
        want = comfy_delta(theirs[key], w)
        assert theirs[key].weights[3] is not None  # ComfyUI read the lora_mid
        torch.testing.assert_close(lora.layers[name].delta(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(comfy_delta(ours[key], w), want, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------- the loader nodes on the whole corpus
def test_loader_nodes_read_or_refuse_every_corpus_file(host, tmp_path_factory) -> None:
    """Load Content LoRA, in the real executor, on every file of the test corpus (lorafiles.corpus): it
    either shows the file's one-line summary or stops with one of the engine's typed errors naming the file —
    never another exception (a traceback)."""
    import shutil

    import comfyhost
    import lorafiles
    from nodehelpers import TEST_SUBDIR, node

    corpus = lorafiles.corpus(tmp_path_factory.mktemp("corpus"))
    errors = {c.__name__ for c in _subclasses(formats.LoRAError)}
    dest = host.loras_dir / TEST_SUBDIR / "corpus"
    failures = {}
    for i, (case, path) in enumerate(corpus.items()):
        target = dest / f"{i:03d}" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        sidecar = formats.peft_sidecar(path)
        if sidecar is not None:
            shutil.copyfile(sidecar, target.with_name(sidecar.name))
        name = target.relative_to(host.loras_dir).as_posix()
        prompt = {"1": node(host, "DuoLoRA_LoadContentLoRA", lora_name=name),
                  "2": node(host, "PreviewAny", source=["1", 1])}
        try:
            summary = host.execute(prompt)["outputs"]["1"][1]
            if summary != formats.one_line_summary(formats.read_lora_for_merge(target)):
                failures[case] = f"summary {summary!r}"
        except comfyhost.NodeExecutionError as err:
            kind = err.exception_type.rsplit(".", 1)[-1]
            message = err.exception_message
            if (kind not in errors or ".formats." not in err.exception_type or target.name not in message
                    or message.count("\n") != 1):
                failures[case] = f"{err.exception_type}: {message!r}"
    assert failures == {}


def _subclasses(cls: type) -> list[type]:
    return [cls, *(s for c in cls.__subclasses__() for s in _subclasses(c))]


def test_loader_cache_sees_a_peft_config_arrive(host) -> None:
    """The loaders' file cache is keyed by the adapter_config.json beside a PEFT adapter too: the scale it
    holds is read once it is there."""
    import json

    import lorafiles
    from nodehelpers import TEST_SUBDIR, pack_module

    loaders = pack_module("nodes.loaders")
    folder = host.loras_dir / TEST_SUBDIR / "peft_cache"
    path, _ = lorafiles.peft_folder(folder, None)
    before = loaders.read_cached(str(path))[0]
    (folder / "adapter_config.json").write_text(json.dumps({**lorafiles.PEFT_CONFIG_DEFAULTS, "r": 16,
                                                            "lora_alpha": 32}))
    after = loaders.read_cached(str(path))[0]
    assert (set(before.scale_sources.values()), set(before.scales.values())) == ({"peft_config_missing"}, {1.0})
    assert (set(after.scale_sources.values()), set(after.scales.values())) == ({"peft_config"}, {2.0})
