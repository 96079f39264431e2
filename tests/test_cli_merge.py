"""``duolora merge`` on two generated full-size SDXL LoRAs (synthetic: seeded noise with SDXL's 560 real
attention names and shapes, fp16, rank 4 to keep the test fast), and on two content LoRAs and a style LoRA
(``--content A --content B --style S``): the file it writes is what ``duolora inspect`` and ComfyUI's stock LoRA
loading accept, its options and errors are the documented ones."""

from __future__ import annotations

import argparse
import logging
import os
import pty
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from duolora import cli, engine, formats
from duolora.config import MergeConfig
from duolora.sdxl import SD15_LAYOUT
from duolora.synthetic import synthetic_lora

REPO = Path(__file__).resolve().parents[1]
RANK_C, RANK_S = 4, 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cli_merge")
    content = synthetic_lora(rank=RANK_C, seed=1, dtype=torch.float16, decay=0.9)
    style = synthetic_lora(rank=RANK_S, seed=2, dtype=torch.float16, decay=0.9)
    return (formats.save_lora(content, folder / "content.safetensors"),
            formats.save_lora(style, folder / "style.safetensors"))


@pytest.fixture(scope="module")
def merged(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("cli_out") / "merged.safetensors"
    code, stdout, stderr = run_main("merge", str(pair[0]), str(pair[1]), "-o", str(out), "--prune-threshold", "0.05")
    assert code == 0, stderr
    return out, stdout


def run_main(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as e:  # argparse errors
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_merge_writes_what_inspect_accepts(merged: tuple[Path, str]) -> None:
    out, stdout = merged
    lines = stdout.splitlines()
    assert re.fullmatch(rf"wrote {re.escape(str(out))}: 560 layers, kept [\d,]+ of 3,920 rank components "
                        r"\([\d.]+ %\) in [\d.]+ s", lines[0]), stdout
    assert re.fullmatch(r"given up by the merge: content [\d.e+-]+ %, style [\d.e+-]+ % of the two LoRAs' own "
                        r"effect \(mean over the learned layers; 0 % = kept exactly\)", lines[1]), stdout
    # Readable by anyone who may read the user's files (0o644 under the usual umask 0o022).
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    code, text, err = run_main("inspect", str(out))
    assert code == 0, err
    lines = text.splitlines()
    assert lines[1:8] == ["key style:           kohya_ldm", "base model:          SDXL", "layers:              560",
                          "  UNet attention:    560", "  other UNet:        0", "  text encoder 1:    0",
                          "  text encoder 2:    0"]
    assert "dtype:               float16" in lines and "NaN/Inf tensors:     0" in lines
    lora = formats.load_lora(out)
    ranks = [lr.rank for lr in lora.layers.values()]
    assert max(ranks) <= RANK_C + RANK_S and min(ranks) >= 1


def test_merge_equals_the_engine_merge(pair: tuple[Path, Path], merged: tuple[Path, str], tmp_path: Path) -> None:
    expected = engine.merge_files(pair[0], pair[1], tmp_path / "engine.safetensors", MergeConfig(prune_threshold=0.05))
    a, b = formats.load_lora(merged[0]), formats.load_lora(expected.path)
    assert a.layers.keys() == b.layers.keys()
    assert all(torch.equal(a.layers[n].up, b.layers[n].up) and torch.equal(a.layers[n].down, b.layers[n].down)
               for n in a.layers)
    assert formats.read_lora(merged[0]).metadata["duolora_mode"] == "weights"


def test_stock_comfyui_loading_maps_every_layer(merged: tuple[Path, str], sdxl_meta, caplog) -> None:
    import comfy.lora
    import comfy.utils

    state = comfy.utils.load_torch_file(str(merged[0]), safe_load=True)  # what LoraLoader reads
    key_map = comfy.lora.model_lora_keys_unet(sdxl_meta, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(state, key_map)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    ours = formats.load_lora(merged[0])
    assert set(patches) == {f"diffusion_model.{n}.weight" for n in ours.layers}
    for name, lr in ours.layers.items():
        up, down, alpha = patches[f"diffusion_model.{name}.weight"].weights[:3]
        assert float(alpha) == down.shape[0] == lr.rank  # alpha = rank: ComfyUI scales by 1
        assert torch.equal(down.float(), lr.down) and torch.equal(up.float(), lr.up)


def test_merge_refuses_to_overwrite_without_force(pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = run_main("merge", str(pair[0]), str(pair[1]), "-o", str(out), "--quiet")
    assert code == cli.EXIT_MERGE_FAILED
    assert err == (f"error: exists.safetensors already exists in {tmp_path}; choose another file name or allow "
                   "overwriting. Pass --force to overwrite it.\n")
    assert out.read_bytes() == b"keep me"
    code, stdout, err = run_main("merge", str(pair[0]), str(pair[1]), "-o", str(out), "--quiet", "--force",
                                 "--method", "direct", "--dtype", "fp32")
    assert (code, stdout, err) == (0, "", "")
    direct = formats.load_lora(out)
    assert {lr.rank for lr in direct.layers.values()} == {RANK_C + RANK_S}
    assert direct.dtype == torch.float32


def test_engine_errors_reach_the_user_unchanged(pair: tuple[Path, Path], tmp_path: Path) -> None:
    code, _, err = run_main("merge", str(tmp_path / "missing.safetensors"), str(pair[1]), "-o",
                            str(tmp_path / "o.safetensors"))
    assert code == 2
    assert err == f"error: missing.safetensors: file not found ({tmp_path / 'missing.safetensors'}). Check the path " \
                  "or the file name.\n"
    sd15 = formats.save_lora(synthetic_lora(SD15_LAYOUT, rank=2, seed=3), tmp_path / "sd15.safetensors")
    code, _, err = run_main("merge", str(pair[0]), str(sd15), "-o", str(tmp_path / "o.safetensors"))
    assert code == 2
    assert err.startswith("error: sd15.safetensors: this LoRA is for SD1.x, not SDXL")
    code, _, err = run_main("merge", str(pair[0]), str(pair[1]), "-o", str(tmp_path / "o.safetensors"),
                            "--priors", "custom", "--custom-prior", "content: output_blocks.9.1")
    assert code == 2
    assert err.startswith("error: custom prior block 'output_blocks.9.1' is not an SDXL attention block")
    code, _, err = run_main("merge", str(pair[0]), str(pair[1]), "-o", str(tmp_path / "o.safetensors"),
                            "--method", "ziplora_out")
    assert code == 2 and "invalid choice: 'ziplora_out'" in err
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("name", ["merged.ckpt", "merged.pt", "merged"])
def test_an_output_name_comfyui_would_not_load_is_refused_before_any_work(
        pair: tuple[Path, Path], tmp_path: Path, name: str) -> None:
    code, stdout, err = run_main("merge", str(pair[0]), str(pair[1]), "-o", str(tmp_path / name))
    why = ("ComfyUI would refuse a .ckpt file as pickle-based" if name.endswith(".ckpt") else
           "ComfyUI would refuse a .pt file as pickle-based" if name.endswith(".pt") else
           "ComfyUI lists LoRA files by their extension")
    stem = name.split(".")[0]
    assert (code, stdout) == (cli.EXIT_MERGE_FAILED, "")
    assert err == (f"error: {name}: the merged LoRA is written in the safetensors format, so its name must end in "
                   f".safetensors ({why}); use {stem}.safetensors.\n")
    assert list(tmp_path.iterdir()) == []


def test_custom_prior_takes_the_short_block_names(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """The names the node's diagram and the Merge Report show (in7, mid, out3) give the same merge as the long
    names."""
    files = {}
    for spelling, spec in (("long", "content: input_blocks.7.1, middle_block.1; style: output_blocks.3.1"),
                           ("short", "content: in7, MID; style: out3")):
        files[spelling] = tmp_path / f"{spelling}.safetensors"
        code, _, err = run_main("merge", str(pair[0]), str(pair[1]), "-o", str(files[spelling]), "--quiet",
                                "--priors", "custom", "--custom-prior", spec)
        assert code == 0, err
    long, short = (formats.load_lora(files[k]) for k in ("long", "short"))
    assert long.layers.keys() == short.layers.keys()
    assert all(torch.equal(long.layers[n].up, short.layers[n].up) for n in long.layers)
    code, _, err = run_main("merge", str(pair[0]), str(pair[1]), "-o", str(tmp_path / "x.safetensors"),
                            "--priors", "custom", "--custom-prior", "content: in9")
    assert code == 2 and err.startswith(
        "error: custom prior block 'in9' is not an SDXL attention block; choose from in4, in5, in7, in8, mid, "
        "out0, out1, out2, out3, out4, out5 (or their long names input_blocks.4.1, ")


def test_the_loss_summary_says_what_a_user_can_judge() -> None:
    """The summary of the solve (the issue's numbers: content 6.37e-05 -> 0.00233) reads as shares of the two
    LoRAs' effect and says why the merge gives up more than the plain sum."""
    from duolora.optimize import MergeResult
    from duolora.solver import describe

    history = {"total": [0.0021, 0.0017], "content": [6.37e-05, 0.00233], "style": [1.2e-4, 0.00051],
               "prior": [0.041, 0.0093]}
    assert describe(MergeResult(merger=None, history=history)) == (
        "given up by the merge: content 0.23 %, style 0.051 % of the two LoRAs' own effect (mean over the learned "
        "layers; 0 % = kept exactly)\n"
        "the plain sum gives up 0.0064 % and 0.012 %, keeping both LoRAs at full strength in every block; the "
        "layer priors weaken each LoRA in the blocks they give to the other")
    assert describe(MergeResult(merger=None, history={})) == "nothing to learn (the method fixes every mask)"


def test_the_same_file_as_content_and_style_is_warned_about(pair: tuple[Path, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(pair[0].read_bytes())
    cases = ((pair[0], f"the same file, {pair[0].name}"), (copy, f"identical files ({pair[0].name} and copy.safetensors)"))
    for style, which in cases:
        code, _, err = run_main("merge", str(pair[0]), str(style), "-o", str(tmp_path / f"out_{style.stem}.safetensors"),
                                "--quiet", "--method", "direct")
        assert code == 0
        assert err == (f"warning: content and style are {which}: a LoRA merged with itself adds nothing new (the "
                       "plain sum only doubles it); give your style LoRA as the second file.\n")
    code, _, err = run_main("merge", str(pair[0]), str(pair[1]), "-o", str(tmp_path / "two.safetensors"), "--quiet",
                            "--method", "direct")
    assert (code, err) == (0, "")


def test_help_documents_every_option_with_its_default() -> None:
    code, text, _ = run_main("merge", "--help")
    assert code == 0
    subparsers = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = [a for a in subparsers.choices["merge"]._actions if a.option_strings and a.dest != "help"]
    assert len(options) == 29
    # One help paragraph per option: from its "  -…" line to the next one.
    paragraphs = {p.split()[0].rstrip(","): " ".join(p.split())
                  for p in re.split(r"\n  (?=-)", text.split("options:", 1)[1])[1:]}
    for action in options:
        paragraph = paragraphs[action.option_strings[0]]
        if action.required:
            assert "default" not in paragraph, paragraph
        else:
            assert "(default: " in paragraph, paragraph
    flat = " ".join(text.split())
    for default in ("ziprank", "svd", "attention", "share_hinge", "0.4", "0.1", "0.001", "300", "auto", "kohya_ldm",
                    "False", "empty", "the method's, 0 for ziprank and 0.01 for ziplora"):
        assert f"(default: {default})" in flat, default


def test_progress_bar_only_on_a_terminal(pair: tuple[Path, Path], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "duolora", "merge", str(pair[0]), str(pair[1]), "--method", "direct"]
    piped = subprocess.run([*args, "-o", str(tmp_path / "a.safetensors")], capture_output=True, text=True,
                           cwd=REPO, env=env, timeout=300, check=False)
    assert piped.returncode == 0 and piped.stderr == ""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([*args, "-o", str(tmp_path / "b.safetensors")], stdout=subprocess.PIPE,
                              stderr=follower, cwd=REPO, env=env, timeout=300, check=False)
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO once the terminal's other end is closed and drained
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(leader)
    tty_err = b"".join(chunks).decode()
    assert proc.returncode == 0
    assert "\rmerging " in tty_err and "560/560 layers" in tty_err and "█" * 30 in tty_err


@pytest.fixture(scope="module")
def second_subject(pair: tuple[Path, Path]) -> Path:
    lora = synthetic_lora(rank=2, seed=5, dtype=torch.float16, decay=0.9)
    return formats.save_lora(lora, pair[0].parent / "content2.safetensors")


def test_merge_of_two_subjects_and_a_style(pair: tuple[Path, Path], second_subject: Path, tmp_path: Path) -> None:
    out = tmp_path / "two.safetensors"
    code, stdout, err = run_main("merge", "--content", str(pair[0]), "--content", str(second_subject), "--style",
                                 str(pair[1]), "-o", str(out))
    assert code == 0, err
    # 560 layers × (4 + 2 + 3) components before pruning.
    lines = stdout.splitlines()
    assert re.fullmatch(rf"wrote {re.escape(str(out))}: 560 layers, kept [\d,]+ of 5,040 rank components "
                        r"\([\d.]+ %\) in [\d.]+ s", lines[0]), stdout
    # What the merge gave up of each LoRA, every content LoRA by its name.
    assert re.fullmatch(r"given up by the merge: content [\d.e+-]+ %, content2 [\d.e+-]+ %, style [\d.e+-]+ % of the "
                        r"LoRAs' own effect \(mean over the learned layers; 0 % = kept exactly\)", lines[1]), stdout
    expected = engine.merge_files([pair[0], second_subject], pair[1], tmp_path / "engine.safetensors", MergeConfig())
    a, b = formats.load_lora(out), formats.load_lora(expected.path)
    assert a.layers.keys() == b.layers.keys()
    assert all(torch.equal(a.layers[n].up, b.layers[n].up) and torch.equal(a.layers[n].down, b.layers[n].down)
               for n in a.layers)
    assert max(lr.rank for lr in a.layers.values()) <= 9
    assert a.metadata["duolora_content"] == "content.safetensors + content2.safetensors"


@pytest.mark.parametrize(("argv", "message"), [
    (["A", "S", "--content", "B"], "give either CONTENT STYLE or --content FILE … --style FILE, not both"),
    (["--content", "A", "--content", "B"],
     "--content FILE (once per subject) needs --style FILE, and --style needs at least one --content"),
    (["--style", "S"], "--content FILE (once per subject) needs --style FILE, and --style needs at least one --content"),
    (["A"], ("give a content LoRA and a style LoRA: duolora merge CONTENT STYLE -o OUT, or duolora merge "
             "--content A --content B --style S -o OUT")),
])
def test_merge_says_how_to_give_the_loras(argv: list[str], message: str, tmp_path: Path) -> None:
    code, stdout, err = run_main("merge", *argv, "-o", str(tmp_path / "o.safetensors"))
    assert (code, stdout, err) == (cli.EXIT_MERGE_FAILED, "", f"error: {message}\n")


def test_merge_refuses_one_file_given_twice_as_subjects_and_b_lora_with_two_subjects(
        pair: tuple[Path, Path], second_subject: Path, tmp_path: Path) -> None:
    code, _, err = run_main("merge", "--content", str(pair[0]), "--content", str(pair[0]), "--style", str(pair[1]),
                            "-o", str(tmp_path / "o.safetensors"))
    assert code == cli.EXIT_MERGE_FAILED
    assert err == (f"error: content LoRA 1 'content.safetensors' and content LoRA 2 'content.safetensors' are the same "
                   f"file ({pair[0].resolve()}): give each LoRA once (to make a LoRA stronger, raise its strength "
                   "instead)\n")
    # The same file as a subject and as the style is merged (a plain doubling where they meet) and warned about.
    code, _, err = run_main("merge", "--content", str(pair[0]), "--content", str(pair[1]), "--style", str(pair[1]),
                            "-o", str(tmp_path / "doubled.safetensors"))
    assert code == 0, err
    assert err == ("warning: content and style are the same file, style.safetensors: a LoRA merged with itself adds "
                   "nothing new (the plain sum only doubles it); give your style LoRA to --style.\n")
    code, _, err = run_main("merge", "--content", str(pair[0]), "--content", str(second_subject), "--style",
                            str(pair[1]), "--method", "b_lora", "-o", str(tmp_path / "o.safetensors"))
    assert code == cli.EXIT_MERGE_FAILED
    assert err == ("error: method 'b_lora' merges exactly one content LoRA (B-LoRA keeps output_blocks.0.1 for the "
                   "content and output_blocks.1.1 for the style), but 2 content LoRAs were given "
                   "('content.safetensors', 'content2.safetensors'); use method 'ziprank', 'ziplora_out', "
                   "'ziplora_in', 'direct' for a multi-concept merge\n")
    assert not (tmp_path / "o.safetensors").exists()
