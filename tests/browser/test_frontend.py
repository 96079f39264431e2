"""The pack's front end in a real browser: a real ComfyUI 0.3.75 server, Debian's headless Chromium.

Checks what a user sees: the extension is served and loads without errors, every node of the pack sits under
"DuoLoRA" in the node library, ZipRank Merge shows mode, method, steps and balance and keeps the other settings
behind its "Show 23 advanced settings" button, the layer-prior diagram (with the advanced settings) follows
`prior_preset` and edits `custom_prior` in custom mode, the loss curve draws "duolora.progress" messages
arriving on the websocket and says when a run was cancelled or warned about, Save Merged LoRA shows the file it
saved, and the Merge Report's image preview is ComfyUI's own, untouched by us. Screenshots go to
test_artifacts/browser/.
"""

from __future__ import annotations

import io
import json
import re
import urllib.request
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from duolora.sdxl import ATTENTION_BLOCKS, PRESETS, parse_custom_preset

if TYPE_CHECKING:
    from conftest import BrowserSession

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PACK = "comfyui-duolora"
EXTENSION_FILES = ("duolora.js", "duolora_priors.js", "duolora_templates.js", "duolora_widgets.js")
# shared contract (notes/nodes_contract.md): node id -> display name; every one in category "DuoLoRA".
NODES = {
    "DuoLoRA_LoadContentLoRA": "Load Content LoRA",
    "DuoLoRA_LoadStyleLoRA": "Load Style LoRA",
    "DuoLoRA_ZipRankMerge": "ZipRank Merge (DuoLoRA)",
    "DuoLoRA_ApplyMergedLoRA": "Apply Merged LoRA",
    "DuoLoRA_SaveMergedLoRA": "Save Merged LoRA",
    "DuoLoRA_MergeReport": "Merge Report",
    "DuoLoRA_ApplyKLoRA": "Apply K-LoRA",
}
MERGE = "DuoLoRA_ZipRankMerge"
REPORT = "DuoLoRA_MergeReport"
SAVE = "DuoLoRA_SaveMergedLoRA"
OUR_WIDGETS = ("duolora_prior_diagram", "duolora_loss_curve", "duolora_advanced_toggle")
IN_VIEW = ["mode", "method", "balance", "steps"]  # ZipRank Merge's widgets a user sees without asking
N_ADVANCED = 23
SHOW_ADVANCED = f"▸ Show {N_ADVANCED} advanced settings"
HIDE_ADVANCED = f"▾ Hide the {N_ADVANCED} advanced settings"
LOSS_TERMS = ("total", "content", "style", "cycle")


def _get(url: str) -> tuple[int, bytes, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=30) as r:
        return r.status, r.read(), r.headers.get("Content-Type", "")


def _our_problems(s: BrowserSession) -> list[str]:
    """Console errors/warnings, page errors and failed requests that come from our extension."""
    ours = f"/extensions/{PACK}/"
    problems = [
        f"console {kind}: {text} ({src})"
        for kind, text, src in s.console
        if kind in ("error", "warning") and ("duolora" in text.lower() or ours in src)
    ]
    problems += [f"page error: {e}" for e in s.page_errors if "duolora" in e.lower()]
    problems += [f"HTTP {code}: {url}" for code, url in s.failed_requests if ours in url]
    return problems


def _fresh_graph(s: BrowserSession, scale: float = 1.0) -> None:
    s.page.evaluate(
        """(scale) => {
            const app = window.comfyAPI.app.app;
            app.graph.clear();
            app.canvas.ds.offset = [0, 0];
            app.canvas.ds.scale = scale;
            app.canvas.setDirty(true, true);
        }""",
        scale,
    )


