"""The on-disk merge cache (duolora/merge_cache.py, nodes/caching.py) in ComfyUI's real executor.

A fresh executor per prompt is what a dropped output looks like to the node: ComfyUI runs ZipRank Merge again
with the same inputs. The second run must come from the cache (no optimisation step, one progress update) and
give the very merge of the first; any change of LoRA, reference, model or setting must miss; the folder stays
within its bound, can be emptied, and a cancelled merge is never stored.
"""

from __future__ import annotations

import os
import stat

import comfyhost
import pytest
import tinysdxl
import torch
from nodehelpers import MERGE_ID, merge_prompt, node, pack_module, tiny_pair, write_lora

from duolora.config import MergeConfig
from duolora.merge_cache import Fingerprint, MergeCache, Uncacheable
from duolora.mergers import build_merger
from duolora.optimize import MergeResult
from duolora.synthetic import synthetic_lora


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "merge_cache"
    monkeypatch.setenv("DUOLORA_MERGE_CACHE", str(folder))
    monkeypatch.delenv("DUOLORA_MERGE_CACHE_MB", raising=False)
    return folder


@pytest.fixture(scope="module")
def pair(host: comfyhost.Host, tiny_layout):
    return tiny_pair(host, tiny_layout, "mergecache")


def _run(host: comfyhost.Host, content: str, style: str, model_seed: int = 0, **widgets) -> dict:
    prompt = merge_prompt(host, content, style, **{"steps": 3, "lora_dtype": "fp32", **widgets})
    prompt["1"]["inputs"]["seed"] = model_seed
    prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
    out = host.execute(prompt)
    merged, stats = out["outputs"][MERGE_ID][0], out["outputs"][MERGE_ID][1]
    return {"merged": merged, "stats": stats, "cache": stats.extra["merge_cache"],
            "progress": [(u.value, u.total) for u in out["progress"] if u.node_id == MERGE_ID]}


