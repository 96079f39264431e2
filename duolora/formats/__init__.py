"""Reading and writing LoRA files in every common key style; every validation error lives here.

Key styles (``LoRA.key_style``), shown for SDXL's ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``:

==========================  ==========================================================================
``kohya_ldm``               ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight``
                            (+ ``.lora_up.weight``, ``.alpha``; text encoders ``lora_te1_…``/``lora_te2_…``,
                            SD1.x ``lora_te_…``)
``kohya_diffusers``         ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down…``
``diffusers_peft``          ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``
                            (+ ``lora_B``; also without ``unet.``, with ``base_model.model.``;
                            text encoders ``text_encoder.…`` / ``text_encoder_2.…``)
``diffusers``               ``unet.down_blocks.….attn1.to_q.lora.down.weight`` (+ ``.lora.up.weight``;
                            text encoders ``….q_proj.lora_linear_layer.down.weight``)
``diffusers_attn_procs``    ``down_blocks.….attn1.processor.to_q_lora.down.weight`` (legacy; ``to_out_lora``)
``comfyui``                 ``diffusion_model.input_blocks.4.1.….attn1.to_q.lora_down.weight`` (+ lora_up,
                            alpha; text encoders ``text_encoders.clip_l.transformer.…``)
==========================  ==========================================================================

These are the styles written. Reading accepts every combination of a known prefix (``unet.``, ``lora_unet_``,
``diffusion_model.``, ``model.diffusion_model.``, ``base_model.model.``, the text-encoder equivalents), path
style (LDM or diffusers) and suffix (``lora_down/up``, ``lora_A/B``, ``lora.down/up``): ``duolora.sdxl``'s
aliases; other combinations get labels such as ``unet.<ldm>.lora_down`` (OneTrainer).

Inside the engine every layer has its canonical name (``duolora.lora``) and ``up`` carries the
scale (docs/method.md §1), so ΔW = up @ down; the scale is read where the file's writer keeps it (``.alpha``
tensors, PEFT ``lora_adapter_metadata``: ``scales.layer_scale``). Bias/norm differences ComfyUI applies are
``LoRA.patches``. Files are never unpickled: only safetensors is read.

The submodules, each importing only those listed before it; callers use the names this package exports:

- ``errors``: ``LoRAError`` and its subclasses, one per kind of problem; the output-name check.
- ``keys``: the key grammar: ``KEY_STYLES``, LoRA/adapter/bias-difference suffixes, key style of a spelling.
- ``safetensors_io``: the header checked before anything is read, tensors (or ``meta`` ones), NaN/Inf scans.
- ``detect``: the base model whose layer names and shapes explain a file's modules.
- ``scales``: each layer's scale from ``.alpha`` tensors, ``lora_adapter_metadata`` or ``adapter_config.json``.
- ``not_lora``: the refusals naming what a file that is no low-rank LoRA is (checkpoint, LoKr, DoRA, …).
- ``read``: ``state_dict_to_lora`` and ``read_lora``: any key style to a ``LoRA`` with canonical names.
- ``validate``: ``validate_lora``/``load_lora``, the check against a model's layout; ``merge_layout`` and
  ``read_lora_for_merge`` (a file read with the table a merge checks it against).
- ``write``: ``lora_to_state_dict`` in each key style, ``save_lora``/``save_state_dict`` (atomic writes).
- ``describe``: inspect's ``summary``, ``one_line_summary``, what is not merged, ``merge_notes``.
"""

from __future__ import annotations

from .describe import (
    merge_notes,
    not_merged,
    not_merged_lines,
    one_line_summary,
    scale_note,
    scale_origin,
    scale_text,
    summary,
)
from .errors import (
    PICKLE_SUFFIXES,
    EmptyLoRAError,
    LayerMismatchError,
    LoRAError,
    MalformedLoRAError,
    MissingFileError,
    NonFiniteError,
    NotALoRAError,
    NotSafetensorsError,
    OutputExistsError,
    OutputNameError,
    PickleFileError,
    RankMismatchError,
    UnknownKeyStyleError,
    UnsupportedAdapterError,
    WrongBaseModelError,
    refuse_output_name,
)
from .keys import EMBEDDING_REASON, KEY_STYLES, split_key
from .read import (
    ALPHA_ONLY_REASON,
    RANK_ZERO_REASON,
    UNKNOWN_LAYER_REASON,
    UNKNOWN_PATCH_REASON,
    UNKNOWN_SPELLING_REASON,
    read_lora,
    state_dict_to_lora,
)
from .safetensors_io import non_finite_keys
from .scales import (
    PEFT_CONFIG_MISSING_NOTE,
    PEFT_CONFIG_NAME,
    PEFT_METADATA_KEY,
    PEFT_WEIGHTS_NAME,
    SCALE_SOURCES,
    peft_sidecar,
)
from .validate import (
    UNKNOWN_SHARE_REFUSED,
    load_lora,
    merge_layout,
    non_finite_error,
    non_finite_layers,
    read_lora_for_merge,
    unknown_modules,
    validate_lora,
)
from .write import (
    exact_scalar,
    file_sha256,
    lora_to_state_dict,
    new_file_beside,
    output_dtype,
    same_file_contents,
    save_lora,
    save_state_dict,
)

__all__ = [
    "ALPHA_ONLY_REASON", "EMBEDDING_REASON", "KEY_STYLES", "PEFT_CONFIG_MISSING_NOTE", "PEFT_CONFIG_NAME",
    "PEFT_METADATA_KEY", "PEFT_WEIGHTS_NAME", "PICKLE_SUFFIXES", "RANK_ZERO_REASON", "SCALE_SOURCES",
    "UNKNOWN_LAYER_REASON", "UNKNOWN_PATCH_REASON", "UNKNOWN_SHARE_REFUSED", "UNKNOWN_SPELLING_REASON",
    "EmptyLoRAError", "LayerMismatchError", "LoRAError", "MalformedLoRAError", "MissingFileError", "NonFiniteError",
    "NotALoRAError", "NotSafetensorsError", "OutputExistsError", "OutputNameError", "PickleFileError",
    "RankMismatchError", "UnknownKeyStyleError", "UnsupportedAdapterError", "WrongBaseModelError",
    "exact_scalar", "file_sha256", "load_lora", "lora_to_state_dict", "merge_layout", "merge_notes",
    "new_file_beside", "non_finite_error", "non_finite_keys", "non_finite_layers", "not_merged",
    "not_merged_lines", "one_line_summary", "output_dtype", "peft_sidecar", "read_lora", "read_lora_for_merge",
    "refuse_output_name",
    "same_file_contents", "save_lora", "save_state_dict", "scale_note", "scale_origin", "scale_text",
    "split_key", "state_dict_to_lora", "summary", "unknown_modules", "validate_lora",
]
