"""Helpers that make LoRA files (good and malformed) for the format, fixture and inspect tests.

Every SDXL LoRA made here is SYNTHETIC (seeded noise with SDXL's real layer names and shapes): no real SDXL
LoRA is small enough to ship (shared/fixtures/SOURCES.md).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from duolora.formats import PEFT_METADATA_KEY
from duolora.lora import LoRA, LowRank
from duolora.sdxl import ATTENTION_BLOCKS, SDXL_LAYOUT, block_of

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures" / "loras"

# One SDXL attention layer in every spelling (shape (640, 2048): attn2.to_k of input_blocks.4.1).
SDXL_TO_K = "input_blocks.4.1.transformer_blocks.0.attn2.to_k"
SDXL_TO_K_KOHYA = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
SDXL_TO_Q_KOHYA = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as a safetensors file (contiguous copies) and return the path."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(path), metadata=metadata)
    return path


def kohya_layer(module: str, out_f: int, in_f: int, rank: int, alpha: float | None = None,
                seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """lora_down (rank, in), lora_up (out, rank) [+ alpha] tensors of one kohya-style linear layer."""
    g = torch.Generator().manual_seed(seed)
    t = {
        f"{module}.lora_down.weight": torch.randn(rank, in_f, generator=g).to(dtype),
        f"{module}.lora_up.weight": torch.randn(out_f, rank, generator=g).to(dtype),
    }
    if alpha is not None:
        t[f"{module}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return t


def random_bytes(path: Path, n: int = 4096, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(data)
    return path


def truncated_copy(src: Path, dst: Path, keep: float = 0.7) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def header_length(path: Path) -> int:
    """The safetensors header length field (first 8 bytes, little-endian u64)."""
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def checkpoint_like(path: Path) -> Path:
    """A small safetensors file spelled like a full SD checkpoint (no LoRA tensors)."""
    return write(path, {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "model.diffusion_model.input_blocks.0.0.bias": torch.zeros(8),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
    })


class Tripwire:
    """Unpickling this object creates ``marker``: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def pickle_with_tripwire(path: Path, marker: Path, zip_container: bool = True) -> Path:
    """A torch.save file whose unpickling touches ``marker`` (zip container, or the legacy bare pickle)."""
    torch.save({"state_dict": {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, "t": Tripwire(marker)},
               os.fspath(path), _use_new_zipfile_serialization=zip_container)
    return path


# ================================================================ files shaped like those in the field
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
    md = {PEFT_METADATA_KEY: json.dumps(metadata)} if metadata is not None else None
    save_file(tensors, os.fspath(path), metadata=md)
    return path, raw


def onetrainer_sdxl(path: Path, limit: int | None = None) -> Path:
    """OneTrainer's SDXL LoRA: unet. + LDM path + kohya suffixes, 722 transformer layers (the first ``limit``),
    fp16, rank 4, alpha 1."""
    names = [n for n in SDXL_LAYOUT.unet_layers() if block_of(n) in ATTENTION_BLOCKS][:limit]
    tensors = {}
    for i, name in enumerate(names):
        up, down = factors(name, 4, seed=i, dtype=torch.float16)
        tensors.update(pair("unet." + name, "lora_down/up", up, down, torch.tensor(1.0, dtype=torch.float16)))
    return write(path, tensors, metadata={"ss_base_model_version": "sdxl_base_v1-0"})


DORA_KINDS = ("peft lora_magnitude_vector", "peft .lora_magnitude_vector.weight",
              "peft in-memory .lora_magnitude_vector.default.weight", "kohya names keeping lora_magnitude_vector",
              "kohya/LyCORIS dora_scale", "metadata use_dora only")


def dora_case(kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a one-layer SDXL DoRA file in the spelling ``kind`` (one of DORA_KINDS)."""
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
        return {**pair(SDXL_TO_Q_KOHYA, "lora_down/up", up, down, torch.tensor(4.0)),
                SDXL_TO_Q_KOHYA + ".lora_magnitude_vector": mag}, {}
    if kind == "kohya/LyCORIS dora_scale":
        return {**pair(SDXL_TO_Q_KOHYA, "lora_down/up", up, down, torch.tensor(4.0)),
                SDXL_TO_Q_KOHYA + ".dora_scale": mag.reshape(1, 640)}, {}
    assert kind == "metadata use_dora only", kind
    return pair(peft, "lora_A/B", up, down), {PEFT_METADATA_KEY: json.dumps({"unet.r": 4, "unet.lora_alpha": 4,
                                                                               "unet.use_dora": True})}


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
    return write(path, t), values


def factors_any(name: str, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of seeded noise for any linear layer of SDXL, extras included (text projection)."""
    shape = SDXL_LAYOUT[name].shape
    g = torch.Generator().manual_seed(seed)
    return 0.02 * torch.randn(shape[0], rank, generator=g), torch.randn(rank, shape[1], generator=g) / 40


def rank_zero(name: str, spelling: str = "kohya", seed: int = 0) -> dict[str, torch.Tensor]:
    """A rank-0 layer as a pruning tool writes it: lora_down (0, in[, kh, kw]), lora_up (out, 0[, 1, 1]).

    ``spelling``: "kohya" (lora_down/lora_up), "kohya+alpha" (with an .alpha tensor), "peft" (unet./text_encoder
    lora_A/lora_B) or "tucker" (LyCORIS: lora_down (0, in, 1, 1), lora_mid (0, 0, kh, kw), lora_up (out, 0, 1, 1)).
    """
    layer = SDXL_LAYOUT[name]
    shape = layer.shape
    up, down = factors(name, 0, seed)
    if spelling == "peft":
        return pair(layer.diffusers if layer.is_text_encoder else "unet." + layer.diffusers, "lora_A/B", up, down)
    if spelling == "tucker":
        return {f"{layer.kohya}.lora_down.weight": torch.zeros(0, shape[1], 1, 1),
                f"{layer.kohya}.lora_mid.weight": torch.zeros(0, 0, *shape[2:]),
                f"{layer.kohya}.lora_up.weight": torch.zeros(shape[0], 0, 1, 1), f"{layer.kohya}.alpha": torch.tensor(4.0)}
    alpha = torch.tensor(8.0) if spelling == "kohya+alpha" else None
    return pair(layer.kohya, "lora_down/up", up, down, alpha)


# OneTrainer's OMI keys (its convert_sdxl_lora key sets): "unet."/"clip_l."/"clip_g." + the model's own module
# path, kohya suffixes; one-to-one with kohya's lora_unet_/lora_te1_/lora_te2_ names (dots → "_").
OMI_PREFIXES = {"unet.": "lora_unet_", "clip_l.": "lora_te1_", "clip_g.": "lora_te2_"}
OMI_TE_PATHS = tuple(f"text_model.encoder.layers.{i}.{m}" for i in (0, 11) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"))


def omi_sdxl(rank: int = 4, alpha: float = 2.0, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(OMI tensors, the same tensors under kohya names) of an SDXL LoRA saved with OneTrainer's
    enable_omi_format: UNet attention and conv layers, CLIP-L and CLIP-G layers (first and twelfth), CLIP-G's
    text projection, .alpha tensors, fp16, and a bundled embedding."""
    modules = {f"unet.{n}": n for n in (Q, K2, CONV)}
    for path in OMI_TE_PATHS:
        modules[f"clip_l.{path}"] = f"te1.{path}"
        modules[f"clip_g.{path}"] = f"te2.{path}"
    modules["clip_g.text_projection"] = "te2.text_projection"
    omi, kohya = {}, {}
    for i, (module, name) in enumerate(modules.items()):
        up, down = (factors_any(name, rank, seed + i) if name.endswith("text_projection")
                    else factors(name, rank, seed + i))
        t = pair(module, "lora_down/up", up.half(), down.half(), torch.tensor(alpha, dtype=torch.float16))
        omi.update(t)
        prefix = next(p for p in OMI_PREFIXES if module.startswith(p))
        legacy = OMI_PREFIXES[prefix] + module[len(prefix):].replace(".", "_")
        kohya.update({legacy + k[len(module):]: v for k, v in t.items()})
    for emb in ("clip_l", "clip_g"):
        omi[f"bundle_emb.sks.{emb}"] = kohya[f"bundle_emb.sks.{emb}"] = torch.zeros(1, 768 if emb == "clip_l" else 1280)
    return omi, kohya


def tucker_conv(module: str, name: str, rank: int, seed: int, alpha: float | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A LyCORIS LoCon Tucker conv (use_tucker) for the SDXL conv ``name`` spelled ``module``: lora_down
    (r, in, 1, 1), lora_mid (r, r, kh, kw), lora_up (out, r, 1, 1) [+ alpha]; and its dense ΔW in float64,
    scale alpha / r included, as LyCORIS's forward composes the three convs (1×1 → kh×kw → 1×1)."""
    out_f, in_f, kh, kw = SDXL_LAYOUT[name].shape
    g = torch.Generator().manual_seed(seed)
    down = (torch.randn(rank, in_f, 1, 1, generator=g) / math.sqrt(in_f)).to(dtype)
    mid = (torch.randn(rank, rank, kh, kw, generator=g) / math.sqrt(rank * kh * kw)).to(dtype)
    up = (0.02 * torch.randn(out_f, rank, 1, 1, generator=g)).to(dtype)
    t = {f"{module}.lora_down.weight": down, f"{module}.lora_mid.weight": mid, f"{module}.lora_up.weight": up}
    scale = 1.0
    if alpha is not None:
        t[f"{module}.alpha"] = torch.tensor(alpha, dtype=dtype)
        scale = alpha / rank
    dense = scale * torch.einsum("oa,abhw,bi->oihw", up.double()[:, :, 0, 0], mid.double(), down.double()[:, :, 0, 0])
    return t, dense


PEFT_CONFIG_DEFAULTS = {  # what save_pretrained writes besides the scale (peft LoraConfig.to_dict)
    "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0",
    "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": "gaussian",
    "layers_pattern": None, "layers_to_transform": None, "lora_dropout": 0.0, "modules_to_save": None,
    "peft_type": "LORA", "rank_pattern": {}, "revision": None, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
    "task_type": None, "use_dora": False, "use_rslora": False,
}


def peft_folder(folder: Path, config: dict | None, names: tuple[str, ...] = (Q, K2, CONV), rank: int = 16,
                ranks: dict[str, int] | None = None, file_name: str = "adapter_model.safetensors",
                metadata: dict[str, str] | None = None) -> tuple[Path, dict]:
    """A PEFT save_pretrained folder of an adapter on the SDXL UNet: ``file_name`` holding
    base_model.model.<diffusers path>.lora_A/lora_B.weight (no alpha; conv: lora_A (r, in, kh, kw), lora_B
    (out, r, 1, 1)), and, unless ``config`` is None, adapter_config.json with ``config`` over
    PEFT_CONFIG_DEFAULTS. Returns (the tensor file, canonical name -> (up, down) in float32)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors, raw = {}, {}
    for i, name in enumerate(names):
        up, down = factors(name, (ranks or {}).get(name, rank), seed=10 + i, dtype=torch.float16)
        tensors.update(pair("base_model.model." + SDXL_LAYOUT[name].diffusers, "lora_A/B", up, down))
        raw[name] = (up.float(), down.float())
    path = write(folder / file_name, tensors, metadata=metadata)
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps({**PEFT_CONFIG_DEFAULTS, **config}, indent=2))
    return path, raw


def with_raw_metadata(path: Path, metadata: object) -> Path:
    """Rewrite a safetensors file's ``__metadata__`` with any JSON value (the format allows only a mapping of
    strings; some tools write numbers or objects), keeping its tensors byte for byte."""
    data = path.read_bytes()
    n = header_length(path)
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return path


# ======================================================================================= the corpus
COMPACT = (Q, K2, CONV, ADM, "input_blocks.1.0.in_layers.2", TE1_Q, TE2_FC1, "te2.text_projection")


def compact_lora(rank: int = 2, seed: int = 0) -> LoRA:
    """A small SDXL LoRA with one layer of each kind: attention, conv (3×3), ADM, both text encoders, the
    text projection."""
    return LoRA(layers={n: LowRank(*(factors_any(n, rank, seed + i) if n.endswith("text_projection")
                                     else factors(n, rank, seed + i))) for i, n in enumerate(COMPACT)}, base="sdxl")


def _kohya(name: str, rank: int = 2, seed: int = 0, alpha: float | None = None) -> dict[str, torch.Tensor]:
    return pair(SDXL_LAYOUT[name].kohya, "lora_down/up", *factors(name, rank, seed),
                None if alpha is None else torch.tensor(alpha))


def _spelled(name: str, prefix: str, ldm: bool) -> str:
    layer = SDXL_LAYOUT[name]
    body = layer.name if ldm else layer.diffusers
    return prefix + (body.replace(".", "_") if prefix in ("lora_unet_", "lycoris_") else body)


def corpus(folder: Path) -> dict[str, Path]:
    """Every kind of LoRA file the tests build or ship, one file each, written under ``folder``: case -> path.

    The shipped third-party fixtures; every key style written and read; bases, spellings and scales; damaged
    and foreign files; the field's structures (rank-0 layers, OneTrainer OMI, LyCORIS Tucker, PEFT folders with
    and without adapter_config.json, metadata that is not strings, NaN, alphas without factors). A PEFT
    folder's case path is its adapter_model.safetensors (peft_sidecar finds its adapter_config.json).
    """
    from duolora import formats
    from duolora.sdxl import SD15_LAYOUT, SD21_LAYOUT
    from duolora.synthetic import synthetic_lora

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def add(case: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        files[case] = write(folder / f"{len(files):03d}.safetensors", tensors, metadata)

    def raw(case: str, data: bytes, suffix: str = ".safetensors") -> None:
        path = folder / f"{len(files):03d}{suffix}"
        path.write_bytes(data)
        files[case] = path

    for path in sorted(FIXTURES.glob("*.safetensors")):
        files[f"shipped: {path.name}"] = path
    compact = compact_lora()
    for style in formats.KEY_STYLES:
        add(f"compact SDXL, {style}", formats.lora_to_state_dict(compact, style))
    for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn):
        add(f"compact SDXL, {dtype}", formats.lora_to_state_dict(compact, "kohya_ldm", dtype=dtype))
    add("SD1.5 LoRA", formats.lora_to_state_dict(synthetic_lora(SD15_LAYOUT, rank=1, seed=3), "kohya_ldm"))
    add("SD2.1 LoRA", formats.lora_to_state_dict(synthetic_lora(SD21_LAYOUT, rank=1, seed=3), "kohya_ldm"))
    add("SD1.x text encoder only", kohya_layer("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, 4, 4))
    add("SDXL CLIP-L only", _kohya(TE1_Q, alpha=2))
    # 60 attention layers (the merge's time grows with the layers, a file's kind does not)
    attention = list(synthetic_lora(rank=1, seed=4).layers.items())[:60]
    full = formats.lora_to_state_dict(LoRA(layers=dict(attention), base="sdxl"), "kohya_ldm")
    add("a few unknown layers", {**full, **kohya_layer("lora_unet_extra_proj", 8, 8, 1)})
    add("many unknown layers", {**full, **{k: v for i in range(30)
                                           for k, v in kohya_layer(f"lora_unet_extra_{i}_proj", 8, 8, 1).items()}})
    add("Flux-like", {**kohya_layer("lora_unet_double_blocks_0_img_attn_qkv", 96, 32, 1),
                      **kohya_layer("lora_unet_single_blocks_0_linear1", 224, 32, 1)})
    add("unknown family", {k: v for i in range(30) for k, v in kohya_layer(f"net.layer{i}.proj", 16, 16, 1).items()})
    add("known layer behind an unknown prefix", pair("my_tool." + Q, "lora_down/up", *factors(Q, 2, 1)))
    add("metadata says SDXL, names unknown", pair("unet.blk3.attn.q", "lora_down/up", torch.zeros(64, 2),
                                                  torch.zeros(2, 64)), {"ss_base_model_version": "sdxl_base_v1-0"})
    for i, prefix in enumerate(("", "unet.", "diffusion_model.", "model.diffusion_model.", "base_model.model.",
                                "unet.base_model.model.", "lora_unet_", "lycoris_")):
        sd = {}
        for j, name in enumerate((Q, K2, CONV, ADM)):
            sd.update(pair(_spelled(name, prefix, ldm=j % 2 == 0), list(SUFFIXES)[(i + j) % 3], *factors(name, 3, j)))
        add(f"UNet spelled '{prefix}'", sd)
    for prefix in ("te1.", "text_encoder.", "text_encoders.clip_l.transformer.", "clip_l.transformer.", "clip_l.",
                   "conditioner.embedders.0.transformer.", "text_encoder.base_model.model.", "lora_te_"):
        path = TE1_Q.split(".", 1)[1]
        module = prefix + (path.replace(".", "_") if prefix.startswith("lora_") else path)
        add(f"CLIP-L spelled '{prefix}'", {**pair(module, "lora_A/B", *factors(TE1_Q, 2, 1)), **_kohya(TE2_FC1)})
    add("legacy diffusers text encoder", {
        "text_encoder_2.text_model.encoder.layers.31.mlp.fc1.lora_linear_layer.down.weight": factors(TE2_FC1, 2, 1)[1],
        "text_encoder_2.text_model.encoder.layers.31.mlp.fc1.lora_linear_layer.up.weight": factors(TE2_FC1, 2, 1)[0]})
    files["OneTrainer unet.<ldm> (first 40 layers)"] = onetrainer_sdxl(folder / f"{len(files):03d}.safetensors", 40)
    files["rich (bias/norm diffs, text projection, embedding)"] = rich_file(folder / f"{len(files):03d}.safetensors", 1)[0]
    # scales
    for dtype in (torch.int64, torch.float8_e4m3fn, torch.bfloat16):
        add(f".alpha in {dtype}", pair(SDXL_TO_Q_KOHYA, "lora_down/up", *factors(Q, 4, 3), torch.tensor(8.0).to(dtype)))
    add(".alpha of four values", pair(SDXL_TO_Q_KOHYA, "lora_down/up", *factors(Q, 4, 3), torch.full((4,), 8.0)))
    add("old kohya, ss_network_alpha only", pair(SDXL_TO_Q_KOHYA, "lora_down/up", *factors(Q, 4, 3)),
        {"ss_network_alpha": "8", "ss_network_dim": "4"})
    for case, md in (("lora_adapter_metadata", {"unet.r": 16, "unet.lora_alpha": 64}),
                     ("lora_adapter_metadata with patterns", {"unet.r": 16, "unet.lora_alpha": 16,
                                                              "unet.alpha_pattern": {"to_q": 64}, "unet.use_rslora": True}),
                     ("lora_adapter_metadata r not the rank", {"unet.r": 8}),
                     ("lora_adapter_metadata use_dora", {"unet.r": 16, "unet.use_dora": True})):
        files[case] = peft_file(folder / f"{len(files):03d}.safetensors", md)[0]
    add("lora_adapter_metadata not JSON", pair("unet." + SDXL_LAYOUT[Q].diffusers, "lora_A/B", *factors(Q, 16, 1)),
        {PEFT_METADATA_KEY: "{unet.r: 16"})
    add(".alpha and lora_adapter_metadata disagree", pair("unet." + SDXL_LAYOUT[Q].diffusers, "lora_A/B",
                                                          *factors(Q, 16, 1), torch.tensor(16.0)),
        {PEFT_METADATA_KEY: json.dumps({"unet.r": 16, "unet.lora_alpha": 64})})
    # damaged and foreign files
    files["random bytes"] = random_bytes(folder / f"{len(files):03d}.safetensors")
    raw("3 bytes", b"abc")
    raw("header not JSON", (5).to_bytes(8, "little") + b"{nope" + b"\0" * 16)
    raw("a web page's JSON error saved as .safetensors", b'{"error": "Unauthorized", "status": 401}')
    files["truncated download"] = truncated_copy(files["compact SDXL, kohya_ldm"], folder / f"{len(files):03d}.safetensors")
    files["checkpoint"] = checkpoint_like(folder / f"{len(files):03d}.safetensors")
    add("VAE", {"encoder.down.0.block.0.conv1.weight": torch.zeros(4, 3, 3, 3)})
    add("textual-inversion embedding", {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)})
    add("unknown key style", {"foo.weight": torch.zeros(2), "bar.scale": torch.zeros(2)})
    add("unknown tensors beside layers", {**_kohya(Q), "tool.scale": torch.ones(3)})
    add("no tensors", {})
    add("only bias/norm differences", {"lora_unet_out_0.w_norm": torch.zeros(320)})
    add("DeepSpeed ZeRO-3 empty save", {k: torch.zeros(0) for k in _kohya(Q)})
    add("zero-valued factors (saved before training)", {k: torch.zeros_like(v) for k, v in _kohya(Q).items()})
    for i, (suffix, zip_container) in enumerate(((".pt", True), (".ckpt", False), (".safetensors", True))):
        files[f"pickle named {suffix}"] = pickle_with_tripwire(folder / f"{len(files):03d}{suffix}",
                                                               folder / f"unpickled_{i}", zip_container)
    add("wrong shape", pair(SDXL_TO_Q_KOHYA, "lora_down/up", torch.zeros(640, 2), torch.zeros(2, 320)))
    add("layer SDXL lacks", {**_kohya(Q), **kohya_layer("lora_unet_input_blocks_4_1_transformer_blocks_7_attn1_to_q",
                                                        640, 640, 4)})
    add("rank mismatch", {**_kohya(Q), SDXL_TO_Q_KOHYA + ".lora_up.weight": torch.zeros(640, 3)})
    add("missing factor", {SDXL_TO_Q_KOHYA + ".lora_down.weight": torch.zeros(2, 640)})
    add("integer factors", {k: v.to(torch.int32) for k, v in _kohya(Q).items()})
    add("layer spelled twice", {**_kohya(Q), **pair("unet." + Q, "lora_down/up", *factors(Q, 2, 1))})
    add("cloneofsimo positional", {"unet:0:up": torch.zeros(640, 1), "unet:0:down": torch.zeros(1, 2048)})
    # adapters that are not low-rank LoRAs
    for kind in DORA_KINDS:
        tensors, md = dora_case(kind)
        add(f"DoRA: {kind}", tensors, md)
    loha = {f"{SDXL_TO_Q_KOHYA}.hada_w1_a": torch.zeros(640, 4), f"{SDXL_TO_Q_KOHYA}.hada_w1_b": torch.zeros(4, 640),
            f"{SDXL_TO_Q_KOHYA}.hada_w2_a": torch.zeros(640, 4), f"{SDXL_TO_Q_KOHYA}.hada_w2_b": torch.zeros(4, 640)}
    add("LoHa", loha)
    add("LoHa among LoRA layers", {**loha, **_kohya(K2), **_kohya(CONV)})
    add("LoKr", {f"{SDXL_TO_K_KOHYA}.lokr_w1": torch.zeros(20, 32), f"{SDXL_TO_K_KOHYA}.lokr_w2_a": torch.zeros(32, 4),
                 f"{SDXL_TO_K_KOHYA}.lokr_w2_b": torch.zeros(4, 64)})
    add("OFT", {f"{SDXL_TO_Q_KOHYA}.oft_blocks": torch.zeros(4, 160, 160)})
    add("(IA)^3", {f"{SDXL_TO_Q_KOHYA}.on_input": torch.zeros(640)})
    add("full .diff", {f"{SDXL_TO_Q_KOHYA}.diff": torch.zeros(640, 640)})
    # rank-0 layers
    for spelling, name in (("kohya+alpha", K2), ("kohya", K2), ("peft", K2), ("kohya+alpha", CONV), ("tucker", CONV),
                           ("kohya+alpha", TE1_Q)):
        add(f"rank-0 {name} ({spelling})", {**_kohya(Q, 4, alpha=8), **rank_zero(name, spelling)})
    add("every layer rank 0", {**rank_zero(Q, "kohya+alpha"), **rank_zero(K2, "kohya")})
    # OneTrainer OMI
    omi, kohya = omi_sdxl()
    add("OneTrainer OMI", omi)
    add("OneTrainer OMI, kohya twin", kohya)
    add("OMI text encoders only", {k: v for k, v in omi.items() if k.startswith(("clip_l.", "clip_g."))})
    # LyCORIS Tucker
    for label, spelled in (("kohya LDM", lambda n: "lora_unet_" + n.replace(".", "_")),
                           ("kohya diffusers", lambda n: "lora_unet_up_blocks_0_upsamplers_0_conv"),
                           ("ComfyUI", lambda n: "diffusion_model." + n)):
        add(f"LoCon Tucker, {label}", {**_kohya(Q, 4, alpha=4), **tucker_conv(spelled(CONV), CONV, 4, 1, alpha=2.0,
                                                                               dtype=torch.float16)[0]})
    bad_mid = tucker_conv(SDXL_LAYOUT[CONV].kohya, CONV, 4, 1)[0]
    add("Tucker with a lora_mid of another rank", {**bad_mid, f"{SDXL_LAYOUT[CONV].kohya}.lora_mid.weight":
                                                   torch.zeros(4, 5, 3, 3)})
    add("Tucker lora_mid alone", {f"{SDXL_LAYOUT[CONV].kohya}.lora_mid.weight": torch.zeros(4, 4, 3, 3), **_kohya(Q)})
    # PEFT save_pretrained folders
    for i, (case, config) in enumerate((
            ("lora_alpha 32 / r 16", {"r": 16, "lora_alpha": 32}),
            ("patterns and rsLoRA", {"r": 16, "lora_alpha": 16, "alpha_pattern": {"to_q": 64}, "use_rslora": True,
                                     "rank_pattern": {"up_blocks.0.upsamplers.0.conv": 16}}),
            ("use_dora", {"r": 16, "use_dora": True}),
            ("peft_type LOHA", {"peft_type": "LOHA"}),
            ("r not the rank", {"r": 4}))):
        files[f"PEFT folder: {case}"] = peft_folder(folder / f"peft_{i}", config)[0]
    files["PEFT folder without adapter_config.json"] = peft_folder(folder / "peft_none", None)[0]
    files["PEFT adapter renamed"] = peft_folder(folder / "peft_renamed", {"r": 16, "lora_alpha": 32},
                                                file_name="renamed.safetensors")[0]
    files["PEFT folder, config not JSON"] = peft_folder(folder / "peft_bad", {"r": 16})[0]
    (folder / "peft_bad" / "adapter_config.json").write_text("{r: 16")
    # headers and values
    for value in (16, None, {"img": {"sks": 3}}):
        path = write(folder / f"{len(files):03d}.safetensors", _kohya(Q))
        files[f"metadata value {json.dumps(value)}"] = with_raw_metadata(path, {"ss_tag_frequency": value})
    nan = dict(full)
    for key in [k for k in nan if k.endswith(".lora_up.weight")][:40]:
        nan[key] = nan[key].clone()
        nan[key][0, 0] = float("nan")
    add("NaN in 40 layers", nan)
    add("NaN alpha", pair(SDXL_TO_Q_KOHYA, "lora_down/up", *factors(Q, 2, 1), torch.tensor(float("nan"))))
    add("Inf in an embedded token only", {**_kohya(Q), "bundle_emb.sks.string_to_param.*": torch.full((1, 768), float("inf"))})
    add("alphas without factors", {**_kohya(Q, alpha=2), **{f"{SDXL_LAYOUT[n].kohya}.alpha": torch.tensor(4.0)
                                                             for n in (TE1_Q, TE2_FC1)}})
    add("only alphas", {f"{SDXL_LAYOUT[n].kohya}.alpha": torch.tensor(4.0) for n in (Q, K2)})
    return files
