#!/usr/bin/env python3
"""Make example_workflows/<name>.jpg: each example workflow as ComfyUI's own front end draws it.

Starts a real ComfyUI server (devtools/comfyserver.py) with this pack, puts the procedural reference
pictures in its input/ folder (so the Load Image nodes show them), opens Debian's Chromium with Playwright,
loads every example workflow, fits the whole graph into a 4:3 view with menus hidden, and saves a JPEG
(``--width`` pixels wide, quality 85). ComfyUI's template browser shows these files beside the workflows.

    .venv/bin/python scripts/make_thumbnails.py [--width 600] [--out example_workflows]

Needs scripts/install_browser.sh (chromium + playwright). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "devtools"))

import comfyserver
import examplegraphs
import exampleinputs
import frontendpage
import workflowformat

CHROMIUM = "/usr/bin/chromium"
# Full-detail drawing at any zoom (no level-of-detail boxes), no canvas statistics, no first-run dialogs.
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Graph.CanvasInfo": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
}
VIEWPORT = {"width": 1600, "height": 1200}
READY_JS = """() => {
    const app = window.comfyAPI?.app?.app;
    return !!(app && app.vueAppReady && app.graph && app.canvas
              && window.LiteGraph?.registered_node_types?.DuoLoRA_ZipRankMerge);
}"""


def _load_exactly(page, wf: dict, name: str, tries: int = 3) -> None:
    """Load ``wf`` and wait until the canvas shows exactly its node ids (raises after ``tries`` loads)."""
    want = sorted(int(n["id"]) for n in wf["nodes"])
    shown: list[int] = []
    for _ in range(tries):
        frontendpage.page_load_workflow(page, wf)
        page.wait_for_timeout(1000)
        shown = sorted(page.evaluate("() => window.comfyAPI.app.app.graph._nodes.map(n => Number(n.id))"))
        if shown == want:
            return
    raise RuntimeError(f"{name}: the canvas shows nodes {shown}, not the example's {want}")


def make_thumbnails(out_dir: Path, width: int = 600,
                    names: tuple[str, ...] = examplegraphs.WORKFLOW_NAMES) -> list[Path]:
    """Write ``<out_dir>/<name>.jpg`` for each example workflow; returns the paths."""
    from playwright.sync_api import sync_playwright

    written = []
    with tempfile.TemporaryDirectory(prefix="duolora-thumbs-") as tmp:
        base = Path(tmp) / "base"
        comfyserver.prepare_base_directory(base, comfyserver.default_custom_nodes())
        exampleinputs.put_example_files(base, image_size=256)
        with comfyserver.comfy_server(base, user_settings=SETTINGS) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-quic"])
            try:
                context = browser.new_context(viewport=VIEWPORT)
                context.add_init_script("try { localStorage.setItem('vueNodesBannerDismissed', 'true'); } catch (e) {}")
                page = context.new_page()
                page.goto(url, wait_until="domcontentloaded", timeout=90_000)
                page.wait_for_function(READY_JS, timeout=90_000)
                # Front end 1.49.6 restores its own start-up workflow a moment after it reports ready, which can
                # replace a graph loaded too early: load until the canvas holds exactly the example's nodes.
                page.wait_for_load_state("networkidle")
                for name in names:
                    wf = workflowformat.load(REPO / "example_workflows" / f"{name}.json")
                    _load_exactly(page, wf, name)
                    # Let the Load Image previews arrive before the picture is taken.
                    page.wait_for_load_state("networkidle")
                    page.wait_for_timeout(800)
                    path = frontendpage.page_thumbnail(page, out_dir / f"{name}.jpg", width=width)
                    written.append(path)
                    print(f"wrote {path}")
            finally:
                browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=600, help="thumbnail width in pixels (default 600)")
    parser.add_argument("--out", type=Path, default=REPO / "example_workflows", help="output folder")
    args = parser.parse_args(argv)
    make_thumbnails(args.out, args.width)
    return 0


if __name__ == "__main__":
    sys.exit(main())
