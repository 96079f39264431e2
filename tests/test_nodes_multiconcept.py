"""A multi-concept merge in the real ComfyUI executor on the tiny SDXL model: Load Content LoRA → Add Content
LoRA (a second subject with its own latents and prompts) → ZipRank Merge with a style LoRA, in every mode; the
saved file is the exact merge of the three files, records all three, and the stock LoraLoader patches what
Apply Merged LoRA patches; the Merge Report names every LoRA; bad inputs are refused by name (synthetic LoRAs;
see nodehelpers)."""

from __future__ import annotations

import comfyhost
import pytest
import torch
from nodehelpers import (
    MERGE_ID,
    N_ATTENTION,
    RANK_C,
    RANK_S,
    TEST_SUBDIR,
    merge_prompt,
    node,
    patched_weights,
    read_tiny,
    tiny_pair,
    write_lora,
)
from safetensors import safe_open

from duolora.config import MergeConfig
from duolora.mergers import build_merger
from duolora.synthetic import synthetic_lora

RANK_C2 = 3
ADD_ID = "20"


def multi_prompt(host: comfyhost.Host, content: str, content2: str, style: str, *, second_references: bool = True,
                 **widgets) -> dict[str, dict]:
    """merge_prompt's graph with Add Content LoRA "20" between Load Content LoRA "10" and the merge: the second
    subject's 64×64 image "30" → latents "31", prompts "32" (p_c) and "33" (p_cs)."""
    prompt = merge_prompt(host, content, style, **widgets)
    prompt.update({
        "30": node(host, "EmptyImage", width=64, height=64, batch_size=1, color=0x30A040),
        "31": node(host, "VAEEncode", pixels=["30", 0], vae=["1", 2]),
        "32": node(host, "CLIPTextEncode", text="a photo of sks cat", clip=["1", 1]),
        "33": node(host, "CLIPTextEncode", text="a sks cat in zwz style", clip=["1", 1]),
    })
    links = {"content_latents": ["31", 0], "content_prompt": ["32", 0], "combined_prompt": ["33", 0]}
    prompt[ADD_ID] = node(host, "DuoLoRA_AddContentLoRA", content_lora=["10", 0], lora_name=content2,
                          **(links if second_references else {}))
    prompt[MERGE_ID]["inputs"]["content_lora"] = [ADD_ID, 0]
    return prompt


def three_files(host: comfyhost.Host, tiny_layout, tag: str):
    content, style = tiny_pair(host, tiny_layout, tag)
    second = synthetic_lora(tiny_layout, rank=RANK_C2, seed=13, std=0.2)
    return content, write_lora(host, second, f"{tag}_content2.safetensors", tiny_layout), style


@pytest.mark.parametrize(("mode", "method"), [("paper", "ziprank"), ("layerwise", "ziprank"), ("weights", "ziprank"),
                                              ("layerwise+paper", "ziprank"), ("paper", "ziplora_out"),
                                              ("weights", "direct")])
def test_two_subjects_and_a_style_merge_through_the_executor(host: comfyhost.Host, tiny_layout, mode: str,
                                                             method: str) -> None:
    content, content2, style = three_files(host, tiny_layout, f"multi_{mode.replace('+', '_')}_{method}")
    save = f"{TEST_SUBDIR}/multi/{mode.replace('+', '_')}_{method}"
    prompt = multi_prompt(host, content.name, content2.name, style.name, mode=mode, method=method, steps=2,
                          lora_dtype="fp32", constyle_iterations=1 if mode == "paper" else 0)
    prompt.update({
        "13": node(host, "DuoLoRA_SaveMergedLoRA", merged_lora=[MERGE_ID, 0], filename_prefix=save),
        "14": node(host, "DuoLoRA_MergeReport", stats=[MERGE_ID, 1]),
        "15": node(host, "DuoLoRA_ApplyMergedLoRA", model=["1", 0], clip=["1", 1], merged_lora=[MERGE_ID, 0]),
        "16": node(host, "PreviewAny", source=["15", 0]),
    })
    result = host.execute(prompt)
    stats = result["outputs"][MERGE_ID][1]
    assert stats.mode == mode and stats.method == method
    if method == "ziprank":
        # One mask per LoRA per learned layer: every attention projection has all three LoRAs.
        assert stats.trainable_parameters == N_ATTENTION * (RANK_C + RANK_C2 + RANK_S)
        assert sum(k.endswith(".m_c2") for k in stats.extra["masks"]) == N_ATTENTION
    if mode != "weights" and method != "direct":
        assert {"content", "content2", "style"} <= set(stats.history)
    if mode == "paper":
        assert {"cycle", "cycle2", "reverse", "reverse2"} <= set(stats.history)
        assert [u.value for u in result["progress"] if u.node_id == MERGE_ID] == [1, 2]

    # The saved file is the exact merge of the three source files with the node's masks.
    (saved_name,) = result["ui"]["13"]["text"]
    path = host.loras_dir / saved_name
    saved = read_tiny(path, tiny_layout)
    loras = [read_tiny(f.path, tiny_layout) for f in (content, content2, style)]
    config = MergeConfig.from_dict(stats.config)
    merger = build_merger(config.method, loras[:2], loras[2], config)
    merger.load_state_dict(stats.extra["masks"])
    expected = merger.export(config.prune_threshold)
    assert set(saved.layers) == set(expected.layers)
    worst = max(float((saved.layers[n].delta() - lr.delta()).abs().max() / lr.delta().abs().max())
                for n, lr in expected.layers.items())
    assert worst <= 1e-5
    unet = [n for n in saved.layers if not n.startswith(("te1.", "te2."))]
    assert max(saved.layers[n].rank for n in unet) <= RANK_C + RANK_C2 + RANK_S
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert (meta["duolora_content"], meta["duolora_content_2"], meta["duolora_style"]) == (
        f"{content.name} + {content2.name}", content2.name, style.name)
    assert meta["duolora_content_2_sha256"] == content2.sha256() and meta["duolora_content_2_strength"] == "1"
    # The report shows every LoRA, by name, and its numbers.
    text = result["outputs"]["14"][1]
    assert (f"LoRAs: content 1 {content.path.name}, content 2 {content2.path.name}, style {style.path.name}"
            in text)
    assert "content 1 kept" in text and "content 2 kept" in text
    assert all(set(v) == {"content", "content2", "style", "layers"} for v in stats.kept_rank_by_block.values())
    (preview,) = result["ui"]["14"]["images"]
    assert preview["type"] == "temp"

    if mode == "paper" and method == "ziprank":
        # The stock LoraLoader patches the saved file exactly as Apply Merged LoRA patches the merge.
        stock = host.execute({
            "1": node(host, comfyhost.TINY_CHECKPOINT_NODE, seed=0),
            "2": node(host, "LoraLoader", model=["1", 0], clip=["1", 1], lora_name=saved_name,
                      strength_model=1.0, strength_clip=1.0),
            "3": node(host, "PreviewAny", source=["2", 0]),
        })
        ours, theirs = patched_weights(result["outputs"]["15"][0]), patched_weights(stock["outputs"]["2"][0])
        assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


