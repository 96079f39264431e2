"""The DuoLoRA nodes in ComfyUI's real executor on the tiny SDXL model: cancel, progress and server
messages, error messages, saving, the loader cache and the non-learning methods. Nothing is mocked."""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import struct

import comfyhost
import objectinfo
import pytest
import tinysdxl
import torch
from nodehelpers import (
    MERGE_ID,
    RANK_C,
    RANK_S,
    TEST_SUBDIR,
    folder_listing,
    merge_prompt,
    node,
    read_tiny,
    real_prompt_server,
    reference_nodes,
    snapshot,
    tiny_pair,
    write_lora,
)

from duolora import formats
from duolora.mergers import B_LORA_CONTENT_BLOCK, B_LORA_STYLE_BLOCK
from duolora.sdxl import SD15_LAYOUT, SDXL_LAYOUT, block_of
from duolora.synthetic import synthetic_lora

NO_FILE = "[None]"  # the loaders' "no file" combo entry (as in ComfyUI's Train LoRA node)


@pytest.fixture(scope="module")
def pair(host: comfyhost.Host, tiny_layout):
    return tiny_pair(host, tiny_layout, "nodes")


def _save(host: comfyhost.Host, prefix: str, source: str = MERGE_ID) -> dict:
    return node(host, "DuoLoRA_SaveMergedLoRA", merged_lora=[source, 0], filename_prefix=f"{TEST_SUBDIR}/{prefix}")


# ---------------------------------------------------------------------------------------------------
# Cancel
# ---------------------------------------------------------------------------------------------------

def test_cancel_stops_the_merge_and_leaves_everything_as_it_was(host: comfyhost.Host, pair, tiny_layout) -> None:
    content, style = pair
    prompt = merge_prompt(host, content.name, style.name, steps=10)
    prompt["14"] = _save(host, "cancel/merged")
    loras_before = folder_listing(host.loras_dir)

    with pytest.raises(comfyhost.ExecutionInterrupted) as info:
        host.execute(prompt, interrupt_after=2)

    interrupted = info.value
    assert (interrupted.node_id, interrupted.node_type) == (MERGE_ID, "DuoLoRA_ZipRankMerge")
    # Two steps reported, then the merge stopped before a third.
    assert [(u.value, u.total) for u in interrupted.result["progress"]] == [(1, 10), (2, 10)]
    assert "14" not in interrupted.result["ui"]
    # No merged file, no partial or temporary file anywhere under loras/.
    assert folder_listing(host.loras_dir) == loras_before

    model = interrupted.result["outputs"]["1"][0]
    # The checkpoint node builds seeded weights: a fresh build is the snapshot from before the merge.
    before = snapshot(tinysdxl.build_tiny_model(seed=0).model)
    after = snapshot(model.model)
    assert after.keys() == before.keys()
    assert [k for k in before if not torch.equal(after[k], before[k])] == []
    assert model.patches == {}
    hooked = [name for name, m in model.model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or "forward" in m.__dict__]
    assert hooked == []

    for lora_file, slot_node in ((content, "10"), (style, "11")):
        source = interrupted.result["outputs"][slot_node][0].lora
        on_disk = read_tiny(lora_file.path, tiny_layout)
        assert source.layers.keys() == on_disk.layers.keys()
        changed = [n for n, lr in on_disk.layers.items()
                   if not (torch.equal(source.layers[n].up, lr.up) and torch.equal(source.layers[n].down, lr.down))]
        assert changed == []


# ---------------------------------------------------------------------------------------------------
# Progress and server messages
# ---------------------------------------------------------------------------------------------------

