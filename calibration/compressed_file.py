"""The compressed file: one .safetensors per model.

Tensors: `<linear>.<A|B|q|q_scale|q_scale2|bias>` per compressed linear.
Metadata (key "liteffn", JSON): format, version, model family, the source model's
fingerprint (per layer: shape and a digest of a fixed sample of its weights), and per layer
rank, residual format, measured relative error, bytes. Written through safe_io (checked output,
temp beside it, renamed into place whole; see st_writer).
"""
from __future__ import annotations

import hashlib
import json

import torch

from ..kernels.modules import TENSOR_NAMES
from .compress import CompressedLayer
from .safe_io import check_output
from .st_writer import StreamingSafetensorsWriter
from .stats import open_checked
from .stats import read_meta as _read_meta

FILE_FORMAT = "liteffn.compressed"
FILE_VERSION = 1
_SAMPLE = 4096


def weight_digest(w: torch.Tensor) -> str:
    """Digest of a strided sample of the weight, taken in bf16 so the same weights held as
    fp32, fp16 or bf16 agree. (FP8 checkpoints hash their raw FP8 values.)"""
    flat = w.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLE)
    sample = flat[::step][:_SAMPLE].to(torch.float32).to(torch.bfloat16).view(torch.int16).cpu()
    return hashlib.blake2b(sample.numpy().tobytes(), digest_size=8).hexdigest()


def fingerprint(weights) -> dict:
    """weights: iterable of (linear name, weight tensor). {name: [out, in, digest]}."""
    return {n: [int(w.shape[0]), int(w.shape[1]), weight_digest(w)] for n, w in weights}


def fingerprint_hash(fp: dict) -> str:
    return hashlib.blake2b(json.dumps(fp, sort_keys=True).encode(), digest_size=8).hexdigest()


class MismatchError(ValueError):
    pass


def compare_fingerprints(saved: dict, model: dict, path: str = "file", common_only: bool = False) -> None:
    """Raise MismatchError naming what differs between the file's source model and this one.
    common_only: compare only the layers both hold (statistics may cover other layers)."""
    if common_only:
        saved = {n: v for n, v in saved.items() if n in model}
    problems = []
    missing = sorted(set(saved) - set(model))
    if missing:
        problems.append(f"{len(missing)} layers of the file are not in the model (e.g. {missing[0]})")
    shape = [n for n in saved if n in model and saved[n][:2] != model[n][:2]]
    if shape:
        n = shape[0]
        problems.append(
            f"{len(shape)} layers differ in shape (e.g. {n}: file {saved[n][0]}x{saved[n][1]}, "
            f"model {model[n][0]}x{model[n][1]})"
        )
    weights = [n for n in saved if n in model and n not in shape and saved[n][2] != model[n][2]]
    if weights:
        problems.append(
            f"{len(weights)} layers hold different weights (e.g. {weights[0]}): the file was made "
            "from another checkpoint (or another precision of it)"
        )
    if problems:
        raise MismatchError(
            f"{path} does not match this model: " + "; ".join(problems)
            + ". Compress this model again, or load the checkpoint the file was made from."
        )


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
                            option: str = "-o") -> None:
    """The offline command's output, checked before any work: not an input, a writable file of
    the right kind, and room on its disk for the file (sized from the checkpoint's FFN shapes;
    skipped when the checkpoint cannot be read: loading it says why)."""
    expected = None
    try:
        from safetensors import safe_open

        from .checkpoint import ffn_linears

        with safe_open(ckpt, framework="pt") as f:
            keys = list(f.keys())
            p, names = ffn_linears(keys, which)
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
    return _read_meta(path, FILE_FORMAT, FILE_VERSION)


def load(path: str, model_fp: dict | None = None, family: str | None = None, device="cpu"):
    """-> ({name: CompressedLayer}, metadata). With model_fp, checks the file against it."""
    meta, f = open_checked(path, FILE_FORMAT, FILE_VERSION)
    if family is not None and meta.get("model_family") != family:
        raise MismatchError(
            f"{path} was made for a {meta.get('model_family')!r} model, not {family!r}"
        )
    if model_fp is not None:
        compare_fingerprints(meta["fingerprint"], model_fp, path)
    layers = {}
    with f:
        keys = set(f.keys())
        for name, info in meta["layers"].items():
            t = {}
            for k in TENSOR_NAMES:
                if f"{name}.{k}" in keys:
                    t[k] = f.get_tensor(f"{name}.{k}").to(device)
            if "q" not in t:
                raise ValueError(f"{path} is missing the residual of layer {name}: the file is damaged")
            n, kk = info["out_features"], info["in_features"]
            if info["rank"] and (t.get("A") is None or tuple(t["A"].shape) != (n, info["rank"])
                                 or tuple(t["B"].shape) != (info["rank"], kk)):
                raise ValueError(f"{path}: low-rank factors of {name} do not have rank {info['rank']}")
            layers[name] = CompressedLayer(t, info)
    return layers, meta