def _add_node(s: BrowserSession, node_type: str, x: float, y: float) -> int:
    node_id = s.page.evaluate(
        """([type, x, y]) => {
            const app = window.comfyAPI.app.app;
            const node = window.LiteGraph.createNode(type);
            if (!node) return null;
            node.pos = [x, y];
            app.graph.add(node);
            app.canvas.setDirty(true, true);
            return node.id;
        }""",
        [node_type, x, y],
    )
    assert node_id is not None, f"the page has no node type {node_type!r} (LiteGraph.createNode returned null)"
    return node_id


def _widget_value(s: BrowserSession, node_id: int, name: str):
    return s.page.evaluate(
        "([id, name]) => window.comfyAPI.app.app.graph.getNodeById(id)?.widgets?.find(w => w.name === name)?.value",
        [node_id, name],
    )


def _set_widget(s: BrowserSession, node_id: int, name: str, value) -> None:
    """Set a widget the way litegraph does on a user edit: value, then callback(value, canvas, node)."""
    found = s.page.evaluate(
        """([id, name, value]) => {
            const app = window.comfyAPI.app.app;
            const node = app.graph.getNodeById(id);
            const w = node?.widgets?.find(w => w.name === name);
            if (!w) return false;
            w.value = value;
            w.callback?.(w.value, app.canvas, node);
            app.canvas.setDirty(true, true);
            return true;
        }""",
        [node_id, name, value],
    )
    assert found, f"node {node_id} has no widget named {name!r}"


def _diagram_roles(s: BrowserSession, node_id: int) -> dict[str, str]:
    return s.page.evaluate(
        """([id, name]) => {
            const node = window.comfyAPI.app.app.graph.getNodeById(id);
            const el = node?.widgets?.find(w => w.name === name)?.element;
            if (!el) return null;
            return Object.fromEntries([...el.querySelectorAll('[data-block]')]
                .map(g => [g.getAttribute('data-block'), g.getAttribute('data-role')]));
        }""",
        [node_id, OUR_WIDGETS[0]],
    )


def _expected_roles(roles: dict[str, str]) -> dict[str, str]:
    return {block: roles.get(block, "off") for block in ATTENTION_BLOCKS}


def _send_ws(s: BrowserSession, messages: list[dict]) -> None:
    """Deliver JSON messages through the page's websocket handler: the path a server message takes."""
    delivered = s.page.evaluate(
        """(messages) => {
            const socket = window.comfyAPI.api.api.socket;
            if (!socket) return false;
            for (const m of messages) socket.dispatchEvent(new MessageEvent('message', {data: JSON.stringify(m)}));
            return true;
        }""",
        messages,
    )
    assert delivered, "the page's api has no websocket (api.socket is null)"


def _merge_node_with_diagram(s: BrowserSession, scale: float = 1.0) -> int:
    """A new ZipRank Merge node with its advanced settings (and so the prior diagram) shown: the user's click on
    its button, or, where the front end draws nodes itself (Nodes 2.0), the node menu's "Show Advanced"."""
    _fresh_graph(s, scale)
    node_id = _add_node(s, MERGE, 300, 60)
    button = s.page.get_by_role("button", name=SHOW_ADVANCED, exact=True)
    s.page.wait_for_timeout(300)
    if button.count() and button.first.is_visible():
        button.click()
    else:
        s.page.evaluate("(id) => window.comfyAPI.app.app.graph.getNodeById(id).toggleAdvanced()", node_id)
    s.page.wait_for_selector(".duolora-prior [data-block]", state="visible")
    return node_id


_JS_NODE_LAYOUT = """(id) => {
    const node = window.comfyAPI.app.app.graph.getNodeById(id);
    return {visible: node.widgets.filter(w => node.isWidgetVisible(w)).map(w => w.name),
            advanced: node.widgets.filter(w => w.advanced).map(w => w.name),
            height: node.size[1], needed: node.computeSize()[1], shown: !!node.showAdvanced};
}"""