def test_a_second_subject_without_references_is_named(host: comfyhost.Host, tiny_layout) -> None:
    content, content2, style = three_files(host, tiny_layout, "multi_missing")
    prompt = multi_prompt(host, content.name, content2.name, style.name, second_references=False, mode="paper")
    prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
    with pytest.raises(comfyhost.NodeExecutionError) as info:
        host.execute(prompt)
    assert (f"ZipRank Merge in 'paper' mode learns each subject from its own reference images and prompts: content "
            f"LoRA 2 '{content2.name}' has no content_latents, content_prompt; connect content_latents, "
            "content_prompt on its Add Content LoRA node (VAE Encode of that subject's images, CLIP Text Encode of "
            "its prompts), or choose mode 'weights' to merge from the LoRAs alone.") in str(info.value)
    # The weights mode needs none.
    prompt[MERGE_ID]["inputs"]["mode"] = "weights"
    assert host.execute(prompt)["outputs"][MERGE_ID][1].mode == "weights"


def test_one_file_given_twice_and_b_lora_are_refused_by_name(host: comfyhost.Host, tiny_layout) -> None:
    content, content2, style = three_files(host, tiny_layout, "multi_bad")
    prompt = multi_prompt(host, content.name, content.name, style.name, mode="weights")
    prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
    with pytest.raises(comfyhost.NodeExecutionError) as info:
        host.execute(prompt)
    assert (f"content LoRA 1 '{content.name}' and content LoRA 2 '{content.name}' are the same file (identical "
            "SHA-256): give each LoRA once") in str(info.value)
    prompt = multi_prompt(host, content.name, content2.name, style.name, mode="weights", method="b_lora")
    prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
    with pytest.raises(comfyhost.NodeExecutionError) as info:
        host.execute(prompt)
    assert "method 'b_lora' merges exactly one content LoRA" in str(info.value)
    # Add Content LoRA's list belongs on content_lora, not style_lora.
    prompt = multi_prompt(host, content.name, content2.name, style.name, mode="weights")
    prompt[MERGE_ID]["inputs"]["style_lora"] = [ADD_ID, 0]
    prompt[MERGE_ID]["inputs"]["content_lora"] = ["11", 0]
    prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
    with pytest.raises(comfyhost.NodeExecutionError) as info:
        host.execute(prompt)
    assert ("ZipRank Merge's style_lora takes one LoRA, from Load Style LoRA; connect Add Content LoRA to "
            "content_lora") in str(info.value)


def test_the_merge_cache_keys_on_every_subject(host: comfyhost.Host, tiny_layout, tmp_path, monkeypatch) -> None:
    """A multi-concept merge run again with the same inputs comes from the merge cache, bit for bit; a change to
    the second subject's references alone is a different merge."""
    monkeypatch.setenv("DUOLORA_MERGE_CACHE", str(tmp_path / "merge_cache"))
    monkeypatch.delenv("DUOLORA_MERGE_CACHE_MB", raising=False)
    content, content2, style = three_files(host, tiny_layout, "multi_cache")

    def run(second_prompt: str) -> tuple[dict, object, object]:
        prompt = multi_prompt(host, content.name, content2.name, style.name, mode="paper", steps=2, lora_dtype="fp32")
        prompt["32"]["inputs"]["text"] = second_prompt
        prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
        merged, stats = host.execute(prompt)["outputs"][MERGE_ID][:2]
        return stats.extra["merge_cache"], merged, stats

    first, merged, stats = run("a photo of sks cat")
    again, merged_again, stats_again = run("a photo of sks cat")
    assert (first["hit"], again["hit"]) == (False, True) and again["key"] == first["key"]
    assert merged.state_dict.keys() == merged_again.state_dict.keys()
    assert all(torch.equal(merged.state_dict[k], merged_again.state_dict[k]) for k in merged.state_dict)
    assert stats.history == stats_again.history
    other, _, _ = run("a photo of sks bird")
    assert other["hit"] is False and other["key"] != first["key"]
