"""The example workflows (example_workflows/*.json) against the real ComfyUI 0.3.75.

Every shipped workflow is checked against the node definitions ComfyUI itself serves, must be exactly what
devtools/workflows.py generates from them, and runs end to end through ComfyUI's own validator and executor
after ONE substitution: CheckpointLoaderSimple -> TinySDXLCheckpoint (a seeded SDXL-layout model). The
LoRA files and reference images the workflow names are generated (tiny, synthetic); only step counts and
canvas sizes are lowered in the API prompt, never in the shipped files. The converter's agreement with the
front end's own graphToPrompt is checked in tests/browser/test_workflow_thumbnails.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import comfyhost
import examplegraphs
import exampleinputs
import exampleparts
import objectinfo
import pytest
import workflowcheck
import workflowformat
from PIL import Image

from duolora import formats

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "example_workflows").glob("*.json"))
NAMES = [p.stem for p in EXAMPLES]
RANK_C, RANK_S, RANK_C2 = 8, 8, 4
TEST_STEPS = 2  # merge and sampler steps in the tests (the shipped workflows keep the paper's 100)
TEST_SIZE = 64  # pixels


@pytest.fixture(scope="module")
def object_info(host: comfyhost.Host) -> dict:
    return objectinfo.node_definitions()


@pytest.fixture(scope="module")
def inputs(host: comfyhost.Host) -> dict[str, Path]:
    """The files the examples name: tiny LoRAs in loras/ (content with text-encoder layers), PNGs in input/."""
    files = exampleinputs.make_tiny_loras(host.loras_dir, {exampleparts.CONTENT_LORA: (RANK_C, 1)}, text_encoder=True)
    files |= exampleinputs.make_tiny_loras(host.loras_dir, {exampleparts.STYLE_LORA: (RANK_S, 2),
                                                            exampleparts.CONTENT2_LORA: (RANK_C2, 3)})
    files |= exampleinputs.make_reference_images(host.input_dir, size=TEST_SIZE)
    return files


def test_the_examples_are_shipped_with_thumbnails_numbered_simplest_first() -> None:
    assert NAMES == sorted(examplegraphs.WORKFLOW_NAMES) == list(examplegraphs.WORKFLOW_NAMES)
    # The file name is what the template browser shows: a number for the order, then the title.
    assert [name.split(". ", 1)[0] for name in NAMES] == ["1", "2", "3", "4", "5", "6"]
    for path in EXAMPLES:
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file(), f"{thumb.name} is missing (scripts/make_thumbnails.py makes it)"
        with Image.open(thumb) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert 500 <= img.width <= 700 and 300 <= img.height <= 700, img.size


def test_shipped_files_are_what_the_generator_makes_from_the_real_definitions(object_info: dict) -> None:
    built = examplegraphs.build_examples(object_info)
    for path in EXAMPLES:
        assert path.read_text(encoding="utf-8") == workflowformat.dumps(built[path.stem]), (
            f"{path.name} differs from devtools/workflows.py's output: run `.venv/bin/python devtools/workflows.py` "
            f"(a node's widgets changed?) and scripts/make_thumbnails.py"
        )


@pytest.mark.parametrize("name", NAMES)
def test_example_is_valid_for_the_real_node_definitions(name: str, object_info: dict) -> None:
    wf = workflowformat.load(REPO / "example_workflows" / f"{name}.json")
    assert workflowcheck.check_workflow(wf, object_info) == []
    assert workflowcheck.layout_problems(wf) == []
    # The paper's defaults stay in the shipped files: 100 steps, lr 0.01, seed fixed; the quick start merges in
    # weights mode, the K-LoRA example merges nothing, every other example merges in paper mode.
    modes = []
    for node in wf["nodes"]:
        if node["type"] == "DuoLoRA_ZipRankMerge":
            values = dict(zip([n for n, _, _ in objectinfo.widget_layout(object_info[node["type"]])],
                              node["widgets_values"]))
            assert values["steps"] == (0 if values["method"] == "direct" else 100)
            assert values["learning_rate"] == 0.01 and values["control_after_generate"] == "fixed"
            modes.append(values["mode"])
    assert set(modes) == ({"weights"} if name == examplegraphs.QUICK
                          else set() if name == examplegraphs.KLORA else {"paper"})
    # Files a user must provide are named, as strings, each LoRA once, and nothing else is needed.
    names = exampleinputs.input_file_names(wf)
    assert names["checkpoints"] == [exampleparts.CKPT]
    second = [exampleparts.CONTENT2_LORA] if name == examplegraphs.MULTI else []
    assert sorted(names["loras"]) == sorted([exampleparts.CONTENT_LORA, exampleparts.STYLE_LORA, *second])
    if name == examplegraphs.QUICK:
        assert names["images"] == []


def test_check_workflow_reports_each_kind_of_problem(object_info: dict) -> None:
    wf = copy.deepcopy(workflowformat.load(REPO / "example_workflows" / f"{examplegraphs.WITH_IMAGES}.json"))
    by_type = {n["type"]: n for n in reversed(wf["nodes"])}
    ks, merge = by_type["KSampler"], by_type["DuoLoRA_ZipRankMerge"]

    def set_widget(node: dict, name: str, value: object) -> None:
        names = [n for n, _, _ in objectinfo.widget_layout(object_info[node["type"]])]
        node["widgets_values"][names.index(name)] = value

    set_widget(ks, "control_after_generate", "sometimes")
    set_widget(ks, "sampler_name", "no_such_sampler")
    set_widget(merge, "steps", 10001)  # max 10000
    set_widget(merge, "learning_rate", "0.01")
    set_widget(by_type["DuoLoRA_LoadContentLoRA"], "lora_name", "")
    by_type["VAEDecode"]["type"] = "NoSuchNode"
    by_type["SaveImage"]["inputs"][0]["link"] = None  # required socket left open, its link now dangles
    link = next(link for link in wf["links"] if link[3] == by_type["SaveImage"]["id"])
    problems = workflowcheck.check_workflow(wf, object_info)
    k, m, s = ks["id"], merge["id"], by_type["SaveImage"]["id"]
    assert problems == [
        (f"node {by_type['DuoLoRA_LoadContentLoRA']['id']} (DuoLoRA_LoadContentLoRA) widget lora_name: "
         "file name must be a non-empty string, got ''"),
        f"node {m} (DuoLoRA_ZipRankMerge) widget steps: 10001 is above the maximum 10000",
        f"node {m} (DuoLoRA_ZipRankMerge) widget learning_rate: expected a number, got '0.01'",
        (f"node {k} (KSampler) widget control_after_generate: 'sometimes' is not one of "
         "['fixed', 'increment', 'decrement', 'randomize']"),
        f"node {k} (KSampler) widget sampler_name: 'no_such_sampler' is not one of "
        + str(object_info["KSampler"]["input"]["required"]["sampler_name"][0][:12]) + " ...",
        f"node {by_type['VAEDecode']['id']} (NoSuchNode): unknown node type",
        f"node {s} (SaveImage): required input 'images' is not connected",
        f"link {link[0]}: node {s} input 0 holds link None",
    ]


def test_ui_to_api_follows_reroutes_bypassed_nodes_and_primitives(object_info: dict) -> None:
    """Every indirection graphToPrompt resolves (expected values by reading the graph; the browser test
    checks the same graph against the front end itself)."""
    wf, ids = examplegraphs.indirection_example(object_info)
    i = {role: str(node_id) for role, node_id in ids.items()}
    assert workflowcheck.check_workflow(wf, object_info) == []
    api = workflowformat.ui_to_api(wf, object_info)
    # No reroute, bypassed loader, note or front-end primitive in the prompt.
    assert sorted(api, key=int) == sorted([i["ckpt"], i["text"], i["latent"], i["steps"], i["ksampler"]], key=int)
    assert api[i["ksampler"]]["inputs"] == {
        "seed": 1234, "steps": [i["steps"], 0], "cfg": 8.0, "sampler_name": "euler", "scheduler": "simple",
        "denoise": 1.0, "model": [i["ckpt"], 0], "positive": [i["text"], 0], "negative": [i["text"], 0],
        "latent_image": [i["latent"], 0],
    }
    assert api[i["steps"]]["inputs"] == {"value": 7}  # its control_after_generate widget is not sent
    assert api[i["text"]]["inputs"] == {"text": "a", "clip": [i["ckpt"], 1]}
    assert api[i["ckpt"]] == {"inputs": {"ckpt_name": exampleparts.CKPT}, "class_type": "CheckpointLoaderSimple",
                              "_meta": {"title": "Load Checkpoint"}}
    # A muted (mode 2) source drops the input, as graphToPrompt does.
    next(n for n in wf["nodes"] if n["id"] == ids["latent"])["mode"] = workflowformat.MODE_NEVER
    assert "latent_image" not in workflowformat.ui_to_api(wf, object_info)[i["ksampler"]]["inputs"]


def _api_prompt_for_test(name: str, object_info: dict) -> tuple[dict, dict, dict[str, int]]:
    """(UI workflow, API prompt for the tiny model with small steps/sizes, merge node id -> its test steps)."""
    wf = workflowformat.load(REPO / "example_workflows" / f"{name}.json")
    shipped = workflowformat.ui_to_api(wf, object_info)
    prompt = workflowformat.use_tiny_checkpoint(shipped)
    # Only the checkpoint loader changed: same nodes, same inputs everywhere else.
    changed = [k for k in shipped if shipped[k] != prompt[k]]
    assert sorted(prompt) == sorted(shipped)
    assert changed == workflowformat.nodes_of_type(shipped, workflowformat.CHECKPOINT_LOADER) and len(changed) == 1
    assert prompt[changed[0]]["class_type"] == workflowformat.TINY_CHECKPOINT
    steps = {}
    for node_id, entry in prompt.items():
        inputs = entry["inputs"]
        if entry["class_type"] == "DuoLoRA_ZipRankMerge":
            inputs["steps"] = min(inputs["steps"], TEST_STEPS)
            # Weights mode learns no steps: its solve reports no progress.
            steps[node_id] = 0 if inputs["mode"] == "weights" else inputs["steps"]
        elif entry["class_type"] == "KSampler":
            inputs["steps"] = TEST_STEPS
        elif entry["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = TEST_SIZE
    return wf, prompt, steps


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", NAMES)
def test_example_runs_end_to_end_on_the_tiny_model(name: str, host: comfyhost.Host, object_info: dict,
                                                   inputs: dict[str, Path], tiny_layout) -> None:
    wf, prompt, merge_steps = _api_prompt_for_test(name, object_info)
    # With the generated files in place every file the workflow names exists, except the real checkpoint.
    ckpt = workflowformat.nodes_of_type(wf, workflowformat.CHECKPOINT_LOADER)[0]
    assert workflowcheck.check_workflow(wf, objectinfo.node_definitions(), files_must_exist=True) == [
        f"node {ckpt} (CheckpointLoaderSimple) widget ckpt_name: '{exampleparts.CKPT}' is not one of []"]
    result = host.execute(prompt)

    # Every output node ran and reported to the UI, and so did the loaders (the file summary they show).
    outputs = {k for k, v in prompt.items() if object_info[v["class_type"]]["output_node"]}
    loaders = {k for k, v in prompt.items() if v["class_type"].startswith(("DuoLoRA_Load", "DuoLoRA_Add"))}
    assert set(result["ui"]) == outputs | loaders and len(loaders) == (3 if name == examplegraphs.MULTI else 2)
    for loader in loaders:
        assert result["ui"][loader]["text"] == [result["outputs"][loader][1]]

    # The merge node reported one progress update per optimisation step, 1..steps.
    for node_id, steps in merge_steps.items():
        seen = [(u.value, u.total) for u in result["progress"] if u.node_id == node_id]
        assert seen == [(i, steps) for i in range(1, steps + 1)], (node_id, seen)
        stats = result["outputs"][node_id][1]
        assert stats.steps_done == steps and stats.method == prompt[node_id]["inputs"]["method"]

    # Saved merged LoRAs: readable, rank r_c + r_s minus what was pruned, provenance in the metadata.
    for save_id in workflowformat.nodes_of_type(prompt, "DuoLoRA_SaveMergedLoRA"):
        merge_id = prompt[save_id]["inputs"]["merged_lora"][0]
        (relative,) = result["ui"][save_id]["text"]
        path = host.loras_dir / relative
        assert path.is_file() and path.suffix == ".safetensors"
        lora = formats.read_lora(path, layouts=(tiny_layout,))
        stats = result["outputs"][merge_id][1]
        rows = stats.report.layers
        assert {r.rank_c for r in rows if not r.name.startswith(("te1.", "te2."))} == {RANK_C}
        assert {r.rank_s for r in rows} <= {0, RANK_S}
        multi = name == examplegraphs.MULTI
        # The multi-concept example merges a second content LoRA into every attention layer.
        assert {m.rank for r in rows if not r.name.startswith(("te1.", "te2.")) for m in r.more} == (
            {RANK_C2} if multi else set())
        for row in rows:
            if row.kept:
                assert lora.layers[row.name].rank == row.kept, row
            else:
                assert row.name not in lora.layers
        total_rank = sum(layer.rank for layer in lora.layers.values())
        assert total_rank == sum(r.kept for r in rows) <= sum(r.rank for r in rows)
        assert any(n.startswith("te1.") for n in lora.layers), "the content LoRA's text-encoder part is kept"
        md = lora.metadata
        config = json.loads(md["duolora_config"])
        merge_inputs = prompt[merge_id]["inputs"]
        assert md["duolora_method"] == merge_inputs["method"] == config["method"]
        assert config["steps"] == merge_inputs["steps"] and config["seed"] == merge_inputs["seed"]
        contents = (f"{exampleparts.CONTENT_LORA} + {exampleparts.CONTENT2_LORA}" if multi
                    else exampleparts.CONTENT_LORA)
        assert md["duolora_content"] == contents and md["duolora_style"] == exampleparts.STYLE_LORA
        assert md["duolora_content_sha256"] == _sha256(inputs[exampleparts.CONTENT_LORA])
        assert md["duolora_style_sha256"] == _sha256(inputs[exampleparts.STYLE_LORA])
        assert md["duolora_steps_done"] == str(merge_steps[merge_id])
        if multi:
            assert md["duolora_content_2"] == exampleparts.CONTENT2_LORA
            assert md["duolora_content_2_sha256"] == _sha256(inputs[exampleparts.CONTENT2_LORA])
        else:
            assert "duolora.content_2" not in md

    # Apply K-LoRA chose a LoRA in each of the tiny model's 560 attention projections.
    for klora_id in workflowformat.nodes_of_type(prompt, "DuoLoRA_ApplyKLoRA"):
        summary = result["outputs"][klora_id][1]
        assert summary.startswith("K-LoRA over 560 layers: γ = "), summary

    # Generated images have the canvas size; previews exist.
    for save_id in workflowformat.nodes_of_type(prompt, "SaveImage"):
        (image,) = result["ui"][save_id]["images"]
        assert image["type"] == "output"
        with Image.open(host.output_dir / image["subfolder"] / image["filename"]) as img:
            assert img.size == (TEST_SIZE, TEST_SIZE)
    for report_id in workflowformat.nodes_of_type(prompt, "DuoLoRA_MergeReport"):
        (preview,) = result["ui"][report_id]["images"]
        assert preview["type"] == "temp"
        with Image.open(host.temp_dir / preview["subfolder"] / preview["filename"]) as img:
            assert img.width >= 600 and img.height >= 400


@pytest.mark.slow
def test_demo_script_writes_the_merge_results(tmp_path: Path) -> None:
    """scripts/demo.py --workflow (example workflow 3 on the tiny random model) in a fresh process (its own
    ComfyUI): files and summary.json from the nodes' outputs. `make demo` itself: tests/test_demo.py."""
    out = tmp_path / "demo"
    cmd = [sys.executable, str(REPO / "scripts" / "demo.py"), "--workflow", "--steps", "2", "--size", "64",
           "--sampler-steps", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ZipRank Merge (DuoLoRA): step 2/2" in run.stdout
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["method"] == "ziprank" and summary["steps"] == 2
    # 560 attention layers of the tiny SDXL layout, one mask value per rank component of each LoRA.
    assert summary["trainable_parameters"] == 560 * (RANK_C + RANK_S)
    # The workflow's merge runs the node's defaults: reconstruction + the layer prior, Constyle off.
    terms = {"total", "content", "style", "prior"}
    assert terms == set(summary["loss_first"]) and set(summary["loss_first"]) == set(summary["loss_last"])
    assert all(v > 0 for v in summary["loss_first"].values())
    blocks = summary["kept_rank"]["content"]
    assert len(blocks) == 11 and set(blocks) == set(summary["kept_rank"]["style"])
    assert all(0 <= v <= RANK_C for v in blocks.values())
    assert summary["wall_seconds"] > summary["merge_seconds"] > 0
    assert set(summary["files"]) == {"merged_lora.safetensors", "report.png", "image.png", "summary.json"}
    for name, path in summary["files"].items():
        assert Path(path) == (out / name).resolve() and Path(path).is_file()
    lora = formats.read_lora(out / "merged_lora.safetensors")
    assert lora.metadata["duolora_method"] == "ziprank" and lora.metadata["duolora_steps_done"] == "2"
    with Image.open(out / "image.png") as img:
        assert img.size == (64, 64)
    with Image.open(out / "report.png") as img:
        assert img.width >= 600

    # A second run into the same folder refuses to overwrite, and says how to proceed.
    again = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip() == (
        f"demo: {out}/ already holds merged_lora.safetensors, report.png, image.png, summary.json; "
        "use --force to replace them or --out to choose another folder")
