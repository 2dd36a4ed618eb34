"""ComfyUI-LiteFFN: ComfyUI loads this file from custom_nodes/. Nothing heavy at import."""


async def comfy_entrypoint():
    from .nodes import LiteFFNExtension

    return LiteFFNExtension()
