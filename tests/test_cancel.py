"""Cancel during a merge, in ComfyUI's real executor, in every mode that runs the model.

ComfyUI's Cancel sets a flag that ``throw_exception_if_processing_interrupted`` turns into
``InterruptProcessingException`` (a ``BaseException`` on current ComfyUI, so ``except Exception`` never sees it;
cleanup must sit in ``finally`` / ``__exit__``). After a cancel the MODEL must be exactly as it was: its weights,
every ``requires_grad`` flag, no patch, no hook, no wrapped forward, no ``.grad``. Current ComfyUI throttles
progress updates, so the merge checks the flag itself before every step instead of relying on the progress hook.
"""

from __future__ import annotations

import comfyhost
import dynamicvram
import pytest
import tinysdxl
import torch
from nodehelpers import MERGE_ID, TEST_SUBDIR, folder_listing, merge_prompt, node, snapshot, tiny_pair


@pytest.fixture(scope="module")
def pair(host: comfyhost.Host, tiny_layout):
    return tiny_pair(host, tiny_layout, "cancel")


def _untouched(model) -> None:
    """``model`` (a MODEL) is exactly what the tiny checkpoint node builds, with nothing left behind."""
    fresh = tinysdxl.build_tiny_model(seed=0)
    before, after = snapshot(fresh.model), snapshot(model.model)
    assert after.keys() == before.keys()
    assert [k for k in before if not torch.equal(after[k], before[k])] == []
    assert [p.requires_grad for p in model.model.parameters()] == [p.requires_grad for p in fresh.model.parameters()]
    assert [n for n, p in model.model.named_parameters() if p.grad is not None] == []
    assert model.patches == {}
    hooked = [name for name, m in model.model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or "forward" in m.__dict__]
    assert hooked == []


@pytest.mark.parametrize("mode", ["paper", "layerwise", "layerwise+paper"])
def test_cancel_in_every_mode_leaves_the_model_as_it_was(host: comfyhost.Host, pair, mode: str) -> None:
    content, style = pair
    prompt = merge_prompt(host, content.name, style.name, mode=mode, steps=6)
    prompt["14"] = node(host, "DuoLoRA_SaveMergedLoRA", merged_lora=[MERGE_ID, 0],
                        filename_prefix=f"{TEST_SUBDIR}/cancel_{mode}")
    loras_before = folder_listing(host.loras_dir)
    with pytest.raises(comfyhost.ExecutionInterrupted) as info:
        host.execute(prompt, interrupt_after=1)
    interrupted = info.value
    assert (interrupted.node_id, interrupted.node_type) == (MERGE_ID, "DuoLoRA_ZipRankMerge")
    # One update (the first paper step, or the first recorded reference), then nothing more from the merge.
    assert [(u.value, u.total) for u in interrupted.result["progress"]] in ([(1, 6)], [(1, 2)]), mode
    assert folder_listing(host.loras_dir) == loras_before
    _untouched(interrupted.result["outputs"]["1"][0])


def test_the_merge_checks_for_cancel_before_every_step_itself(host: comfyhost.Host, pair) -> None:
    content, style = pair
    prompt = merge_prompt(host, content.name, style.name, steps=6)
    prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
    # A host whose progress hook never looks at the flag: the merge's own check must stop it before step 2.
    with pytest.raises(comfyhost.ExecutionInterrupted) as info:
        host.execute(prompt, interrupt_after=1, progress_checks_interrupt=False)
    assert [(u.value, u.total) for u in info.value.result["progress"]] == [(1, 6)]
    _untouched(info.value.result["outputs"]["1"][0])


def test_cancel_on_a_dynamic_model_leaves_it_and_comfyuis_copy_clean(host: comfyhost.Host, pair) -> None:
    if not dynamicvram.dynamic_vram_available():
        pytest.skip("this ComfyUI has no dynamic VRAM (comfy.model_patcher.ModelPatcherDynamic)")
    content, style = pair
    prompt = merge_prompt(host, content.name, style.name, steps=6)
    prompt["20"] = node(host, comfyhost.TINY_DYNAMIC_MODEL_NODE, seed=0)
    prompt[MERGE_ID]["inputs"]["model"] = ["20", 0]
    prompt["21"] = node(host, "PreviewAny", source=["20", 0])
    prompt["13"] = node(host, "PreviewAny", source=[MERGE_ID, 0])
    with pytest.raises(comfyhost.ExecutionInterrupted) as info:
        host.execute(prompt, interrupt_after=1)
    model = info.value.result["outputs"]["20"][0]
    assert model.is_dynamic()
    _untouched(model)
    _untouched(model.get_non_dynamic_delegate())
