"""Fingerprint of a model's linears: per layer [out, in, digest of a fixed sample of its weights].

Compressed files and statistics files carry one (metadata "fingerprint"); loading, compressing and
merging compare it with the model's, the checkpoint's or the other file's.

Digest versions (the digest string says which):
  2 (current, "2:<hex>"): a strided sample of 4096 values rounded to bf16, with |x| < 2^-14 taken
    as 0 and |x| > 65504 as +-inf. A bf16 source and its fp16 and fp32 copies agree: bf16 values
    in fp16's normal range are exact in fp16, and below it (where fp16 loses bits) every copy
    reads 0. An fp32 source agrees with its bf16 copy; its fp16 copy rounds twice and may not.
  1 (files before it, a plain 16-digit hex): the sample rounded to bf16 as is, so an fp16 copy of
    bf16 weights with values below 2^-14 (or above 65504) got another digest. Still read: the
    model's digest is then taken the same way (`fingerprint(..., like=saved)`).
  3 ("3:<hex>", only for weights in one of ComfyUI's quantized layouts whose codes are not FP8: a
    comfy-kitchen QuantizedTensor in int8 / int8-ConvRot, NVFP4, ...): version 2 of its stored codes, so
    the digest is the same wherever the weight is read (node or file) and whichever kernel would
    dequantize it (their last bits differ between devices). Files before it hashed such weights
    dequantized (version 2), which is how the model's digest is taken for them (`like=saved`).
FP8 weights (scaled FP8 checkpoints included) are hashed as their raw E4M3 values (exact in bf16).
"""
from __future__ import annotations

import hashlib
import json

import torch

from .validate import FileError

FINGERPRINT_VERSION = 3  # the newest digest version written and read
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_SAMPLE = 4096
_FP16_TINY = 2.0**-14  # fp16's smallest normal
_FP16_MAX = 65504.0


class MismatchError(ValueError):
    """A file made from another model (other layers, shapes or weights)."""


def digest_version(digest) -> int:
    return int(digest.split(":", 1)[0]) if isinstance(digest, str) and ":" in digest else 1


def weight_digest(w: torch.Tensor, version: int | None = None) -> str:
    """Digest of a strided sample of the weight, the same for bf16/fp16/fp32 copies (module docstring).
    version None: 3 for a quantized weight whose codes are not FP8, else 2."""
    codes = getattr(w, "_qdata", None)  # a QuantizedTensor's stored codes
    coded = codes is not None and codes.dtype not in _FP8
    if version is None:
        version = 3 if coded else 2
    if coded and version < 3:
        flat = w.dequantize()  # (how files before version 3 saw such a weight)
    else:
        flat = w if codes is None else codes
    flat = flat.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLE)
    sample = flat[::step][:_SAMPLE].to(torch.float32).to(torch.bfloat16)
    if version > FINGERPRINT_VERSION or version < 1:
        raise ValueError(f"unknown fingerprint version {version}")
    if version >= 2:
        s = sample.float()
        s = torch.where(s.abs() < _FP16_TINY, torch.zeros_like(s), s)
        s = torch.where(s.abs() > _FP16_MAX, torch.sign(s) * float("inf"), s)
        s = torch.where(torch.isnan(s), torch.full_like(s, float("nan")), s)  # one NaN pattern
        sample = s.to(torch.bfloat16)
    h = hashlib.blake2b(sample.view(torch.int16).cpu().numpy().tobytes(), digest_size=8).hexdigest()
    return h if version == 1 else f"{version}:{h}"


def fingerprint(weights, like: dict | None = None) -> dict:
    """weights: iterable of (linear name, weight tensor) -> {name: [out, in, digest]}.
    like: a saved fingerprint; its layers' digests are taken in the version it holds (old files)."""
    out = {}
    for n, w in weights:
        version = digest_version(like[n][2]) if like and isinstance(like.get(n), list) and len(like[n]) == 3 \
            else None
        out[n] = [int(w.shape[0]), int(w.shape[1]), weight_digest(w, version)]
    return out


def fingerprint_hash(fp: dict) -> str:
    return hashlib.blake2b(json.dumps(fp, sort_keys=True).encode(), digest_size=8).hexdigest()


