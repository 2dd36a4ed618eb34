"""GPTQ error feedback over one block of columns, in Triton, with its torch reference.

Rows of the residual are independent in GPTQ (the error of row n only moves along row n,
through the shared upper Cholesky factor U of H^-1), so one program owns a tile of rows
and walks the block's columns in order, keeping the tile in registers. The torch loop
launches ~12 small kernels per column; at LTX-2's 16384-wide down-projections that was
2.4 s per layer on an H100 (bench/compress_time_h100.md), the whole block here is one launch.

Kinds of format (the kernel's FMT, by the format's class in formats.py, so any block size or
copy of a registered format runs): 0 = ChannelFP8 (fixed per-row scale), 1 = NVFP4 (E4M3
block scale times a tensor scale, least-MSE of six shrink factors), 2 = MXFP4 (power-of-two
block scale, least-MSE of two). Other classes take the torch loop (supports()). Rounding is written out in arithmetic (not casts), because the Triton
interpreter's fp32 -> fp8 cast does not round like the hardware; the CPU tests run it.
"""
from __future__ import annotations

import torch

from . import formats as F
from .formats import NVFP4_CANDIDATES  # the kernel unrolls the same scale search as formats.NVFP4_SHRINK

try:
    import triton
    import triton.language as tl
except ImportError:  # torch-only installs (CPU): calibration/residual.py uses the torch loop
    triton = None

# The kernel's FMT per format class: exact classes only, since a subclass may round differently.
_KERNEL_FMT = {F.ChannelFP8: 0, F.NVFP4: 1, F.MXFP4: 2}
BLOCK_COLS = 128

