"""The example workflows run end to end by a user in a real browser against a real ComfyUI server.

What a user does, step by step, on the ComfyUI under test (0.3.75 + frontend 1.32.9, or $COMFYUI_DIR's tree with
its own front end, e.g. 0.8.0 + 1.35.9) in Debian's headless Chromium:
the two LoRAs and three reference pictures the workflow names are put in the server's models/loras and
input/ folders (tiny synthetic LoRAs for the tiny SDXL-layout test model, procedural PNGs), then ComfyUI is
opened in a new tab; example 3 (with your own pictures) is opened from the template browser; its Load
Checkpoint node is replaced by
the test-only Tiny SDXL checkpoint (nothing else changes: its MODEL, CLIP and VAE go to the same inputs);
image size and step counts are lowered through the widgets, by name; the Run button queues it. The server
runs the real nodes; the page shows the loss curve from the real "duolora.progress" messages and the Merge
Report's preview. The finished graph is saved as <artifacts>/20_end_to_end.png (comfyserver.artifacts_dir) and,
on the default host (0.3.75) only, as docs/screenshot.png (the README's picture; the same bytes on every run
here): a run against another ComfyUI never changes a tracked file. The quick start (example 1, weights mode)
is run the same way and its saved file is found through what Save Merged LoRA shows; a merge cancelled with
ComfyUI's own Cancel button leaves a curve that says so. The multi-concept example (two subjects and one style:
Load Content LoRA → Add Content LoRA → ZipRank Merge) goes through the same steps; its finished graph is saved
as <artifacts>/23_multi_concept.png only.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import stat
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import comfyserver
import examplegraphs
import exampleinputs
import exampleparts
import frontendpage
import numpy as np
import pytest
import workflowformat
from PIL import Image

from duolora import formats
from duolora.sdxl import ATTENTION_BLOCKS

if TYPE_CHECKING:
    from conftest import BrowserSession

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "example_workflows"
SCREENSHOT = REPO / "docs" / "screenshot.png"
QUICK_START_PICTURE = REPO / "docs" / "quick_start.png"  # the README's quick-start picture
ARTIFACTS = comfyserver.artifacts_dir()
PACK = "comfyui-duolora"
CATEGORY = "DuoLoRA"  # the template browser's label of our pack (locales/en/main.json)
FIRST = examplegraphs.WITH_IMAGES
KLORA_WORKFLOW = examplegraphs.KLORA
MULTI = examplegraphs.MULTI
KLORA = "DuoLoRA_ApplyKLoRA"
MERGE, REPORT, SAVE_LORA = "DuoLoRA_ZipRankMerge", "DuoLoRA_MergeReport", "DuoLoRA_SaveMergedLoRA"
MERGE_STEPS = 3
SAMPLER_STEPS = 2
SIZE = 64  # pixels: the empty latent and the reference pictures
RANK = 8
RANK_C2 = 4  # the second subject's LoRA, of another rank than the first
RUN_TIMEOUT_S = 150
SCREENSHOT_WIDTH = 1400
# Rendered larger than the README's picture and scaled down, so node text stays sharp.
SCREENSHOT_VIEWPORT = {"width": 2100, "height": 1400}


def _get_json(url: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=30) as r:
        return json.loads(r.read())


def _put_input_files(base: Path) -> dict[str, Path]:
    """The files the examples name, made for the tiny model: LoRAs in models/loras, pictures in input/."""
    loras = base / "models" / "loras"
    files = exampleinputs.make_tiny_loras(loras, {exampleparts.CONTENT_LORA: (RANK, 1)}, text_encoder=True)
    files |= exampleinputs.make_tiny_loras(loras, {exampleparts.STYLE_LORA: (RANK, 2),
                                                   exampleparts.CONTENT2_LORA: (RANK_C2, 3)})
    files |= exampleinputs.make_reference_images(base / "input", size=SIZE)
    return files


_READY = """() => {
    const app = window.comfyAPI?.app?.app;
    return !!(app && app.vueAppReady && app.graph && app.canvas
              && window.LiteGraph?.registered_node_types?.DuoLoRA_ZipRankMerge);
}"""


@dataclass
class UserPage:
    """A second tab of the session's browser, opened after the input files exist, with its own log of
    console messages and page errors (the session's shared page keeps its log for the other tests)."""

    page: Any
    console: list[tuple[str, str, str]] = field(default_factory=list)  # (type, text, source url)
    page_errors: list[str] = field(default_factory=list)

    def problems_of_ours(self) -> list[str]:
        """Console errors/warnings whose source is our extension, and page errors naming it.
        (ComfyUI's front end also tries to look nodes up on api.comfy.org; the server's CSP blocks that,
        and those messages come from its own bundle, not from us.)"""
        ours = f"/extensions/{PACK}/"
        found = [f"console {k}: {text} ({src})" for k, text, src in self.console
                 if k in ("error", "warning") and (ours in src or text.startswith("[DuoLoRA]"))]
        return found + [e for e in self.page_errors if "duolora" in e.lower()]


@pytest.fixture
def user_page(browser_session: BrowserSession) -> Iterator[UserPage]:
    """Put the files the examples name into the server's folders, then open ComfyUI in a new tab."""
    _put_input_files(browser_session.base_directory)
    page = browser_session.page.context.new_page()
    page.set_default_timeout(30_000)
    user = UserPage(page)
    page.on("console", lambda m: user.console.append((m.type, m.text, (m.location or {}).get("url", ""))))
    page.on("pageerror", lambda e: user.page_errors.append(f"{e}\n{getattr(e, 'stack', '')}"))
    try:
        page.goto(browser_session.url, wait_until="domcontentloaded", timeout=90_000)
        page.wait_for_function(_READY, timeout=90_000)
        yield user
    finally:
        page.close()


def _combo_options(page: Any, node_type: str, name: str) -> list:
    """The options the front end offers in a node type's combo widget (from the server's /object_info)."""
    return page.evaluate(
        """([type, name]) => {
            const spec = window.LiteGraph.registered_node_types[type]?.nodeData?.input?.required?.[name];
            return Array.isArray(spec?.[0]) ? spec[0] : (spec?.[1]?.options ?? []);
        }""",
        [node_type, name],
    )


def _open_template(page: Any, name: str = FIRST, node_type: str = MERGE) -> None:
    """Templates → DuoLoRA → the card titled ``name`` (a workflow with a ``node_type`` node), as a user clicks."""
    page.evaluate("() => { window.comfyAPI.app.app.graph.clear(); }")
    dialog = frontendpage.page_open_template_pack(page, CATEGORY, timeout=90_000)
    dialog.get_by_text(name, exact=True).first.click(timeout=90_000)
    page.wait_for_function(f"() => window.comfyAPI.app.app.graph._nodes.some(n => n.type === '{node_type}')")
    dialog.wait_for(state="hidden")
    page.wait_for_timeout(500)


_JS_STATE = """() => {
    const app = window.comfyAPI.app.app;
    return {
        types: app.graph._nodes.map(n => n.type),
        unknown: app.graph._nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type),
        dialogs: [...document.querySelectorAll('[role=dialog]')].filter(d => d.offsetParent !== null)
            .map(d => d.innerText.slice(0, 200)),
    };
}"""

# Swap one node for another of a different type: same place, every output link re-made from the output of
# the same type on the new node to the same target input, then the old node removed. Returns the new id and
# the links before/after as [output type, target id, target slot].
_JS_REPLACE = """([oldType, newType]) => {
    const app = window.comfyAPI.app.app, graph = app.graph, LiteGraph = window.LiteGraph;
    const olds = graph._nodes.filter(n => n.type === oldType);
    if (olds.length !== 1) return {error: `${olds.length} nodes of type ${oldType}`};
    const old = olds[0];
    const link = (id) => graph.getLink?.(id) ?? graph.links?.get?.(id) ?? graph.links?.[id];
    const outgoing = (node) => node.outputs.flatMap(o => (o.links ?? []).map(id => {
        const l = link(id);
        return [o.type, l.target_id, l.target_slot];
    }));
    const before = outgoing(old);
    const fresh = LiteGraph.createNode(newType);
    if (!fresh) return {error: `no node type ${newType}`};
    fresh.pos = [old.pos[0], old.pos[1]];
    graph.add(fresh);
    for (const [type, targetId, targetSlot] of before) {
        const slot = fresh.outputs.findIndex(o => o.type === type);
        if (slot < 0) return {error: `${newType} has no ${type} output`};
        fresh.connect(slot, graph.getNodeById(targetId), targetSlot);
    }
    graph.remove(old);
    app.canvas.setDirty(true, true);
    return {id: fresh.id, before, after: outgoing(fresh), outputs: fresh.outputs.map(o => o.type)};
}"""

_JS_SET_WIDGET = """([id, name, value]) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph.getNodeById(id);
    const w = node?.widgets?.find(w => w.name === name);
    if (!w) return false;
    w.value = value;
    w.callback?.(w.value, app.canvas, node);
    app.canvas.setDirty(true, true);
    return true;
}"""

# What the server sends to this page, recorded next to (not instead of) the extension's own listeners.
_JS_LISTEN = """() => {
    const api = window.comfyAPI.api.api;
    const log = {progress: [], done: [], success: [], errors: [], executed: []};
    api.addEventListener('duolora.progress', e => log.progress.push(e.detail));
    api.addEventListener('duolora.done', e => log.done.push(e.detail));
    api.addEventListener('execution_success', e => log.success.push(e.detail));
    api.addEventListener('execution_error', e => log.errors.push(e.detail));
    api.addEventListener('executed', e => log.executed.push(e.detail));
    window.__duoloraE2E = log;
    return window.__duolora?.progressEvents ?? null;
}"""

_JS_LOSS = """(id) => {
    const node = window.comfyAPI.app.app.graph.getNodeById(id);
    const loss = node?.__duolora?.loss;
    if (!loss) return null;
    const canvas = loss.canvas;
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let blue = 0;  // the content series' colour (#3b82f6): the drawn curve, not the text
    for (let i = 0; i < data.length; i += 4) {
        if (Math.abs(data[i] - 0x3b) < 40 && Math.abs(data[i + 1] - 0x82) < 40
            && Math.abs(data[i + 2] - 0xf6) < 40 && data[i + 3] > 128) blue++;
    }
    return {steps: [...loss.state.steps], total: loss.state.total, done: loss.state.done,
            series: Object.fromEntries(Object.entries(loss.state.series).map(([k, v]) => [k, [...v]])),
            points: Number(canvas.dataset.points), label: canvas.getAttribute('aria-label'), blue,
            visible: canvas.offsetParent !== null && canvas.clientWidth > 0,
            progressEvents: window.__duolora?.progressEvents ?? null};
}"""

_JS_FIT_NODES = """([ids, margin]) => {
    const app = window.comfyAPI.app.app;
    const nodes = ids.map(id => app.graph.getNodeById(id));
    const groups = app.graph._groups.filter(g => nodes.some(n => {
        const b = g._bounding ? [...g._bounding] : [...g.bounding];
        return n.pos[0] >= b[0] && n.pos[0] < b[0] + b[2] && n.pos[1] >= b[1] && n.pos[1] < b[1] + b[3];
    }));
    const boxes = [...nodes.map(n => [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30]),
                   ...groups.map(g => g._bounding ? [...g._bounding] : [...g.bounding])];
    const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
    const x1 = Math.max(...boxes.map(b => b[0] + b[2])), y1 = Math.max(...boxes.map(b => b[1] + b[3]));
    // Fit into the part of the canvas that ComfyUI's own panels leave free: right of the side bar, below
    // the tabs, the breadcrumb and the Run bar, above the zoom buttons.
    const el = app.canvas.canvas, rect = el.getBoundingClientRect();
    const edge = (selector, side) => [...document.querySelectorAll(selector)]
        .map(e => e.getBoundingClientRect()).filter(r => r.width > 0 && r.height > 0).map(r => r[side]);
    const left = Math.max(rect.left, ...edge('.side-tool-bar-container', 'right')) - rect.left;
    const top = Math.max(rect.top, ...edge('.workflow-tabs-container, .subgraph-breadcrumb, .actionbar',
                                           'bottom')) - rect.top;
    const W = el.clientWidth - left, H = el.clientHeight - top - 50;
    const scale = Math.min((W - 2 * margin) / (x1 - x0), (H - 2 * margin) / (y1 - y0));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [left / scale + (W / scale - (x1 - x0)) / 2 - x0,
                            top / scale + (H / scale - (y1 - y0)) / 2 - y0];
    app.canvas.setDirty(true, true);
    return {box: [x0, y0, x1, y1], scale, groups: groups.map(g => g.title)};
}"""


# Where the loss curve and a node are on the page (CSS pixels of the viewport).
_JS_REGIONS = """(reportId) => {
    const app = window.comfyAPI.app.app;
    const canvas = [...document.querySelectorAll('.duolora-loss canvas')].find(c => c.offsetParent !== null);
    const c = canvas.getBoundingClientRect();
    const r = app.canvas.canvas.getBoundingClientRect();
    const n = app.graph.getNodeById(reportId);
    const [x, y] = app.canvas.ds.convertOffsetToCanvas([n.pos[0], n.pos[1]]);
    const s = app.canvas.ds.scale;
    return {loss: [c.left, c.top, c.right, c.bottom],
            report: [r.left + x, r.top + y, r.left + x + n.size[0] * s, r.top + y + n.size[1] * s]};
}"""


def _umask() -> int:
    # The server process inherits this process's umask (devtools/comfyserver.py starts it).
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _node_ids(page: Any, node_type: str) -> list[int]:
    return page.evaluate("(t) => window.comfyAPI.app.app.graph._nodes.filter(n => n.type === t).map(n => n.id)",
                           node_type)


def _set_widget(page: Any, node_id: int, name: str, value: object) -> None:
    assert page.evaluate(_JS_SET_WIDGET, [node_id, name, value]), f"node {node_id} has no widget {name!r}"


def _small_and_fast(page: Any) -> None:
    """Few sampler steps and a small canvas, set through the widgets by name."""
    for node_id in _node_ids(page, "KSampler"):
        _set_widget(page, node_id, "steps", SAMPLER_STEPS)
    for node_id in _node_ids(page, "EmptyLatentImage"):
        _set_widget(page, node_id, "width", SIZE)
        _set_widget(page, node_id, "height", SIZE)


def _open_shipped(page: Any, url: str, name: str, node_type: str = MERGE) -> dict:
    """The example ``name`` from the template browser: every node of the shipped file known, no missing-nodes
    dialog, and the front end's prompt the converter's. Returns that prompt (the shipped workflow in API form)."""
    _open_template(page, name, node_type)
    state = page.evaluate(_JS_STATE)
    shipped = workflowformat.load(EXAMPLES / f"{name}.json")
    assert sorted(state["types"]) == sorted(n["type"] for n in shipped["nodes"])
    assert state["unknown"] == [] and state["dialogs"] == [], state
    shipped_api = workflowformat.ui_to_api(shipped, _get_json(url + "/object_info"))
    assert frontendpage.page_graph_to_prompt(page) == shipped_api
    return shipped_api


def _click_run(page: Any) -> tuple[str, dict]:
    """Press the Run button as a user; returns the prompt id the server gave and the prompt the page posted.
    The Run button sits inside [data-testid=queue-button] up to front end 1.35.9; 1.49.6 draws it elsewhere."""
    run = page.locator('[data-testid="queue-button"]').get_by_role("button", name=re.compile(r"^\s*Run\s*$")).or_(
        page.get_by_role("button", name=re.compile(r"^\s*Run\s*$")).filter(visible=True))
    with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as posted:
        run.first.click()
    assert posted.value.status == 200, posted.value.text()
    return posted.value.json()["prompt_id"], posted.value.request.post_data_json["prompt"]


def _wait_for_history(url: str, prompt_id: str, timeout: float) -> dict:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        entry = _get_json(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
            return entry
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not finish within {timeout:.0f} s; queue: "
                         f"{_get_json(url + '/queue')}")


def _expected_prompt(shipped_api: dict, tiny_id: str) -> dict:
    """The shipped workflow's API prompt after the user's edits: the checkpoint loader replaced by the tiny
    one (id ``tiny_id``, links to it renamed), lowered steps and image size, and nothing else."""
    (ckpt_id,) = workflowformat.nodes_of_type(shipped_api, workflowformat.CHECKPOINT_LOADER)
    expected = {}
    for node_id, entry in workflowformat.use_tiny_checkpoint(shipped_api).items():
        inputs = {name: ([tiny_id, value[1]] if isinstance(value, list) and value[0] == ckpt_id else value)
                  for name, value in entry["inputs"].items()}
        if entry["class_type"] == MERGE:
            inputs["steps"] = MERGE_STEPS
        elif entry["class_type"] == "KSampler":
            inputs["steps"] = SAMPLER_STEPS
        elif entry["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = SIZE
        expected[tiny_id if node_id == ckpt_id else node_id] = {**entry, "inputs": inputs}
    return expected


def _save_screenshot(page: Any, node_ids: list[int], report_id: int, name: str = "20_end_to_end",
                     picture: Path = SCREENSHOT) -> tuple[Path, dict]:
    """The finished graph around ``node_ids`` (their groups included), rendered large and scaled to
    SCREENSHOT_WIDTH; saved to ARTIFACTS/<name>.png and, in the run that draws the README's pictures
    ($DUOLORA_README_HOST=1: scripts/test_hosts.sh sets it for ComfyUI 0.33.0), as ``picture``.
    Returns the path and the boxes (in the saved picture's pixels) of the loss curve and the report node."""
    old_viewport = page.viewport_size
    setting = "async ([k, v]) => await window.comfyAPI.app.app.extensionManager.setting.set(k, v)"
    lod = page.evaluate("(k) => window.comfyAPI.app.app.extensionManager.setting.get(k)",
                        "LiteGraph.Canvas.MinFontSizeForLOD")
    info = page.evaluate("(k) => window.comfyAPI.app.app.extensionManager.setting.get(k)", "Comfy.Graph.CanvasInfo")
    try:
        # Full detail at any zoom (no level-of-detail boxes instead of text and widgets).
        page.evaluate(setting, ["LiteGraph.Canvas.MinFontSizeForLOD", 0])
        page.evaluate(setting, ["Comfy.Graph.CanvasInfo", False])
        page.set_viewport_size(SCREENSHOT_VIEWPORT)
        page.wait_for_timeout(300)
        page.evaluate(_JS_FIT_NODES, [node_ids, 20])
        # Keep the canvas drawing until the report's preview image and our DOM widgets are in place.
        page.wait_for_function("""() => {
            const app = window.comfyAPI.app.app;
            app.canvas.setDirty(true, true);
            return [...document.querySelectorAll('.duolora-loss canvas')].some(c => c.offsetParent !== null);
        }""")
        page.wait_for_timeout(800)
        png = page.screenshot()
        regions = page.evaluate(_JS_REGIONS, report_id)
    finally:
        page.set_viewport_size(old_viewport)
        page.evaluate(setting, ["LiteGraph.Canvas.MinFontSizeForLOD", lod])
        page.evaluate(setting, ["Comfy.Graph.CanvasInfo", info])
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img = img.resize((SCREENSHOT_WIDTH, round(img.height * SCREENSHOT_WIDTH / img.width)), Image.Resampling.LANCZOS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / f"{name}.png"
    img.save(out, format="PNG", optimize=True)
    if os.environ.get("DUOLORA_README_HOST") == "1":
        picture.parent.mkdir(parents=True, exist_ok=True)
        img.save(picture, format="PNG", optimize=True)
    k = SCREENSHOT_WIDTH / SCREENSHOT_VIEWPORT["width"]
    return out, {name: [round(v * k) for v in box] for name, box in regions.items()}


def test_example_with_pictures_runs_end_to_end_from_the_ui(browser_session: BrowserSession, user_page: UserPage,
                                                tiny_layout) -> None:
    s = browser_session
    page = user_page.page
    base = s.base_directory
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    # 1. The LoRAs and pictures were put in place before the page loaded: the loaders list them.
    for node_type in ("DuoLoRA_LoadContentLoRA", "DuoLoRA_LoadStyleLoRA"):
        options = _combo_options(page, node_type, "lora_name")
        assert {exampleparts.CONTENT_LORA, exampleparts.STYLE_LORA} <= set(options), options
    images = set(_combo_options(page, "LoadImage", "image"))
    assert {*exampleparts.CONTENT_IMAGES, exampleparts.STYLE_IMAGE} <= images, images

    # 2. Example 3 from the template browser: every node known, no missing-nodes dialog.
    _open_template(page)
    state = page.evaluate(_JS_STATE)
    shipped = workflowformat.load(EXAMPLES / f"{FIRST}.json")
    assert sorted(state["types"]) == sorted(n["type"] for n in shipped["nodes"])
    assert state["unknown"] == [] and state["dialogs"] == [], state
    object_info = _get_json(s.url + "/object_info")
    shipped_api = workflowformat.ui_to_api(shipped, object_info)
    assert frontendpage.page_graph_to_prompt(page) == shipped_api
    timings["opened_s"] = time.monotonic() - t0

    # 3. Load Checkpoint -> Tiny SDXL checkpoint, with its MODEL, CLIP and VAE going where they went before.
    replaced = page.evaluate(_JS_REPLACE, [workflowformat.CHECKPOINT_LOADER, workflowformat.TINY_CHECKPOINT])
    assert "error" not in replaced, replaced
    assert replaced["outputs"] == ["MODEL", "CLIP", "VAE"]
    (ckpt,) = workflowformat.nodes_of_type(shipped, workflowformat.CHECKPOINT_LOADER)
    shipped_links = sorted([kind, target, slot] for _, origin, _, target, slot, kind in shipped["links"]
                           if origin == int(ckpt))
    # Node ids as numbers: front end 1.49.6 gives a loaded link's target id as a string, a new link's as a number.
    before, after = ([[kind, int(target), slot] for kind, target, slot in replaced[k]] for k in ("before", "after"))
    assert sorted(before) == shipped_links and len(shipped_links) == 9, replaced
    assert sorted(after) == shipped_links, replaced

    # 4. Small image and few steps, set through the widgets by name.
    (merge_id,) = _node_ids(page, MERGE)
    (report_id,) = _node_ids(page, REPORT)
    _set_widget(page, merge_id, "steps", MERGE_STEPS)
    _small_and_fast(page)
    front_end = frontendpage.page_graph_to_prompt(page)
    assert front_end == _expected_prompt(shipped_api, str(replaced["id"]))

    # 5. Look at the merge node (zoomed in far enough for ComfyUI to show its DOM widgets), then Run, as a
    #    user: the Run button. The page's websocket carries everything back.
    page.evaluate(_JS_FIT_NODES, [[merge_id, report_id], 20])
    page.wait_for_function("""() => {
        window.comfyAPI.app.app.canvas.setDirty(true, true);
        return [...document.querySelectorAll('.duolora-loss canvas')].some(c => c.offsetParent !== null
                                                                             && c.clientWidth > 0);
    }""")
    events_before = page.evaluate(_JS_LISTEN)
    assert events_before is not None, "duolora.js is not loaded (window.__duolora is unset)"
    prompt_id, posted = _click_run(page)
    assert posted == front_end
    t_run = time.monotonic()
    history = _wait_for_history(s.url, prompt_id, RUN_TIMEOUT_S)
    timings["run_s"] = time.monotonic() - t_run
    page.wait_for_function("() => window.__duoloraE2E.success.length + window.__duoloraE2E.errors.length > 0")
    log = page.evaluate("() => window.__duoloraE2E")

    # The prompt finished without an error.
    status = history["status"]
    assert log["errors"] == [] and status["status_str"] == "success" and status["completed"] is True, status
    assert [m[0] for m in status["messages"]].count("execution_error") == 0
    assert [e["prompt_id"] for e in log["success"]] == [prompt_id]

    # 6. The loss curve was drawn from the server's own duolora.progress messages: one point per step.
    progress = [p for p in log["progress"] if p["node"] == str(merge_id)]
    assert [(p["step"], p["total"]) for p in progress] == [(i, MERGE_STEPS) for i in range(1, MERGE_STEPS + 1)]
    assert all(math.isfinite(v) for p in progress for v in p["losses"].values())
    assert set(progress[0]["losses"]) == {"total", "content", "style", "prior"}  # the defaults: Constyle off
    page.evaluate("() => window.comfyAPI.app.app.canvas.setDirty(true, true)")
    curve = page.evaluate(_JS_LOSS, merge_id)
    assert curve is not None, "the merge node has no loss curve"
    assert curve["steps"] == list(range(1, MERGE_STEPS + 1)) and curve["total"] == MERGE_STEPS, curve
    assert curve["series"] == {k: [p["losses"][k] for p in progress] for k in progress[0]["losses"]}
    assert curve["points"] == MERGE_STEPS * len(progress[0]["losses"]), curve
    assert curve["progressEvents"] - events_before == MERGE_STEPS
    assert curve["blue"] > 20, f"no content curve on the canvas: {curve}"
    (done,) = [d for d in log["done"] if d["node"] == str(merge_id)]
    assert curve["done"] is True and curve["label"].startswith(f"loss · step {MERGE_STEPS} / {MERGE_STEPS} · done")
    assert done["kept_rank"] and set(done["kept_rank"]) <= set(ATTENTION_BLOCKS), done
    assert all(0 <= kept[role] <= RANK for kept in done["kept_rank"].values() for role in ("content", "style"))

    # 7. The Merge Report shows its preview: ComfyUI loaded the node's ui image into the node.
    outputs = history["outputs"]
    (preview,) = outputs[str(report_id)]["images"]
    preview_path = base / preview["type"] / preview["subfolder"] / preview["filename"]
    with Image.open(preview_path) as img:
        preview_size = img.size
    page.wait_for_function(
        """(id) => {
            const app = window.comfyAPI.app.app;
            app.canvas.setDirty(true, true);
            return (app.graph.getNodeById(id)?.imgs?.[0]?.naturalWidth ?? 0) > 0;
        }""",
        arg=report_id,
    )
    shown = page.evaluate(
        "(id) => { const i = window.comfyAPI.app.app.graph.getNodeById(id).imgs[0];"
        " return {w: i.naturalWidth, h: i.naturalHeight, src: i.src}; }", report_id)
    assert (shown["w"], shown["h"]) == preview_size and preview["filename"] in shown["src"], (shown, preview)

    # 8. Files: the merged LoRA in models/loras (at most rank r_c + r_s per layer, 3 steps done), the image
    #    in output/ at the size set above.
    (save_lora_id,) = _node_ids(page, SAVE_LORA)
    (relative,) = outputs[str(save_lora_id)]["text"]
    merged = base / "models" / "loras" / relative
    assert merged.is_file() and merged.suffix == ".safetensors", merged
    # The node shows the user where the file went, and the file is as readable as the run's images.
    shown_name = page.get_by_role("status").filter(has_text=relative)
    assert shown_name.inner_text() == f"Saved in your loras folder as {relative} (press R to list it in Load LoRA)"
    assert stat.S_IMODE(merged.stat().st_mode) == 0o666 & ~_umask()
    lora = formats.read_lora(merged, layouts=(tiny_layout,))
    assert lora.metadata["duolora_steps_done"] == str(MERGE_STEPS)
    assert lora.metadata["duolora_content"] == exampleparts.CONTENT_LORA
    assert lora.metadata["duolora_style"] == exampleparts.STYLE_LORA
    assert 0 < max(layer.rank for layer in lora.layers.values()) <= 2 * RANK
    (save_image_id,) = _node_ids(page, "SaveImage")
    (image,) = outputs[str(save_image_id)]["images"]
    with Image.open(base / "output" / image["subfolder"] / image["filename"]) as img:
        assert img.size == (SIZE, SIZE) and image["type"] == "output"

    # 9. The picture of the finished graph: the merge, its report and the generated image.
    (sampler_id,) = _node_ids(page, "KSampler")
    shot, regions = _save_screenshot(page, [merge_id, report_id, save_lora_id, sampler_id, save_image_id], report_id)
    with Image.open(shot) as img:
        assert img.width == SCREENSHOT_WIDTH and 700 <= img.height <= 1100, img.size
        assert 0 <= min(regions["loss"] + regions["report"]) and max(regions["loss"][2], regions["report"][2]) <= img.width
        assert max(regions["loss"][3], regions["report"][3]) <= img.height, regions
        curve_px = np.asarray(img.convert("RGB").crop(regions["loss"]), dtype=np.int16)
        report_px = np.asarray(img.convert("RGB").crop(regions["report"]), dtype=np.int16)
    # In the picture: the loss curve's coloured series (the empty curve is grey on dark grey), and the
    # report's light image in its node.
    coloured = (curve_px.max(axis=-1) - curve_px.min(axis=-1) > 60).sum()
    assert coloured > 200, f"the loss curve is not on the screenshot ({coloured} coloured pixels in {regions['loss']})"
    light = (report_px.min(axis=-1) > 230).sum()
    assert light > 0.25 * report_px.shape[0] * report_px.shape[1], (
        f"the report preview is not on the screenshot ({light} light pixels in {regions['report']})")
    assert user_page.problems_of_ours() == []
    timings["total_s"] = time.monotonic() - t0
    (ARTIFACTS / "end_to_end_timings.json").write_text(json.dumps(timings, indent=1), encoding="utf-8")


def test_the_klora_workflow_runs_from_the_ui(browser_session: BrowserSession, user_page: UserPage) -> None:
    """The K-LoRA example, opened from the template browser and run with the Run button: the same user steps as
    workflow 1 (tiny checkpoint in place of Load Checkpoint, small canvas, few steps), nothing merged or saved
    but the image. Its picture goes to <artifacts>/21_klora.png only."""
    s = browser_session
    page = user_page.page
    shipped_api = _open_shipped(page, s.url, KLORA_WORKFLOW, KLORA)

    replaced = page.evaluate(_JS_REPLACE, [workflowformat.CHECKPOINT_LOADER, workflowformat.TINY_CHECKPOINT])
    assert "error" not in replaced and len(replaced["after"]) == 4, replaced  # MODEL, 2 × CLIP, VAE
    _small_and_fast(page)
    front_end = frontendpage.page_graph_to_prompt(page)
    assert front_end == _expected_prompt(shipped_api, str(replaced["id"]))

    (klora_id,) = _node_ids(page, KLORA)
    (sampler_id,) = _node_ids(page, "KSampler")
    (save_image_id,) = _node_ids(page, "SaveImage")
    page.evaluate(_JS_LISTEN)
    prompt_id, posted = _click_run(page)
    assert posted == front_end
    history = _wait_for_history(s.url, prompt_id, RUN_TIMEOUT_S)
    status = history["status"]
    assert status["status_str"] == "success" and status["completed"] is True, status
    page.wait_for_function("() => window.__duoloraE2E.success.length + window.__duoloraE2E.errors.length > 0")
    log = page.evaluate("() => window.__duoloraE2E")
    assert log["errors"] == [] and [e["prompt_id"] for e in log["success"]] == [prompt_id]
    # The image sampled through Apply K-LoRA's MODEL was saved at the canvas size.
    assert str(save_image_id) in {str(e["node"]) for e in log["executed"]}
    (image,) = history["outputs"][str(save_image_id)]["images"]
    with Image.open(s.base_directory / "output" / image["subfolder"] / image["filename"]) as img:
        assert img.size == (SIZE, SIZE) and image["type"] == "output"
    page.evaluate(_JS_FIT_NODES, [[klora_id, sampler_id, save_image_id], 20])
    page.wait_for_timeout(500)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "21_klora.png"))


def test_quick_start_merges_two_loras_and_shows_where_the_file_went(browser_session: BrowserSession,
                                                                   user_page: UserPage, tiny_layout) -> None:
    """The README's quick start as a user follows it: open "1. Merge two LoRAs in seconds", (pick the LoRAs: the
    template names the two files put in models/loras), press Run, read the saved file's name in Save Merged
    LoRA, find the file. Only the checkpoint is swapped for the tiny test model."""
    s = browser_session
    page = user_page.page
    _open_template(page, examplegraphs.QUICK)
    state = page.evaluate(_JS_STATE)
    shipped = workflowformat.load(EXAMPLES / f"{examplegraphs.QUICK}.json")
    assert sorted(state["types"]) == sorted(n["type"] for n in shipped["nodes"])
    assert state["unknown"] == [] and state["dialogs"] == [], state
    # Each LoRA is picked once, in its loader; no picture or prompt is asked for.
    assert exampleinputs.input_file_names(shipped) == {"loras": [exampleparts.CONTENT_LORA, exampleparts.STYLE_LORA],
                                                       "images": [], "checkpoints": [exampleparts.CKPT]}
    replaced = page.evaluate(_JS_REPLACE, [workflowformat.CHECKPOINT_LOADER, workflowformat.TINY_CHECKPOINT])
    assert "error" not in replaced and [kind for kind, _, _ in replaced["after"]] == ["MODEL"], replaced
    (merge_id,) = _node_ids(page, MERGE)
    (save_id,) = _node_ids(page, SAVE_LORA)
    page.evaluate(_JS_FIT_NODES, [_node_ids(page, "DuoLoRA_LoadContentLoRA") + [merge_id, save_id], 20])
    page.evaluate(_JS_LISTEN)
    t0 = time.monotonic()
    prompt_id = _click_run(page)[0]
    history = _wait_for_history(s.url, prompt_id, RUN_TIMEOUT_S)
    run_s = time.monotonic() - t0
    assert history["status"]["status_str"] == "success", history["status"]

    # Weights mode learns no steps: the node says the merge is done and what it kept instead of a curve.
    page.wait_for_function("() => window.__duoloraE2E.done.length > 0")
    page.evaluate("() => window.comfyAPI.app.app.canvas.setDirty(true, true)")
    assert page.evaluate(_JS_LOSS, merge_id)["label"].startswith("merged · mean kept rank: content ")
    (relative,) = history["outputs"][str(save_id)]["text"]
    shown = page.get_by_role("status").filter(has_text=relative)
    shown.wait_for(state="visible")
    assert shown.inner_text() == f"Saved in your loras folder as {relative} (press R to list it in Load LoRA)"
    assert relative.startswith("duolora/merged_") and relative.endswith("_.safetensors")
    merged = s.base_directory / "models" / "loras" / relative
    assert stat.S_IMODE(merged.stat().st_mode) == 0o666 & ~_umask()
    lora = formats.read_lora(merged, layouts=(tiny_layout,))
    assert lora.metadata["duolora_mode"] == "weights" and lora.metadata["duolora_steps_done"] == "0"
    # Each loader shows what its file holds: which files went into the merge.
    for loader in ("DuoLoRA_LoadContentLoRA", "DuoLoRA_LoadStyleLoRA"):
        (loader_id,) = _node_ids(page, loader)
        (summary,) = history["outputs"][str(loader_id)]["text"]
        assert summary.startswith("kohya_ldm · ") and summary.endswith(" · rank 8"), summary
        assert page.get_by_role("status").filter(has_text=re.compile(f"^{re.escape(summary)}$")).count() == 1
    (report_id,) = _node_ids(page, REPORT)
    page.wait_for_function(
        """(id) => {
            const app = window.comfyAPI.app.app;
            app.canvas.setDirty(true, true);
            return (app.graph.getNodeById(id)?.imgs?.[0]?.naturalWidth ?? 0) > 0;
        }""", arg=report_id)
    everything = page.evaluate("() => window.comfyAPI.app.app.graph._nodes.map(n => n.id)")
    shot, _ = _save_screenshot(page, everything, report_id, "21_quick_start_after_run", QUICK_START_PICTURE)
    with Image.open(shot) as img:
        assert img.width == SCREENSHOT_WIDTH and 500 <= img.height <= 1100, img.size
    (ARTIFACTS / "quick_start_timings.json").write_text(json.dumps({"run_s": run_s}, indent=1), encoding="utf-8")
    assert user_page.problems_of_ours() == []


def test_cancel_leaves_a_curve_that_says_cancelled(browser_session: BrowserSession, user_page: UserPage) -> None:
    """A long merge, cancelled with ComfyUI's own Cancel button after two steps: the node's curve says so
    instead of standing at "step 2 / 200" as if the merge still ran."""
    s = browser_session
    page = user_page.page
    _open_template(page)
    replaced = page.evaluate(_JS_REPLACE, [workflowformat.CHECKPOINT_LOADER, workflowformat.TINY_CHECKPOINT])
    assert "error" not in replaced, replaced
    (merge_id,) = _node_ids(page, MERGE)
    _set_widget(page, merge_id, "steps", 200)
    for node_id in _node_ids(page, "EmptyLatentImage"):
        _set_widget(page, node_id, "width", SIZE)
        _set_widget(page, node_id, "height", SIZE)
    page.evaluate(_JS_FIT_NODES, [[merge_id], 20])
    page.evaluate(_JS_LISTEN)
    prompt_id = _click_run(page)[0]
    page.wait_for_function(f"() => window.__duoloraE2E.progress.filter(p => p.node === '{merge_id}').length >= 2",
                           timeout=RUN_TIMEOUT_S * 1000)
    page.get_by_role("button", name="Cancel current run").click()
    history = _wait_for_history(s.url, prompt_id, RUN_TIMEOUT_S)
    messages = [m[0] for m in history["status"]["messages"]]
    assert "execution_interrupted" in messages and history["status"]["completed"] is False, history["status"]
    page.evaluate("() => window.comfyAPI.app.app.canvas.setDirty(true, true)")
    curve = page.evaluate(_JS_LOSS, merge_id)
    steps = len(curve["steps"])
    assert 2 <= steps < 200 and curve["label"] == f"loss · step {steps} / 200 · cancelled", curve
    s.screenshot("22_cancelled_merge")
    assert user_page.problems_of_ours() == []


def test_multi_concept_workflow_runs_end_to_end_from_the_ui(browser_session: BrowserSession, user_page: UserPage,
                                                            tiny_layout) -> None:
    """The multi-concept example from the template browser: two subjects (Load Content LoRA → Add Content LoRA,
    each with its own picture and prompts) and one style merged into one LoRA, applied, and sampled once per
    subject; the same user steps as example 3 (tiny checkpoint, small canvas, few steps)."""
    s = browser_session
    page = user_page.page
    base = s.base_directory
    assert exampleparts.CONTENT2_LORA in _combo_options(page, "DuoLoRA_AddContentLoRA", "lora_name")
    assert set(exampleparts.CONTENT2_IMAGES) <= set(_combo_options(page, "LoadImage", "image"))
    shipped_api = _open_shipped(page, s.url, MULTI)
    replaced = page.evaluate(_JS_REPLACE, [workflowformat.CHECKPOINT_LOADER, workflowformat.TINY_CHECKPOINT])
    assert "error" not in replaced and replaced["outputs"] == ["MODEL", "CLIP", "VAE"], replaced
    (merge_id,) = _node_ids(page, MERGE)
    (report_id,) = _node_ids(page, REPORT)
    (add_id,) = _node_ids(page, "DuoLoRA_AddContentLoRA")
    _set_widget(page, merge_id, "steps", MERGE_STEPS)
    _small_and_fast(page)
    front_end = frontendpage.page_graph_to_prompt(page)
    assert front_end == _expected_prompt(shipped_api, str(replaced["id"]))
    assert front_end[str(merge_id)]["inputs"]["content_lora"] == [str(add_id), 0]

    page.evaluate(_JS_FIT_NODES, [[merge_id, report_id], 20])
    page.evaluate(_JS_LISTEN)
    prompt_id, posted = _click_run(page)
    assert posted == front_end
    history = _wait_for_history(s.url, prompt_id, RUN_TIMEOUT_S)
    page.wait_for_function("() => window.__duoloraE2E.success.length + window.__duoloraE2E.errors.length > 0")
    log = page.evaluate("() => window.__duoloraE2E")
    status = history["status"]
    assert log["errors"] == [] and status["status_str"] == "success" and status["completed"] is True, status

    # One reconstruction term per content LoRA in the loss the page drew.
    progress = [p for p in log["progress"] if p["node"] == str(merge_id)]
    assert [p["step"] for p in progress] == list(range(1, MERGE_STEPS + 1))
    assert set(progress[0]["losses"]) == {"total", "content", "content2", "style", "prior"}
    (done,) = [d for d in log["done"] if d["node"] == str(merge_id)]
    assert all(set(kept) == {"content", "content2", "style", "layers"} for kept in done["kept_rank"].values())
    curve = page.evaluate(_JS_LOSS, merge_id)
    assert curve["done"] is True and "content2" in curve["label"], curve

    # The merged LoRA records all three files; at most r_c + r_c2 + r_s components per layer.
    outputs = history["outputs"]
    (save_lora_id,) = _node_ids(page, SAVE_LORA)
    (relative,) = outputs[str(save_lora_id)]["text"]
    lora = formats.read_lora(base / "models" / "loras" / relative, layouts=(tiny_layout,))
    md = lora.metadata
    assert (md["duolora_content"], md["duolora_content_2"], md["duolora_style"]) == (
        f"{exampleparts.CONTENT_LORA} + {exampleparts.CONTENT2_LORA}", exampleparts.CONTENT2_LORA,
        exampleparts.STYLE_LORA)
    assert 0 < max(layer.rank for layer in lora.layers.values()) <= 2 * RANK + RANK_C2
    # Two pictures, one per subject's prompt, at the size set above; the report's preview in its node.
    saves = _node_ids(page, "SaveImage")
    assert len(saves) == 2
    for save_id in saves:
        (image,) = outputs[str(save_id)]["images"]
        with Image.open(base / "output" / image["subfolder"] / image["filename"]) as img:
            assert img.size == (SIZE, SIZE)
    (preview,) = outputs[str(report_id)]["images"]
    page.wait_for_function(
        """(id) => {
            const app = window.comfyAPI.app.app;
            app.canvas.setDirty(true, true);
            return (app.graph.getNodeById(id)?.imgs?.[0]?.naturalWidth ?? 0) > 0;
        }""", arg=report_id)
    shown = page.evaluate("(id) => window.comfyAPI.app.app.graph.getNodeById(id).imgs[0].src", report_id)
    assert preview["filename"] in shown, (shown, preview)
    page.evaluate(_JS_FIT_NODES, [[merge_id, report_id, add_id, save_lora_id], 20])
    page.wait_for_timeout(800)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "23_multi_concept.png"))
    assert user_page.problems_of_ours() == []
