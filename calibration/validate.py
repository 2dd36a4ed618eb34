"""Checks of what is written and loaded: a compressed layer's tensors (names, shapes, dtypes,
finiteness) against its metadata, with messages that name the file, the layer, the tensor and
the fix. The same rules run on a layer just compressed (before it is written) and on a file
being loaded, so a file that passed one passes the other.

The expected shapes and dtypes of a residual format's tensors are read off the format itself: a
tiny residual is quantized at two sizes and each dimension is matched to N, a fraction of K, or a
constant (so a format registered later is checked without a table here).
"""
from __future__ import annotations

import functools

import torch

DAMAGED = ("the file is damaged or was not made by LiteFFN (it would give wrong or NaN frames): re-run Compress "
           "Model (or `liteffn compress`) to make it again")

# safetensors' dtype names
ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
}
# weights LiteFFN compresses (FP8 with its scale)
SOURCE_DTYPES = ("BF16", "F16", "F32", "F8_E4M3", "F8_E5M2")


class FileError(ValueError):
    """A file that cannot be used as it is (damaged, inconsistent, foreign); the message says which
    file, what, and what to do."""


class LayerError(ValueError):
    """A layer that cannot be compressed or written (its source weight, its result); the message
    names the layer and what to do."""


# ------------------------------------------------------------------ expected tensors
_PROBES = ((2, 64), (3, 128))  # (N, K): K a multiple of every block size


@functools.lru_cache(maxsize=None)
def residual_spec(fmt_name: str) -> dict:
    """{tensor: (dtype, dims)} of a format's stored residual; dims: per dimension ("N",),
    ("K", fraction) or ("C", constant)."""
    from ..kernels import formats as F
    from .residual import quantize_residual

    form = F.get(fmt_name)
    g = torch.Generator().manual_seed(0)
    probes = [quantize_residual(torch.randn(n, k, generator=g), form, None)[0] for n, k in _PROBES]
    spec = {}
    for name in form.tensor_names:
        t0, t1 = probes[0][name], probes[1][name]
        dims = []
        for d0, d1 in zip(t0.shape, t1.shape):
            if d0 == d1:
                dims.append(("C", d0))
            elif (d0, d1) == (_PROBES[0][0], _PROBES[1][0]):
                dims.append(("N",))
            elif d0 * _PROBES[1][1] == d1 * _PROBES[0][1]:
                dims.append(("K", d0 / _PROBES[0][1]))
            else:
                dims.append(None)  # not derivable: unchecked
        spec[name] = (t0.dtype, tuple(dims))
    return spec


def expected_tensors(info: dict, has_bias: bool, has_amax: bool) -> dict:
    """{tensor: (dtype, shape)} a layer of this metadata stores. Raises ValueError (no file named)
    if the metadata itself is inconsistent."""
    from ..kernels import formats as F

    n, k, r, fmt = info.get("out_features"), info.get("in_features"), info.get("rank"), info.get("format")
    for what, v, lo in (("out_features", n, 1), ("in_features", k, 1), ("rank", r, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"its metadata gives {what} = {v!r}")
    if r > min(n, k):
        raise ValueError(f"its metadata gives rank {r}, larger than the layer ({n}x{k}) allows")
    form = F.get(fmt)  # ValueError naming the known formats
    out = {}
    for name, (dtype, dims) in residual_spec(form.name).items():
        shape = []
        for d in dims:
            if d is None:
                shape.append(None)
            elif d[0] == "C":
                shape.append(d[1])
            elif d[0] == "N":
                shape.append(n)
            else:
                size = k * d[1]
                if size != int(size):
                    raise ValueError(f"its input width {k} does not fit the {form.name} format's blocks")
                shape.append(int(size))
        out[name] = (dtype, tuple(shape))
    if r:
        out["A"] = (torch.bfloat16, (n, r))
        out["B"] = (torch.bfloat16, (r, k))
    if has_bias:
        out["bias"] = (torch.bfloat16, (n,))
    if has_amax:
        out["input_amax"] = (torch.float32, (1,))
    return out


def _shape(s) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in s) + "]"


def check_header(where: str, layer: str, info: dict, found: dict, fix: str = DAMAGED, error=FileError) -> None:
    """found: {tensor: (safetensors dtype name, shape)} of one layer as stored (or about to be).
    Raises FileError naming where, the layer, the tensor and fix."""
    try:
        expected = expected_tensors(info, "bias" in found, "input_amax" in found)
    except ValueError as e:
        raise error(f"{where}: layer {layer}: {e}; {fix}") from None
    for name in expected:
        if name not in found:
            raise error(f"{where}: layer {layer} has no tensor {name} ({info.get('format')} residual, rank "
                            f"{info.get('rank')}); {fix}")
    extra = [k for k in found if k not in expected]
    if extra:
        raise error(f"{where}: layer {layer} holds a tensor {extra[0]} its metadata does not describe "
                        f"({info.get('format')} residual, rank {info.get('rank')}); {fix}")
    for name, (dtype, shape) in expected.items():
        fdt, fshape = found[name]
        fshape = tuple(fshape)
        if len(fshape) != len(shape) or any(s is not None and s != d for s, d in zip(shape, fshape)):
            hint = " (a per-tensor value where one per output row is due: it would broadcast)" \
                if fshape in ((1,), ()) and len(shape) >= 1 and shape[0] not in (1, None) else ""
            raise error(f"{where}: layer {layer}, tensor {name} has shape {_shape(fshape)}, expected "
                            f"{_shape(shape)} for a {info['out_features']}x{info['in_features']} layer{hint}; {fix}")
        if fdt != ST_DTYPES[dtype]:
            raise error(f"{where}: layer {layer}, tensor {name} is {fdt}, expected {ST_DTYPES[dtype]}; {fix}")


def header_of(tensors: dict) -> dict:
    return {k: (ST_DTYPES.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in tensors.items()}


# ------------------------------------------------------------------ values
_VALUES = 1 << 20  # values per finiteness check (bounded scratch on 16384-wide layers)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN / Inf in t (any float dtype, FP8 by its bit patterns; integer tensors are finite)."""
    if t.dtype == torch.float8_e4m3fn:  # no Inf; NaN is S.1111.111
        return not bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())
    if t.dtype == torch.float8_e5m2:  # exponent all ones: Inf or NaN
        return not bool(((t.view(torch.uint8) & 0x7C) == 0x7C).any())
    if not t.is_floating_point():
        return True
    # torch.isfinite makes an |x| copy and two masks: in pieces of ~1M values the scratch stays small
    flat = t.reshape(-1) if t.is_contiguous() else t.flatten()
    return all(bool(torch.isfinite(flat[i:i + _VALUES]).all()) for i in range(0, flat.numel(), _VALUES))


def check_values(where: str, layer: str, info: dict, tensors: dict, fix: str = DAMAGED, error=FileError) -> None:
    """Every tensor finite, decoded scales finite (E8M0's 255 is 2^128), input_amax >= 0."""
    from ..kernels import formats as F

    for name, t in tensors.items():
        if not all_finite(t):
            raise error(f"{where}: layer {layer}, tensor {name} contains NaN or Inf; {fix}")
    form = F.get(info["format"])
    scale, ts = form.decode_scales(tensors)
    for name, s in (("q_scale", scale), ("q_scale2", ts)):
        if s is not None and not bool(torch.isfinite(s).all()):
            raise error(f"{where}: layer {layer}, tensor {name} decodes to Inf or NaN; {fix}")
    amax = tensors.get("input_amax")
    if amax is not None and bool((amax < 0).any()):
        raise error(f"{where}: layer {layer}, tensor input_amax is negative; {fix}")
