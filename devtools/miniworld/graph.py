"""The API prompt of one MiniBench sampling run through the real nodes, shared by the benchmark and the demo.

One run: MiniBenchCheckpoint → (nothing | LoRAs stacked through ComfyUI's LoraLoaderModelOnly, each at its own
strength, as a user stacks loaders | DuoLoRA_LoadContentLoRA / DuoLoRA_LoadStyleLoRA → DuoLoRA_ZipRankMerge
(reference images and prompts from the MiniBench pack) → DuoLoRA_ApplyMergedLoRA) → ComfyUI's KSampler on the target prompt "a <shape> in <texture> style" →
MiniBenchToImage. The KSampler seed depends on the pair and the seed only (:func:`noise_seed`), so every run of
one (pair, seed) starts from the same initial noise, whatever it merges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from miniworld import loras as mb_lora
from miniworld import world as mb_world

MERGE_NODE = "DuoLoRA_ZipRankMerge"
KLORA_NODE = "DuoLoRA_ApplyKLoRA"


@dataclass(frozen=True)
class Pair:
    """One content × style pair: the two LoRA specs and the prompts of the merge and of the evaluation.

    ``content_word``/``style_word`` name the concepts (the classifiers' class names for the built-in pairs; for a
    bring-your-own pair, the words of its captions, scored open-set, see miniworld.classify.Scorer.hits).
    """

    content: mb_lora.LoRASpec
    style: mb_lora.LoRASpec
    content_word: str
    style_word: str
    p_c: str
    p_s: str

    @property
    def name(self) -> str:
        return f"{self.content_word}×{self.style_word}"

    @property
    def slug(self) -> str:
        return f"{slug(self.content_word)}__{slug(self.style_word)}"

    @property
    def target(self) -> str:
        return mb_world.caption(self.content_word, self.style_word)

    @property
    def joint(self) -> mb_lora.LoRASpec:
        """The ceiling's LoRA: trained on renders of the target itself (built-in pairs only)."""
        return mb_lora.joint_spec(self.content_word, self.style_word)

    def lora_file(self, role: str) -> str:
        """The models/loras file name of the pair's ``role`` LoRA: "content", "style" or "joint"."""
        spec = {"content": self.content, "style": self.style}.get(role) or (self.joint if role == "joint" else None)
        if spec is None:
            raise ValueError(f"unknown LoRA role {role!r} (content, style or joint)")
        return f"{spec.name}.safetensors"


def builtin_pair(shape: str, texture: str) -> Pair:
    return Pair(mb_lora.content_spec(shape), mb_lora.style_spec(texture), shape, texture,
                mb_world.caption(shape, "solid"), mb_world.caption("circle", texture))


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def noise_seed(pair: Pair, seed: int) -> int:
    """KSampler seed of a unit: the same for every method of the unit, different across units."""
    return 1000 + 7919 * seed + sum(map(ord, pair.name)) % 1000


def merge_defaults(host) -> dict[str, Any]:
    """Every widget of ``DuoLoRA_ZipRankMerge`` at the node's own default, except ``seed`` (set per run)."""
    from objectinfo import widget_defaults  # devtools/ is on sys.path whenever this package imports

    return {k: v for k, v in widget_defaults(host, MERGE_NODE).items() if not isinstance(v, list) and k != "seed"}


