"""Z-Image and Qwen-Image LoRA files, read into ComfyUI's layers and merged weights-only by ``duolora merge``: a
family is a table (``duolora.families``), so the Flux.1 path (tests/test_flux_files.py) serves them unchanged.

As there, the oracle is ComfyUI's key map written down as facts (comfy/lora.py, comfy/utils.py
``z_image_to_diffusers``): Z-Image's diffusers ``attention.to_q``/``to_k``/``to_v`` patch rows [0, d), [d, 2d),
[2d, 3d) of ComfyUI's fused ``attention.qkv`` and ``attention.to_out.0`` is ``attention.out``; Qwen-Image's
ComfyUI model keeps diffusers' paths, so nothing is fused. Each file holds a few full-size layers at rank 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lorafiles import write
from test_flux_files import run_main

from duolora import formats
from duolora.families.qwen_image import QWEN_IMAGE_LAYOUT
from duolora.families.zimage import ZIMAGE_LAYOUT

RANK = 2
ZD, QD = 3840, 3072
# family -> (layout, {ComfyUI weight: (rows, width)}, {diffusers path: (ComfyUI weight, first row, rows)},
# the prefix the diffusers-style file puts before the path)
FAMILIES = {
    "zimage": (ZIMAGE_LAYOUT,
               {"layers.0.attention.qkv": (3 * ZD, ZD), "layers.0.attention.out": (ZD, ZD)},
               {"layers.0.attention.to_q": ("layers.0.attention.qkv", 0, ZD),
                "layers.0.attention.to_k": ("layers.0.attention.qkv", ZD, ZD),
                "layers.0.attention.to_v": ("layers.0.attention.qkv", 2 * ZD, ZD),
                "layers.0.attention.to_out.0": ("layers.0.attention.out", 0, ZD)},
               "diffusion_model."),
    "qwen_image": (QWEN_IMAGE_LAYOUT,
                   {"transformer_blocks.0.attn.to_q": (QD, QD), "transformer_blocks.0.img_mlp.net.0.proj": (4 * QD, QD)},
                   {"transformer_blocks.0.attn.to_q": ("transformer_blocks.0.attn.to_q", 0, QD),
                    "transformer_blocks.0.img_mlp.net.0.proj": ("transformer_blocks.0.img_mlp.net.0.proj", 0, 4 * QD)},
                   "transformer."),
}


def kohya_file(path: Path, fused: dict, seed: int) -> Path:
    """kohya: ``lora_unet_`` + ComfyUI's module path with underscores, alpha 1 (scale 1/2)."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name, (rows, width) in fused.items():
        module = "lora_unet_" + name.replace(".", "_")
        t |= {f"{module}.lora_down.weight": torch.randn(RANK, width, generator=g) * 0.1,
              f"{module}.lora_up.weight": torch.randn(rows, RANK, generator=g) * 0.1,
              f"{module}.alpha": torch.tensor(1.0)}
    return write(path, t)


def diffusers_file(path: Path, fused: dict, slices: dict, prefix: str, seed: int) -> Path:
    """diffusers/PEFT: ``prefix`` + the diffusers path, ``lora_A``/``lora_B``, no alpha (scale 1)."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for module, (target, _, rows) in slices.items():
        t |= {f"{prefix}{module}.lora_A.weight": torch.randn(RANK, fused[target][1], generator=g) * 0.1,
              f"{prefix}{module}.lora_B.weight": torch.randn(rows, RANK, generator=g) * 0.1}
    return write(path, t)


def applied(path: Path, fused: dict, slices: dict, prefix: str, probes: dict) -> dict[str, torch.Tensor]:
    """ΔW @ probe of every ComfyUI weight as ComfyUI's key map applies the file (float64)."""
    from safetensors.torch import load_file

    sd = {k: v.to(torch.float64) for k, v in load_file(str(path)).items()}
    modules = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in sd}
    kohya = {"lora_unet_" + n.replace(".", "_"): n for n in fused}
    out = {name: torch.zeros(rows, probes[name].shape[1], dtype=torch.float64) for name, (rows, _) in fused.items()}
    for module in modules:
        a, b = ("lora_A", "lora_B") if f"{module}.lora_A.weight" in sd else ("lora_down", "lora_up")
        up, down = sd[f"{module}.{b}.weight"], sd[f"{module}.{a}.weight"]
        alpha = sd.get(f"{module}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        if module in kohya:
            target, start, rows = kohya[module], 0, fused[kohya[module]][0]
        elif module.removeprefix("diffusion_model.") in fused and module.startswith("diffusion_model."):
            target = module.removeprefix("diffusion_model.")
            start, rows = 0, fused[target][0]
        else:
            target, start, rows = slices[module.removeprefix(prefix)]
        out[target][start:start + rows] += scale * (up @ (down @ probes[target]))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_read_and_merged_weights_only(family: str, tmp_path: Path) -> None:
    layout, fused, slices, prefix = FAMILIES[family]
    probes = {n: torch.randn(w, 8, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
              for i, (n, (_, w)) in enumerate(fused.items())}
    content = kohya_file(tmp_path / "content.safetensors", fused, seed=1)
    style = diffusers_file(tmp_path / "style.safetensors", fused, slices, prefix, seed=2)
    for path in (content, style):
        lora = formats.load_lora(path, layout)
        assert (lora.base, sorted(lora.layers)) == (layout.base, sorted(fused))
    out = tmp_path / "merged.safetensors"
    code, _, err = run_main("merge", str(content), str(style), "-o", str(out), "--method", "direct", "--dtype",
                            "fp32")
    assert code == 0, err
    got = applied(out, fused, slices, prefix, probes)
    c, s = (applied(p, fused, slices, prefix, probes) for p in (content, style))
    for name in fused:
        assert float((got[name] - c[name] - s[name]).norm() / (c[name] + s[name]).norm()) < 1e-6, name