def test_merge_node_shows_what_a_user_decides_and_keeps_the_rest_one_click_away(
        browser_session: BrowserSession) -> None:
    s = browser_session
    _fresh_graph(s)
    node_id = _add_node(s, MERGE, 300, 60)
    s.page.get_by_role("button", name=SHOW_ADVANCED, exact=True).wait_for(state="visible")
    collapsed = s.page.evaluate(_JS_NODE_LAYOUT, node_id)
    assert collapsed["visible"] == [*IN_VIEW, "duolora_advanced_toggle", "duolora_loss_curve"], collapsed
    # 23 settings, the seed's "control after generate" and the prior diagram wait behind the button.
    assert len(collapsed["advanced"]) == N_ADVANCED + 2 and "duolora_prior_diagram" in collapsed["advanced"]
    assert collapsed["height"] == collapsed["needed"] <= 500, collapsed
    assert s.page.locator(".duolora-prior").first.is_hidden()
    # A new node keeps its seed between runs (randomized, every Run would merge and save again).
    assert _widget_value(s, node_id, "control_after_generate") == "fixed"
    s.screenshot("08_merge_node_collapsed")

    s.page.get_by_role("button", name=SHOW_ADVANCED, exact=True).click()
    expanded = s.page.evaluate(_JS_NODE_LAYOUT, node_id)
    assert expanded["shown"] is True and len(expanded["visible"]) == len(collapsed["visible"]) + N_ADVANCED + 2
    assert expanded["height"] == expanded["needed"] >= collapsed["height"] + N_ADVANCED * 20, expanded
    assert s.page.get_by_role("button", name=HIDE_ADVANCED, exact=True).get_attribute("aria-expanded") == "true"
    s.page.wait_for_selector(".duolora-prior [data-block]", state="visible")
    s.screenshot("09_merge_node_expanded")

    s.page.get_by_role("button", name=HIDE_ADVANCED, exact=True).click()
    again = s.page.evaluate(_JS_NODE_LAYOUT, node_id)
    assert again == collapsed
    # Hidden is not gone: every setting still goes to the server, and the workflow keeps every value.
    prompt = s.page.evaluate("async () => (await window.comfyAPI.app.app.graphToPrompt()).output")
    assert len(prompt[str(node_id)]["inputs"]) == len(IN_VIEW) + N_ADVANCED
    saved = s.page.evaluate("(id) => window.comfyAPI.app.app.graph.getNodeById(id).serialize()", node_id)
    assert len(saved["widgets_values"]) == len(IN_VIEW) + N_ADVANCED + 1  # and the seed's control widget
    assert _our_problems(s) == []


def test_save_node_shows_the_file_it_saved(browser_session: BrowserSession) -> None:
    s = browser_session
    _fresh_graph(s)
    node_id = _add_node(s, SAVE, 300, 60)
    status = s.page.get_by_role("status").filter(has_text="saved file")
    assert status.inner_text() == "After a run, the saved file's name appears here."
    # What ComfyUI sends once the node ran (its ui {"text": [path relative to models/loras]}).
    _send_ws(s, [{"type": "executed", "data": {"node": str(node_id), "display_node": str(node_id),
                                               "prompt_id": "duolora-browser-test",
                                               "output": {"text": ["duolora/merged_00007_.safetensors"]}}}])
    shown = s.page.get_by_role("status").filter(has_text="merged_00007_")
    assert shown.inner_text() == (
        "Saved in your loras folder as duolora/merged_00007_.safetensors (press R to list it in Load LoRA)")
    s.screenshot("12_save_node_file_name")
    # A loader shows what its file holds the same way (its ui text is the summary output).
    loader = _add_node(s, "DuoLoRA_LoadContentLoRA", 300, 260)
    summary = "kohya_ldm · SDXL · 722 layers (72 text encoder) · rank 16"
    _send_ws(s, [{"type": "executed", "data": {"node": str(loader), "display_node": str(loader),
                                               "prompt_id": "duolora-browser-test", "output": {"text": [summary]}}}])
    assert s.page.get_by_role("status").filter(has_text="kohya_ldm").inner_text() == summary
    assert _our_problems(s) == []


