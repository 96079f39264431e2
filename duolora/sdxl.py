"""SDXL UNet layout: the LoRA-able layers and the content/style layer priors (METHOD.md §3).

Block of a layer: the first three components of its canonical (LDM) name, e.g.
``input_blocks.4.1`` for ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` and ``middle_block.1``
for ``middle_block.1.transformer_blocks.3.attn2.to_k``.
"""

from __future__ import annotations

import re

CONTENT = "content"
STYLE = "style"

# The ten attention blocks of SDXL, with the latent side they run at for a 1024 px image (128×128 latent).
ATTENTION_BLOCKS: dict[str, int] = {
    "input_blocks.4.1": 64,
    "input_blocks.5.1": 64,
    "input_blocks.7.1": 32,
    "input_blocks.8.1": 32,
    "middle_block.1": 32,
    "output_blocks.0.1": 32,
    "output_blocks.1.1": 32,
    "output_blocks.2.1": 32,
    "output_blocks.3.1": 64,
    "output_blocks.4.1": 64,
    "output_blocks.5.1": 64,
}

_LOW_RES = [b for b, r in ATTENTION_BLOCKS.items() if r == 32]
_HIGH_RES = [b for b, r in ATTENTION_BLOCKS.items() if r == 64]

# Prior presets: block -> role. Layers in blocks a preset does not name get no prior.
PRESETS: dict[str, dict[str, str]] = {
    # The paper: low-resolution attention carries content, high-resolution attention carries style.
    "paper": {**{b: CONTENT for b in _LOW_RES}, **{b: STYLE for b in _HIGH_RES}},
    # What the released research code matched (content only in input_blocks.7/8).
    "code_literal": {
        "input_blocks.7.1": CONTENT,
        "input_blocks.8.1": CONTENT,
        "input_blocks.4.1": STYLE,
        "input_blocks.5.1": STYLE,
        "output_blocks.3.1": STYLE,
        "output_blocks.4.1": STYLE,
        "output_blocks.5.1": STYLE,
    },
    # B-LoRA's finding (Frenkel et al.): one content block and one style block.
    "b_lora": {"output_blocks.0.1": CONTENT, "output_blocks.1.1": STYLE},
    "none": {},
}
PRESET_NAMES: tuple[str, ...] = (*PRESETS.keys(), "custom")
DEFAULT_PRESET = "paper"

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
_ATTN_RE = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def block_of(name: str) -> str:
    """The block a canonical UNet layer name belongs to (first three dotted components)."""
    parts = name.split(".")
    if parts[0] == "middle_block":
        return ".".join(parts[:2])
    return ".".join(parts[:3])


def is_attention_projection(name: str) -> bool:
    """True for the 560 attention projections ZipRank learns on by default (scope="attention")."""
    return bool(_ATTN_RE.search(name))


def parse_custom_preset(spec: str) -> dict[str, str]:
    """Parse ``"content: input_blocks.7.1, middle_block.1; style: output_blocks.3.1"``.

    Raises ValueError with a message that says what is wrong and how to write it.
    """
    roles: dict[str, str] = {}
    spec = spec.strip()
    if not spec:
        return roles
    for part in spec.split(";"):
        part = part.strip()
        if not part:
            continue
        if ":" not in part:
            raise ValueError(
                f"custom prior {part!r} has no role: write e.g. "
                "'content: input_blocks.7.1, middle_block.1; style: output_blocks.3.1'"
            )
        role, blocks = (s.strip() for s in part.split(":", 1))
        if role not in (CONTENT, STYLE):
            raise ValueError(f"custom prior role {role!r} must be 'content' or 'style'")
        for b in (x.strip() for x in blocks.split(",")):
            if not b:
                continue
            if b not in ATTENTION_BLOCKS:
                raise ValueError(
                    f"custom prior block {b!r} is not an SDXL attention block; "
                    f"choose from {', '.join(ATTENTION_BLOCKS)}"
                )
            if b in roles and roles[b] != role:
                raise ValueError(f"custom prior block {b!r} is both content and style")
            roles[b] = role
    return roles


def preset_roles(preset: str, custom: str | dict[str, str] | None = None) -> dict[str, str]:
    """Block -> role for a preset name (``custom`` takes a spec string or a dict)."""
    if preset == "custom":
        if isinstance(custom, dict):
            return dict(custom)
        return parse_custom_preset(custom or "")
    if preset not in PRESETS:
        raise ValueError(f"unknown layer-prior preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    return dict(PRESETS[preset])


def prior_role(name: str, roles: dict[str, str]) -> str | None:
    """"content", "style" or None for a canonical UNet layer name under a block -> role mapping."""
    return roles.get(block_of(name))
