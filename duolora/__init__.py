"""DuoLoRA engine: content–style LoRA merging (ZipRank, layer priors, optional Constyle). Pure torch; never imports ComfyUI."""

__version__ = "0.1.0"
