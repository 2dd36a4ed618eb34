"""The compressed file: one .safetensors per model.

Tensors: `<linear>.<A|B|q|q_scale|q_scale2|bias>` per compressed linear.
Metadata (key "liteffn", JSON): format, version, model family, the source model's
fingerprint (per layer: shape and a digest of a fixed sample of its weights), and per layer
rank, residual format, measured relative error, bytes. Written through safe_io (checked output,
temp beside it, renamed into place whole; see st_writer).
"""
from __future__ import annotations

import json

import torch

from .compress import CompressedLayer
from .fingerprint import (FINGERPRINT_VERSION, MismatchError, check_fingerprint,  # noqa: F401 (the API)
                          compare_fingerprints, digest_version, fingerprint, fingerprint_hash, weight_digest)
from .report import heldout_totals
from .safe_io import check_output
from .st_writer import StreamingSafetensorsWriter
from .stats import open_checked
from .validate import DAMAGED, FileError, check_header, check_values

FILE_FORMAT = "liteffn.compressed"
FILE_VERSION = 1
REMAKE = "re-run Compress Model (or `liteffn compress`) to make it again"


class Writer:
    """Adds compressed layers one at a time (with the source weight's fingerprint entry);
    the file appears, whole, only when the `with` block ends without an error.

    The output is checked when the Writer is made, before any work (safe_io.check_output):
    inputs (the source checkpoint, the statistics file) are never overwritten, nor a
    directory, a device, or an existing file that is not a compressed file (statistics, a
    model checkpoint). expected_bytes (estimate_bytes) checks the free space; expected_layers
    sizes the header's room. option: how the user names the output, for messages."""

    def __init__(self, path: str, family: str, extra: dict | None = None, *, inputs=(),
                 expected_bytes: int | None = None, expected_layers: int | None = None, option: str = "output"):
        self.path, self.family, self.extra = path, family, dict(extra or {})
        self.fp: dict = {}
        self.infos: dict = {}
        kw = {} if expected_layers is None else {"header_room": _header_room(expected_layers)}
        self._w = StreamingSafetensorsWriter(path, inputs, expect_format=FILE_FORMAT, expected_bytes=expected_bytes,
                                             option=option, **kw)

    def add(self, name: str, layer: CompressedLayer, source_weight: torch.Tensor | None = None, *,
            fingerprint_entry: list | None = None) -> None:
        """fingerprint_entry: fingerprint()'s entry of the source weight, when another process held
        the weight (checkpoint.compress_rank)."""
        if (source_weight is None) == (fingerprint_entry is None):
            raise ValueError("give the source weight or its fingerprint entry")
        self.fp[name] = fingerprint([(name, source_weight)])[name] if source_weight is not None else fingerprint_entry
        self.infos[name] = layer.info
        for k, v in layer.tensors.items():
            self._w.add(f"{name}.{k}", v)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.abort()
        else:
            self.close()
        return False

    def abort(self) -> None:
        """Drop what was added; the target is left as it was."""
        self._w.abort()

    def close(self) -> None:
        """Write the metadata and move the file into place."""
        meta = {
            **self.extra,  # first: never overrides the keys below
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "model_family": self.family,
            "fingerprint": self.fp,
            "fingerprint_hash": fingerprint_hash(self.fp),
            "layers": self.infos,
        }
        held = heldout_totals(self.infos)  # the error users get, over the layers measured on held-out rows
        if held is not None:
            meta["heldout"] = held
        self._w.close({"liteffn": json.dumps(meta)})


def _header_room(layers: int) -> int:
    """Header bytes to leave for this many compressed linears (measured ~1.2 KB each with
    names as long as LTX-2's; twice that, so the data never has to move)."""
    return 16384 + 2560 * layers


