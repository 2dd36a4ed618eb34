"""The fused kernels as torch custom ops (`torch.ops.liteffn.*`), each with a fake (meta)
implementation, so torch.compile sees one opaque node per compressed linear or FFN and no
graph break. The ops take any leading shape [..., K] and return [..., N]."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import fused


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _layer(q, q_scale, A, B, bias, sb, block):
    """Kernel layer: FP8 (sb None) or FP4 in the W4A8 layout (sb = block bytes, block = 16 or 32)."""
    t = dict(q=q, q_scale=q_scale, A=A, B=B, bias=bias)
    return t if sb is None else dict(t, sb=sb, block=block)


@torch.library.custom_op("liteffn::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, q: Tensor, q_scale: Tensor, A: Optional[Tensor], B: Optional[Tensor],
               bias: Optional[Tensor], sb: Optional[Tensor] = None, block: int = 0) -> Tensor:
    y = fused.linear(_rows(x), _layer(q, q_scale, A, B, bias, sb, block))
    return y.reshape(*x.shape[:-1], q.shape[0])


@fp8_linear.register_fake
def _(x, q, q_scale, A, B, bias, sb=None, block=0):
    return x.new_empty(*x.shape[:-1], q.shape[0], dtype=fused.out_dtype(x))


@torch.library.custom_op("liteffn::fp8_ffn", mutates_args=())
def fp8_ffn_op(x: Tensor, q1: Tensor, s1: Tensor, A1: Optional[Tensor], B1: Optional[Tensor],
               b1: Optional[Tensor], q2: Tensor, s2: Tensor, A2: Optional[Tensor], B2: Optional[Tensor],
               b2: Optional[Tensor], h_scale: Optional[Tensor], sb1: Optional[Tensor] = None,
               sb2: Optional[Tensor] = None, block1: int = 0, block2: int = 0) -> Tensor:
    up = _layer(q1, s1, A1, B1, b1, sb1, block1)
    down = _layer(q2, s2, A2, B2, b2, sb2, block2)
    return fused.ffn(_rows(x), up, down, h_scale).reshape(*x.shape[:-1], q2.shape[0])


@fp8_ffn_op.register_fake
def _(x, q1, s1, A1, B1, b1, q2, s2, A2, B2, b2, h_scale, sb1=None, sb2=None, block1=0, block2=0):
    return x.new_empty(*x.shape[:-1], q2.shape[0], dtype=fused.out_dtype(x))
