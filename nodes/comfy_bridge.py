"""The one module of the pack that touches ComfyUI internals (``comfy.*``, ``folder_paths``, ``server``).

Everything here goes through the most public entry point that does the job. Each internal was read in
ComfyUI 0.3.75, 0.8.0 and 0.33.0 (`make test` runs 0.3.75 and 0.33.0; 0.8.0 on request); where they differ the
code asks for the capability (an attribute), never for a version:

* ``BaseModel.model_config.unet_config`` (the model family: Flux.1's has ``image_model`` "flux", SDXL's none;
  the widths of either table).
* ``folder_paths.get_filename_list / get_full_path_or_raise / get_folder_paths / get_save_image_path``
* ``comfy.sd.load_lora_for_models`` — the stock LoRA path (LoraLoader uses it), so ApplyMergedLoRA patches
  exactly like a saved file loaded by LoraLoader.
* ``comfy.model_management.load_models_gpu`` (as ``comfy.sampler_helpers.prepare_sampling`` does),
  ``throw_exception_if_processing_interrupted`` / ``InterruptProcessingException`` (Cancel).
* ``comfy.sampler_helpers.convert_cond`` + ``comfy.samplers.encode_model_conds`` with the model's
  ``extra_conds`` — how the samplers turn a CONDITIONING into ``c_crossattn`` / ``y`` (SDXL's ADM vector).
* ``BaseModel.apply_model`` (returns the denoised x̂0), ``process_latent_in``, the model's
  ``model_sampling`` (``sigmas``; EPS / V_PREDICTION noise scaling x_t = x0 + σ·ε).
* ``comfy.utils.ProgressBar``; ``server.PromptServer.instance.send_sync`` (only when a server exists).
* K-LoRA's sampling-time patch: ``ModelPatcher.clone`` + ``add_wrapper_with_key`` with
  ``comfy.patcher_extension.WrappersMP.OUTER_SAMPLE`` (``CFGGuider.outer_sample``: one sampling run) and
  ``WrappersMP.APPLY_MODEL`` (``BaseModel.apply_model(x, t, c_concat, c_crossattn, control, transformer_options)``,
  t = σ; ``transformer_options["sample_sigmas"]`` is the run's σ schedule, set by ``CFGGuider.inner_sample``);
  ``BaseModel.model_sampling`` (``sigmas``, or ``sigma_max``/``sigma_min``). Checked in 0.3.75, 0.8.0 and 0.33.0,
  where these signatures are identical.
* Dynamic VRAM (0.33): ``ModelPatcher.is_dynamic``, ``ModelPatcherDynamic.get_non_dynamic_delegate`` (absent
  before: no model is dynamic there), ``load_models_gpu(force_full_load=...)`` (all three),
  ``comfy.model_management.unload_model_and_clones`` (0.33; without it the copy is left to model management).
* ``folder_paths.get_user_directory`` (the merge cache's default place); ``ModelPatcher.patches`` /
  ``object_patches`` / ``model_options`` (read for the merge cache's model fingerprint; a patch added through a
  ``(key, offset[, function])`` key-map target carries its offset and function in the patch).
* The node API's ``io.Input`` (``nodes/api.py``): its ``advanced`` / ``extra_dict`` attributes, the one capability
  branch (``advanced``), since only newer ComfyUIs (0.33.0 here) have the first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import comfy.model_management
import comfy.model_sampling
import comfy.ops
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
import torch

from ..duolora import formats, sdxl
from ..duolora.adapter import Adapter, Branch, attach, plain_weight
from ..duolora.families import flux
from ..duolora.klora import KLoRA, KLoRAPatch, schedule_progress
from ..duolora.lora import TEXT_ENCODER_PREFIXES, LoRA
from ..duolora.merge_cache import Fingerprint, MergeCache
from ..duolora.mergers import Merger
from ..duolora.objective import DiscreteSchedule
from .api import io

if TYPE_CHECKING:
    from typing_extensions import Self

Interrupted = comfy.model_management.InterruptProcessingException
_LOG = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------

def lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def lora_path(name: str) -> str:
    return folder_paths.get_full_path_or_raise("loras", name)


def loras_dir() -> str:
    return folder_paths.get_folder_paths("loras")[0]


def next_lora_path(filename_prefix: str) -> tuple[str, str]:
    """(absolute path, path relative to the loras folder) for the next free ``<prefix>_NNNNN_.safetensors``.

    ComfyUI's own counter naming (SaveImage, SaveLoRA, CheckpointSave use ``get_save_image_path``); the
    caller still refuses to overwrite, since another process may have written the same name meanwhile.
    """
    base = loras_dir()
    full_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, base)
    while True:
        name = f"{filename}_{counter:05}_.safetensors"
        path = os.path.join(full_folder, name)
        if not os.path.exists(path):
            break
        counter += 1
    os.makedirs(full_folder, exist_ok=True)
    return path, os.path.join(subfolder, name) if subfolder else name


# The merge cache (duolora.merge_cache): a folder, or "off"; and its bound in MiB.
MERGE_CACHE_ENV = "DUOLORA_MERGE_CACHE"
MERGE_CACHE_MB_ENV = "DUOLORA_MERGE_CACHE_MB"
MERGE_CACHE_DEFAULT_MB = 256


def merge_cache() -> MergeCache:
    """The merge cache: ``$DUOLORA_MERGE_CACHE`` (a folder; ``off`` turns it off), else ``duolora/merge_cache`` in
    ComfyUI's user directory (``ComfyUI/user/``, which survives restarts, unlike its temp folder), bounded by
    ``$DUOLORA_MERGE_CACHE_MB`` (default 256)."""
    where = os.environ.get(MERGE_CACHE_ENV, "").strip()
    size = os.environ.get(MERGE_CACHE_MB_ENV, "").strip()
    try:
        mb = float(size) if size else MERGE_CACHE_DEFAULT_MB
    except ValueError:
        raise ValueError(f"{MERGE_CACHE_MB_ENV}={size!r} is not a number of MiB; set it to e.g. 256, "
                         "or 0 to turn the merge cache off") from None
    if where.lower() in ("off", "0", "none", "false"):
        mb = 0
    folder = where if where and mb > 0 else os.path.join(folder_paths.get_user_directory(), "duolora", "merge_cache")
    return MergeCache(Path(folder), int(max(mb, 0) * 1024 * 1024))


def _plain_patch(value: Any) -> Any:
    """A model patch as data ``Fingerprint`` takes: weight adapters by their class and tensors; modules by their
    class and state; anything else (a callable) is refused."""
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_patch(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain_patch(v) for k, v in value.items()}
    if isinstance(value, torch.nn.Module):
        return (type(value).__qualname__, dict(value.state_dict()))
    weights = getattr(value, "weights", None)
    if weights is not None and not callable(weights):
        return (type(value).__qualname__, _plain_patch(weights))
    return value


def model_fingerprint(model) -> str:
    """A fingerprint of what a MODEL computes: its class, every weight's name, dtype and shape with its first and
    last 256 values, its patches (a LoRA applied before the merge), object patches and model options.

    Raises ``Uncacheable`` when a patch or option is a callable (its effect cannot be told from outside)."""
    fp = Fingerprint(sample=256)
    fp.add(type(model.model).__qualname__)
    for name, tensor in model.model.state_dict().items():
        fp.add(name)
        fp.tensor(tensor)
    fp.add(_plain_patch(dict(getattr(model, "patches", {}))))
    fp.add(_plain_patch(dict(getattr(model, "object_patches", {}))))
    fp.add(_plain_patch(dict(getattr(model, "model_options", {}))))
    return fp.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Node inputs
# ----------------------------------------------------------------------------------------------------

def advanced(widget: io.Input) -> io.Input:
    """Mark a V3 widget input as advanced (the front end keeps it out of view until the user shows the node's
    advanced inputs) and return it. Where ComfyUI's ``io.Input`` has an ``advanced`` attribute (0.33.0) it is
    set; elsewhere (0.3.75, 0.8.0: their widget inputs take no ``advanced=`` or ``extra_dict=``) the same
    ``"advanced": true`` goes into the input's ``extra_dict``, which ``Input.as_dict`` merges into the options
    the front end reads (front ends from 1.32.9 on know the key)."""
    if hasattr(widget, "advanced"):
        widget.advanced = True
    else:
        widget.extra_dict["advanced"] = True
    return widget


# ----------------------------------------------------------------------------------------------------
# The model's layout and the stock LoRA path
# ----------------------------------------------------------------------------------------------------

def model_layout(model) -> sdxl.Layout:
    """The layout of a MODEL (a ModelPatcher), from ComfyUI's ``unet_config``: Flux.1's table at the model's widths
    for a Flux.1 model (``image_model`` "flux"), else SDXL's UNet table at the model's widths. Another diffusion
    transformer (``image_model`` of another family, or Flux.2) is refused in one line."""
    unet_config = model.model.model_config.unet_config
    image_model = unet_config.get("image_model")
    if image_model is None:
        return sdxl.layout_for(sdxl.UNetConfig.from_comfy(unet_config))
    try:
        return flux.layout_for(flux.FluxConfig.from_comfy(unet_config))
    except ValueError as e:
        raise ValueError(f"the DuoLoRA nodes merge LoRAs for SDXL and Flux.1 models, not for this one ({e}); "
                         "duolora merge merges Z-Image and Qwen-Image LoRAs weights-only") from None


def validate_for_model(lora, model) -> None:
    """Raise the engine's LoRAError when ``lora`` does not fit ``model`` (ComfyUI itself would only log
    "lora key not loaded" or a shape error and leave the weight unchanged). Text-encoder layers are
    checked when the model is a full-size SDXL or Flux.1, whose text encoders are known."""
    layout = model_layout(model)
    standard = {"sdxl": sdxl.SDXL_LAYOUT, "flux": flux.FLUX_LAYOUT}.get(layout.family)
    standard = standard if standard is not None and standard.config == layout.config else None
    formats.validate_lora(lora, standard or layout, text_encoders=standard is not None)


def apply_lora_state_dict(model, clip, state_dict: dict[str, torch.Tensor], strength_model: float,
                          strength_clip: float):
    """ComfyUI's stock LoRA patching (what LoraLoader does with a file's state dict)."""
    return comfy.sd.load_lora_for_models(model, clip, state_dict, strength_model, strength_clip)


# ----------------------------------------------------------------------------------------------------
# Progress, cancel, messages
# ----------------------------------------------------------------------------------------------------

class Progress:
    """One ComfyUI progress-bar update and one ``duolora.progress`` message per optimisation step."""

    def __init__(self, total: int, node_id: str | None) -> None:
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.node_id = node_id
        self.total = total

    def finished(self, result) -> None:
        """One update at the end, for a merge that came from the merge cache (its last step's losses)."""
        last = {name: values[-1] for name, values in result.history.items() if values}
        self(self.total, self.total, last)

    def __call__(self, step: int, total: int, losses: dict[str, float]) -> None:
        self.bar.update_absolute(step, total)
        send_message("duolora.progress", {"node": self.node_id, "step": step, "total": total,
                                          "losses": {k: float(v) for k, v in losses.items()}})


def send_message(event: str, data: dict) -> None:
    """Send a message to the browser when a ComfyUI server is running (headless runs have none)."""
    try:
        import server
    except ImportError:
        return
    instance = getattr(server.PromptServer, "instance", None)
    if instance is None:
        return
    client_id = getattr(instance, "client_id", None)
    instance.send_sync(event, data, client_id)


def send_warning(node_id: str | None, text: str) -> None:
    """A warning that does not stop the node: in ComfyUI's log, and as a ``duolora.warning`` message that the
    front end shows on the node."""
    _LOG.warning("[DuoLoRA] %s", text)
    send_message("duolora.warning", {"node": node_id, "message": text})


def interrupted() -> bool:
    """True once the user pressed Cancel; ComfyUI's flag is left set so the executor stops the prompt."""
    return comfy.model_management.processing_interrupted()


def raise_if_interrupted() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


# ----------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory during a block: device memory on CUDA, the process's peak RSS otherwise."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self.kind = "cuda" if device.type == "cuda" else "process_rss"

    def __enter__(self) -> Self:
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak_bytes = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ----------------------------------------------------------------------------------------------------
# The Denoiser over a ModelPatcher
# ----------------------------------------------------------------------------------------------------

def _materialise_inference_tensors(module: torch.nn.Module) -> int:
    """Replace inference-mode parameters/buffers by ordinary tensors with the same values.

    ComfyUI builds and loads models under ``torch.inference_mode()``; autograd refuses to save such
    tensors for backward (and to take views of them), even though our masks, not the weights, are what
    is learned. Each tensor is replaced by an ordinary clone under the same name (``.data =`` is not
    enough: the tensor keeps its inference-mode version counter), one at a time, so every value stays
    bit-identical and the extra memory stays near one layer.
    """
    swapped = 0
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                    swapped += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    swapped += 1
    return swapped


@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """``requires_grad=False`` on every parameter of ``module`` for the block; flags restored on exit.

    Gradients still flow through the frozen weights to the masks; no ``.grad`` is ever allocated for them.
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _check_ordinary(module: torch.nn.Module) -> None:
    """Raise if a tensor of ``module`` is an inference tensor (autograd could not use it)."""
    bad = [name for name, t in (*module.named_parameters(), *module.named_buffers()) if t.is_inference()]
    if bad:
        raise RuntimeError(
            f"DuoLoRA internal error: {len(bad)} merger tensor(s) became inference tensors (first: {bad[0]}); "
            f"please report this with your ComfyUI version."
        )


# ----------------------------------------------------------------------------------------------------
# Dynamic VRAM: which ModelPatcher a merge runs
# ----------------------------------------------------------------------------------------------------

class DynamicModelError(RuntimeError):
    """A dynamic-VRAM MODEL that ComfyUI cannot give a trainable (non-dynamic) copy of."""


def is_dynamic(model) -> bool:
    """True when ``model`` loads its weights with ComfyUI's dynamic VRAM (``ModelPatcher.is_dynamic()``): weights
    are cast into shared device buffers at each forward and LoRA patches are applied at cast time."""
    check = getattr(model, "is_dynamic", None)
    return bool(check()) if callable(check) else False


def merge_runner(model, needs_grad: bool) -> tuple[Any, bool]:
    """The ModelPatcher a merge runs on, and whether it is a separate copy that must be released afterwards.

    Forward-only passes (the layer-wise recording) run on ``model`` itself, dynamic or not: dynamic VRAM
    streams the weights in and the adapter adds its low-rank paths to whatever the ops compute. Passes that
    backpropagate (paper steps) need every weight a forward used to still hold its values during backward, which
    dynamic VRAM's shared cast buffers do not promise; there the merge runs on ComfyUI's own non-dynamic delegate
    of the model (``get_non_dynamic_delegate``, what its samplers use for hooked conditionings: a second copy of
    the weights, made by the model's loader and kept by ComfyUI for reuse), fully loaded on the device.
    """
    if not (needs_grad and is_dynamic(model)):
        return model, False
    make = getattr(model, "get_non_dynamic_delegate", None)
    try:
        if make is None:
            raise RuntimeError("this ComfyUI has no non-dynamic delegate")
        return make(), True
    except RuntimeError as err:
        raise DynamicModelError(
            f"ZipRank Merge cannot learn on this MODEL: it is loaded with ComfyUI's dynamic VRAM and ComfyUI could "
            f"not make the non-dynamic copy that training needs ({err}). Load the model with a core loader (Load "
            "Checkpoint, Load Diffusion Model), start ComfyUI with --disable-dynamic-vram, or use mode 'layerwise' "
            "or 'weights'."
        ) from None


def _release(patcher) -> None:
    """Hand a merge-only copy's device memory back to ComfyUI's model management (where it can do that)."""
    unload = getattr(comfy.model_management, "unload_model_and_clones", None)
    if unload is not None:
        unload(patcher)


# Storage-only weight dtypes (ComfyUI's fp8 checkpoints): the model computes in its manual-cast dtype.
_STORAGE_DTYPES = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}


def compute_dtype_of(base) -> torch.dtype:
    """The dtype a ComfyUI ``BaseModel`` computes in: ``manual_cast_dtype`` when it stores its weights in
    another dtype (fp8 checkpoints, fp16 weights on a bf16-only device, …), else its weights' dtype (as
    ``BaseModel._apply_model`` casts its input)."""
    manual = getattr(base, "manual_cast_dtype", None)
    return manual if manual is not None else base.get_dtype()


def foldable(module: torch.nn.Module) -> bool:
    """True when a ComfyUI op's output is exactly F.linear/conv of its own ``weight`` and ``bias`` right now.

    ComfyUI's ops (``comfy.ops.CastWeightBiasOp`` subclasses) run torch's forward unless they cast their
    weights per forward (``comfy_cast_weights``: lowvram offloading, fp8 or manual-cast storage) or carry
    per-forward weight/bias functions (lowvram LoRA patches); then the adapter must add its low-rank path to
    whatever the op computes instead of folding ΔW into ``weight`` (``duolora.adapter``).
    """
    if plain_weight(module):
        return True
    cast_op = getattr(comfy.ops, "CastWeightBiasOp", None)
    return (cast_op is not None and isinstance(module, cast_op) and not getattr(module, "comfy_cast_weights", True)
            and not getattr(module, "weight_function", None) and not getattr(module, "bias_function", None))


class _CheckpointedBlocks:
    """Gradient checkpointing of the layers of the UNet's input/middle/output blocks, removable.

    Forward hooks of the adapter run again during recomputation, so each checkpointed call records the
    adapter's branches and restores them while recomputing.
    """

    def __init__(self, unet: torch.nn.Module, adapter: Adapter) -> None:
        # The UNet runs its input/middle/output blocks through ``forward_timestep_embed``, which calls each
        # layer inside a block (ResBlock, SpatialTransformer, Down/Upsample), never the block's own forward:
        # so the layers are what gets checkpointed (as ComfyUI's TrainLoraNode does).
        blocks = list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks)
        self.blocks = [layer for block in blocks for layer in block]
        self.adapter = adapter

    def __enter__(self) -> Self:
        for block in self.blocks:
            def checkpointed(*args: Any, _orig=block.forward, adapter=self.adapter, **kwargs: Any) -> Any:
                if not torch.is_grad_enabled():
                    return _orig(*args, **kwargs)
                branches = adapter.branches

                def run(*a: Any, adapter=adapter, branches=branches, **k: Any) -> Any:
                    previous = adapter.branches
                    adapter.set_branches(branches)
                    try:
                        return _orig(*a, **k)
                    finally:
                        adapter.set_branches(previous)

                return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

            block.forward = checkpointed
        return self

    def __exit__(self, *exc: object) -> None:
        for block in self.blocks:
            # The instance attribute shadows the class's forward; deleting it restores the module exactly.
            if "forward" in block.__dict__:
                del block.__dict__["forward"]


class ComfyDenoiser(DiscreteSchedule):
    """``duolora.objective.Denoiser`` over a ComfyUI MODEL with a merger attached.

    Use as a context manager: entering loads the model through ComfyUI's model management, attaches the
    merger's low-rank paths with forward hooks (no dense ΔW), and optionally checkpoints the UNet's
    blocks; leaving removes every hook, so the MODEL is exactly as it was.
    ``cond`` items are ComfyUI CONDITIONINGs; latents are in the model's internal space
    (``process_latent_in`` already applied, see ``prepare_latents``).
    """

    def __init__(self, model, merger: Merger, compute_dtype: torch.dtype | None = None,
                 gradient_checkpointing: bool = True, needs_grad: bool = True) -> None:
        sampling = model.get_model_object("model_sampling")
        if not isinstance(sampling, comfy.model_sampling.EPS):
            raise TypeError(
                f"DuoLoRA's paper mode needs an ε- or v-prediction model (SDXL); this model samples with "
                f"{type(sampling).__name__}. Use mode 'weights' instead."
            )
        super().__init__(sampling.sigmas.detach().float().cpu())
        self.patcher = model
        # What the merge runs on (``merge_runner``; set on entering): the MODEL, or its non-dynamic delegate.
        self.runner = model
        self.needs_grad = needs_grad
        self.merger = merger
        self.compute_dtype = compute_dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.device = model.load_device
        # The dtype the UNet computes in (set on entering; float16 turns on loss scaling in optimize).
        self.activation_dtype: torch.dtype | None = None
        self._cond_cache: dict[tuple[int, tuple[int, ...]], dict[str, Any]] = {}
        self._stack = contextlib.ExitStack()
        self.adapter: Adapter | None = None
        # Canonical layer name -> the UNet module the adapter patches (set on entering).
        self.modules: dict[str, torch.nn.Module] = {}

    # -- lifecycle -----------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        # ComfyUI runs nodes under torch.inference_mode(). Every tensor the merge creates, moves or casts
        # while this context is open (the merger's masks and factors, latents, conditionings, noise, Adam's
        # state) must be an ordinary tensor, or autograd refuses it (on CUDA the merger's move below made
        # its masks inference tensors: "abs(): functions with out=... arguments don't support automatic
        # differentiation"). So inference mode is off for the whole life of the denoiser, not per call.
        self._stack.enter_context(torch.inference_mode(False))
        try:
            self.runner, separate = merge_runner(self.patcher, self.needs_grad)
            if separate:
                self._stack.callback(_release, self.runner)  # registered first: runs after every other exit
            # Backward needs the weights that each forward used: with gradients, the UNet stays whole on the
            # device (no per-forward casting into reused buffers), as ComfyUI's Train LoRA loads it.
            comfy.model_management.load_models_gpu([self.runner], force_full_load=self.needs_grad)
            base = self.runner.model
            unet = base.diffusion_model
            if self.needs_grad:
                # Only autograd refuses inference tensors; a forward-only pass reads the weights as they are
                # (and leaves every tensor and flag of the MODEL untouched).
                _materialise_inference_tensors(base)
                # Only the masks learn: no UNet weight may take a gradient (ComfyUI creates its parameters with
                # requires_grad=True; a full SDXL would otherwise hold 2.6 B gradients after the merge).
                self._stack.enter_context(_frozen(base))
            modules = {name: module for name, module in _named_lora_modules(unet) if name in self.merger}
            self.modules = modules
            # The low-rank path computes in the UNet's compute dtype, never in a storage dtype (fp8 weights
            # are cast per forward by ComfyUI's ops; their activations are in the manual-cast dtype).
            model_dtype = compute_dtype_of(base)
            self.activation_dtype = self.compute_dtype or model_dtype
            dtype = self.activation_dtype if self.activation_dtype not in _STORAGE_DTYPES else None
            # Masks and factors stay float32 whatever the model's dtype (docs/method.md §2; the adapter casts).
            self.merger.to(device=self.device, dtype=torch.float32)
            _check_ordinary(self.merger)
            self.adapter = self._stack.enter_context(
                attach(self.merger, modules, compute_dtype=dtype, foldable=foldable))
            if self.gradient_checkpointing:
                self._stack.enter_context(_CheckpointedBlocks(unet, self.adapter))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self.adapter = None

    # -- inputs ----------------------------------------------------------------------------------------
    def prepare_latents(self, samples: torch.Tensor) -> list[torch.Tensor]:
        """A LATENT's samples (B, C, H, W) in the model's internal space, one (1, C, H, W) float32 tensor per
        image on the model's device (moved once: noise, x_t, x̂0 and the losses then stay there)."""
        x = self.runner.model.process_latent_in(samples.detach().float())
        return [x[i:i + 1].to(self.device, copy=True) for i in range(x.shape[0])]

    def _encode(self, cond: list, x_t: torch.Tensor) -> dict[str, Any]:
        """The model inputs of one CONDITIONING (its first entry) as ComfyUI COND objects, batch 1."""
        key = (id(cond), tuple(x_t.shape[1:]))
        cached = self._cond_cache.get(key)
        if cached is not None:
            return cached
        converted = comfy.sampler_helpers.convert_cond(cond[:1])
        encoded = comfy.samplers.encode_model_conds(
            self.runner.model.extra_conds, converted, x_t[:1], self.device, "positive",
            latent_image=x_t[:1], seed=0,
        )
        out = {}
        for name, c in encoded[0]["model_conds"].items():
            c = c.process_cond(batch_size=1, device=self.device, area=None)
            if isinstance(c.cond, torch.Tensor) and c.cond.is_inference():
                # The host's encoder output (made under inference mode): an ordinary copy for autograd.
                # ``_copy_with`` is how every COND class re-wraps a tensor (0.3.75 and 0.8.0).
                c = c._copy_with(c.cond.clone())
            out[name] = c
        self._cond_cache[key] = out
        return out

    # -- the protocol --------------------------------------------------------------------------------
    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Sequence[Any],
                branches: Sequence[Branch]) -> torch.Tensor:
        assert self.adapter is not None, "use ComfyDenoiser as a context manager"
        raise_if_interrupted()
        n = x_t.shape[0]
        per_sample = [self._encode(c, x_t) for c in cond]
        # ComfyUI's own batching of conds (cross-attention contexts of different lengths are repeated
        # up to a common length, which leaves attention unchanged).
        kwargs = {name: per_sample[0][name].concat([p[name] for p in per_sample[1:]])
                  for name in per_sample[0]}
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(n).to(self.device)
        x = x_t.to(self.device)
        self.adapter.set_branches(list(branches))
        autocast = (torch.autocast(self.device.type, dtype=self.compute_dtype)
                    if self.compute_dtype not in (None, torch.float32) else contextlib.nullcontext())
        with autocast:
            denoised = self.runner.model.apply_model(x, sigma, **kwargs)
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        return ((x - denoised.float()) / s).to(x_t.device)


