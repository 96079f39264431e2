"""The MiniBench text-to-image model: ComfyUI's own SDXL UNet classes, tiny widths, on 32×32 pixels.

The UNet keeps SDXL's block layout and module names (input_blocks.4.1 … output_blocks.5.1, one transformer
block each), so SDXL LoRA keys, ``duolora.sdxl.layout_for`` and the ``paper`` prior preset apply verbatim:
at 32×32 input its attention runs at 16×16 (SDXL's 64×64 "style" blocks) and 8×8 (SDXL's 32×32 "content"
blocks and the middle). It uses SDXL's discrete noise schedule and predicts either ε (like SDXL base) or v on the
zero-terminal-SNR version of that schedule (like the v-prediction SDXL checkpoints, e.g. NoobAI-XL V-Pred): a
checkpoint says which in its metadata (:data:`PREDICTIONS`), and ComfyUI builds the matching model sampling from
the same state-dict markers it reads in such checkpoints. The "latent" is the RGB image itself in [-1, 1] (a pixel
latent format with scale 1).

The text encoder is learned from scratch: a 5-token context ("a <shape> in <texture> style") of learned
word + position embeddings, and a pooled vector. ComfyUI modules are imported inside functions, after
``comfyhost.boot()`` has prepared the process.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

CONTEXT_DIM = 64
POOLED_DIM = 32
N_TOKENS = 5
SIZE_EMBED_DIM = 6 * 256  # SDXL appends six 256-wide Fourier embeddings of the image size/crop.

MINI_UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": POOLED_DIM + SIZE_EMBED_DIM,
    "model_channels": 32,
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 1, 2],
    # SDXL's layout with transformer depth 1 everywhere it has attention.
    "transformer_depth": [0, 0, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "use_linear_in_transformer": True,
    "context_dim": CONTEXT_DIM,
    "num_head_channels": 32,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

# The trained word table's rows, in the checkpoint's order (frozen: base_ema.safetensors has exactly these 18
# rows). "star" and "diagonal" have rows that base training never updated (held out since MiniBench 1).
VOCAB: tuple[str, ...] = ("<pad>", "a", "in", "style", "circle", "square", "triangle", "cross", "ring", "diamond",
                          "star", "solid", "hstripes", "vstripes", "checker", "dots", "gradient", "diagonal")


def tokenize(prompt: str) -> list[int]:
    """Word ids of ``prompt`` in VOCAB, padded/truncated to N_TOKENS; words outside VOCAB raise ValueError.

    Base training uses this (it only ever sees VOCAB's base words); prompts with new words go through
    ``MiniTextEncoder.encode``, which gives them unseen-word embeddings.
    """
    ids = []
    for word in prompt.lower().split():
        if word not in VOCAB:
            raise ValueError(f"word {word!r} is not in the MiniBench vocabulary ({', '.join(VOCAB[1:])})")
        ids.append(VOCAB.index(word))
    ids = ids[:N_TOKENS]
    return ids + [0] * (N_TOKENS - len(ids))


def unseen_word_embedding(word: str) -> torch.Tensor:
    """The embedding (CONTEXT_DIM,) of a word outside the trained table: N(0, 1) seeded by the word itself.

    That is exactly what a table row looks like when training never touches it (``nn.Embedding`` draws its
    rows from N(0, 1), and Adam without weight decay leaves a row with zero gradient unchanged), so a new
    word — MiniBench 2's heart/moon/zigzag/grid, or a bring-your-own glyph — is as unknown to the base as
    "star" is, and the same word always gets the same vector.
    """
    g = torch.Generator().manual_seed(zlib.crc32(word.encode()) + 7919)
    return torch.randn(CONTEXT_DIM, generator=g)


def unseen_words(prompt: str) -> list[str]:
    """Words of ``prompt`` that the base's word table does not hold."""
    return [w for w in prompt.lower().split() if w not in VOCAB]


class MiniTextEncoder(torch.nn.Module):
    """Learned word embeddings → context (B, 5, CONTEXT_DIM) and pooled (B, POOLED_DIM).

    Words never seen in training (the held-out shape/texture) keep their seeded initial embedding: Adam
    without weight decay leaves rows with zero gradient untouched; words outside the table get the same
    kind of vector from ``unseen_word_embedding``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.words = torch.nn.Embedding(len(VOCAB), CONTEXT_DIM)
        self.position = torch.nn.Parameter(torch.zeros(N_TOKENS, CONTEXT_DIM))
        self.norm = torch.nn.LayerNorm(CONTEXT_DIM)
        self.pool = torch.nn.Linear(CONTEXT_DIM, POOLED_DIM)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, 5) long → (context (B, 5, 64), pooled (B, 32))."""
        return self.from_embeddings(self.words(ids))

    def from_embeddings(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Word embeddings (B, 5, 64) → (context (B, 5, 64), pooled (B, 32))."""
        ctx = self.norm(e + self.position)
        pooled = self.pool(e.mean(dim=1))
        return ctx, pooled

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a list of prompts (the empty string is the unconditional prompt); any words allowed."""
        rows = []
        for prompt in prompts:
            words = prompt.lower().split()[:N_TOKENS]
            vecs = [self.words.weight[VOCAB.index(w)] if w in VOCAB else unseen_word_embedding(w).to(
                self.words.weight) for w in words]
            vecs += [self.words.weight[0]] * (N_TOKENS - len(vecs))
            rows.append(torch.stack(vecs))
        return self.from_embeddings(torch.stack(rows))


def _model_config():
    import comfy.latent_formats
    import comfy.supported_models

    class PixelFormat(comfy.latent_formats.LatentFormat):
        """The model's "latent" is the image itself in [-1, 1]."""

        latent_channels = 3
        scale_factor = 1.0

    cfg = comfy.supported_models.SDXL(dict(MINI_UNET_CONFIG))
    # BASE.__init__ forces SDXL's 64-wide heads from unet_extra_config; keep ours.
    cfg.unet_config["num_head_channels"] = MINI_UNET_CONFIG["num_head_channels"]
    cfg.set_inference_dtype(torch.float32, None)
    cfg.latent_format = PixelFormat()
    return cfg


# How a checkpoint predicts (safetensors metadata key ``minibench.prediction``; absent means "eps"):
# "eps": ε on SDXL's scaled-linear schedule. "v_zsnr": v on the same schedule rescaled to zero terminal SNR
# (Lin et al., "Common Diffusion Noise Schedules and Sample Steps Are Flawed"), so that x_T carries nothing of the
# image; ComfyUI reads the same two state-dict markers ("v_pred", "ztsnr") in v-prediction SDXL checkpoints.
PREDICTIONS: dict[str, dict[str, torch.Tensor]] = {
    "eps": {},
    "v_zsnr": {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])},
}
PREDICTION_KEY = "minibench.prediction"