def check_fingerprint(fp, path: str, fix: str, required: bool = True) -> dict:
    """A file's fingerprint, well formed ({name: [out, in, digest]}) and, if required, present and
    not empty. Raises FileError naming the file and fix."""
    if fp is None or fp == {}:
        if required:
            raise FileError(f"{path} has no fingerprint of its source model (metadata 'fingerprint' is "
                            f"{'missing' if fp is None else 'empty'}), so it cannot be checked against the model; "
                            f"{fix}")
        return {}
    if not isinstance(fp, dict):
        raise FileError(f"{path}: its fingerprint is not a table of layers; {fix}")
    for n, e in fp.items():
        if not (isinstance(e, list) and len(e) == 3 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                           for x in e[:2]) and isinstance(e[2], str) and e[2]):
            raise FileError(f"{path}: fingerprint entry of layer {n} is {e!r}, not [out, in, digest]; {fix}")
        if digest_version(e[2]) > FINGERPRINT_VERSION:
            raise FileError(f"{path}: layer {n} has a fingerprint of version {digest_version(e[2])}, newer than "
                            "this LiteFFN reads; update the pack")
    return fp


REMAKE_FOR_MODEL = ("This file was made for another model: compress this model again (re-run Compress Model), "
                    "or load the checkpoint the file was made from.")


def compare_fingerprints(saved: dict, model: dict, path: str = "file", common_only: bool = False,
                         fix: str = REMAKE_FOR_MODEL) -> None:
    """Raise MismatchError naming what differs between the file's source model and this one.
    common_only: compare only the layers both hold (statistics may cover other layers). model's
    digests must be taken like saved's (fingerprint(..., like=saved)); where they are not (a file of
    an older LiteFFN against a current fingerprint), the message says to re-make the file."""
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
    common = [n for n in saved if n in model and n not in shape]
    versions = [n for n in common if digest_version(saved[n][2]) != digest_version(model[n][2])]
    if versions:
        n = versions[0]
        raise MismatchError(
            f"{path} was made by another version of LiteFFN (weight fingerprint version "
            f"{digest_version(saved[n][2])}, this one compares version {digest_version(model[n][2])}, e.g. layer "
            f"{n}), so its weights cannot be compared with this model's: make the file again with this version"
        )
    weights = [n for n in common if saved[n][2] != model[n][2]]
    if weights:
        problems.append(
            f"{len(weights)} layers hold different weights (e.g. {weights[0]}): the file was made "
            "from another checkpoint"
        )
    if problems:
        raise MismatchError(
            f"{path} does not match this model: " + "; ".join(problems) + ". " + fix
        )


def compare_files(a: dict, b: dict, path_a: str, path_b: str, what: str) -> None:
    """Two statistics files' fingerprints (and families) over the layers both hold: MismatchError if
    they were made on different models. what: the action refused ("merged")."""
    fa, fb = a.get("model_family"), b.get("model_family")
    if fa is not None and fb is not None and fa != fb:
        raise MismatchError(f"{path_b} holds statistics of a {fb!r} model and {path_a} of a {fa!r} model: "
                            f"statistics of different models cannot be {what}")
    pa, pb = a.get("fingerprint") or {}, b.get("fingerprint") or {}
    common = [n for n in pa if n in pb]
    shape = [n for n in common if pa[n][:2] != pb[n][:2]]
    versions = [n for n in common if n not in shape and digest_version(pa[n][2]) != digest_version(pb[n][2])]
    weights = [n for n in common if n not in shape and n not in versions and pa[n][2] != pb[n][2]]
    if shape or weights:
        n = (shape or weights)[0]
        why = (f"{len(shape)} layers differ in shape (e.g. {n}: {pa[n][0]}x{pa[n][1]} and {pb[n][0]}x{pb[n][1]})"
               if shape else f"{len(weights)} layers were calibrated on other weights (e.g. {n})")
        raise MismatchError(f"{path_a} and {path_b} were made on different models: {why}; statistics of "
                            f"different models cannot be {what}. Calibrate the same checkpoint, or keep them apart")
    if versions:
        n = versions[0]
        raise MismatchError(f"{path_a} and {path_b} were made by different versions of LiteFFN (weight fingerprint "
                            f"versions {digest_version(pa[n][2])} and {digest_version(pb[n][2])}, e.g. layer {n}), "
                            f"so whether they come from the same model cannot be checked; they cannot be {what}: "
                            "calibrate again with this version")