def test_extension_is_served_and_loaded(browser_session: BrowserSession) -> None:
    s = browser_session
    _, body, _ = _get(s.url + "/extensions")
    listed = json.loads(body)
    for name in EXTENSION_FILES:
        assert f"/extensions/{PACK}/{name}" in listed, f"{name} missing from /extensions: {listed[-8:]}"
    status, js, ctype = _get(f"{s.url}/extensions/{PACK}/duolora.js")
    assert status == 200 and "javascript" in ctype and b"app.registerExtension" in js
    flags = s.page.evaluate("() => window.__duolora ?? null")
    assert flags is not None, "duolora.js did not run in the page (window.__duolora is unset)"
    assert flags["loaded"] is True and flags["setup"] is True, flags
    assert any(t.startswith("[DuoLoRA] front-end extension") for _, t, _ in s.console), "no load line in console"
    s.screenshot("01_loaded")
    assert _our_problems(s) == []


def test_nodes_listed_under_duolora(browser_session: BrowserSession) -> None:
    s = browser_session
    _, body, _ = _get(s.url + "/object_info")
    info = json.loads(body)
    for node_id, display in NODES.items():
        assert node_id in info, f"/object_info has no {node_id}"
        assert info[node_id]["category"] == "DuoLoRA", (node_id, info[node_id]["category"])
        assert info[node_id]["display_name"] == display, (node_id, info[node_id]["display_name"])
    registered = s.page.evaluate(
        """(ids) => Object.fromEntries(ids.map(id => [id, window.LiteGraph.registered_node_types[id]?.category ?? null]))""",
        list(NODES),
    )
    assert registered == dict.fromkeys(NODES, "DuoLoRA")

    # The user's view: Node Library sidebar -> "DuoLoRA" folder -> every display name. Found by their text: each
    # front end draws the tree with other classes (1.49.6 lists pack categories under "Extensions").
    page = s.page
    page.locator(".node-library-tab-button").first.click()
    try:
        folder = page.get_by_text(re.compile(r"^\s*DuoLoRA\s*$")).filter(visible=True).first
        folder.wait_for(state="visible")
        folder.click()
        page.wait_for_timeout(300)
        shown = {d: page.get_by_text(d, exact=True).filter(visible=True).count() > 0 for d in NODES.values()}
        s.screenshot("02_node_library")
    finally:
        page.locator(".node-library-tab-button").first.click()  # close the sidebar again, whatever happened
    missing = [d for d, visible in shown.items() if not visible]
    assert missing == [], f"not shown under DuoLoRA in the node library: {missing}"
    assert _our_problems(s) == []


