"""ComfyUI adapters (V3 nodes). Imported only by comfy_entrypoint, inside ComfyUI."""
from comfy_api.latest import ComfyExtension, io

from . import files
from .calibrate import LiteFFNCalibrate
from .compare import LiteFFNCompare
from .compress import LiteFFNCompressModel
from .loader import LowRankFFNLoader

files.register()


class LiteFFNExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LiteFFNCalibrate, LiteFFNCompressModel, LowRankFFNLoader, LiteFFNCompare]
