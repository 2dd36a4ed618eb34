"""Plain-torch references of the compressed linear and FFN; run on CPU and any GPU, and are
what the fused kernels (fp8_ffn.py) are tested against.

    y = dequant(Q) xq + (x B^T) A^T + bias

where xq is x quantized to FP8 E4M3 for the FP8/FP4 residual formats (what the fused kernels
feed the tensor cores): per token by default, or with a static per-tensor scale (the FFN's
hidden activation when its range was calibrated, see fp8_ffn.py); x itself for a bf16
residual. The low-rank branch always sees the unquantized x, as in the fused kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn

from . import formats as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    # CPU bf16 matmuls are slow and no more faithful; GPUs use the activation's dtype.
    return torch.float32 if x.device.type == "cpu" else x.dtype


def dequant_weight(fmt: str | F.ResidualFormat, t: dict, dtype) -> torch.Tensor:
    f = F.get(fmt)
    if f.in_w4a8_layout(t):  # an FP4 residual modules.py converted for the W4A8 kernel
        from . import w4a8
        return w4a8.dequant(w4a8.layer(f.name, t)).to(dtype)
    return f.decode(t, dtype)


def quant_act_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 fake-quantization with one given scale (saturating at +-448)."""
    s = scale.float().reshape(())
    return (x.float() / s).clamp(-F.FP8_MAX, F.FP8_MAX).to(torch.float8_e4m3fn).float() * s


def act_quant_lowrank_ref(x: torch.Tensor, B: torch.Tensor | None):
    """Reference of fp8_ffn.act_quant_lowrank: (fp8 codes, per-token scale [M], x B^T or None)."""
    q, s = F.quantize_act_fp8(x)
    u = None if B is None else Fn.linear(x.to(compute_dtype(x)), B.to(compute_dtype(x))).to(torch.bfloat16)
    return q, s.reshape(-1), u


def compressed_linear_ref(x: torch.Tensor, fmt: str | F.ResidualFormat, t: dict, act_quant: bool = True,
                          act_scale: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x.dtype. t: stored tensors (q, q_scale, q_scale2, A, B, bias).
    act_scale: static FP8 scale of x (else per token). dtype: compute dtype (default: fp32 on
    CPU, x.dtype on GPU; fp32 gives the exact value of the same quantized tensors)."""
    dt = dtype or compute_dtype(x)
    xc = x.to(dt)
    if act_quant and F.get(fmt).act_quant:
        xq = (quant_act_static(x, act_scale) if act_scale is not None else F.fake_quant_act_fp8(x)).to(dt)
    else:
        xq = xc
    y = Fn.linear(xq, dequant_weight(fmt, t, dt))
    A = t.get("A")
    if A is not None and A.shape[1] > 0:
        y = y + Fn.linear(Fn.linear(xc, t["B"].to(dt)), A.to(dt))
    b = t.get("bias")
    if b is not None:
        y = y + b.to(dt)
    return y if dtype is not None else y.to(x.dtype)


def compressed_ffn_ref(x: torch.Tensor, up_fmt: str | F.ResidualFormat, up: dict,
                       down_fmt: str | F.ResidualFormat, down: dict,
                       h_scale: torch.Tensor | None = None, act_quant: bool = True,
                       dtype: torch.dtype | None = None, h_dtype: torch.dtype | None = None,
                       x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Linear -> GELU(tanh) -> Linear. h_scale: static FP8 scale of the hidden activation; x_scale: of the
    input (else per token). h_dtype: round the hidden activation to this dtype first (the unfused kernels
    store it)."""
    h = Fn.gelu(compressed_linear_ref(x, up_fmt, up, act_quant, act_scale=x_scale, dtype=dtype), approximate="tanh")
    if h_dtype is not None:
        h = h.to(h_dtype).to(h.dtype)
    y = compressed_linear_ref(h, down_fmt, down, act_quant, act_scale=h_scale, dtype=dtype)
    return y if dtype is not None else y.to(x.dtype)
