"""The refusals of files that are not low-rank LoRAs, naming what each is instead: a checkpoint, VAE, text encoder
or embedding; a LyCORIS, DoRA, OFT or other adapter (with the base model it was made for); cloneofsimo/lora's
positional format."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch

from ..families import BASE_LABELS
from ..layout import Layout
from .detect import base_hint, context_width_base, detect_layout
from .errors import (
    LoRAError,
    NotALoRAError,
    UnknownKeyStyleError,
    UnsupportedAdapterError,
    display_name,
    quote_examples,
)
from .keys import ADAPTER_NAMES, CLONEOFSIMO_RE, EMBEDDING_RE, adapter_of
from .scales import PEFT_CONFIG_NAME


def not_lora_error(keys: list[str], source: str | None) -> LoRAError:
    name = display_name(source)
    keys = sorted(keys, key=lambda k: (not k.endswith(".weight"), k))  # show a weight as the example
    example = next((k for k in keys if k.startswith("model.diffusion_model.")), None)
    if example:
        return NotALoRAError(
            f"{name} is not a LoRA: it is a full Stable Diffusion checkpoint (e.g. key '{example}'). "
            "Load it with a checkpoint loader (Load Checkpoint) and pick LoRA files for DuoLoRA.", source)
    checks = (
        (("first_stage_model.", "encoder.down.", "decoder.up.", "quant_conv."), "a VAE", "Load VAE"),
        (("conditioner.embedders.", "cond_stage_model.", "text_model.", "clip_l.", "clip_g."),
         "a text-encoder checkpoint", "Load CLIP"),
        (("input_blocks.", "down_blocks.", "diffusion_model.", "model.diffusion_model", "conv_in."),
         "a diffusion-model (UNet) checkpoint", "Load Diffusion Model"),
    )
    for prefixes, what, loader in checks:
        example = next((k for k in keys if k.startswith(prefixes)), None)
        if example:
            return NotALoRAError(
                f"{name} is not a LoRA: it looks like {what} (e.g. key '{example}'). Load it with "
                f"{loader} and pick LoRA files for DuoLoRA.", source)
    if all(EMBEDDING_RE.match(k) for k in keys):
        return NotALoRAError(
            f"{name} is not a LoRA: it is a textual-inversion embedding (keys {quote_examples(keys)}). "
            "Use it in the prompt as an embedding and pick LoRA files for DuoLoRA.", source)
    return UnknownKeyStyleError(
        f"{name}: no LoRA layers found; its tensor names match no known LoRA key style "
        f"(e.g. {quote_examples(sorted(keys))}). Supported: kohya (lora_unet_…), diffusers/PEFT (…lora_A/"
        "lora_B, ….lora.down), diffusers attention processors, ComfyUI (diffusion_model.…lora_up).", source)


def adapter_error(sd: Mapping[str, torch.Tensor], adapters: dict[str, str | None],
                   groups: dict[str, dict[str, str]], metadata: Mapping[str, str], layouts: tuple[Layout, ...],
                   source: str | None, *, algorithm: str | None = None, evidence: str = "") -> UnsupportedAdapterError:
    name = display_name(source)
    algos = Counter(a for a in adapters.values() if a) or Counter({algorithm or "DoRA": len(adapters)})
    algo = algorithm or ("DoRA" if "DoRA" in algos else algos.most_common(1)[0][0])
    # the base model, for the message: from the adapters' effective shapes and any plain LoRA pairs (DoRA)
    shapes = {m: s for m in adapters if (s := _adapter_shape(sd, m)) is not None}
    for module, g in groups.items():
        up, down = sd.get(g.get("up", "")), sd.get(g.get("down", ""))
        if up is not None and down is not None and up.dim() >= 2 and down.dim() >= 2:
            shapes.setdefault(module, (int(up.shape[0]), *(int(x) for x in down.shape[1:])))
    base = "unknown"
    if shapes:
        layout, matched = detect_layout(shapes, layouts, base_hint(metadata, shapes))
        base = layout.base if matched > 0 else "unknown"
    what = ADAPTER_NAMES[algo]
    if len(algos) > 1:
        what += " (also " + ", ".join(a for a in algos if a != algo) + ")"
    made_for = f", made for {BASE_LABELS[base]}" if base != "unknown" else ""
    # the file's modules: the adapters' and the plain LoRA layers beside them (a DoRA module is both)
    total = len(set(adapters) | {m for m, g in groups.items() if g.keys() & {"up", "down", "mid"}})
    if total > len(adapters):
        head = (f"{name} is {what}{made_for}, not a low-rank LoRA: {len(adapters)} of its {total} modules are "
                f"{algo} modules (the other {total - len(adapters)} are low-rank LoRA layers).")
    else:
        head = f"{name} is {what} with {len(adapters)} modules{made_for}, not a low-rank LoRA."
    if algo == "DoRA":
        suffixes = sorted({"dora_scale" if k.endswith(".dora_scale") else "lora_magnitude_vector"
                           for k in sd if (hit := adapter_of(k)) is not None and hit[1] == "DoRA"})
        spelled = evidence or "its " + " and ".join(suffixes) + " tensors"
        return UnsupportedAdapterError(
            f"{head} Besides its low-rank factors it stores a magnitude per output channel ({spelled}) that "
            "rescales every patched weight after the low-rank update, so its effect is not a low-rank ΔW and "
            "DuoLoRA cannot merge it. Use the same subject or style as a plain LoRA (trained with DoRA off) "
            "instead. Do not delete the magnitude tensors to make it load: without them the file is a "
            "different LoRA.", source, algorithm=algo, base=base)
    return UnsupportedAdapterError(
        f"{head} DuoLoRA merges only low-rank LoRA layers (lora_down/lora_up or lora_A/lora_B): use a "
        f"standard LoRA, or convert this {algo} to one first.", source, algorithm=algo, base=base)


def check_sidecar_type(config: Mapping, sd: Mapping[str, torch.Tensor], groups: dict[str, dict[str, str]],
                        metadata: Mapping[str, str], layouts: tuple[Layout, ...], source: str | None) -> None:
    """Refuse a PEFT adapter whose adapter_config.json says it is not a plain LoRA (DoRA, another peft_type)."""
    where = f"the {PEFT_CONFIG_NAME} beside it"
    if config.get("use_dora"):
        raise adapter_error(sd, dict.fromkeys(m for m, g in groups.items() if "down" in g), groups, metadata,
                             layouts, source, algorithm="DoRA", evidence=f"{where} says use_dora")
    peft_type = config.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(
            f"{display_name(source)}: {where} says peft_type '{peft_type}', a PEFT adapter that is not a LoRA, so "
            "its tensors do not mean ΔW = lora_B·lora_A. DuoLoRA merges only low-rank LoRA layers: use a LoRA "
            "adapter (peft_type LORA) instead.", source, algorithm=str(peft_type))


def _adapter_shape(sd: Mapping[str, torch.Tensor], module: str) -> tuple[int, ...] | None:
    """The weight shape a LoKr/LoHa module patches (for naming its base model in the error)."""
    def factor(prefix: str) -> tuple[int, ...] | None:
        if f"{module}.{prefix}" in sd:
            return tuple(sd[f"{module}.{prefix}"].shape)
        a, b = sd.get(f"{module}.{prefix}_a"), sd.get(f"{module}.{prefix}_b")
        if a is not None and b is not None:
            return (int(a.shape[0]), *(int(x) for x in b.shape[1:]))
        return None

    w1, w2 = factor("lokr_w1"), factor("lokr_w2")
    if w1 is not None and w2 is not None and len(w1) == 2:
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    h1 = factor("hada_w1")
    if h1 is not None:
        return h1
    return None


def cloneofsimo_error(sd: Mapping[str, torch.Tensor], source: str | None) -> UnknownKeyStyleError:
    """cloneofsimo/lora's positional format: name it and, from shapes, the base model."""
    name = display_name(source)
    unet_in = {int(t.shape[1]) for k, t in sd.items() if k.startswith("unet:") and k.endswith(":down")}
    unet_out = {int(t.shape[0]) for k, t in sd.items() if k.startswith("unet:") and k.endswith(":up")}
    # the cross-attention k/v inputs are the only UNet input widths that are no layer's output width
    context = [w for w in sorted(unet_in - unet_out) if context_width_base([w])]
    base = context_width_base(context) or "unknown"
    tokens = [k for k in sd if not CLONEOFSIMO_RE.match(k)]
    made_for = ""
    if base != "unknown":
        made_for = (f", made for {BASE_LABELS[base]} (its cross-attention layers read {context[0]}-wide "
                    "text embeddings)")
    extra = f", with embedded tokens {quote_examples(tokens)}" if tokens else ""
    n = sum(1 for k in sd if CLONEOFSIMO_RE.match(k) and k.endswith(":up"))
    return UnknownKeyStyleError(
        f"{name} is in cloneofsimo/lora's own format ('unet:0:up' keys: {n} layers numbered by position, "
        f"not named){made_for}{extra}. Its layers cannot be matched to model layers by name, so DuoLoRA "
        "cannot read it; convert it to a kohya or diffusers LoRA with the tool that made it.", source,
        base=base)
