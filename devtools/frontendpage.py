"""ComfyUI's front end in a browser: a Playwright page showing ComfyUI (no Playwright import here) loads a
workflow, hands back the prompt the front end would queue, opens the template browser, and saves a workflow's
thumbnail picture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_JS_FIT = """(margin) => {
    const app = window.comfyAPI.app.app;
    const items = [...app.graph._nodes.map(n => [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30]),
                   ...app.graph._groups.map(g => g._bounding ? [...g._bounding] : [...g.bounding])];
    if (!items.length) return null;
    const x0 = Math.min(...items.map(b => b[0])), y0 = Math.min(...items.map(b => b[1]));
    const x1 = Math.max(...items.map(b => b[0] + b[2])), y1 = Math.max(...items.map(b => b[1] + b[3]));
    const el = app.canvas.canvas, W = el.clientWidth, H = el.clientHeight;
    const scale = Math.min((W - 2 * margin) / (x1 - x0), (H - 2 * margin) / (y1 - y0));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [(W / scale - (x1 - x0)) / 2 - x0, (H / scale - (y1 - y0)) / 2 - y0];
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    return [x0, y0, x1, y1, scale];
}"""

# Everything but the graph canvas and the node widgets that live in the DOM (text areas, our diagrams).
_THUMBNAIL_CSS = """
body * { visibility: hidden !important; }
#graph-canvas, .dom-widget, .dom-widget * { visibility: visible !important; }
"""


# ComfyUI's template browser, in every front end the tests meet: up to 1.35.9 a dialog with this class; 1.49.6 draws
# it as a layout dialog labelled by its key, "global-workflow-template-selector".
TEMPLATE_DIALOG = ".workflow-template-selector-dialog, [role=dialog][aria-labelledby*='workflow-template-selector']"


def template_pictures_js() -> str:
    """A JavaScript expression: the pictures the template browser shows, e.g. once a pack's category is chosen, that
    pack's card pictures (front end 1.49.6 shows them from blob: URLs of the fetched files, so not by their URL)."""
    # One selector list, so an image inside two matching elements (a front end whose dialog matches both forms) is
    # listed once.
    images = ", ".join(f"{part.strip()} img" for part in TEMPLATE_DIALOG.split(","))
    return f"[...document.querySelectorAll({json.dumps(images)})].filter(i => i.offsetParent !== null)"


def page_open_template_pack(page: Any, pack: str, timeout: float) -> Any:
    """Templates in the side bar → the ``pack`` category, as a user clicks through it; returns the dialog."""
    page.locator(".templates-tab-button").first.click(timeout=timeout)
    dialog = page.locator(TEMPLATE_DIALOG).first
    dialog.wait_for(state="visible", timeout=timeout)
    dialog.get_by_role("button", name=pack).first.click(timeout=timeout)
    return dialog


def page_load_workflow(page: Any, workflow: dict) -> None:
    """Load a UI workflow into the page's ComfyUI app the way opening a file does (``app.loadGraphData``)."""
    page.evaluate("async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf, true, true, null, {}); }",
                  workflow)
    page.wait_for_timeout(300)


def page_graph_to_prompt(page: Any) -> dict:
    """The API prompt the front end itself would queue for the graph on screen (``app.graphToPrompt``)."""
    return page.evaluate("async () => (await window.comfyAPI.app.app.graphToPrompt()).output")


def page_fit_view(page: Any, margin: float = 24.0) -> list[float] | None:
    """Zoom and pan the canvas so every node and group is visible; returns [x0, y0, x1, y1, scale]."""
    bounds = page.evaluate(_JS_FIT, margin)
    page.wait_for_timeout(300)
    return bounds


def page_thumbnail(page: Any, path: str | Path, width: int = 600, quality: int = 85) -> Path:
    """Fit the graph and save a JPEG of the canvas alone (menus hidden), ``width`` pixels wide."""
    import io

    from PIL import Image

    # A <style> element put in by hand: Playwright's add_style_tag waits for the element's load event and fails
    # with whatever the page reports meanwhile (the server's CSP blocking the front end's api.comfy.org lookups).
    style = page.evaluate_handle("css => { const el = document.createElement('style'); el.textContent = css; "
                                 "document.head.appendChild(el); return el; }", _THUMBNAIL_CSS)
    try:
        page_fit_view(page)
        png = page.screenshot()
    finally:
        style.evaluate("el => el.remove()")
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img = img.resize((width, round(img.height * width / img.width)), Image.Resampling.LANCZOS)
    path = Path(path)
    img.save(path, format="JPEG", quality=quality, optimize=True)
    return path