def build_model_base(seed: int = 0, prediction: str = "eps"):
    """A ``comfy.model_base.SDXL`` with MINI_UNET_CONFIG and seeded initial weights; ``prediction`` is a key of
    :data:`PREDICTIONS` (ComfyUI picks the model type and its model sampling from those markers)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r} (one of {', '.join(PREDICTIONS)})")
    cfg = _model_config()
    model = cfg.get_model(dict(PREDICTIONS[prediction]), "model.diffusion_model.", device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed)
    return model


def prediction_of(model) -> str:
    """"v_zsnr" for a v-prediction model on a zero-terminal-SNR schedule, "eps" for an ε model; else ValueError."""
    import comfy.model_sampling

    sampling = model.model_sampling
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        if not getattr(sampling, "zsnr", False):
            raise ValueError("a v-prediction MiniBench model without zero terminal SNR is not a MiniBench model")
        return "v_zsnr"
    if isinstance(sampling, comfy.model_sampling.EPS):
        return "eps"
    raise ValueError(f"MiniBench models predict ε or v, not {type(sampling).__name__}")


def init_weights_(unet: torch.nn.Module, seed: int) -> None:
    """Seeded initialisation (ComfyUI's ops skip it): fan-in scaled normal weights, zero biases, unit norms.

    The final output conv is zeroed, a standard diffusion trick: the untrained model predicts ε = 0.
    """
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        # Only the last conv: zeroing the GroupNorm before it too would cut every gradient path.
        for p in unet.out[-1].parameters():
            p.zero_()


def size_embedding(model) -> torch.Tensor:
    """The constant SDXL size/crop part of ``y`` as ComfyUI computes it for a 32×32 input (1, 1536).

    ComfyUI's sampler passes width/height = 8 × the latent side (comfy.samplers.encode_model_conds).
    """
    pooled = torch.zeros(1, POOLED_DIM)
    y = model.encode_adm(pooled_output=pooled, width=32 * 8, height=32 * 8)
    return y[:, POOLED_DIM:].detach()


def build_patcher(model):
    """Wrap a model_base in ComfyUI's ModelPatcher (what a MODEL socket carries)."""
    import comfy.model_management
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def checkpoint_prediction(path: str) -> str:
    """The prediction a MiniBench checkpoint was trained for (its ``minibench.prediction`` metadata; "eps" if none)."""
    import safetensors

    with safetensors.safe_open(path, "pt") as f:
        return (f.metadata() or {}).get(PREDICTION_KEY, "eps")


def load_checkpoint(path: str) -> tuple[Any, MiniTextEncoder]:
    """Build the model_base and text encoder and load a MiniBench checkpoint (safetensors) into them.

    Keys: ``unet.<diffusion_model key>`` and ``text.<encoder key>``; the metadata says how it predicts.
    """
    import safetensors.torch

    sd = safetensors.torch.load_file(path)
    model = build_model_base(0, checkpoint_prediction(path))
    text = MiniTextEncoder()
    unet_sd = {k[5:]: v for k, v in sd.items() if k.startswith("unet.")}
    text_sd = {k[5:]: v for k, v in sd.items() if k.startswith("text.")}
    missing, unexpected = model.diffusion_model.load_state_dict(unet_sd, strict=True), None
    del missing, unexpected
    text.load_state_dict(text_sd, strict=True)
    model.eval()
    text.eval()
    return model, text