def test_prior_diagram_follows_preset_and_edits_custom_prior(browser_session: BrowserSession) -> None:
    s = browser_session
    node_id = _merge_node_with_diagram(s)
    # "auto" (the default) is paper on SDXL: the diagram draws paper's roles
    assert _widget_value(s, node_id, "prior_preset") == "auto"
    assert _diagram_roles(s, node_id) == _expected_roles(PRESETS["paper"])
    s.screenshot("03_prior_paper")
    for preset in ("code_literal", "b_lora", "none", "paper"):
        _set_widget(s, node_id, "prior_preset", preset)
        assert _diagram_roles(s, node_id) == _expected_roles(PRESETS[preset]), preset
    _set_widget(s, node_id, "prior_preset", "flux_splitflux")  # Flux.1's blocks: none of SDXL's drawn with a role
    assert set(_diagram_roles(s, node_id).values()) == {"off"}

    _set_widget(s, node_id, "prior_preset", "custom")
    _set_widget(s, node_id, "custom_prior", "")
    assert set(_diagram_roles(s, node_id).values()) == {"off"}

    def click(block: str) -> str:
        s.page.locator(f'.duolora-prior [data-block="{block}"]').click()
        return _widget_value(s, node_id, "custom_prior")

    # Real mouse clicks on the blocks: off -> content -> style -> off.
    assert click("output_blocks.3.1") == "content: output_blocks.3.1"
    assert click("output_blocks.3.1") == "style: output_blocks.3.1"
    assert click("input_blocks.7.1") == "content: input_blocks.7.1; style: output_blocks.3.1"
    assert click("middle_block.1") == "content: input_blocks.7.1, middle_block.1; style: output_blocks.3.1"
    value = click("input_blocks.4.1")
    assert value == "content: input_blocks.4.1, input_blocks.7.1, middle_block.1; style: output_blocks.3.1"
    # What the node will parse is what the diagram shows.
    assert _diagram_roles(s, node_id) == _expected_roles(parse_custom_preset(value))
    s.screenshot("04_prior_custom")
    assert click("output_blocks.3.1") == "content: input_blocks.4.1, input_blocks.7.1, middle_block.1"

    # A typed value is drawn too; outside custom mode a click changes nothing.
    _set_widget(s, node_id, "custom_prior", "style: input_blocks.8.1")
    assert _diagram_roles(s, node_id) == _expected_roles({"input_blocks.8.1": "style"})
    _set_widget(s, node_id, "prior_preset", "b_lora")
    click("input_blocks.5.1")
    assert _widget_value(s, node_id, "custom_prior") == "style: input_blocks.8.1"

    # Our widgets never reach the workflow file or the prompt: a save/load round trip keeps every value.
    saved = s.page.evaluate(
        """([id, type]) => {
            const LiteGraph = window.LiteGraph;
            const node = window.comfyAPI.app.app.graph.getNodeById(id);
            const data = JSON.parse(JSON.stringify(node.serialize()));
            const copy = LiteGraph.createNode(type);
            copy.configure(data);
            const values = (n) => Object.fromEntries(
                n.widgets.filter(w => w.serialize !== false).map(w => [w.name, w.value]));
            return {stored: data.widgets_values, before: values(node), after: values(copy)};
        }""",
        [node_id, MERGE],
    )
    assert None not in saved["stored"], f"holes in widgets_values: {saved['stored']}"
    assert saved["after"] == saved["before"] and saved["before"]["custom_prior"] == "style: input_blocks.8.1"
    prompt = s.page.evaluate("async () => (await window.comfyAPI.app.app.graphToPrompt()).output")
    inputs = prompt[str(node_id)]["inputs"]
    assert not set(OUR_WIDGETS) & set(inputs), sorted(inputs)
    assert inputs["prior_preset"] == "b_lora" and inputs["custom_prior"] == "style: input_blocks.8.1"
    assert _our_problems(s) == []


def test_js_custom_prior_syntax_round_trips_through_python(browser_session: BrowserSession) -> None:
    """The string the diagram writes is what duolora.sdxl.parse_custom_preset reads, and back."""
    s = browser_session
    cases = [
        {},
        {"middle_block.1": "content"},
        {"output_blocks.5.1": "style", "input_blocks.4.1": "content"},
        {b: ("content" if i % 2 else "style") for i, b in enumerate(ATTENTION_BLOCKS)},
    ]
    result = s.page.evaluate(
        """async ([url, cases]) => {
            const m = await import(url);
            return cases.map(c => {
                const text = m.formatCustomPrior(c);
                return {text, back: m.parseCustomPrior(text)};
            });
        }""",
        [f"/extensions/{PACK}/duolora_priors.js", cases],
    )
    for case, out in zip(cases, result):
        assert parse_custom_preset(out["text"]) == case, out["text"]
        assert out["back"] == {"roles": case, "errors": []}
    bad = s.page.evaluate(
        "async (url) => (await import(url)).parseCustomPrior('content: input_blocks.9.1; style: middle_block.1')",
        f"/extensions/{PACK}/duolora_priors.js",
    )
    assert bad == {"roles": {"middle_block.1": "style"}, "errors": ["'input_blocks.9.1' is not an SDXL attention block"]}
    # The short names the diagram shows (in7, mid, out3) read as their blocks, as in Python.
    short = "content: in7, MID; style: out3, output_blocks.4.1"
    parsed = s.page.evaluate("async ([url, text]) => (await import(url)).parseCustomPrior(text)",
                             [f"/extensions/{PACK}/duolora_priors.js", short])
    expected = {"input_blocks.7.1": "content", "middle_block.1": "content", "output_blocks.3.1": "style",
                "output_blocks.4.1": "style"}
    assert parsed == {"roles": expected, "errors": []} and parse_custom_preset(short) == expected