def _named_lora_modules(unet: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            yield name, module


def execution_device(model) -> torch.device:
    return model.load_device


# ----------------------------------------------------------------------------------------------------
# K-LoRA: the rule as a sampling-time patch of a MODEL
# ----------------------------------------------------------------------------------------------------

KLORA_WRAPPER_KEY = "duolora_klora"
# How a model call's σ becomes the rule's progress t/T: "steps" places it on the sampling run's own σ schedule
# (the paper: steps done over steps); "noise" on the model's training noise schedule (the same at a given σ for
# any step count, scheduler or split of the run into several samplers).
KLORA_TIMELINES: tuple[str, ...] = ("steps", "noise")


class KLoRASampling:
    """K-LoRA on a MODEL through ComfyUI's own ModelPatcher wrappers, so any sampler and the stock KSampler run it.

    ``outer_sample`` (WrappersMP.OUTER_SAMPLE) spans one sampling run: the rule is attached to the UNet's modules
    at the run's first model call and removed when the run ends, however it ends. ``apply_model``
    (WrappersMP.APPLY_MODEL) chooses every layer's LoRA from the call's σ before the call; a call outside a
    sampling run (a node that calls the model directly) attaches and removes the rule around itself. Nothing is
    changed on the MODEL that was passed in: the wrappers live on a clone, and the UNet's modules carry the
    rule only inside those calls (the clone shares them with the original).
    """

    def __init__(self, klora: KLoRA, timeline: str = "steps") -> None:
        if timeline not in KLORA_TIMELINES:
            raise ValueError(f"K-LoRA timeline {timeline!r} is not one of {', '.join(KLORA_TIMELINES)}")
        self.klora = klora
        self.timeline = timeline
        self.patch: KLoRAPatch | None = None
        self._base_id: int | None = None
        self._runs = 0
        self._schedules: dict[int, tuple[Any, list[float]]] = {}

    # -- the wrappers ----------------------------------------------------------------------------------
    def outer_sample(self, executor, *args: Any, **kwargs: Any) -> Any:
        self._runs += 1
        try:
            return executor(*args, **kwargs)
        finally:
            self._runs -= 1
            if self._runs == 0:
                self.remove()

    def apply_model(self, executor, x: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        base = executor.class_obj
        options = args[3] if len(args) > 3 else kwargs.get("transformer_options") or {}
        patch = self._attach(base)
        patch.set_progress(self.progress(base, t, options))
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            if self._runs == 0:
                self.remove()

    # -- progress and life cycle ------------------------------------------------------------------------
    def progress(self, base, t: torch.Tensor, transformer_options: dict) -> float:
        """The rule's t/T for a model call at σ = ``t`` (ComfyUI's samplers evaluate a batch at one σ)."""
        sigma = float(torch.as_tensor(t).reshape(-1)[0])
        schedule = transformer_options.get("sample_sigmas") if self.timeline == "steps" else None
        if schedule is None:
            schedule = self._training_schedule(base)
        return schedule_progress(sigma, self._as_list(schedule))

    def _as_list(self, schedule: Any) -> list[float]:
        cached = self._schedules.get(id(schedule))
        if cached is None or cached[0] is not schedule:
            cached = (schedule, [float(v) for v in torch.as_tensor(schedule).reshape(-1).tolist()])
            self._schedules = {id(schedule): cached}
        return cached[1]

    @staticmethod
    def _training_schedule(base) -> Any:
        """The model's noise levels from the highest down (its training σ table; else σ_max, σ_min)."""
        sampling = base.model_sampling
        sigmas = getattr(sampling, "sigmas", None)
        if sigmas is not None:
            return torch.as_tensor(sigmas).flip(0)
        return torch.tensor([float(sampling.sigma_max), float(sampling.sigma_min)])

    def _attach(self, base) -> KLoRAPatch:
        if self.patch is not None and self._base_id != id(base):
            self.remove()
        if self.patch is None:
            unet = base.diffusion_model
            modules = {name: m for name, m in _named_lora_modules(unet) if name in self.klora.merger}
            # The low-rank path in float32 whatever the model computes in (as ComfyUI computes a LoRA's ΔW): a
            # factor with its alpha/rank scale folded in can fall below float16's normal range.
            self.patch = self.klora.patch(modules, compute_dtype=torch.float32, foldable=foldable)
            self._base_id = id(base)
        if not self.patch.attached:
            self.patch.attach()
        return self.patch

    def remove(self) -> None:
        """Take the rule off the UNet's modules (they are exactly as before) and free its cached factors."""
        if self.patch is not None:
            self.patch.remove()


def klora_model(model, klora: KLoRA, timeline: str = "steps"):
    """A clone of ``model`` (a ModelPatcher) that samples with K-LoRA; ``model`` itself is left unchanged.

    The LoRAs' bias/norm differences of the UNet (not low-rank layers, so not the rule's to choose) are added as
    the stock LoRA path adds them, summed where both LoRAs have one (the merger's ``patches``)."""
    patches = {k: v for k, v in klora.merger.patches.items() if not k.startswith(TEXT_ENCODER_PREFIXES)}
    if patches:
        state_dict = formats.lora_to_state_dict(LoRA(patches=patches, base=klora.merger.export_base), "kohya_ldm",
                                                dtype=torch.float32, layout=model_layout(model))
        patched, _ = comfy.sd.load_lora_for_models(model, None, state_dict, 1.0, 0.0)
    else:
        patched = model.clone()
    sampling = KLoRASampling(klora, timeline)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KLORA_WRAPPER_KEY,
                                 sampling.outer_sample)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KLORA_WRAPPER_KEY,
                                 sampling.apply_model)
    return patched