def _same_merge(a: dict, b: dict) -> None:
    sa, sb = a["merged"].state_dict, b["merged"].state_dict
    assert sa.keys() == sb.keys() and [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    assert a["merged"].metadata == b["merged"].metadata
    assert a["stats"].history == b["stats"].history and a["stats"].steps_done == b["stats"].steps_done


def test_a_rerun_comes_from_the_cache_and_is_the_same_merge(host: comfyhost.Host, pair, cache_dir) -> None:
    content, style = pair
    first = _run(host, content.name, style.name)
    assert first["cache"]["hit"] is False and first["progress"] == [(1, 3), (2, 3), (3, 3)]
    entries = sorted(p.name for p in cache_dir.iterdir())
    assert entries == [f"{first['cache']['key']}.safetensors"]
    again = _run(host, content.name, style.name)
    assert again["cache"]["hit"] is True and again["cache"]["key"] == first["cache"]["key"]
    # No optimisation ran: one progress update, at the end.
    assert again["progress"] == [(3, 3)]
    _same_merge(first, again)
    # The entry holds the masks only (r_c + r_s values per layer), nothing of the LoRAs' factors.
    masks = first["stats"].extra["masks"]
    entry = (cache_dir / entries[0]).stat().st_size
    assert entry < 4 * sum(t.numel() for t in masks.values()) + 256 * len(masks) + 64 * 1024
    assert entry < (content.path.stat().st_size + style.path.stat().st_size) / 5


@pytest.mark.parametrize("change", ["seed", "steps", "model", "strength", "file", "reference", "mode"])
def test_every_input_is_in_the_key(host: comfyhost.Host, pair, tiny_layout, cache_dir, change: str) -> None:
    content, style = pair
    first = _run(host, content.name, style.name)
    if change == "file":
        other = write_lora(host, synthetic_lora(tiny_layout, rank=4, text_encoder=True, seed=13, std=0.2),
                           "mergecache_other_content.safetensors", tiny_layout)
        changed = _run(host, other.name, style.name)
    elif change == "model":
        changed = _run(host, content.name, style.name, model_seed=1)
    elif change == "reference":
        prompt_text = {"text": "a photo of sks dog, outdoors"}
        prompt = merge_prompt(host, content.name, style.name, steps=3, lora_dtype="fp32")
        prompt["2"]["inputs"].update(prompt_text)
        prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
        stats = host.execute(prompt)["outputs"][MERGE_ID][1]
        changed = {"cache": stats.extra["merge_cache"]}
    else:
        widgets = {"seed": {"seed": 7}, "steps": {"steps": 2}, "mode": {"mode": "layerwise"}}.get(change, {})
        if change == "strength":
            prompt = merge_prompt(host, content.name, style.name, steps=3, lora_dtype="fp32")
            prompt["10"]["inputs"]["strength"] = 0.5
            prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
            changed = {"cache": host.execute(prompt)["outputs"][MERGE_ID][1].extra["merge_cache"]}
        else:
            changed = _run(host, content.name, style.name, **widgets)
    assert changed["cache"]["hit"] is False and changed["cache"]["key"] != first["cache"]["key"], change
    assert len(list(cache_dir.glob("*.safetensors"))) == 2


def test_a_cancelled_merge_is_not_stored(host: comfyhost.Host, pair, cache_dir) -> None:
    content, style = pair
    prompt = merge_prompt(host, content.name, style.name, steps=10)
    prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
    with pytest.raises(comfyhost.ExecutionInterrupted):
        host.execute(prompt, interrupt_after=2)
    assert not cache_dir.exists() or list(cache_dir.iterdir()) == []


def test_the_cache_can_be_turned_off_and_its_bound_must_be_a_number(host: comfyhost.Host, pair, cache_dir,
                                                                  monkeypatch) -> None:
    content, style = pair
    monkeypatch.setenv("DUOLORA_MERGE_CACHE", "off")
    assert _run(host, content.name, style.name)["cache"] == {"hit": False, "key": None, "entry": None,
                                                           "reason": "off"}
    monkeypatch.setenv("DUOLORA_MERGE_CACHE", str(cache_dir))
    monkeypatch.setenv("DUOLORA_MERGE_CACHE_MB", "lots")
    with pytest.raises(comfyhost.NodeExecutionError) as info:
        _run(host, content.name, style.name)
    assert info.value.exception_message.strip() == (
        "DUOLORA_MERGE_CACHE_MB='lots' is not a number of MiB; set it to e.g. 256, or 0 to turn the merge cache off")


def test_the_default_folder_is_in_comfyuis_user_directory(host: comfyhost.Host, monkeypatch) -> None:
    import folder_paths

    bridge = pack_module("nodes.comfy_bridge")
    monkeypatch.delenv("DUOLORA_MERGE_CACHE")
    monkeypatch.delenv("DUOLORA_MERGE_CACHE_MB", raising=False)
    cache = bridge.merge_cache()
    assert cache.folder == host.base_dir / "user" / "duolora" / "merge_cache"
    assert str(cache.folder).startswith(folder_paths.get_user_directory())
    assert cache.max_bytes == 256 * 1024 * 1024


def test_a_callable_in_the_model_options_keeps_the_merge_out_of_the_cache(host: comfyhost.Host) -> None:
    bridge = pack_module("nodes.comfy_bridge")
    model = tinysdxl.build_tiny_model(seed=0)
    before = bridge.model_fingerprint(model)
    assert bridge.model_fingerprint(tinysdxl.build_tiny_model(seed=0)) == before
    assert bridge.model_fingerprint(tinysdxl.build_tiny_model(seed=1)) != before
    model.set_model_unet_function_wrapper(lambda apply, args: apply(args["input"], args["timestep"], **args["c"]))
    # The pack's own class (ComfyUI loaded the pack as a package of its own, beside the test's `duolora`).
    with pytest.raises(pack_module("duolora.merge_cache").Uncacheable, match="cannot fingerprint a builtins.function"):
        bridge.model_fingerprint(model)


def test_patches_with_key_map_offsets_are_part_of_the_model_fingerprint(host: comfyhost.Host) -> None:
    """ComfyUI's key map can target part of a fused weight: a ``(key, offset)`` target (and ``(key, offset,
    function)``); ``add_patches`` keeps offset and function with the patch. An offset is data of the key, a
    function keeps the model out of the cache."""
    bridge = pack_module("nodes.comfy_bridge")
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    diff = ("diff", (torch.full((32, 32), 0.01),))
    fingerprints = []
    for target in (key, (key, (0, 0, 16)), (key, (0, 16, 16))):
        model = tinysdxl.build_tiny_model(seed=0)
        assert model.add_patches({target: diff}) == [target]
        fingerprints.append(bridge.model_fingerprint(model))
    assert len(set(fingerprints)) == 3
    model = tinysdxl.build_tiny_model(seed=0)
    model.add_patches({(key, (0, 0, 16), lambda w: w): diff})
    with pytest.raises(pack_module("duolora.merge_cache").Uncacheable, match="cannot fingerprint a builtins.function"):
        bridge.model_fingerprint(model)


# ---------------------------------------------------------------------------------------------------
# The folder itself (no host needed)
# ---------------------------------------------------------------------------------------------------

def _merged(tiny_layout, seed: int) -> tuple[MergeResult, object, object]:
    c = synthetic_lora(tiny_layout, rank=4, seed=seed, std=0.2)
    s = synthetic_lora(tiny_layout, rank=6, seed=seed + 1, std=0.2)
    config = MergeConfig(steps=0)
    merger = build_merger("ziprank", c, s, config)
    with torch.no_grad():
        for p in merger.mask_parameters():
            p.uniform_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    result = MergeResult(merger=merger, history={"total": [1.5, float("nan")]}, steps_done=2, config=config)
    result.merged = merger.export(config.prune_threshold)
    return result, c, s


def test_entries_rebuild_exactly_and_the_folder_keeps_its_bound(tmp_path, tiny_layout) -> None:
    result, c, s = _merged(tiny_layout, 1)
    cache = MergeCache(tmp_path / "c")
    path = cache.put("k1", result)
    back = cache.get("k1", c, s)
    assert back is not None and back.steps_done == 2 and back.history["total"][0] == 1.5
    assert torch.isnan(torch.tensor(back.history["total"][1]))
    assert back.merged.layers.keys() == result.merged.layers.keys()
    assert all(torch.equal(back.merged.layers[n].up, result.merged.layers[n].up)
               and torch.equal(back.merged.layers[n].down, result.merged.layers[n].down) for n in result.merged.layers)
    # The same entry read against other LoRAs does not fit: it is dropped, never misapplied.
    other, _, _ = _merged(tiny_layout, 5)
    small = synthetic_lora(tiny_layout, rank=2, seed=3, std=0.2)
    assert cache.get("k1", small, s) is None and not path.exists()
    # Bound: room for two entries; a third evicts the least recently used.
    size = cache.put("k1", result).stat().st_size
    bounded = MergeCache(tmp_path / "c", max_bytes=2 * size + size // 2)
    bounded.put("k2", other)
    assert bounded.get("k1", c, s) is not None  # k1 used last
    bounded.put("k3", other)
    assert sorted(p.stem for p in bounded.entries()) == ["k1", "k3"]
    assert bounded.size() <= bounded.max_bytes
    assert bounded.clear() == 2 and bounded.entries() == []
    assert MergeCache(tmp_path / "off", max_bytes=0).put("k", result) is None and not (tmp_path / "off").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_entries_get_the_mode_a_plain_write_gives(tmp_path, tiny_layout, umask: int) -> None:
    """A cache entry is readable by whoever may read the user's other files (0o666 less the umask), like a saved
    LoRA; nothing half-written is left beside it."""
    result, _, _ = _merged(tiny_layout, 1)
    old = os.umask(umask)
    try:
        path = MergeCache(tmp_path / "c").put("k1", result)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["k1" + path.suffix]


def test_fingerprints_see_every_value_of_small_tensors_and_refuse_callables() -> None:
    base = Fingerprint().add({"a": torch.zeros(3), "b": [1, 2.0, "x"]}).hexdigest()
    assert Fingerprint().add({"b": [1, 2.0, "x"], "a": torch.zeros(3)}).hexdigest() == base
    assert Fingerprint().add({"a": torch.tensor([0.0, 0.0, 1e-30]), "b": [1, 2.0, "x"]}).hexdigest() != base
    assert Fingerprint().add({"a": torch.zeros(3, dtype=torch.float64), "b": [1, 2.0, "x"]}).hexdigest() != base
    assert Fingerprint().add({"a": torch.zeros(3), "b": [1, 2, "x"]}).hexdigest() != base
    with pytest.raises(Uncacheable, match="cannot fingerprint a builtins.function"):
        Fingerprint().add([lambda: 0])