if triton is not None:
    _NVFP4_CANDIDATES = tl.constexpr(NVFP4_CANDIDATES)  # globals read by a kernel must be constexpr

    @triton.jit
    def _pow2(e):
        """2^e for integer e in [-126, 127], built from the exponent bits (exact)."""
        return ((e + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _round_e4m3(x):
        """Nearest E4M3 value (ties to even), saturating at 448."""
        a = tl.abs(x)
        e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        sp = _pow2(tl.maximum(e, -6) - 3)  # spacing of the binade (subnormals below 2^-6)
        q = ((a / sp + 12582912.0) - 12582912.0) * sp  # 1.5 * 2^23: round to integer, ties even
        q = tl.minimum(q, 448.0)
        return tl.where(x < 0, -q, q)

    @triton.jit
    def _round_e2m1(x):
        a = tl.abs(x)
        q = tl.where(a > 0.25, 0.5, 0.0)
        q = tl.where(a >= 0.75, 1.0, q)
        q = tl.where(a > 1.25, 1.5, q)
        q = tl.where(a >= 1.75, 2.0, q)
        q = tl.where(a > 2.5, 3.0, q)
        q = tl.where(a >= 3.5, 4.0, q)
        q = tl.where(a > 5.0, 6.0, q)
        return tl.where(x < 0, -q, q)

    @triton.jit
    def _gptq_block_kernel(W, U, G, Err, S, rowscale, ts, N,
                           FMT: tl.constexpr, BS: tl.constexpr, BLK: tl.constexpr, BR: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BR + tl.arange(0, BR)
        rmask = rows < N
        cols = tl.arange(0, BS)
        offs = rows[:, None] * BS + cols[None, :]
        w = tl.load(W + offs, mask=rmask[:, None], other=0.0)
        if FMT == 0:
            s = tl.load(rowscale + rows, mask=rmask, other=1.0)
        else:
            s = tl.full([BR], 1.0, tl.float32)
        g_all = tl.zeros([BR, BS], tl.float32)
        e_all = tl.zeros([BR, BS], tl.float32)
        for i in range(BS):
            if FMT != 0:
                if i % BLK == 0:
                    grp = (cols[None, :] >= i) & (cols[None, :] < i + BLK)
                    wg = tl.where(grp, w, 0.0)
                    amax = tl.max(tl.abs(wg), 1)
                    best_err = tl.full([BR], float("inf"), tl.float32)
                    if FMT == 1:
                        for c in tl.static_range(_NVFP4_CANDIDATES):
                            sc = _round_e4m3(amax * (1.0 - 0.05 * c) / (6.0 * ts))
                            sc = tl.where(sc > 0, sc, 0.001953125) * ts  # 2^-9: smallest E4M3
                            d = _round_e2m1(wg / sc[:, None]) * sc[:, None] - wg
                            err = tl.sum(d * d, 1)
                            better = err < best_err
                            s = tl.where(better, sc, s)
                            best_err = tl.where(better, err, best_err)
                    else:
                        v = tl.maximum(amax / 6.0, 1.1754943508222875e-38)
                        vb = v.to(tl.int32, bitcast=True)
                        e = ((vb >> 23) & 0xFF) - 127 + ((vb & 0x7FFFFF) != 0).to(tl.int32)
                        for c in tl.static_range(2):
                            sc = _pow2(tl.minimum(tl.maximum(e - c, -126), 127))
                            d = _round_e2m1(wg / sc[:, None]) * sc[:, None] - wg
                            err = tl.sum(d * d, 1)
                            better = err < best_err
                            s = tl.where(better, sc, s)
                            best_err = tl.where(better, err, best_err)
                    tl.store(S + rows * (BS // BLK) + i // BLK, s, mask=rmask)
            sel = cols[None, :] == i
            wi = tl.sum(tl.where(sel, w, 0.0), 1)
            if FMT == 0:
                g = _round_e4m3(wi / s)
            else:
                g = _round_e2m1(wi / s)
            d_ii = tl.load(U + i * BS + i)
            err = (wi - g * s) / d_ii
            u = tl.load(U + i * BS + cols)  # row i of the upper factor: zero left of i
            w = w - err[:, None] * u[None, :]
            g_all = tl.where(sel, g[:, None], g_all)
            e_all = tl.where(sel, err[:, None], e_all)
        tl.store(G + offs, g_all, mask=rmask[:, None])
        tl.store(Err + offs, e_all, mask=rmask[:, None])


def available() -> bool:
    return triton is not None


def supports(fmt: str | F.ResidualFormat) -> bool:
    """Whether the kernel quantizes this format (else calibration/residual.py runs the torch loop)."""
    return type(F.get(fmt)) in _KERNEL_FMT


def gptq_block_triton(W1: torch.Tensor, U1: torch.Tensor, fmt: str | F.ResidualFormat, rowscale: torch.Tensor | None,
                      tensor_scale: float = 1.0, block: int = 1, rows_per_program: int = 16):
    """One block of BLOCK_COLS columns. W1 [N, BS] (current values), U1 [BS, BS] upper.
    rowscale: the per-row scales of a format without blocks (fixed); block formats choose
    theirs here. Returns (grid values [N, BS], scaled errors [N, BS], block scales [N, BS/block]
    or None)."""
    f = F.get(fmt)
    if not supports(f):
        raise ValueError(f"the GPTQ kernel does not quantize {f.name} ({type(f).__name__})")
    per_row = f.block is None
    n, bs = W1.shape
    W1, U1 = W1.float().contiguous(), U1.float().contiguous()
    G, Err = torch.empty_like(W1), torch.empty_like(W1)
    S = W1.new_empty(1) if per_row else torch.empty(n, bs // block, device=W1.device)
    rs = rowscale.float().contiguous() if per_row else W1.new_empty(1)
    grid = (triton.cdiv(n, rows_per_program),)
    _gptq_block_kernel[grid](W1, U1, G, Err, S, rs, float(tensor_scale), n, FMT=_KERNEL_FMT[type(f)], BS=bs,
                             BLK=block, BR=rows_per_program, num_warps=4)
    return G, Err, (None if per_row else S)