def _loss_canvas(s: BrowserSession, node_id: int) -> dict:
    return s.page.evaluate(
        """([id, name]) => {
            const node = window.comfyAPI.app.app.graph.getNodeById(id);
            const canvas = node?.widgets?.find(w => w.name === name)?.element?.querySelector('canvas');
            if (!canvas) return null;
            const ctx = canvas.getContext('2d');
            const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
            // Pixels of the content series' blue (#3b82f6): the drawn curve, not the text.
            let blue = 0;
            for (let i = 0; i < data.length; i += 4) {
                if (Math.abs(data[i] - 0x3b) < 40 && Math.abs(data[i + 1] - 0x82) < 40
                    && Math.abs(data[i + 2] - 0xf6) < 40 && data[i + 3] > 128) blue++;
            }
            return {points: Number(canvas.dataset.points), step: canvas.dataset.step,
                    label: canvas.getAttribute('aria-label'),
                    done: canvas.dataset.done, blue, width: canvas.width, height: canvas.height};
        }""",
        [node_id, OUR_WIDGETS[1]],
    )


def _progress(node: str, step: int, total: int) -> dict:
    return {
        "type": "duolora.progress",
        "data": {
            "node": node,
            "step": step,
            "total": total,
            "losses": {
                "total": 2.0 * 0.93**step + 0.05,
                "content": 1.2 * 0.95**step + 0.02,
                "style": 0.6 * 0.9**step + 0.02,
                "cycle": 0.2 * 0.97**step + 0.01,
            },
        },
    }


def test_loss_curve_draws_progress_messages(browser_session: BrowserSession) -> None:
    s = browser_session
    node_id = _merge_node_with_diagram(s)
    s.page.wait_for_selector(".duolora-loss canvas", state="visible")
    before = _loss_canvas(s, node_id)
    assert before is not None and before["width"] > 0 and before["height"] > 0, before
    assert before["points"] == 0 and before["blue"] == 0, before

    _send_ws(s, [_progress(str(node_id), step, 40) for step in range(1, 41)])
    after = _loss_canvas(s, node_id)
    assert after["points"] == 40 * len(LOSS_TERMS), after
    assert after["step"] == "40" and after["done"] == "false", after
    assert after["blue"] > 60, f"the content curve is not on the canvas: {after}"
    s.page.evaluate("() => window.comfyAPI.app.app.canvas.setDirty(true, true)")
    s.screenshot("05_loss_curve")

    # Messages for another node leave this curve alone.
    _send_ws(s, [_progress(str(int(node_id) + 1000), 41, 40)])
    assert _loss_canvas(s, node_id)["points"] == 40 * len(LOSS_TERMS)

    kept = {  # the merge node's shape: block -> mean kept rank per prior group
        "input_blocks.4.1": {"content": 6.0, "style": 10.0, "layers": 40},
        "middle_block.1": {"content": 12.0, "style": 0.0, "layers": 40},
    }
    _send_ws(s, [{"type": "duolora.done", "data": {"node": str(node_id), "kept_rank": kept}}])
    done = _loss_canvas(s, node_id)
    assert done["done"] == "true", done
    assert done["label"] == "loss · step 40 / 40 · done · mean kept rank: content 9.00, style 5.00", done

    # A new run (step counting from 1 again) starts a fresh curve.
    _send_ws(s, [_progress(str(node_id), 1, 40), _progress(str(node_id), 2, 40)])
    fresh = _loss_canvas(s, node_id)
    assert fresh["points"] == 2 * len(LOSS_TERMS) and fresh["step"] == "2" and fresh["done"] == "false", fresh
    assert _our_problems(s) == []


