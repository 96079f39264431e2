"""``python -m duolora inspect`` on full-size synthetic SDXL LoRAs (rank 64, attention only) and on bad files.

The LoRAs are synthetic (seeded noise with SDXL's 560 real attention names and shapes), written in float16
like most published LoRAs (~186 MB each), one style at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import lorafiles as LF
import pytest
import torch

from duolora import sdxl
from duolora.cli import main
from duolora.formats import save_lora
from duolora.inspect import EXIT_BAD_FILE, EXIT_REFUSED, EXIT_USABLE
from duolora.lora import LoRA
from duolora.synthetic import synthetic_lora

REPO = Path(__file__).resolve().parents[1]
MAIN_STYLES = ("kohya_ldm", "kohya_diffusers", "diffusers_peft", "comfyui")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "duolora", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300, check=False)


@pytest.fixture(scope="module")
def full_sdxl() -> LoRA:
    return synthetic_lora(rank=64, scope="attention", dtype=torch.float16, seed=0)


@pytest.mark.parametrize("style", MAIN_STYLES)
def test_inspect_full_sdxl_rank64(full_sdxl: LoRA, style: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = save_lora(full_sdxl, tmp_path / f"sdxl_{style}.safetensors", key_style=style)
    result = run_cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:12] == [
        f"file:                sdxl_{style}.safetensors",
        f"key style:           {style}",
        "base model:          SDXL",
        "layers:              560",
        "  UNet attention:    560",
        "  other UNet:        0",
        "  text encoder 1:    0",
        "  text encoder 2:    0",
        "rank:                64",
        ("alpha:               64 from .alpha tensors · scale 1" if style != "diffusers_peft" else
         "alpha:               none: no .alpha tensor or lora_adapter_metadata · scale 1"),
        "dtype:               float16",
        "parameters:          92,897,280",  # 64 · (Σ out + Σ in) = 64 · (665,600 + 785,920)
    ]
    assert "NaN/Inf tensors:     0" in lines

    # --json through the same entry point, in-process (the subprocess path is covered above)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["key_style"], info["base"], info["ranks"], info["dtype"]) == (style, "sdxl", [64], "float16")
    assert info["counts"] == {"unet_attention": 560, "unet_other": 0, "te1": 0, "te2": 0}


def test_inspect_json_subprocess(tmp_path: Path) -> None:
    path = save_lora(synthetic_lora(rank=8, scope="all", text_encoder=True), tmp_path / "all.safetensors")
    result = run_cli("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["counts"] == {"unet_attention": 560, "unet_other": 234, "te1": 72, "te2": 192}
    assert (info["conv_layers"], info["skipped"], info["non_finite_keys"]) == (51, 0, [])


def test_inspect_bad_file_exits_nonzero_with_the_message(tmp_path: Path) -> None:
    path = LF.random_bytes(tmp_path / "broken.safetensors", n=4096, seed=0)
    result = run_cli("inspect", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    n = LF.header_length(path)
    assert result.stderr == (
        f"error: broken.safetensors is not a safetensors file (or is truncated/corrupt): its first 8 bytes "
        f"announce a {n}-byte header, but the file has 4096 bytes. Re-download it or export it again as "
        ".safetensors.\n")


def test_inspect_reports_nan_and_wrong_base(tmp_path: Path) -> None:
    from duolora.formats import lora_to_state_dict
    from duolora.sdxl import SD15_LAYOUT

    sd = lora_to_state_dict(synthetic_lora(SD15_LAYOUT, rank=4), "kohya_diffusers")
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
    sd[key][0, 0] = float("inf")
    path = LF.write(tmp_path / "sd15_inf.safetensors", sd)
    out = []

    class Sink:
        def write(self, s: str) -> None:
            out.append(s)

    from duolora.inspect import run_inspect

    # Described in full, and the exit status says a merge would refuse it.
    assert run_inspect(path, out=Sink()) == EXIT_REFUSED == 1
    text = "".join(out)
    assert "base model:          SD1.x\n" in text
    assert f"NaN/Inf tensors:     1 (e.g. {key})\n" in text
    assert text.endswith("note: DuoLoRA merges SDXL LoRAs; this one is for SD1.x.\n")


def test_inspect_exit_status_says_whether_a_merge_takes_the_file(full_sdxl: LoRA, tmp_path: Path) -> None:
    """0: a merge accepts it; 1: described, but a merge would refuse it; 2: not readable as a LoRA. The help
    says so."""
    usable = save_lora(synthetic_lora(rank=2, seed=1), tmp_path / "sdxl.safetensors")
    sd15 = save_lora(synthetic_lora(sdxl.SD15_LAYOUT, rank=2, seed=1), tmp_path / "sd15.safetensors")
    broken = LF.random_bytes(tmp_path / "broken.safetensors", n=4096, seed=0)
    runs = {p.name: run_cli("inspect", str(p)) for p in (usable, sd15, broken)}
    assert {name: r.returncode for name, r in runs.items()} == {
        "sdxl.safetensors": EXIT_USABLE, "sd15.safetensors": EXIT_REFUSED, "broken.safetensors": EXIT_BAD_FILE}
    assert (EXIT_USABLE, EXIT_REFUSED, EXIT_BAD_FILE) == (0, 1, 2)
    assert "for a merge:         usable" in runs["sdxl.safetensors"].stdout
    assert "for a merge:         refused: sd15.safetensors: this LoRA is for SD1.x" in runs["sd15.safetensors"].stdout
    assert runs["broken.safetensors"].stdout == ""
    assert main(["inspect", str(sd15), "--json"]) == EXIT_REFUSED
    helped = run_cli("inspect", "--help")
    assert " ".join(helped.stdout.split()).endswith(
        "exit status: 0 = a merge accepts the file; 1 = described, but a merge would refuse it (the reason is on "
        "the 'for a merge' line); 2 = not readable as a LoRA (the message is on stderr)")


def test_inspect_names_a_lora_with_sdxl_names_at_other_widths(tmp_path: Path) -> None:
    """Every layer named like an SDXL layer, none of SDXL's shape (a model built like SDXL at other widths):
    the note counts the file's layers, not the zero layers whose names are unknown."""
    narrow = sdxl.layout_for(dataclasses.replace(sdxl.SDXL, model_channels=32, num_head_channels=16, context_dim=64))
    path = save_lora(synthetic_lora(narrow, rank=2, seed=1), tmp_path / "narrow.safetensors", layout=narrow)
    result = run_cli("inspect", str(path))
    assert result.returncode == EXIT_REFUSED, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "note: its 560 layers carry SDXL's layer names, but none has SDXL's shape: a LoRA for a model built like it "
        "at other widths, not for SDXL, SD1.x or SD2.x. DuoLoRA merges SDXL LoRAs.")
    assert "none of its 0 layers" not in result.stdout