def test_one_progress_update_and_one_message_per_step(host: comfyhost.Host, pair) -> None:
    content, style = pair
    prompt = merge_prompt(host, content.name, style.name, steps=4, constyle_iterations=1)  # every loss term
    prompt["14"] = node(host, "DuoLoRA_MergeReport", stats=[MERGE_ID, 1])
    with real_prompt_server(client_id="browser-1") as server:
        result = host.execute(prompt)
        received = server.drain()

    updates = [(u.value, u.total, u.node_id) for u in result["progress"]]
    assert updates == [(1, 4, MERGE_ID), (2, 4, MERGE_ID), (3, 4, MERGE_ID), (4, 4, MERGE_ID)]

    progress = [(data, sid) for event, data, sid in received if event == "duolora.progress"]
    assert [(d["node"], d["step"], d["total"], sid) for d, sid in progress] == [
        (MERGE_ID, step, 4, "browser-1") for step in (1, 2, 3, 4)]
    stats = result["outputs"][MERGE_ID][1]
    for step, (data, _) in enumerate(progress):
        assert set(data["losses"]) == set(stats.history)
        assert {"total", "content", "style", "cycle"} <= set(data["losses"])
        # The message carries exactly the step's loss terms.
        assert data["losses"] == {k: v[step] for k, v in stats.history.items()}
        assert all(math.isfinite(v) for v in data["losses"].values())
    done = [data for event, data, _ in received if event == "duolora.done"]
    assert done == [{"node": MERGE_ID, "kept_rank": stats.kept_rank_by_block}]
    assert [event for event, _, _ in received].count("duolora.progress") == 4


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------

def _node_error(host: comfyhost.Host, prompt: dict) -> comfyhost.NodeExecutionError:
    with pytest.raises(comfyhost.NodeExecutionError) as info:
        host.execute(prompt)
    return info.value


def _loader_prompt(host: comfyhost.Host, name: str) -> dict:
    return {"1": node(host, "DuoLoRA_LoadContentLoRA", lora_name=name),
            "2": node(host, "PreviewAny", source=["1", 1])}


def test_paper_mode_without_references_names_the_missing_inputs(host: comfyhost.Host, pair) -> None:
    content, style = pair
    prompt = merge_prompt(host, content.name, style.name, references=False, steps=2)
    prompt["14"] = _save(host, "errors/no_refs")
    err = _node_error(host, prompt)
    assert (err.node_id, err.node_type, err.exception_type) == (MERGE_ID, "DuoLoRA_ZipRankMerge", "ValueError")
    assert err.exception_message == (
        "ZipRank Merge in 'paper' mode learns from reference images and prompts; connect content_latents, "
        "style_latents, content_prompt, style_prompt (VAE Encode of your content and style "
        "images, CLIP Text Encode of the prompts), or choose mode 'weights' to merge from the LoRAs alone.\n")


def test_constyle_without_combined_prompt_says_how_to_turn_it_off(host: comfyhost.Host, pair) -> None:
    content, style = pair
    prompt = merge_prompt(host, content.name, style.name, steps=2, constyle_iterations=1)
    del prompt[MERGE_ID]["inputs"]["combined_prompt"]
    prompt["14"] = _save(host, "errors/no_combined")
    err = _node_error(host, prompt)
    assert err.exception_message == (
        "ZipRank Merge in 'paper' mode with the Constyle cycle loss on (constyle_iterations 1) needs "
        "combined_prompt; connect combined_prompt (CLIP Text Encode of your subject in your style, e.g. 'a sks "
        "dog in zwz style'), or set constyle_iterations to 0.\n")
    # Nothing connected at all: every input is named, and both ways out.
    prompt = merge_prompt(host, content.name, style.name, references=False, steps=2, constyle_iterations=1)
    prompt["14"] = _save(host, "errors/no_refs_constyle")
    assert _node_error(host, prompt).exception_message == (
        "ZipRank Merge in 'paper' mode learns from reference images and prompts; connect content_latents, "
        "style_latents, content_prompt, style_prompt, combined_prompt (VAE Encode of your content and style "
        "images, CLIP Text Encode of the prompts) (combined_prompt only for the Constyle cycle loss: or set "
        "constyle_iterations to 0), or choose mode 'weights' to merge from the LoRAs alone.\n")


