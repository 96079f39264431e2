"""Fixtures for the browser tests: one real ComfyUI server and one headless Chromium page per session.

The server is ComfyUI's main.py (devtools/comfyserver.py: 0.3.75 with front end 1.32.9, or the tree named by
$COMFYUI_DIR with the front end its requirements pin, e.g. 0.8.0 with 1.35.9) with this repository linked into
its custom_nodes/ as ``comfyui-duolora``; the browser is Debian's chromium driven by Playwright
(scripts/install_browser.sh installs both; Playwright never downloads a browser of its own).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "devtools"))

import comfyserver
import exampleinputs

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = comfyserver.artifacts_dir()
# Flags for a quiet, offline, throw-away browser (Playwright adds --headless and a pipe for CDP).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# First-run template browser and the minimap would cover the canvas in screenshots.
USER_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
}
VIEWPORT = {"width": 1400, "height": 1000}
PAGE_TIMEOUT_MS = 90_000


@dataclass
class BrowserSession:
    """The server's URL, the Playwright page, and everything the page said since it opened."""

    url: str
    page: object
    base_directory: Path
    console: list[tuple[str, str, str]] = field(default_factory=list)  # (type, text, source url)
    failed_requests: list[tuple[int, str]] = field(default_factory=list)  # (status, url)
    page_errors: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def screenshot(self, name: str) -> Path:
        """Save a PNG of the page to ARTIFACTS/<name>.png (gitignored) and return its path."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path


def _require_browser() -> None:
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (Debian package chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package")
    if missing:
        pytest.fail(f"browser tests need {', '.join(missing)}: run scripts/install_browser.sh", pytrace=False)


@pytest.fixture(scope="session")
def browser_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserSession]:
    """A real ComfyUI server and a headless Chromium page showing its front end, ready to script."""
    _require_browser()
    from playwright.sync_api import sync_playwright

    base = tmp_path_factory.mktemp("comfy-base")
    exampleinputs.put_example_files(base)
    t0 = time.monotonic()
    with comfyserver.comfy_server(base, user_settings=USER_SETTINGS) as url:
        t_server = time.monotonic() - t0
        profile = tmp_path_factory.mktemp("chromium-profile")
        with sync_playwright() as pw:
            # A persistent context only to hand Chromium a fresh --user-data-dir of our own.
            context = pw.chromium.launch_persistent_context(
                str(profile),
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
                viewport=VIEWPORT,
            )
            # The "try Nodes 2.0" banner would push the canvas down in every screenshot.
            context.add_init_script("try { localStorage.setItem('vueNodesBannerDismissed', 'true'); } catch (e) {}")
            try:
                page = context.pages[0] if context.pages else context.new_page()
                page.set_default_timeout(30_000)
                session = BrowserSession(url=url, page=page, base_directory=base)
                page.on(
                    "console",
                    lambda m: session.console.append((m.type, m.text, (m.location or {}).get("url", ""))),
                )
                page.on("pageerror", lambda e: session.page_errors.append(f"{e}\n{getattr(e, 'stack', '')}"))
                page.on(
                    "response",
                    lambda r: session.failed_requests.append((r.status, r.url)) if r.status >= 400 else None,
                )
                page.goto(url, wait_until="domcontentloaded", timeout=PAGE_TIMEOUT_MS)
                # The app is up once the canvas is mounted and the core node types are registered;
                # extensions' setup() runs right after registration.
                page.wait_for_function(
                    """() => {
                        const app = window.comfyAPI?.app?.app;
                        return !!(app && app.vueAppReady && app.graph && app.canvas
                                  && window.LiteGraph?.registered_node_types?.KSampler);
                    }""",
                    timeout=PAGE_TIMEOUT_MS,
                )
                page.wait_for_timeout(500)
                session.timings = {"server_start_s": t_server, "page_ready_s": time.monotonic() - t0 - t_server}
                yield session
            finally:
                context.close()
    shutil.rmtree(profile, ignore_errors=True)
