"""Synthetic LoRA files for the tiny Flux (devtools/tinyflux.py: hidden size 32, 2 double and 12 single blocks)
in the three spellings people have, and the ΔW each means as an oracle written from facts.

kohya (``lora_unet_double_blocks_0_img_attn_qkv``, ``.alpha``), ComfyUI (``diffusion_model.single_blocks.0.linear1``)
and diffusers/PEFT (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, no alpha: diffusers' separate
q/k/v and ``proj_mlp`` patch row slices of ComfyUI's fused ``qkv`` and ``linear1``, as comfy/utils.py
``flux_to_diffusers`` places them). ``file_delta`` is the ΔW a file means for each model weight.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import tinyflux
import torch
from lorafiles import write

from duolora import cli

H, MLP = tinyflux.TINY_FLUX_CONFIG["hidden_size"], 4 * tinyflux.TINY_FLUX_CONFIG["hidden_size"]
DOUBLE, SINGLE = (0, 1), (0, 11)

# ComfyUI weight (without diffusion_model. and .weight) -> (rows, width), for the layers the files hold: the fused
# attention of both streams, their output projections, one MLP layer of each stream, both layers of single blocks
FUSED: dict[str, tuple[int, int]] = {}
# diffusers module -> (ComfyUI weight, first row, rows)
SPLIT: dict[str, tuple[str, int, int]] = {}
for i in DOUBLE:
    d, c = f"transformer_blocks.{i}", f"double_blocks.{i}"
    FUSED |= {f"{c}.img_attn.qkv": (3 * H, H), f"{c}.txt_attn.qkv": (3 * H, H), f"{c}.img_attn.proj": (H, H),
              f"{c}.txt_attn.proj": (H, H), f"{c}.img_mlp.0": (MLP, H), f"{c}.txt_mlp.2": (H, MLP)}
    for j, (img, txt) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
        SPLIT[f"{d}.attn.{img}"] = (f"{c}.img_attn.qkv", j * H, H)
        SPLIT[f"{d}.attn.{txt}"] = (f"{c}.txt_attn.qkv", j * H, H)
    SPLIT |= {f"{d}.attn.to_out.0": (f"{c}.img_attn.proj", 0, H), f"{d}.attn.to_add_out": (f"{c}.txt_attn.proj", 0, H),
              f"{d}.ff.net.0.proj": (f"{c}.img_mlp.0", 0, MLP), f"{d}.ff_context.net.2": (f"{c}.txt_mlp.2", 0, H)}
for i in SINGLE:
    d, c = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
    FUSED |= {f"{c}.linear1": (3 * H + MLP, H), f"{c}.linear2": (H, H + MLP)}
    SPLIT |= {f"{d}.attn.to_q": (f"{c}.linear1", 0, H), f"{d}.attn.to_k": (f"{c}.linear1", H, H),
              f"{d}.attn.to_v": (f"{c}.linear1", 2 * H, H), f"{d}.proj_mlp": (f"{c}.linear1", 3 * H, MLP),
              f"{d}.proj_out": (f"{c}.linear2", 0, H)}
MODEL_KEYS = sorted(f"diffusion_model.{n}.weight" for n in FUSED)
# The layers ZipRank learns on (scope "attention"): the fused attention and output projections, linear1/linear2.
ATTENTION = {n for n in FUSED if "_attn." in n or ".linear" in n}


def _factors(g: torch.Generator, rows: int, width: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, rank, generator=g) * 0.1, torch.randn(rank, width, generator=g) * 0.1


def fused_file(path: Path, prefix: str, sep: str, seed: int, rank: int, alpha: float) -> Path:
    """kohya (``lora_unet_`` + underscores) or ComfyUI (``diffusion_model.``) keys of the fused layers, with alpha."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name, (rows, width) in FUSED.items():
        up, down = _factors(g, rows, width, rank)
        module = prefix + name.replace(".", sep)
        t |= {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up,
              f"{module}.alpha": torch.tensor(alpha)}
    return write(path, t)


def diffusers_file(path: Path, seed: int, rank: int) -> Path:
    """diffusers/PEFT keys (``transformer.`` + the diffusers path, ``lora_A``/``lora_B``, no alpha: scale 1)."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for module, (target, _, rows) in SPLIT.items():
        up, down = _factors(g, rows, FUSED[target][1], rank)
        t |= {f"transformer.{module}.lora_A.weight": down, f"transformer.{module}.lora_B.weight": up}
    return write(path, t)


def file_delta(path: Path) -> dict[str, torch.Tensor]:
    """ΔW (float64) the file means for each model weight, from its tensors: scale · up @ down on the rows its key
    names (scale = alpha / rank, 1 without an alpha)."""
    from safetensors.torch import load_file

    sd = {k: v.to(torch.float64) for k, v in load_file(str(path)).items()}
    out = {f"diffusion_model.{n}.weight": torch.zeros(FUSED[n], dtype=torch.float64) for n in FUSED}
    kohya = {"lora_unet_" + n.replace(".", "_"): n for n in FUSED}
    for key, down in sd.items():
        if not key.endswith((".lora_down.weight", ".lora_A.weight")):
            continue
        module = key.rsplit(".", 2)[0]
        up = sd[f"{module}.lora_up.weight" if key.endswith(".lora_down.weight") else f"{module}.lora_B.weight"]
        alpha = sd.get(f"{module}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        if module.startswith("transformer."):
            target, start, rows = SPLIT[module.removeprefix("transformer.")]
        else:
            target = kohya.get(module) or module.removeprefix("diffusion_model.")
            start, rows = 0, FUSED[target][0]
        out[f"diffusion_model.{target}.weight"][start:start + rows] += scale * (up @ down)
    return out



def run_main(*argv: str) -> tuple[int, str]:
    """``duolora …`` in this process: (exit status, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, err.getvalue()
