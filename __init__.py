"""DuoLoRA for ComfyUI: merge a content LoRA and a style LoRA for SDXL (ZipRank, layer priors, optional Constyle).

ComfyUI imports this package from ``custom_nodes/``. Only the V3 entry point is exported (ComfyUI ignores
``comfy_entrypoint`` when a module also exports ``NODE_CLASS_MAPPINGS``).
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import DuoLoRAExtension

    return DuoLoRAExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
