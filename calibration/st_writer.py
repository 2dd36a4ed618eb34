"""A safetensors writer that takes tensors one at a time, so a whole model's compressed
layers never sit in memory together (safetensors' own save_file needs them all at once).

The file is written once, in place, into safe_io's temporary file beside the target: the
tensor data starts after room left for the header (known only at the end), and close()
writes the header, padded with spaces (which safetensors allows) to fill that room, then
renames the temp over the target. No second copy: the disk needs the output's size once.
If the header outgrows the room, the data is moved up inside the same file (no extra space,
one more pass over the data), so the room is sized from the expected number of tensors.
Readers are safetensors' own (safe_open); tests/test_file.py checks round trips.
"""
from __future__ import annotations

import json
import struct

import torch

from .safe_io import FULL_ERRNOS, SafeOutput, enospc_message

_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
}
DEFAULT_HEADER_ROOM = 1 << 20  # bytes; ~4x the header of LTX-2 19B's 192 FFN linears
_CHUNK = 64 << 20


def _round8(n: int) -> int:
    return n + (-n % 8)


class StreamingSafetensorsWriter:
    """add() tensors, then close(metadata) (or abort()). Output checks, the temp, signals and
    stale temps: safe_io.SafeOutput, whose arguments (inputs, expect_format, expected_bytes,
    option) are passed through. header_room: bytes left for the header before the data."""

    def __init__(self, path: str, inputs=(), *, expect_format: str | None = None,
                 expected_bytes: int | None = None, header_room: int = DEFAULT_HEADER_ROOM,
                 option: str = "output"):
        self._out = SafeOutput(path, inputs, expect_format=expect_format, expected_bytes=expected_bytes,
                               option=option)
        self.path = self._out.path
        self._room = _round8(max(int(header_room), 8))
        self._data = self._out.file
        self._data.seek(8 + self._room)
        self._header: dict = {}
        self._offset = 0

    @property
    def temp_path(self) -> str:
        return self._out.tmp

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._header:
            raise KeyError(f"tensor {name} written twice")
        if t.dtype not in _DTYPES:
            raise TypeError(f"dtype {t.dtype} of {name} cannot be stored")
        t = t.detach().contiguous().cpu()
        n = t.numel() * t.element_size()
        if n:
            try:
                self._data.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            except OSError as e:
                self.abort()
                if e.errno in FULL_ERRNOS:
                    raise enospc_message(self._out.shown, e) from e
                raise
        self._header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._offset, self._offset + n]}
        self._offset += n

    def close(self, metadata: dict[str, str]) -> None:
        """Write the header and move the file into place."""
        try:
            header = dict(self._header)
            header["__metadata__"] = metadata
            hb = json.dumps(header, separators=(",", ":")).encode()
            if len(hb) > self._room:
                self._move_data(_round8(len(hb)) - self._room)
            hb += b" " * (self._room - len(hb))  # data starts 8-byte aligned, right after
            self._data.seek(0)
            self._data.write(struct.pack("<Q", len(hb)))
            self._data.write(hb)
            self._out.commit()
        except OSError as e:
            if e.errno in FULL_ERRNOS:
                raise enospc_message(self._out.shown, e) from e
            raise
        finally:
            self.abort()

    def _move_data(self, delta: int) -> None:
        """Shift the data delta bytes up within the file, last chunk first."""
        start = 8 + self._room
        self._data.flush()
        end = self._offset
        while end > 0:
            n = min(_CHUNK, end)
            self._data.seek(start + end - n)
            buf = self._data.read(n)
            self._data.seek(start + end - n + delta)
            self._data.write(buf)
            end -= n
        self._room += delta

    def abort(self) -> None:
        """Remove the temporary file; the target is left as it was (no-op after close)."""
        self._out.abort()
