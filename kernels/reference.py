"""Plain-torch reference of the compressed linear; runs on CPU and any GPU.

    y = dequant(Q) xq + (x B^T) A^T + bias

where xq is x quantized per token to FP8 E4M3 for the FP8/FP4 residual formats (what the
fused kernels feed the tensor cores), and x itself for a bf16 residual. The low-rank branch
always sees the unquantized x, as in the fused kernel that reads x once for both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn

from . import formats as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    # CPU bf16 matmuls are slow and no more faithful; GPUs use the activation's dtype.
    return torch.float32 if x.device.type == "cpu" else x.dtype


def dequant_weight(fmt: str, t: dict, dtype) -> torch.Tensor:
    return F.decode(fmt, t, dtype)


def compressed_linear_ref(x: torch.Tensor, fmt: str, t: dict, act_quant: bool = True) -> torch.Tensor:
    """x [..., K] -> [..., N] in x.dtype. t: stored tensors (q, q_scale, q_scale2, A, B, bias)."""
    dt = compute_dtype(x)
    xc = x.to(dt)
    xq = F.fake_quant_act_fp8(x).to(dt) if (act_quant and F.ACT_QUANT[fmt]) else xc
    y = Fn.linear(xq, dequant_weight(fmt, t, dt))
    A = t.get("A")
    if A is not None and A.shape[1] > 0:
        y = y + Fn.linear(Fn.linear(xc, t["B"].to(dt)), A.to(dt))
    b = t.get("bias")
    if b is not None:
        y = y + b.to(dt)
    return y.to(x.dtype)
