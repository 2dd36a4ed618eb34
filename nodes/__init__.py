"""ComfyUI adapters (V3 nodes). Imported only by comfy_entrypoint, inside ComfyUI."""
from comfy_api.latest import ComfyExtension, io


class LiteFFNExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []  # the nodes arrive with the nodes issue
