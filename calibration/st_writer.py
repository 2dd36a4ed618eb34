"""A safetensors writer that takes tensors one at a time, so a whole model's compressed
layers never sit in memory together (safetensors' own save_file needs them all at once).

Tensor bytes go to a temporary data file; close() writes the header (known only at the
end) followed by the data into a second temporary file and renames it over the target.
Readers are safetensors' own (safe_open); tests/test_file.py checks round trips.
"""
from __future__ import annotations

import json
import os
import shutil
import struct

import torch

_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
}


class StreamingSafetensorsWriter:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        d = os.path.dirname(self.path)
        os.makedirs(d, exist_ok=True)
        base = f".{os.path.basename(path)}.{os.getpid()}"
        self._data_path = os.path.join(d, base + ".data.tmp")
        self._out_path = os.path.join(d, base + ".tmp")
        self._data = open(self._data_path, "wb")
        self._header: dict = {}
        self._offset = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._header:
            raise KeyError(f"tensor {name} written twice")
        if t.dtype not in _DTYPES:
            raise TypeError(f"dtype {t.dtype} of {name} cannot be stored")
        t = t.detach().contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self._data.write(raw)
        self._header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._offset, self._offset + len(raw)]}
        self._offset += len(raw)

    def close(self, metadata: dict[str, str]) -> None:
        """Finish the file and move it into place."""
        try:
            self._data.close()
            header = dict(self._header)
            header["__metadata__"] = metadata
            hb = json.dumps(header, separators=(",", ":")).encode()
            hb += b" " * (-len(hb) % 8)  # data starts 8-byte aligned
            with open(self._out_path, "wb") as out, open(self._data_path, "rb") as data:
                out.write(struct.pack("<Q", len(hb)))
                out.write(hb)
                shutil.copyfileobj(data, out, 64 << 20)
            os.replace(self._out_path, self.path)
        finally:
            self.abort()

    def abort(self) -> None:
        """Remove the temporary files; the target is left as it was."""
        if not self._data.closed:
            self._data.close()
        for p in (self._data_path, self._out_path):
            if os.path.exists(p):
                os.remove(p)