def build_prompt(host, pair: Pair, seed: int, samples: int, ckpt: str, sampler_steps: int, cfg: float, *,
                 merge: dict[str, Any] | None = None, stack: Sequence[tuple[str, float]] = (),
                 klora: dict[str, Any] | None = None) -> tuple[dict, dict]:
    """The API prompt of one run and the ids of its image and merge nodes (``{"image": ..., "merge": ...}``).

    ``merge``: every ZipRankMerge widget but ``seed`` (the node's seed is ``seed``), or None for no merge.
    ``stack``: (role, strength) pairs, role "content", "style" or "joint" (``Pair.lora_file``): those LoRAs are
    applied one after another with ``LoraLoaderModelOnly`` at those strengths, as a user stacks LoRA loaders.
    ``klora``: every Apply K-LoRA widget: the content and style LoRAs through K-LoRA's sampling-time patch.
    None of them: the base. ``samples`` images (batch), euler / normal, ``sampler_steps`` steps, CFG ``cfg``, from
    the seed :func:`noise_seed` (pair, seed). The LoRA files must be in ComfyUI's models/loras under
    ``Pair.lora_file``'s names. Raises ValueError when more than one of them is given.
    """
    from objectinfo import widget_defaults

    if sum((merge is not None, bool(stack), klora is not None)) > 1:
        raise ValueError("build_prompt: give merge widgets, a stack of LoRAs or K-LoRA widgets, not several")
    p: dict[str, dict] = {}

    def add(nid: str, cls: str, **inputs: Any) -> list:
        p[nid] = {"class_type": cls, "inputs": {**widget_defaults(host, cls), **inputs}}
        return [nid, 0]

    add("ckpt", "MiniBenchCheckpoint", ckpt_path=ckpt)
    model = ["ckpt", 0]
    text = ["ckpt", 1]
    ids: dict[str, Any] = {"image": "img", "merge": None}
    if merge is not None:
        add("lc", "DuoLoRA_LoadContentLoRA", lora_name=pair.lora_file("content"), strength=1.0)
        add("ls", "DuoLoRA_LoadStyleLoRA", lora_name=pair.lora_file("style"), strength=1.0)
        add("xc", "MiniBenchImages", spec=pair.content.images, seed=pair.content.seed,
            folder=pair.content.folder)
        add("xs", "MiniBenchImages", spec=pair.style.images, seed=pair.style.seed, folder=pair.style.folder)
        add("pc", "MiniBenchTextEncode", text_encoder=text, prompt=pair.p_c)
        add("ps", "MiniBenchTextEncode", text_encoder=text, prompt=pair.p_s)
        add("pcs", "MiniBenchTextEncode", text_encoder=text, prompt=pair.target)
        add("merge", MERGE_NODE, model=model, content_lora=["lc", 0], style_lora=["ls", 0],
            content_latents=["xc", 0], style_latents=["xs", 0], content_prompt=["pc", 0],
            style_prompt=["ps", 0], combined_prompt=["pcs", 0], seed=seed, **merge)
        add("apply", "DuoLoRA_ApplyMergedLoRA", model=model, merged_lora=["merge", 0], strength_model=1.0,
            strength_clip=0.0)
        model = ["apply", 0]
        ids["merge"] = "merge"
    if klora is not None:
        add("lc", "DuoLoRA_LoadContentLoRA", lora_name=pair.lora_file("content"), strength=1.0)
        add("ls", "DuoLoRA_LoadStyleLoRA", lora_name=pair.lora_file("style"), strength=1.0)
        model = add("klora", KLORA_NODE, model=model, content_lora=["lc", 0], style_lora=["ls", 0], **klora)
    for i, (role, strength) in enumerate(stack):
        model = add(f"lora{i}", "LoraLoaderModelOnly", model=model, lora_name=pair.lora_file(role),
                    strength_model=float(strength))
    add("neg", "MiniBenchTextEncode", text_encoder=text, prompt="")
    add("empty", "MiniBenchEmpty", batch_size=samples)
    add("pos", "MiniBenchTextEncode", text_encoder=text, prompt=pair.target)
    add("ks", "KSampler", model=model, seed=noise_seed(pair, seed), steps=sampler_steps, cfg=cfg,
        sampler_name="euler", scheduler="normal", positive=["pos", 0], negative=["neg", 0],
        latent_image=["empty", 0], denoise=1.0)
    add("img", "MiniBenchToImage", samples=["ks", 0])
    add("out", "PreviewImage", images=["img", 0])
    return p, ids
