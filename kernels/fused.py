"""Whole compressed layers on the Triton kernels: one linear (act_quant_lowrank + a scaled GEMM)
and one FFN (three launches with a calibrated hidden scale, fp8_ffn.py says how; four without).

A layer is a dict of kernel operands: FP8 (q [N, K] E4M3, q_scale [N]) or W4A8 (w4a8.prepare's:
q repacked FP4 [N, K/2], sb block bytes, q_scale, block), with A, B, bias, and x_scale when its input is
quantized with one static scale (modules.STATIC_INPUT) instead of per token. Its kernel layout
(`layout`) picks the GEMM from GEMMS; everything else is the same for both.
"""
from __future__ import annotations

import torch

from . import fp8_ffn, fp8_ws, w4a8
from .fp8_ffn import act_quant_lowrank
from . import gemm as G
from .gemm import out_dtype

__all__ = ["GEMMS", "layout", "linear", "shared_linear", "ffn", "out_dtype"]


def _fp8_gemm(xq, sx, t: dict, **kw):
    return fp8_ffn.scaled_gemm(xq, sx, t["q"], t["q_scale"], **kw)


# kernel layout -> scaled GEMM(xq, sx, layer, **epilogue)
GEMMS = {"fp8": _fp8_gemm, "w4a8": w4a8.scaled_gemm}


# The down-projection's u2 (the up-projection's fp32 sum) rounded to bf16 in a launch of its own where the
# warp-specialized GEMM runs it: that kernel takes bf16 U's rows through its K ring, fp32 ones its epilogue
# reads from global memory (both GEMMs round U to bf16 for the MMA: the same results). Benches turn it off.
U2_BF16 = True


def _u2_bf16(device: torch.device, M: int) -> bool:
    return U2_BF16 and fp8_ws.enabled(device, M)


def layout(t: dict) -> str:
    """Kernel layout of a layer's tensors: "w4a8" when it holds FP4 block bytes (sb), else "fp8"."""
    return "w4a8" if t.get("sb") is not None else "fp8"


def linear(x2: torch.Tensor, t: dict, config=None, single: bool | None = None) -> torch.Tensor:
    """One compressed linear on a [M, K] input -> [M, N] in out_dtype(x2). single: act_quant_lowrank's
    launch variant (None: by token count and rank)."""
    xq, sx, u = act_quant_lowrank(x2, t.get("B"), static=t.get("x_scale"), single=single)
    return GEMMS[layout(t)](xq, sx, t, u=u, A=t.get("A"), bias=t.get("bias"), out_dtype=out_dtype(x2), config=config)


def shared_linear(x2: torch.Tensor, ts: list, config=None) -> torch.Tensor:
    """Two or three compressed linears that read the same input (an attention's q, k and v; k and v of a
    cross-attention's context), as one input pass (act_quant_lowrank with their factors, so one read of
    x, one quantization: the first layer's x_scale, if any, is theirs) and a GEMM each. Their ranks must be
    equal (all zero allowed). Returns one [M, sum of N] buffer holding the outputs one after another, each
    [M, N_g] contiguous (split_shared)."""
    M = x2.shape[0]
    y_dtype = out_dtype(x2)
    Bs = [t.get("B") for t in ts]
    xq, sx, u = act_quant_lowrank(x2, None if Bs[0] is None else Bs, static=ts[0].get("x_scale"))
    ns = [t["q"].shape[0] for t in ts]
    y = G.new((M, sum(ns)), y_dtype, x2.device)
    for g, (t, out) in enumerate(zip(ts, split_shared(y, ns))):
        GEMMS[layout(t)](xq, sx, t, u=None if u is None else u[g], A=t.get("A"), bias=t.get("bias"),
                         out=out, out_dtype=y_dtype, config=config)
    return y


def split_shared(y: torch.Tensor, ns) -> list:
    """The outputs in shared_linear's buffer y [..., sum of ns]: [..., N_g] each, contiguous."""
    lead, flat, off, out = y.shape[:-1], y.reshape(-1), 0, []
    rows = flat.numel() // y.shape[-1] if y.shape[-1] else 0
    for n in ns:
        out.append(flat[off:off + rows * n].view(*lead, n))
        off += rows * n
    return out


def ffn(x2: torch.Tensor, up: dict, down: dict, h_scale: torch.Tensor | None, config=None,
        single: bool | None = None) -> torch.Tensor:
    """Linear -> GELU(tanh) -> Linear on [M, dim]. With h_scale (static FP8 scale of the hidden
    activation) the fused path: input pass, up-projection, down-projection (and, where the warp-specialized
    GEMM runs, u2's rounding to bf16 between them: U2_BF16); without it the hidden activation goes
    through bf16 and a per-token quantization pass. single: as in linear."""
    y_dtype = out_dtype(x2)
    gemm_up, gemm_down = GEMMS[layout(up)], GEMMS[layout(down)]
    B2 = down.get("B")
    if h_scale is None:
        xq, sx, u = act_quant_lowrank(x2, up.get("B"), static=up.get("x_scale"), single=single)
        h = gemm_up(xq, sx, up, u=u, A=up.get("A"), bias=up.get("bias"), gelu=True, out_dtype=y_dtype, config=config)
        hq, sh, u2 = act_quant_lowrank(h, B2, single=single)
    else:
        r2 = 0 if B2 is None else B2.shape[0]
        # the up-projection's epilogue adds into u2 atomically; act_quant_lowrank zeroes it first
        u2 = G.new((x2.shape[0], r2), torch.float32, x2.device) if r2 else None
        xq, sx, u = act_quant_lowrank(x2, up.get("B"), zero=u2, static=up.get("x_scale"), single=single)
        hq = gemm_up(xq, sx, up, u=u, A=up.get("A"), bias=up.get("bias"), gelu=True, h_scale=h_scale, next_B=B2,
                     u_next=u2, config=config)
        sh = h_scale
        if r2 and config is None and _u2_bf16(x2.device, x2.shape[0]):
            u2 = fp8_ffn.round_bf16(u2)
    return gemm_down(hq, sh, down, u=u2, A=down.get("A"), bias=down.get("bias"), out_dtype=y_dtype, config=config)