def test_the_same_file_as_content_and_style_is_warned_about(host: comfyhost.Host, pair) -> None:
    content, _ = pair
    prompt = merge_prompt(host, content.name, content.name, references=False, mode="weights")
    prompt["14"] = _save(host, "errors/same")
    with real_prompt_server(client_id="browser-1") as server:
        host.execute(prompt)
        received = server.drain()
    warnings = [(data, sid) for event, data, sid in received if event == "duolora.warning"]
    assert warnings == [({"node": MERGE_ID, "message": (
        f"content and style are the same file, {content.name}: a LoRA merged with itself adds nothing new (the "
        "plain sum only doubles it); pick your style LoRA in Load Style LoRA.")}, "browser-1")]
    # Two different files: no warning.
    prompt = merge_prompt(host, content.name, pair[1].name, references=False, mode="weights")
    with real_prompt_server(client_id="browser-1") as server:
        host.execute({**prompt, "14": _save(host, "errors/different")})
        assert [e for e, _, _ in server.drain() if e == "duolora.warning"] == []


def test_sd15_lora_is_refused_by_the_loader(host: comfyhost.Host) -> None:
    lora = synthetic_lora(SD15_LAYOUT, rank=1, seed=3)
    f = write_lora(host, lora, "sd15_style.safetensors", SD15_LAYOUT)
    err = _node_error(host, _loader_prompt(host, f.name))
    assert (err.node_id, err.node_type) == ("1", "DuoLoRA_LoadContentLoRA")
    assert err.exception_type.endswith("duolora.formats.WrongBaseModelError")
    assert err.exception_message == (
        "sd15_style.safetensors: this LoRA is for SD1.x, not SDXL (its cross-attention layers read 768-wide "
        "text embeddings; SDXL's read 2048). Pick a LoRA trained for SDXL.\n")


def test_truncated_file_is_refused_by_the_loader(host: comfyhost.Host, pair) -> None:
    """A download that stopped early: the header is intact, the tensor data is cut."""
    content, _ = pair
    path = host.loras_dir / TEST_SUBDIR / "truncated.safetensors"
    data = content.path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    header = 8 + struct.unpack("<Q", data[:8])[0]
    err = _node_error(host, _loader_prompt(host, f"{TEST_SUBDIR}/truncated.safetensors"))
    assert (err.node_id, err.node_type) == ("1", "DuoLoRA_LoadContentLoRA")
    assert err.exception_type.endswith("duolora.formats.NotSafetensorsError")
    assert err.exception_message == (
        f"truncated.safetensors is truncated: its header describes {len(data) - header} bytes of tensor data "
        f"but only {len(data) * 2 // 3 - header} are present. Re-download the file or export it again.\n")

    # A header that is not JSON.
    path.write_bytes(struct.pack("<Q", 16) + b"{not json at all" + bytes(64))
    err = _node_error(host, _loader_prompt(host, f"{TEST_SUBDIR}/truncated.safetensors"))
    assert err.exception_message == (
        "truncated.safetensors is not a safetensors file (or is corrupt): its header is not valid JSON (Expecting "
        "property name enclosed in double quotes: line 1 column 2 (char 1)). Re-download it or export it again "
        "as .safetensors.\n")


def test_full_size_sdxl_lora_does_not_fit_the_tiny_model(host: comfyhost.Host, pair) -> None:
    full = synthetic_lora(SDXL_LAYOUT, rank=1, seed=4)
    keep = ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn2.to_k")
    full = dataclasses.replace(full, layers={k: full.layers[k] for k in keep})
    f = write_lora(host, full, "full_sdxl_style.safetensors", SDXL_LAYOUT)
    content, _ = pair
    prompt = merge_prompt(host, content.name, f.name, method="direct", references=False)
    prompt["14"] = _save(host, "errors/full")
    err = _node_error(host, prompt)
    assert (err.node_id, err.node_type) == (MERGE_ID, "DuoLoRA_ZipRankMerge")
    assert err.exception_type.endswith("duolora.formats.LayerMismatchError")
    assert err.exception_message == (
        "full_sdxl_style.safetensors: 2 layers do not match SDXL: 'input_blocks.4.1.transformer_blocks.0.attn1.to_q' "
        "is (640, 640) in the file but (64, 64) in SDXL; 'input_blocks.4.1.transformer_blocks.0.attn2.to_k' is "
        "(640, 2048) in the file but (64, 80) in SDXL. This LoRA was made for a different model.\n")


