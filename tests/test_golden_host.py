"""Golden hashes of SDXL merges through the real ComfyUI: the tiny SDXL model in the executor, ZipRank Merge in
paper and layer-wise mode, the merged LoRA and the learned masks hashed.

They were taken before the bridge's denoiser learned other samplings (flow matching) and the layer tables
became family-neutral data: an SDXL merge through ComfyUI must stay bit-identical. Update a hash only for a
change meant to alter SDXL merges, and say so.
"""

from __future__ import annotations

import hashlib

import comfyhost
import pytest
from nodehelpers import MERGE_ID, merge_prompt, node, tiny_pair
from test_golden_sdxl import lora_digest, tensor_digest

HOST_DIGESTS = {"paper": "37826fe39e782c23", "layerwise": "a5a5d34a37706581"}


@pytest.mark.parametrize("mode", list(HOST_DIGESTS))
def test_tiny_sdxl_merges_bit_identically_through_comfyui(host: comfyhost.Host, tiny_layout, mode: str) -> None:
    content, style = tiny_pair(host, tiny_layout, "golden")
    prompt = merge_prompt(host, content.name, style.name, mode=mode, steps=2, lora_dtype="fp32",
                          constyle_iterations=1 if mode == "paper" else 0)
    prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 1])
    result = host.execute(prompt)
    merged, stats = result["outputs"][MERGE_ID][0], result["outputs"][MERGE_ID][1]
    h = hashlib.sha256(lora_digest(merged.lora).encode())
    for key in sorted(stats.extra["masks"]):
        h.update(key.encode())
        tensor_digest(h, stats.extra["masks"][key])
    h.update(repr(sorted(stats.history.items())).encode())
    assert h.hexdigest()[:16] == HOST_DIGESTS[mode]
