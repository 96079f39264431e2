"""The three real third-party LoRA files (shared/fixtures/SOURCES.md): each is read correctly or refused clearly.

None of them is an SDXL low-rank LoRA, so the loaders must refuse all three, naming what each file is.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lorafiles as LF
import pytest
import torch
from safetensors import safe_open

from duolora.formats import (
    UnknownKeyStyleError,
    UnsupportedAdapterError,
    WrongBaseModelError,
    load_lora,
    read_lora,
    summary,
)
from duolora.lora import LoRA
from duolora.sdxl import SD15_LAYOUT

LOKR = LF.FIXTURES / "lycoris__smart_falcon_4_lokr.safetensors"
ATTN_PROCS = LF.FIXTURES / "catundchat__sd15_attnprocs_pytorch_lora_weights.safetensors"
CLONEOFSIMO = LF.FIXTURES / "cloneofsimo__lora_disney.safetensors"

pytestmark = pytest.mark.skipif(not LF.FIXTURES.is_dir(), reason="shared/fixtures is not beside the repository")


@pytest.mark.parametrize("reader", [read_lora, load_lora])
def test_lokr_is_refused_naming_lokr_and_sd1(reader: Callable[[Path], LoRA]) -> None:
    with pytest.raises(UnsupportedAdapterError) as e:
        reader(LOKR)
    assert str(e.value) == (
        "lycoris__smart_falcon_4_lokr.safetensors is a LyCORIS LoKr (Kronecker-product) file with 350 modules, "
        "made for SD1.x, not a low-rank LoRA. DuoLoRA merges only low-rank LoRA layers (lora_down/lora_up or "
        "lora_A/lora_B): use a standard LoRA, or convert this LoKr to one first.")
    assert (e.value.algorithm, e.value.base) == ("LoKr", "sd1")


def test_attention_processor_file_reads_as_sd1_rank4() -> None:
    lora = read_lora(ATTN_PROCS)
    assert (lora.key_style, lora.base, lora.ranks(), lora.dtype) == (
        "diffusers_attn_procs", "sd1", [4], torch.float32)
    # 16 transformer blocks × attn1/attn2 × q/k/v/out: every SD1.5 attention projection, nothing skipped
    assert len(lora.layers) == 128
    assert set(lora.layers) == set(SD15_LAYOUT.attention_layers())
    assert lora.skipped == []
    assert lora.alphas == dict.fromkeys(lora.layers)  # no alpha keys: scale 1
    k = lora.layers["input_blocks.1.1.transformer_blocks.0.attn2.to_k"]
    assert k.weight_shape == (320, 768)
    s = summary(lora)
    assert s["counts"] == {"unet_attention": 128, "unet_other": 0, "te1": 0, "te2": 0}
    assert s["metadata"] == {"format": "pt"}


def test_attention_processor_file_values_are_the_files() -> None:
    lora = read_lora(ATTN_PROCS)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    with safe_open(str(ATTN_PROCS), "pt") as f:
        up, down = f.get_tensor(key + ".up.weight"), f.get_tensor(key + ".down.weight")
    got = lora.layers["input_blocks.1.1.transformer_blocks.0.attn1.to_out.0"]
    assert torch.equal(got.up, up) and torch.equal(got.down, down)


def test_attention_processor_file_is_refused_for_sdxl() -> None:
    with pytest.raises(WrongBaseModelError) as e:
        load_lora(ATTN_PROCS)
    assert str(e.value) == (
        "catundchat__sd15_attnprocs_pytorch_lora_weights.safetensors: this LoRA is for SD1.x, not SDXL (its "
        "cross-attention layers read 768-wide text embeddings; SDXL's read 2048). Pick a LoRA trained for SDXL.")


def test_attention_processor_file_loads_for_sd1() -> None:
    lora = load_lora(ATTN_PROCS, layout=SD15_LAYOUT)
    assert (lora.base, len(lora.layers)) == ("sd1", 128)


@pytest.mark.parametrize("reader", [read_lora, load_lora])
def test_cloneofsimo_format_is_named_and_refused(reader: Callable[[Path], LoRA]) -> None:
    with pytest.raises(UnknownKeyStyleError) as e:
        reader(CLONEOFSIMO)
    assert str(e.value) == (
        "cloneofsimo__lora_disney.safetensors is in cloneofsimo/lora's own format ('unet:0:up' keys: 192 layers "
        "numbered by position, not named), made for SD1.x (its cross-attention layers read 768-wide text "
        "embeddings), with embedded tokens '<s1>', '<s2>'. Its layers cannot be matched to model layers by "
        "name, so DuoLoRA cannot read it; convert it to a kohya or diffusers LoRA with the tool that made it.")
    assert e.value.base == "sd1"
