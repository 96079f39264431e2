"""A merged file's provenance: ``duolora merge`` writes the keys the ZipRank Merge node writes (one writer,
``duolora.provenance``), modes in the user's vocabulary, and the keys of files written before still read."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

from duolora import __version__, cli, formats, provenance
from duolora.config import MergeConfig, mode_of, objective_of
from duolora.synthetic import synthetic_lora

# Every key a weights-mode file records, whoever wrote it (the node adds its run's trainable_parameters,
# steps_done and kept_rank).
FILE_KEYS = {"method", "content", "style", "scope", "prune_threshold", "basis", "mode", "config", "fast_objective",
             "version", "content_sha256", "content_strength", "style_sha256", "style_strength"}


def test_the_command_writes_the_node_keys(tmp_path: Path) -> None:
    paths = []
    for name, seed in (("content", 1), ("style", 2)):
        path = tmp_path / f"{name}.safetensors"
        formats.save_lora(synthetic_lora(rank=2, seed=seed, dtype=torch.float16), path)
        paths.append(path)
    out = tmp_path / "merged.safetensors"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(["merge", str(paths[0]), str(paths[1]), "-o", str(out), "--quiet", "--margin", "0.3"])
    assert code == 0
    metadata = formats.read_lora(out, load_tensors=False).metadata
    record = provenance.read(metadata)
    assert set(record) == FILE_KEYS
    assert all(f"duolora_{name}" in metadata for name in FILE_KEYS)  # the current spelling, not the old one
    assert (record["mode"], record["method"], record["version"]) == ("weights", "ziprank", __version__)
    assert (record["content"], record["style"]) == ("content.safetensors", "style.safetensors")
    assert record["content_sha256"] == formats.file_sha256(paths[0])
    assert record["style_sha256"] == formats.file_sha256(paths[1])
    assert (record["content_strength"], record["style_strength"]) == ("1", "1")
    config = MergeConfig.from_dict(json.loads(record["config"]))
    assert (config.objective, config.margin, config.prior_push) == ("weights_only", 0.3, "dominant")


def test_old_node_files_still_read() -> None:
    # As the node wrote a file before node and command line shared one writer: dotted keys, the objective's name.
    old = {"duolora.version": "0.1.0", "duolora.method": "ziprank", "duolora.mode": "weights_only",
           "duolora.content": "a.safetensors", "duolora.content_sha256": "ab" * 32, "duolora.steps_done": "0",
           "ss_network_dim": "4"}
    assert provenance.read(old) == {"version": "0.1.0", "method": "ziprank", "mode": "weights",
                                    "content": "a.safetensors", "content_sha256": "ab" * 32, "steps_done": "0"}
    # The current spelling wins where a file holds both; a file this pack did not write has none.
    assert provenance.read({"duolora.mode": "paper", "duolora_mode": "layerwise"}) == {"mode": "layerwise"}
    assert provenance.read({"ss_network_dim": "4"}) == {}


def test_one_mode_vocabulary_both_spellings_accepted() -> None:
    assert [objective_of(m) for m in ("paper", "layerwise", "weights", "layerwise+paper")] == [
        "paper", "layerwise", "weights_only", "layerwise_paper"]
    assert [objective_of(o) for o in ("weights_only", "layerwise_paper")] == ["weights_only", "layerwise_paper"]
    assert [mode_of(o) for o in ("weights_only", "weights", "layerwise_paper")] == [
        "weights", "weights", "layerwise+paper"]
    assert MergeConfig(objective="weights") == MergeConfig(objective="weights_only")
    assert MergeConfig(objective="layerwise+paper").objective == "layerwise_paper"
