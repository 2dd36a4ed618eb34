"""Entry points of the fused kernels for the modules: `linear` and `ffn` take any leading shape
[..., K] and return [..., N].

Eager calls run the Python implementation (fused.py) directly. While torch.compile traces, they
go through the torch custom ops (`torch.ops.liteffn.*`), each with a fake (meta) implementation,
so the graph holds one opaque node per compressed linear or FFN and has no break. Eager calls
skip the custom op because its dispatch costs more host time than the layer (~120 us per FFN
call at M=126 on the H200's host, bench/gemm_explore_h200.log).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import fused


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _layer(t: dict, block: int) -> dict:
    """Kernel layer: FP8 (no sb) or FP4 in the W4A8 layout (sb = block bytes, block = 16 or 32)."""
    return t if t.get("sb") is None else dict(t, block=block)


def _linear(x: Tensor, t: dict) -> Tensor:
    return fused.linear(_rows(x), t).reshape(*x.shape[:-1], t["q"].shape[0])


def _ffn(x: Tensor, up: dict, down: dict, h_scale) -> Tensor:
    return fused.ffn(_rows(x), up, down, h_scale).reshape(*x.shape[:-1], down["q"].shape[0])


def linear_rows(t: dict, block: int = 0, single: bool | None = None):
    """fn(x2 [M, K]) -> [M, N]: fused.linear on this layer's operands, what graphs.py runs and captures."""
    t = _layer(t, block)
    return lambda x2: fused.linear(x2, t, single=single)


def shared_rows(ts: list, blocks: list):
    """fn(x2 [M, K]) -> [M, sum of N]: fused.shared_linear on these layers' operands, as linear_rows."""
    ts = [_layer(t, b) for t, b in zip(ts, blocks)]
    return lambda x2: fused.shared_linear(x2, ts)


def ffn_rows(up: dict, down: dict, h_scale: Optional[Tensor], block1: int = 0, block2: int = 0,
             single: bool | None = None):
    """fn(x2 [M, dim]) -> [M, dim]: fused.ffn on these operands, as linear_rows."""
    up, down = _layer(up, block1), _layer(down, block2)
    return lambda x2: fused.ffn(x2, up, down, h_scale, single=single)


def linear(x: Tensor, t: dict, block: int = 0) -> Tensor:
    """One compressed linear; t: the layer's tensors (q, q_scale, A, B, bias, sb, x_scale)."""
    if torch.compiler.is_compiling():
        return fp8_linear(x, t["q"], t["q_scale"], t.get("A"), t.get("B"), t.get("bias"), t.get("sb"), block,
                          t.get("x_scale"))
    return _linear(x, _layer(t, block))


def shared_linear(x: Tensor, ts: list, blocks: list) -> Tensor:
    """Linears that read the same x ([..., K] -> [..., sum of N], fused.shared_linear's layout); eager only
    (under torch.compile each linear is its own custom op)."""
    y = fused.shared_linear(_rows(x), [_layer(t, b) for t, b in zip(ts, blocks)])
    return y.reshape(*x.shape[:-1], y.shape[-1])


def ffn(x: Tensor, up: dict, down: dict, h_scale: Optional[Tensor], block1: int = 0, block2: int = 0) -> Tensor:
    """One compressed FFN (Linear -> GELU(tanh) -> Linear); h_scale: the hidden activation's static FP8
    scale (None: per-token quantization)."""
    if torch.compiler.is_compiling():
        return fp8_ffn_op(x, up["q"], up["q_scale"], up.get("A"), up.get("B"), up.get("bias"),
                          down["q"], down["q_scale"], down.get("A"), down.get("B"), down.get("bias"), h_scale,
                          up.get("sb"), down.get("sb"), block1, block2, up.get("x_scale"))
    return _ffn(x, _layer(up, block1), _layer(down, block2), h_scale)


def _tensors(q, q_scale, A, B, bias, sb, x_scale=None) -> dict:
    t = dict(q=q, q_scale=q_scale, A=A, B=B, bias=bias, sb=sb)
    if x_scale is not None:
        t["x_scale"] = x_scale
    return t


@torch.library.custom_op("liteffn::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, q: Tensor, q_scale: Tensor, A: Optional[Tensor], B: Optional[Tensor],
               bias: Optional[Tensor], sb: Optional[Tensor] = None, block: int = 0,
               x_scale: Optional[Tensor] = None) -> Tensor:
    return _linear(x, _layer(_tensors(q, q_scale, A, B, bias, sb, x_scale), block))


@fp8_linear.register_fake
def _(x, q, q_scale, A, B, bias, sb=None, block=0, x_scale=None):
    return x.new_empty(*x.shape[:-1], q.shape[0], dtype=fused.out_dtype(x))


@torch.library.custom_op("liteffn::fp8_ffn", mutates_args=())
def fp8_ffn_op(x: Tensor, q1: Tensor, s1: Tensor, A1: Optional[Tensor], B1: Optional[Tensor],
               b1: Optional[Tensor], q2: Tensor, s2: Tensor, A2: Optional[Tensor], B2: Optional[Tensor],
               b2: Optional[Tensor], h_scale: Optional[Tensor], sb1: Optional[Tensor] = None,
               sb2: Optional[Tensor] = None, block1: int = 0, block2: int = 0,
               x_scale: Optional[Tensor] = None) -> Tensor:
    up = _layer(_tensors(q1, s1, A1, B1, b1, sb1, x_scale), block1)
    down = _layer(_tensors(q2, s2, A2, B2, b2, sb2), block2)
    return _ffn(x, up, down, h_scale)


@fp8_ffn_op.register_fake
def _(x, q1, s1, A1, B1, b1, q2, s2, A2, B2, b2, h_scale, sb1=None, sb2=None, block1=0, block2=0, x_scale=None):
    return x.new_empty(*x.shape[:-1], q2.shape[0], dtype=fused.out_dtype(x))
