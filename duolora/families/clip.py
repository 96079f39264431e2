"""CLIP text encoders as LoRA layer tables (SDXL's CLIP-L and CLIP-G, SD1.x's CLIP-L, SD2.x's OpenCLIP-H,
Flux.1's CLIP-L): canonical ``te1.``/``te2.`` + the CLIP module path, with every file spelling."""

from __future__ import annotations

from ..layout import Layer

# SDXL's text encoders (ComfyUI clip_l / clip_g) and the single encoders of SD1.x (CLIP-L) and SD2.x
# (OpenCLIP-H, 24 layers in ComfyUI; kohya trains 23 of them).
TE_CLIP_L = (768, 12, 3072)
TE_CLIP_G = (1280, 32, 5120)
TE_CLIP_H = (1024, 24, 4096)
_CLIP_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                 "mlp.fc1", "mlp.fc2")


def text_encoder_layers(
    which: str = "te1",
    hidden: int = 768,
    layers: int = 12,
    mlp: int | None = None,
    *,
    kohya_prefix: str | None = None,
    diffusers_prefix: str | None = None,
    clip_name: str | None = None,
) -> dict[str, Layer]:
    """The LoRA-able linear layers of one CLIP text encoder: canonical ``te1.text_model.encoder.layers.N.*``.

    q/k/v/out_proj are (hidden, hidden); mlp.fc1 is (mlp, hidden), mlp.fc2 (hidden, mlp); mlp defaults to
    4·hidden. Spellings: kohya ``lora_te1_text_model_encoder_layers_N_self_attn_q_proj`` (``kohya_prefix``
    overrides ``lora_te1_``, e.g. ``lora_te_`` for SD1.x), diffusers ``text_encoder.…`` / ``text_encoder_2.…``,
    ComfyUI ``text_encoders.clip_l.transformer.…``.
    """
    if which not in ("te1", "te2"):
        raise ValueError(f"text encoder must be 'te1' or 'te2', not {which!r}")
    mlp = mlp if mlp is not None else 4 * hidden
    kohya_prefix = kohya_prefix if kohya_prefix is not None else f"lora_{which}_"
    if diffusers_prefix is None:
        diffusers_prefix = "text_encoder." if which == "te1" else "text_encoder_2."
    clip_name = clip_name or ("clip_l" if which == "te1" else "clip_g")
    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden),
        "self_attn.out_proj": (hidden, hidden),
        "mlp.fc1": (mlp, hidden),
        "mlp.fc2": (hidden, mlp),
    }
    out: dict[str, Layer] = {}
    for i in range(layers):
        for m in _CLIP_MODULES:
            path = f"text_model.encoder.layers.{i}.{m}"
            kohya = kohya_prefix + path.replace(".", "_")
            out[f"{which}.{path}"] = Layer(
                name=f"{which}.{path}",
                diffusers=diffusers_prefix + path,
                kohya=kohya,
                kohya_diffusers=kohya,
                block=which,
                resolution=0,
                shape=shapes[m],
                kind="linear",
                is_attention=False,
                comfyui=f"text_encoders.{clip_name}.transformer.{path}",
                model_key=f"{clip_name}.transformer.{path}.weight",
            )
    return out


CLIP_VOCAB = 49408  # CLIP-L and CLIP-G token embeddings (ComfyUI clip_model.CLIPEmbeddings)
CLIP_POSITIONS = 77


def _te_prefixes(which: str, kohya_prefix: str | None, diffusers_prefix: str | None,
                 clip_name: str | None) -> tuple[str, str, str]:
    if which not in ("te1", "te2"):
        raise ValueError(f"text encoder must be 'te1' or 'te2', not {which!r}")
    kohya_prefix = kohya_prefix if kohya_prefix is not None else f"lora_{which}_"
    if diffusers_prefix is None:
        diffusers_prefix = "text_encoder." if which == "te1" else "text_encoder_2."
    return kohya_prefix, diffusers_prefix, clip_name or ("clip_l" if which == "te1" else "clip_g")


def _te_module(which: str, path: str, shape: tuple[int, ...], kind: str, bias: bool, kohya_prefix: str,
               diffusers_prefix: str, clip_name: str, kohya_mapped: bool) -> Layer:
    comfyui = f"text_encoders.{clip_name}.transformer.{path}"
    # ComfyUI's key map knows kohya names (lora_te1_…) only for the attention/MLP projections and the text
    # projection; every other CLIP weight it maps only as text_encoders.… — so that is how we write them.
    kohya = kohya_prefix + path.replace(".", "_") if kohya_mapped else comfyui
    return Layer(name=f"{which}.{path}", diffusers=diffusers_prefix + path, kohya=kohya, kohya_diffusers=kohya,
                 block=which, resolution=0, shape=shape, kind=kind, is_attention=False, comfyui=comfyui,
                 model_key=f"{clip_name}.transformer.{path}.weight", bias=bias)


def text_encoder_extras(
    which: str = "te1",
    hidden: int = 768,
    *,
    kohya_prefix: str | None = None,
    diffusers_prefix: str | None = None,
    clip_name: str | None = None,
    vocab: int = CLIP_VOCAB,
    positions: int = CLIP_POSITIONS,
) -> dict[str, Layer]:
    """CLIP weights ComfyUI's stock loader patches from a LoRA file though trainers rarely target them.

    ``te1.text_projection`` (hidden, hidden; no bias) — OneTrainer writes ``lora_te2_text_projection``, and
    ComfyUI maps it (comfy/lora.py ``model_lora_keys_clip``); ``text_model.embeddings.token_embedding``
    (vocab, hidden) and ``position_embedding`` (positions, hidden) — ComfyUI's LoRA extraction (LoraSave)
    writes a LoRA for every 2-D weight, these included. Not part of the layer table trainers enumerate
    (``Layout.layers``), but read, merged (as text-encoder layers: a plain sum) and written like it.
    """
    kohya_prefix, diffusers_prefix, clip_name = _te_prefixes(which, kohya_prefix, diffusers_prefix, clip_name)
    args = (kohya_prefix, diffusers_prefix, clip_name)
    # diffusers' CLIPTextModelWithProjection holds text_projection beside text_model, as ComfyUI does
    return {
        f"{which}.text_projection": _te_module(which, "text_projection", (hidden, hidden), "linear", False, *args,
                                               kohya_mapped=True),
        f"{which}.text_model.embeddings.token_embedding": _te_module(
            which, "text_model.embeddings.token_embedding", (vocab, hidden), "embedding", False, *args,
            kohya_mapped=False),
        f"{which}.text_model.embeddings.position_embedding": _te_module(
            which, "text_model.embeddings.position_embedding", (positions, hidden), "embedding", False, *args,
            kohya_mapped=False),
    }


def text_encoder_norms(
    which: str = "te1",
    hidden: int = 768,
    layers: int = 12,
    *,
    kohya_prefix: str | None = None,
    diffusers_prefix: str | None = None,
    clip_name: str | None = None,
) -> dict[str, Layer]:
    """The LayerNorms of one CLIP text encoder (kind "norm"): layer_norm1/2 of every layer, final_layer_norm."""
    kohya_prefix, diffusers_prefix, clip_name = _te_prefixes(which, kohya_prefix, diffusers_prefix, clip_name)
    paths = [f"text_model.encoder.layers.{i}.layer_norm{k}" for i in range(layers) for k in (1, 2)]
    paths.append("text_model.final_layer_norm")
    return {f"{which}.{p}": _te_module(which, p, (hidden,), "norm", True, kohya_prefix, diffusers_prefix,
                                       clip_name, kohya_mapped=False) for p in paths}