def test_loss_curve_says_when_a_run_was_cancelled_or_warned_about(browser_session: BrowserSession) -> None:
    s = browser_session
    node_id = _merge_node_with_diagram(s)
    node = str(node_id)
    _send_ws(s, [{"type": "executing", "data": {"node": node, "display_node": node, "prompt_id": "p1"}}])
    # What the server sends for a merge of one file with itself (nodes/merge.py), then seven steps.
    warning = ("content and style are the same file, a.safetensors: a LoRA merged with itself adds nothing new "
               "(the plain sum only doubles it); pick your style LoRA in Load Style LoRA.")
    _send_ws(s, [{"type": "duolora.warning", "data": {"node": node, "message": warning}}])
    _send_ws(s, [_progress(node, step, 80) for step in range(1, 8)])
    # On the node, and in ComfyUI's own toast (also an alert, headed "DuoLoRA").
    on_node = s.page.get_by_role("alert").filter(has_text=re.compile(r"^content and style are the same file"))
    assert on_node.inner_text() == warning
    toast = s.page.get_by_role("alert").filter(has_text=re.compile(r"^DuoLoRA"))
    assert warning in toast.inner_text()
    assert _loss_canvas(s, node_id)["label"] == "loss · step 7 / 80"
    # Cancel: ComfyUI reports the interrupted node; the curve stops saying "step 7 / 80" as if still running.
    _send_ws(s, [{"type": "execution_interrupted",
                  "data": {"prompt_id": "p1", "node_id": node, "node_type": MERGE, "executed": []}}])
    cancelled = _loss_canvas(s, node_id)
    assert cancelled["label"] == "loss · step 7 / 80 · cancelled" and cancelled["points"] == 7 * len(LOSS_TERMS)
    s.page.evaluate("() => window.comfyAPI.app.app.canvas.setDirty(true, true)")
    s.screenshot("13_loss_curve_cancelled")
    # The next run starts clean: no warning, no "cancelled".
    _send_ws(s, [{"type": "executing", "data": {"node": node, "display_node": node, "prompt_id": "p2"}},
                 _progress(node, 1, 80)])
    assert _loss_canvas(s, node_id)["label"] == "loss · step 1 / 80"
    assert on_node.count() == 0
    assert _our_problems(s) == []