def test_nan_in_a_lora_is_refused(host: comfyhost.Host, pair, tiny_layout) -> None:
    content, style = pair
    broken = read_tiny(style.path, tiny_layout)
    layer = "output_blocks.2.1.transformer_blocks.3.attn2.to_v"
    broken.layers[layer].up[0, 0] = float("nan")
    f = write_lora(host, broken, "nan_style.safetensors", tiny_layout)
    prompt = merge_prompt(host, content.name, f.name, method="direct", references=False)
    prompt["14"] = _save(host, "errors/nan")
    err = _node_error(host, prompt)
    assert err.exception_type.endswith("duolora.formats.NonFiniteError")
    assert (err.node_id, err.node_type) == (MERGE_ID, "DuoLoRA_ZipRankMerge")
    assert err.exception_message == (
        f"nan_style.safetensors: layer '{layer}' contains NaN or Inf values. The file is damaged (often a "
        "training run that diverged); use another epoch or export.\n")
    # ComfyUI's error report formats the node's inputs with str(): one short line per LoRA, no tensors.
    style_input = err.result["outputs"]["11"][0]
    assert err.details["current_inputs"]["style_lora"] == [f"SourceLoRA({f.name!r}: {style_input.summary})"]
    assert len(str(err.details["current_inputs"])) < 1000


# ---------------------------------------------------------------------------------------------------
# Save Merged LoRA
# ---------------------------------------------------------------------------------------------------

def test_save_counts_never_overwrites_and_is_atomic(host: comfyhost.Host, pair) -> None:
    content, style = pair
    prompt = merge_prompt(host, content.name, style.name, method="direct", references=False)
    prompt["14"] = _save(host, "naming/run")
    # Two Save nodes with the same inputs: ComfyUI runs one (same cache signature); run the prompt twice.
    runs = [host.execute(prompt) for _ in range(2)]
    assert [r["ui"]["14"]["text"] for r in runs] == [[f"{TEST_SUBDIR}/naming/run_00001_.safetensors"], [f"{TEST_SUBDIR}/naming/run_00002_.safetensors"]]
    folder = host.loras_dir / TEST_SUBDIR / "naming"

    save = host.node_class_mappings["DuoLoRA_SaveMergedLoRA"]
    merged = runs[1]["outputs"][MERGE_ID][0]
    # The next free name exists already (another tool, another run): it is kept and another name is used.
    (folder / "run_00003_.safetensors").write_bytes(b"someone else's file")
    out = save.execute(merged_lora=merged, filename_prefix=f"{TEST_SUBDIR}/naming/run")
    assert out.ui == {"text": [f"{TEST_SUBDIR}/naming/run_00004_.safetensors"]}
    assert (folder / "run_00003_.safetensors").read_bytes() == b"someone else's file"

    # Readable as any file the process writes (0o644 under the usual umask 0o022), not only by its owner.
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.glob("run_0000[124]_.safetensors")} == {
        oct(0o666 & ~umask)}

    listing = folder_listing(folder)
    # A metadata value that is not a string: refused before anything is written.
    bad_meta = dataclasses.replace(merged, metadata={**merged.metadata, "duolora.steps_done": 0})
    with pytest.raises(TypeError, match="^safetensors metadata must map strings to strings; "
                                        "'duolora.steps_done' -> int$"):
        save.execute(merged_lora=bad_meta, filename_prefix=f"{TEST_SUBDIR}/naming/run")
    # Two names for one tensor: safetensors refuses while writing the temporary file, which is removed.
    t = next(iter(merged.state_dict.values()))
    aliased = dataclasses.replace(merged, state_dict={"a.lora_up.weight": t, "b.lora_up.weight": t})
    with pytest.raises(RuntimeError, match="share memory"):
        save.execute(merged_lora=aliased, filename_prefix=f"{TEST_SUBDIR}/naming/run")
    assert folder_listing(folder) == listing


# ---------------------------------------------------------------------------------------------------
# Loader cache
# ---------------------------------------------------------------------------------------------------

