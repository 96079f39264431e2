"""What the example workflows share: the files and prompts they name, sampler settings, colours, node heights,
and the node groups several of them use (reference images, the two loaders, sampling to a saved image, the merge's
inputs and outputs)."""

from __future__ import annotations

from typing import Any

from workflowbuilder import Column, WorkflowBuilder

CKPT = "sd_xl_base_1.0.safetensors"
# Shown by the front end's missing-models dialog (node.properties.models), as ComfyUI's own templates do.
CKPT_MODELS = [{
    "name": CKPT,
    "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
    "directory": "checkpoints",
}]
CONTENT_LORA = "content_lora.safetensors"
STYLE_LORA = "style_lora.safetensors"
CONTENT_IMAGES = ("content_1.png", "content_2.png")
STYLE_IMAGE = "style.png"
P_C = "a photo of sks dog"
P_S = "a cat in zwz style"
P_CS = "a sks dog in zwz style"
# The second subject of the multi-concept example.
CONTENT2_LORA = "content2_lora.safetensors"
CONTENT2_IMAGES = ("content2_1.png",)
P_C2 = "a photo of pqr fox"
P_CS2 = "a pqr fox in zwz style"
NEGATIVE = "blurry, low quality, deformed, watermark, text"
SEED = 42
SIZE = 1024  # SDXL's native resolution
SAMPLER = {"seed": SEED, "seed:control_after_generate": "fixed", "steps": 30, "cfg": 7.0,
           "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}
MERGE_SEED = {"seed": 0, "seed:control_after_generate": "fixed"}

GREEN, GREEN_BG = "#232", "#353"  # ComfyUI's own colours for positive / negative prompts
RED, RED_BG = "#322", "#533"
GROUP_COLOURS = {"model": "#3f789e", "refs": "#8A8", "prompts": "#b58b2a", "merge": "#a1309b",
                 "out": "#88A"}

# What a user sees of ZipRank Merge in a new graph (mode, method, steps, balance, the advanced button, the loss
# curve): the height a template gives it, measured in front end 1.32.9 (tests/browser/test_frontend.py).
MERGE_HEIGHT = 454
# A loader and Save Merged LoRA with the line that shows, after a run, the file's summary / the saved name.
LOADER_HEIGHT, SAVE_HEIGHT = 142, 110
# Add Content LoRA: five input sockets, two widgets and the same summary line as the loaders.
ADD_CONTENT_HEIGHT = 202


def add_note(b: WorkflowBuilder, col: Column, text: str, height: float = 180, width: float = 340) -> int:
    return b.add("Note", col, {"text": text}, width=width, height=height)


def add_prompt(b: WorkflowBuilder, col: Column, text: str, title: str, negative: bool = False) -> int:
    colours = (RED, RED_BG) if negative else (GREEN, GREEN_BG)
    return b.add("CLIPTextEncode", col, {"text": text}, title=title, width=400, height=120,
                 color=colours[0], bgcolor=colours[1])


def add_merge(b: WorkflowBuilder, col: Column, title: str, **widgets: Any) -> int:
    return b.add("DuoLoRA_ZipRankMerge", col, {**MERGE_SEED, **widgets}, title=title, width=400, height=MERGE_HEIGHT)


def add_reference_images(b: WorkflowBuilder, vae_src: int, cols: tuple[Column, Column]) -> tuple[int, int, list[int]]:
    """LoadImage ×2 -> ImageBatch -> VAEEncode (content) and LoadImage -> VAEEncode (style)."""
    top = max(c.y for c in cols) + 60  # room for the group's title above the first node
    for c in cols:
        c.y = top
    imgs = [b.add("LoadImage", cols[0], {"image": name}, title=f"Content image {i + 1}", width=300, height=330)
            for i, name in enumerate(CONTENT_IMAGES)]
    style_img = b.add("LoadImage", cols[0], {"image": STYLE_IMAGE}, title="Style image", width=300, height=330)
    batch = b.add("ImageBatch", cols[1], title="Content images (batch)", width=240)
    b.connect(imgs[0], "IMAGE", batch, "image1")
    b.connect(imgs[1], "IMAGE", batch, "image2")
    enc_c = b.add("VAEEncode", cols[1], title="VAE Encode (content)", width=240)
    b.connect(batch, "IMAGE", enc_c, "pixels")
    b.connect(vae_src, "VAE", enc_c, "vae")
    cols[1].y = max(cols[1].y, b.node(style_img)["pos"][1])
    enc_s = b.add("VAEEncode", cols[1], title="VAE Encode (style)", width=240)
    b.connect(style_img, "IMAGE", enc_s, "pixels")
    b.connect(vae_src, "VAE", enc_s, "vae")
    return enc_c, enc_s, [*imgs, style_img, batch, enc_c, enc_s]


def add_loras(b: WorkflowBuilder, col: Column) -> tuple[int, int]:
    # A loader shows its file's summary (key style, base model, layers, rank) in the node after a run.
    c = b.add("DuoLoRA_LoadContentLoRA", col, {"lora_name": CONTENT_LORA}, width=320, height=LOADER_HEIGHT)
    s = b.add("DuoLoRA_LoadStyleLoRA", col, {"lora_name": STYLE_LORA}, width=320, height=LOADER_HEIGHT)
    return c, s


def add_sampling(b: WorkflowBuilder, model_src: int, positive: int, negative: int, vae_src: int,
                 cols: tuple[Column, Column], prefix: str, title: str = "KSampler",
                 latent: int | None = None) -> tuple[int, int, int]:
    """EmptyLatentImage (unless given) -> KSampler -> VAEDecode -> SaveImage."""
    if latent is None:
        latent = b.add("EmptyLatentImage", cols[0], {"width": SIZE, "height": SIZE, "batch_size": 1}, width=300)
    ks = b.add("KSampler", cols[0], SAMPLER, title=title, width=300)
    b.connect(model_src, "MODEL", ks, "model")
    b.connect(positive, "CONDITIONING", ks, "positive")
    b.connect(negative, "CONDITIONING", ks, "negative")
    b.connect(latent, "LATENT", ks, "latent_image")
    dec = b.add("VAEDecode", cols[1], width=220)
    b.connect(ks, "LATENT", dec, "samples")
    b.connect(vae_src, "VAE", dec, "vae")
    save = b.add("SaveImage", cols[1], {"filename_prefix": prefix}, width=380, height=400)
    b.connect(dec, "IMAGE", save, "images")
    return latent, ks, save


def connect_merge_inputs(b: WorkflowBuilder, merge: int, model: int, content: int, style: int,
                         latents: tuple[int, str, int, str] | None, prompts: tuple[int, int, int] | None,
                         content_output: str = "content_lora") -> None:
    """``content_output``: the content node's output ("content_loras" from Add Content LoRA)."""
    b.connect(model, "MODEL", merge, "model")
    b.connect(content, content_output, merge, "content_lora")
    b.connect(style, "style_lora", merge, "style_lora")
    if latents:
        b.connect(latents[0], latents[1], merge, "content_latents")
        b.connect(latents[2], latents[3], merge, "style_latents")
    if prompts:
        for src, name in zip(prompts, ("content_prompt", "style_prompt", "combined_prompt")):
            b.connect(src, "CONDITIONING", merge, name)


def add_save_and_report(b: WorkflowBuilder, merge: int, col: Column) -> tuple[int, int]:
    """Save Merged LoRA and Merge Report on the merge's outputs."""
    save_lora = b.add("DuoLoRA_SaveMergedLoRA", col, {"filename_prefix": "duolora/merged"}, width=320,
                      height=SAVE_HEIGHT)
    b.connect(merge, "merged_lora", save_lora, "merged_lora")
    report = b.add("DuoLoRA_MergeReport", col, width=400, height=340)
    b.connect(merge, "stats", report, "stats")
    return save_lora, report


def add_apply_and_generate(b: WorkflowBuilder, merge: int, ckpt: int, cols: tuple[Column, Column],
                           negative_title: str) -> list[int]:
    """Apply Merged LoRA (MODEL + CLIP) -> prompts encoded by the patched CLIP -> sampler and SaveImage.

    Returns the nodes of the "Generate with the merged LoRA" group."""
    apply = b.add("DuoLoRA_ApplyMergedLoRA", cols[0], width=320)
    b.connect(ckpt, "MODEL", apply, "model")
    b.connect(ckpt, "CLIP", apply, "clip")
    b.connect(merge, "merged_lora", apply, "merged_lora")
    pos = add_prompt(b, cols[0], P_CS, "Prompt (merged LoRA)")
    b.connect(apply, "CLIP", pos, "clip")
    neg = add_prompt(b, cols[0], NEGATIVE, negative_title, negative=True)
    b.connect(apply, "CLIP", neg, "clip")
    latent, ks, save = add_sampling(b, apply, pos, neg, ckpt, cols, "duolora/merged")
    return [apply, pos, neg, latent, ks, save]