def _png_bytes() -> bytes:
    # A 256x128 picture with a magenta left half: easy to find again in a screenshot.
    img = Image.new("RGB", (256, 128), (40, 160, 90))
    img.paste((255, 0, 255), (0, 0, 128, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_merge_report_preview_is_comfyuis_own(browser_session: BrowserSession) -> None:
    s = browser_session
    _fresh_graph(s)
    node_id = _add_node(s, REPORT, 300, 60)
    node = s.page.evaluate(
        "(id) => { const n = window.comfyAPI.app.app.graph.getNodeById(id);"
        " return {ours: n.__duolora !== undefined, widgets: (n.widgets ?? []).map(w => w.name),"
        " size: n.size}; }",
        node_id,
    )
    assert node["ours"] is False and not set(OUR_WIDGETS) & set(node["widgets"]), node
    s.page.evaluate("(id) => window.comfyAPI.app.app.graph.getNodeById(id).setSize([300, 260])", node_id)

    # The report's image goes where a node's ui.images would: upload it, then the "executed" message.
    import requests

    r = requests.post(
        s.url + "/upload/image",
        files={"image": ("duolora_report_test.png", _png_bytes(), "image/png")},
        data={"overwrite": "true", "type": "input"},
        timeout=30,
        proxies={"http": "", "https": ""},
    )
    assert r.status_code == 200, r.text
    uploaded = r.json()
    _send_ws(
        s,
        [
            {
                "type": "executed",
                "data": {
                    "node": str(node_id),
                    "display_node": str(node_id),
                    "prompt_id": "duolora-browser-test",
                    "output": {
                        "images": [{"filename": uploaded["name"], "subfolder": uploaded["subfolder"], "type": "input"}],
                        "text": ["report"],
                    },
                },
            }
        ],
    )
    # ComfyUI loads a node's preview images when it next draws the node: keep the canvas dirty meanwhile.
    s.page.wait_for_function(
        """(id) => {
            const app = window.comfyAPI.app.app;
            app.canvas.setDirty(true, true);
            return (app.graph.getNodeById(id)?.imgs?.[0]?.naturalWidth ?? 0) > 0;
        }""",
        arg=node_id,
    )
    s.page.evaluate("() => window.comfyAPI.app.app.canvas.setDirty(true, true)")
    s.page.wait_for_timeout(300)
    box = s.page.evaluate(
        """(id) => {
            const app = window.comfyAPI.app.app;
            const n = app.graph.getNodeById(id);
            const r = app.canvas.canvas.getBoundingClientRect();
            const [x, y] = app.canvas.ds.convertOffsetToCanvas([n.pos[0], n.pos[1]]);
            return {x: r.left + x, y: r.top + y, w: n.size[0] * app.canvas.ds.scale, h: n.size[1] * app.canvas.ds.scale};
        }""",
        node_id,
    )
    shot = s.screenshot("06_merge_report_preview")
    with Image.open(shot) as full:
        region = full.convert("RGB").crop(
            (int(box["x"]), int(box["y"]), int(box["x"] + box["w"]), int(box["y"] + box["h"]))
        )
        rgb = np.asarray(region, dtype=np.int16)
        magenta = int(((rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] > 200)).sum())
    # The preview scales the 128x128 magenta half into the node; any sizeable patch means it is shown.
    assert magenta > 2000, f"the report preview is not visible in the node ({magenta} magenta pixels), {box}"
    (shot.parent / "timings.json").write_text(json.dumps(s.timings, indent=1), encoding="utf-8")
    assert _our_problems(s) == []


def test_widgets_work_in_nodes_2_mode(browser_session: BrowserSession) -> None:
    """With ComfyUI's "Nodes 2.0" (Vue) node design on, the diagram edits custom_prior and the curve draws."""
    s = browser_session
    set_mode = "async (on) => { await window.comfyAPI.app.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on); }"
    s.page.evaluate(set_mode, True)
    try:
        # Vue nodes are taller than canvas ones: zoom out so the whole node is on screen.
        node_id = _merge_node_with_diagram(s, 0.75)
        s.page.wait_for_selector(".lg-node .duolora-prior [data-block]", state="visible")
        _set_widget(s, node_id, "prior_preset", "custom")
        _set_widget(s, node_id, "custom_prior", "")
        s.page.locator('.duolora-prior [data-block="output_blocks.4.1"]').click()
        s.page.locator('.duolora-prior [data-block="input_blocks.8.1"]').click()
        assert _widget_value(s, node_id, "custom_prior") == "content: input_blocks.8.1, output_blocks.4.1"
        _send_ws(s, [_progress(str(node_id), step, 10) for step in range(1, 11)])
        assert _loss_canvas(s, node_id)["points"] == 10 * len(LOSS_TERMS)
        s.screenshot("07_nodes_2_mode")
    finally:
        s.page.evaluate(set_mode, False)
    assert _our_problems(s) == []
