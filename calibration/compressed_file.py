"""The compressed file: one .safetensors per model.

Tensors: `<linear>.<A|B|q|q_scale|q_scale2|bias>` per compressed linear.
Metadata (key "liteffn", JSON): format, version, model family, the source model's
fingerprint (per layer: shape and a digest of a fixed sample of its weights), and per layer
rank, residual format, measured relative error, bytes. Written atomically.
"""
from __future__ import annotations

import hashlib
import json

import torch

from ..kernels.modules import TENSOR_NAMES
from .compress import CompressedLayer
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
    the file appears, whole, only when the `with` block ends without an error."""

    def __init__(self, path: str, family: str, extra: dict | None = None):
        self.path, self.family, self.extra = path, family, dict(extra or {})
        self.fp: dict = {}
        self.infos: dict = {}
        self._w = StreamingSafetensorsWriter(path)

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


def save(path: str, layers: dict[str, CompressedLayer], weights: dict[str, torch.Tensor], family: str,
         extra: dict | None = None) -> None:
    """layers and the source weights they were made from, by linear name."""
    with Writer(path, family, extra) as w:
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
