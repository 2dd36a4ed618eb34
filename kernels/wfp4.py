"""FP4 residuals on FP8 tensor cores (W4A8): what the GEMM (fp8_ffn._load_w) needs from a
stored MXFP4 / NVFP4 residual, and the torch reference of the E4M3 weights it builds.

The weights stay packed E2M1 (half of FP8's bytes) with their block scales; each K-tile is
converted in registers to E4M3 and fed to the FP8 MMA with the FP8 activations. How the block
scales enter (chosen here, measured in bench/ffn_kernels.py --w4):

- Folded into the E4M3 values. Per output channel n a power of two p[n] goes to the epilogue
  (like FP8's per-channel scale) and the tile is w = e2m1 * block_scale / p[n], rounded to E4M3.
  MXFP4: block scales are powers of two and E2M1 values have one mantissa bit, so w is exact in
  E4M3 whenever block_scale / p[n] >= 2^-8 / 0.5; p[n] puts the channel's largest block at 6 * 2^6
  = 384 <= 448, so blocks down to 2^-14 of the largest are exact (the rest round: a 2^-14
  relative error on that channel). NVFP4: E4M3 block scales have 3 mantissa bits, the product
  with an E2M1 value needs up to 5, so w rounds to E4M3 (relative error <= 2^-4 per weight, on
  top of FP4's own); measured by the tests and the benchmark.
- The alternative, rescaling the accumulator per block, needs one MMA per 32 (MX) or 16 (NV)
  values of K with a full-tile multiply after each: FP8 MMAs are 32 deep, so NVFP4 could not
  even be expressed that way without splitting the instruction.
"""
from __future__ import annotations

import torch

from . import formats as F

W4 = {"mxfp4": 1, "nvfp4": 2}


def prepare(fmt: str, t: dict) -> dict:
    """Kernel operands of a stored FP4 residual t (q: packed [N, K/2] uint8, q_scale: block
    scales, q_scale2: NVFP4's tensor scale): q, block_scale, cn (fp32 [N], the factor applied to
    block scales), q_scale (fp32 [N], the epilogue's per-channel scale = the power of two p[n])."""
    q, bs = t["q"], t["q_scale"]
    if fmt == "mxfp4":
        e = bs.to(torch.int32)
        top = e.amax(dim=1)  # largest block exponent of each channel
        p = torch.exp2((top - 127 - 6).float())  # 6 * 2^(top-127) / p = 384
        block_scale, cn = bs.to(torch.uint8).contiguous(), 1.0 / p
    elif fmt == "nvfp4":
        ts = t["q_scale2"].float().reshape(())
        top = bs.float().amax(dim=1) * ts * F.FP4_MAX  # largest |w| of each channel
        p = torch.exp2(torch.ceil(torch.log2((top / F.FP8_MAX).clamp_min(2.0**-126))))
        block_scale, cn = bs.contiguous(), ts / p
    else:
        raise ValueError(f"W4A8 takes mxfp4 or nvfp4 residuals, not {fmt!r}")
    return {"w4": W4[fmt], "block": F.BLOCK[fmt], "q": q.contiguous(), "block_scale": block_scale,
            "cn": cn.float().contiguous(), "q_scale": p.float().contiguous()}


def folded_e4m3(w4: dict) -> torch.Tensor:
    """The E4M3 weights [N, K] the kernel multiplies (values, fp32): reference of _load_w."""
    grid = F.e2m1_decode(F.unpack_fp4(w4["q"]))
    bs = w4["block_scale"]
    bs = F.e8m0_decode(bs) if w4["w4"] == 1 else bs.float()
    scale = bs * w4["cn"][:, None]
    n, k = grid.shape
    w = grid.view(n, k // w4["block"], w4["block"]) * scale[:, :, None]
    return F.round_fp8(w.view(n, k))


def dequant(w4: dict) -> torch.Tensor:
    """Dense weights the W4A8 GEMM computes with: folded_e4m3 * q_scale."""
    return folded_e4m3(w4) * w4["q_scale"][:, None]
