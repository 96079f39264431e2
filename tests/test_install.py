"""Install the pack the way ComfyUI-Manager does, then start a real ComfyUI on it.

ComfyUI-Manager clones the repository into ``ComfyUI/custom_nodes/<name>`` and runs
``<ComfyUI's python> -m pip install -r requirements.txt`` there. This test does the same into a fresh base
directory: a ``git clone`` of HEAD when the working tree is clean, else a copy of exactly the files git
tracks (their working-tree contents), so a file the pack needs but git does not have fails here as it
would for every user. The copy is a real folder (no symlink); the server (devtools/comfyserver.py) loads
nothing else.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import comfyserver
import examplegraphs
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PACK = "comfyui-duolora"
NODES = {
    "DuoLoRA_LoadContentLoRA": "Load Content LoRA",
    "DuoLoRA_LoadStyleLoRA": "Load Style LoRA",
    "DuoLoRA_ZipRankMerge": "ZipRank Merge (DuoLoRA)",
    "DuoLoRA_ApplyMergedLoRA": "Apply Merged LoRA",
    "DuoLoRA_SaveMergedLoRA": "Save Merged LoRA",
    "DuoLoRA_MergeReport": "Merge Report",
    "DuoLoRA_ApplyKLoRA": "Apply K-LoRA",
}


def _git(*args: str) -> str:
    run = subprocess.run(["git", "-C", str(REPO), *args], check=False, capture_output=True, text=True)
    if run.returncode != 0:
        pytest.fail(f"git {' '.join(args)} failed in {REPO} (the install test needs a git checkout): "
                    f"{run.stderr.strip()}", pytrace=False)
    return run.stdout


def install_like_the_manager(target: Path) -> str:
    """Put the repository at ``target`` as ComfyUI-Manager would; returns how ("clone" or "tracked files")."""
    if _git("status", "--porcelain", "--untracked-files=no").strip() == "":
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(target)], check=True, capture_output=True)
        return "clone"
    # Uncommitted edits: what git tracks, as it is on disk now (files deleted on disk are left out).
    target.mkdir(parents=True)
    for name in _git("ls-files", "-z").split("\0"):
        source = REPO / name
        if name and source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return "tracked files"


def _get_json(url: str) -> object:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=30) as r:
        return json.loads(r.read())


def _versions(python: str, names: tuple[str, ...]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys; "
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))")
    run = subprocess.run([python, "-c", code, *names], check=True, capture_output=True, text=True)
    return json.loads(run.stdout)


def test_manager_style_install_loads_nodes_web_extension_and_templates(tmp_path: Path) -> None:
    base = tmp_path / "ComfyUI"
    pack = base / "custom_nodes" / PACK
    how = install_like_the_manager(pack)
    assert pack.is_dir() and not pack.is_symlink()
    assert (pack / "__init__.py").is_file() and (pack / "requirements.txt").is_file(), how

    # `<python> -m pip install -r requirements.txt` into the environment ComfyUI runs in: it must succeed
    # and must leave ComfyUI's own torch, numpy, Pillow and safetensors as they were.
    python = sys.executable
    watched = ("torch", "numpy", "pillow", "safetensors")
    before = _versions(python, watched)
    pip = subprocess.run([python, "-m", "pip", "install", "--disable-pip-version-check", "-r", "requirements.txt"],
                         cwd=pack, check=False, capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    assert _versions(python, watched) == before
    assert importlib.metadata.version("safetensors") == before["safetensors"]

    with comfyserver.comfy_server(base, custom_nodes={}) as url:
        info = _get_json(url + "/object_info")
        extensions = _get_json(url + "/extensions")
        templates = _get_json(url + "/workflow_templates")
        i18n = _get_json(url + "/i18n")
    log = (base / comfyserver.LOG_NAME).read_text(encoding="utf-8", errors="replace")
    # Only our pack's lines count (ComfyUI's own audio nodes fail to import here without torchaudio).
    problems = [line for line in log.splitlines() if str(pack) in line
                and any(m in line for m in ("IMPORT FAILED", "Cannot import", "Error while calling"))]
    assert problems == [], (f"installed from {how} (files git does not track are not installed; see git "
                            "status); ComfyUI could not load the pack:\n" + "\n".join(problems))
    # The server loaded the copy (its import-times line names the folder), not the repository.
    assert any(str(pack) in line for line in log.splitlines() if "seconds" in line), log[-2000:]

    ours = {name: (info[name]["display_name"], info[name]["category"]) for name in NODES if name in info}
    assert ours == {name: (display, "DuoLoRA") for name, display in NODES.items()}, f"installed from {how}"
    web = sorted(p.name for p in (pack / "web").glob("*.js"))
    assert web == ["duolora.js", "duolora_priors.js", "duolora_templates.js", "duolora_widgets.js"]
    assert sorted(e for e in extensions if e.startswith(f"/extensions/{PACK}/")) == [
        f"/extensions/{PACK}/{name}" for name in web]
    assert sorted(templates) == [PACK] and sorted(templates[PACK]) == sorted(examplegraphs.WORKFLOW_NAMES)
    # The template browser's label of the pack's category comes from the pack's locales/ folder.
    assert i18n["en"]["templateWorkflows"]["category"][PACK] == "DuoLoRA"