def estimate_bytes(shapes, rank: int, fmt, bias: bool = True) -> int:
    """Bytes of a compressed file holding linears of these (out, in) shapes at this rank (an
    upper bound per layer; with an energy policy give the least rank, 0, for a lower bound)
    and residual format, header room included (the room of a Writer not told the layer count,
    st_writer.DEFAULT_HEADER_ROOM, at least)."""
    from .st_writer import DEFAULT_HEADER_ROOM
    from ..kernels.formats import get

    f = get(fmt)
    total = 0
    for n, k in shapes:
        r = max(0, min(int(rank), n, k))
        total += (n + k) * r * 2 + n * k * f.bits // 8 + 4  # A, B (bf16), q, input_amax
        if "q_scale" in f.tensor_names:
            total += n * 4 if f.block is None else n * (k // f.block)  # fp32 per row; 1-byte block scales
        if f.tensor_scale:
            total += 4
        if bias:
            total += n * 2
    return total + 8 + max(_header_room(len(shapes)), DEFAULT_HEADER_ROOM)


def check_checkpoint_output(out: str, ckpt: str, stats: str | None, which: str, rank: int, fmt,
                            option: str = "-o", layers: str = "ffn") -> None:
    """The offline command's output, checked before any work: not an input, a writable file of
    the right kind, and room on its disk for the file (sized from the selected linears' shapes;
    skipped when the checkpoint cannot be read: loading it says why)."""
    expected = None
    try:
        from safetensors import safe_open

        from .checkpoint import block_linears

        with safe_open(ckpt, framework="pt") as f:
            keys = list(f.keys())
            p, names = block_linears(keys, which, layers)
            shapes = [tuple(f.get_slice(f"{p}{n}.weight").get_shape()) for n in names]
            bias = any(f"{p}{n}.bias" in keys for n in names)
        if shapes and all(len(s) == 2 for s in shapes):
            expected = estimate_bytes(shapes, rank, fmt, bias)
    except Exception:  # noqa: BLE001  (not readable: the compression itself reports it)
        pass
    check_output(out, (ckpt, stats), expect_format=FILE_FORMAT, expected_bytes=expected, option=option)


def save(path: str, layers: dict[str, CompressedLayer], weights: dict[str, torch.Tensor], family: str,
         extra: dict | None = None) -> None:
    """layers and the source weights they were made from, by linear name."""
    with Writer(path, family, extra, expected_layers=len(layers)) as w:
        for name, layer in layers.items():
            w.add(name, layer, weights[name])


def read_meta(path: str) -> dict:
    """The checked metadata (layers and fingerprint well formed), without reading tensors."""
    meta, f = open_checked(path, FILE_FORMAT, FILE_VERSION)
    with f:
        _check_meta(meta, path)
        return meta


def _check_meta(meta: dict, path: str) -> None:
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise FileError(f"{path} describes no compressed layers (metadata 'layers' is "
                        f"{'empty' if layers == {} else 'missing or not a table'}); {DAMAGED}")
    fp = check_fingerprint(meta.get("fingerprint"), path, REMAKE)
    for name, info in layers.items():
        if not isinstance(info, dict):
            raise FileError(f"{path}: metadata of layer {name} is not a table; {DAMAGED}")
        if name not in fp:
            raise FileError(f"{path}: layer {name} has no fingerprint entry, so it cannot be checked against the "
                            f"model; {REMAKE}")
        if fp[name][:2] != [info.get("out_features"), info.get("in_features")]:
            raise FileError(f"{path}: layer {name} is {info.get('out_features')}x{info.get('in_features')} but its "
                            f"fingerprint says {fp[name][0]}x{fp[name][1]}; {DAMAGED}")


def load(path: str, model_fp: dict | None = None, family: str | None = None, device="cpu"):
    """-> ({name: CompressedLayer}, metadata). With model_fp (its digests taken like the file's:
    fingerprint(weights, like=read_meta(path)["fingerprint"])), checks the file against it.

    Before any tensor is read: the metadata (layers, fingerprint present and covering every layer,
    family, model), then every layer's tensors as the header gives them (the set the format and
    rank call for, nothing else, their shapes and dtypes); while reading: every value finite.
    Errors (FileError, MismatchError) name the file, the layer, the tensor and the fix."""
    meta, f = open_checked(path, FILE_FORMAT, FILE_VERSION)
    with f:
        _check_meta(meta, path)
        if family is not None and meta.get("model_family") != family:
            raise MismatchError(
                f"{path} was made for a {meta.get('model_family')!r} model, not {family!r}: this file was made "
                "for another model"
            )
        if model_fp is not None:
            compare_fingerprints(meta["fingerprint"], model_fp, path)
        by_layer: dict[str, dict] = {name: {} for name in meta["layers"]}
        for key in f.keys():
            name, _, tensor = key.rpartition(".")
            if name not in by_layer:
                raise FileError(f"{path} holds a tensor {key} that belongs to no layer of its metadata; {DAMAGED}")
            sl = f.get_slice(key)
            by_layer[name][tensor] = (sl.get_dtype(), tuple(sl.get_shape()))
        for name, info in meta["layers"].items():
            check_header(path, name, info, by_layer[name])
        layers = {}
        for name, info in meta["layers"].items():
            t = {k: f.get_tensor(f"{name}.{k}") for k in by_layer[name]}
            check_values(path, name, info, t)
            layers[name] = CompressedLayer({k: v.to(device) for k, v in t.items()}, info)
    return layers, meta