def test_loader_reads_a_file_once_until_it_changes(host: comfyhost.Host, pair) -> None:
    content, _ = pair
    prompt = _loader_prompt(host, content.name)
    first = host.execute(prompt)["outputs"]["1"][0]
    second = host.execute(prompt)["outputs"]["1"][0]
    # Same parsed object: the second execution did not read the file again.
    assert second.lora is first.lora
    assert second.sha256 == first.sha256 == content.sha256()
    st = os.stat(content.path)
    os.utime(content.path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    third = host.execute(prompt)["outputs"]["1"][0]
    assert third.lora is not first.lora
    assert third.sha256 == first.sha256
    assert all(torch.equal(third.lora.layers[n].up, lr.up) for n, lr in first.lora.layers.items())


def test_a_lora_file_overwritten_under_its_name_runs_the_merge_again(host: comfyhost.Host, tiny_layout) -> None:
    """ComfyUI reuses a node's cached output while its inputs are unchanged. A LoRA retrained and saved under the
    same name changes no input, only the file: the loaders' fingerprint (the file's mtime and size) makes the
    executor read it again and re-run everything after it."""
    content, style = tiny_pair(host, tiny_layout, "refresh")
    prompt = merge_prompt(host, content.name, style.name, references=False, mode="weights")
    prompt["14"] = _save(host, "refresh/merged")
    folder = host.loras_dir / TEST_SUBDIR / "refresh"
    executor = host.executor()

    def cached(result: dict) -> set[str]:
        return {n for event, data in result["messages"] if event == "execution_cached" for n in data["nodes"]}

    first = host.execute(prompt, executor=executor)
    assert cached(first) == set() and folder_listing(folder) == ["merged_00001_.safetensors"]
    again = host.execute(prompt, executor=executor)
    # Unchanged: every node from the cache, nothing saved again.
    assert cached(again) == set(prompt) and folder_listing(folder) == ["merged_00001_.safetensors"]

    st = os.stat(content.path)
    retrained = write_lora(host, synthetic_lora(tiny_layout, rank=RANK_C, text_encoder=True, seed=99, std=0.2),
                           os.path.basename(content.path), tiny_layout)
    assert retrained.path == content.path and retrained.sha256() != first["outputs"]["10"][0].sha256
    # A retrained file of the same rank has the same size; its write time is what tells it apart (set it 2 s
    # later explicitly, so a coarse file-system clock cannot hide the change).
    os.utime(content.path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    third = host.execute(prompt, executor=executor)
    assert cached(third) == {"1", "11"}  # the checkpoint and the unchanged style loader
    assert third["outputs"]["10"][0].sha256 == retrained.sha256()
    assert folder_listing(folder) == ["merged_00001_.safetensors", "merged_00002_.safetensors"]
    saved = formats.read_lora(folder / "merged_00002_.safetensors", layouts=(tiny_layout,))
    assert saved.metadata["duolora_content_sha256"] == retrained.sha256()


# ---------------------------------------------------------------------------------------------------
# Methods that learn nothing
# ---------------------------------------------------------------------------------------------------

def test_direct_and_b_lora_need_no_references(host: comfyhost.Host, pair, tiny_layout) -> None:
    content, style = pair
    prompt = merge_prompt(host, content.name, style.name, method="direct", references=False, steps=5)
    prompt["13"] = node(host, "DuoLoRA_ZipRankMerge", model=["1", 0], content_lora=["10", 0], style_lora=["11", 0],
                        method="b_lora", steps=5)
    prompt["14"] = _save(host, "methods/direct")
    prompt["15"] = _save(host, "methods/b_lora", source="13")
    result = host.execute(prompt)
    assert result["progress"] == []
    c, s = read_tiny(content.path, tiny_layout), read_tiny(style.path, tiny_layout)

    direct = result["outputs"][MERGE_ID][0].lora
    assert result["outputs"][MERGE_ID][1].steps_done == 0
    assert set(direct.layers) == set(c.layers) == set(s.layers)
    for name, lr in direct.layers.items():
        # Exactly the two LoRAs side by side: B = [B_c | B_s], A = [A_c; A_s].
        assert torch.equal(lr.B, torch.cat([c.layers[name].B, s.layers[name].B], dim=1)), name
        assert torch.equal(lr.A, torch.cat([c.layers[name].A, s.layers[name].A], dim=0)), name
    worst = max(float((lr.delta() - c.layers[n].delta() - s.layers[n].delta()).abs().max())
                for n, lr in direct.layers.items())
    assert worst <= 1e-6

    b_lora = result["outputs"]["13"][0].lora
    unet = b_lora.unet_layers()
    assert {block_of(n) for n in unet} == {B_LORA_CONTENT_BLOCK, B_LORA_STYLE_BLOCK}
    for name, lr in unet.items():
        src = c if block_of(name) == B_LORA_CONTENT_BLOCK else s
        assert lr.rank == (RANK_C if src is c else RANK_S)
        assert torch.equal(lr.B, src.layers[name].B) and torch.equal(lr.A, src.layers[name].A), name
    # 10 transformer blocks × 8 attention projections (attn1, attn2: q, k, v, out) in each of the two blocks.
    assert len(unet) == 2 * 10 * 8
    # The text-encoder parts pass through as the direct merge.
    assert set(b_lora.text_encoder_layers()) == set(c.text_encoder_layers())
    assert {lr.rank for lr in b_lora.text_encoder_layers().values()} == {RANK_C + RANK_S}


# ---------------------------------------------------------------------------------------------------
# LORA_MODEL from ComfyUI's own Train LoRA
# ---------------------------------------------------------------------------------------------------

def test_lora_model_from_core_train_lora_loads(host: comfyhost.Host) -> None:
    prompt = reference_nodes(host)
    prompt["5"]["inputs"]["batch_size"] = 2
    # Train LoRA of ComfyUI 0.3.75 fails on one LATENT input (its `multi_res` is only set for a list),
    # so the two latents come in as a list, as from a dataset.
    prompt["19"] = node(host, "RebatchLatents", latents=["7", 0], batch_size=1)
    prompt["20"] = node(host, "TrainLoraNode", model=["1", 0], latents=["19", 0], positive=["2", 0], steps=1,
                        rank=2, training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)
    # Train LoRA's outputs moved (MODEL, LORA_MODEL, … before; LORA_MODEL first in current ComfyUI): by type.
    slot = objectinfo.output_slot(host, "TrainLoraNode", "LORA_MODEL")
    prompt["21"] = node(host, "DuoLoRA_LoadContentLoRA", lora_name=NO_FILE, lora_model=["20", slot])
    prompt["22"] = node(host, "PreviewAny", source=["21", 1])
    result = host.execute(prompt)
    trained = result["outputs"]["20"][slot]
    loaded = result["outputs"]["21"][0]
    # Every linear and convolution of the UNet (the tiny model has SDXL's 794) as a rank-2 LoRA ...
    assert len(loaded.lora.layers) == 794
    assert loaded.lora.ranks() == [2]
    worst = 0.0
    for name, lr in loaded.lora.layers.items():
        key = "diffusion_model." + name
        up, down = trained[key + ".lora_up.weight"], trained[key + ".lora_down.weight"]
        scale = float(trained[key + ".alpha"]) / down.shape[0]
        expected = (up.flatten(1) @ down.flatten(1)) * scale
        worst = max(worst, float((lr.delta().flatten(1) - expected).abs().max()))
    assert worst <= 1e-7
    # ... and its bias/norm differences (ComfyUI applies them) are carried as patches, never dropped.
    diffs = {k: v for k, v in trained.items() if k.endswith((".diff", ".diff_b"))}
    assert loaded.lora.skipped == []
    assert len(loaded.lora.patches) == len(diffs) > 0
    for key, value in diffs.items():
        module, suffix = key.rsplit(".", 1)
        param = module[len("diffusion_model."):] + (".bias" if suffix == "diff_b" else ".weight")
        assert torch.equal(loaded.lora.patches[param], value.float()), key
    assert f"{len(diffs)} bias/norm differences" in loaded.summary
    assert result["ui"]["22"]["text"] == [loaded.summary]

    # "[None]" without a LORA_MODEL says what to do.
    err = _node_error(host, _loader_prompt(host, NO_FILE))
    assert err.exception_message == (
        "no LoRA file chosen: put .safetensors LoRAs in ComfyUI's models/loras folder, refresh, and pick one "
        "(or connect a LORA_MODEL to lora_model)\n")
