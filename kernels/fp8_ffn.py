"""Triton kernels of the compressed linears on FP8 tensor cores: per-token activation quantization
with the low-rank down-projection, and the scaled FP8 GEMM with its fused epilogue (gemm.py).
Whole layers (a linear, an FFN's three launches) are in fused.py; the torch references in
reference.py (`act_quant_lowrank_ref`, `compressed_linear_ref`, `compressed_ffn_ref`).

One FFN, y = W2 GELU(W1 x + b1) + b2 with W = A B + dequant(Q), is three launches:

  1. act_quant_lowrank(x, B1): per-token FP8 quantization of x (scale sx = rowmax/448) and the
     low-rank down-projection u1 = x B1^T, computed from the same read of x as the row max.
     Few rows without a low rank (M <= SINGLE_LAUNCH_M, K <= 4096): one launch, a program per row
     walking all of K twice (row max, then the codes). Otherwise two launches over a (row block x K
     split) grid, the first for the row max and u (atomics over the splits), the second for the
     codes. Either also zeroes u2 (step 2's atomic sum).
  2. scaled_gemm, up: acc = xq Q1^T on FP8 tensor cores, acc = acc*sx*sw1, then u1 A1^T is
     accumulated into the same registers (bf16 MMA), + b1, GELU(tanh); the output h is written
     as FP8 with a static per-tensor scale s_h, and h B2^T (the second linear's low-rank
     down-projection, from the unquantized h) is added into u2 [M, r2] with fp32 atomics.
  3. scaled_gemm, down: acc = hq Q2^T, acc*s_h*sw2 + u2 A2^T + b2 -> bf16.

Why a static scale for h: a per-token scale needs the row max over all 16384 columns, which
no single output tile of the first GEMM sees. FP8 is floating point, so a per-tensor scale
costs precision only for values more than 2^15 below the tensor's max (they go subnormal);
the scale is s_h = 2^ceil(log2(2 * amax / 448)), amax being the calibration's absmax of
this input (the statistics record it), a power of two so the scaling itself is exact.
Without calibrated ranges the FFN takes the unfused path (kernel 1 on h, per-token scales).

Why atomics for u2: the alternative is a separate pass over h (one more read of M x 16384
bytes) and the low-rank branch would then see quantized h. One atomic per element of u2 per
output tile (both epilogue halves summed first). The fp32 atomic sum makes u2 reproducible
only to fp32 rounding (the order of additions varies).

GELU uses tanh.approx.f32 on the GPU: with exp + reciprocal the epilogue was bound by the
special-function unit (measured: +115 us on a 700 us GEMM at M=6144).

Accumulation: Hopper's FP8 MMA accumulates in reduced precision. Over all of K that costs up to
18% relative error against an fp64 product of the same codes on coherent sums (rows aligned with
the weights; 16384->4096: 1.8e-1, 8192->2048: 9.6e-2; bench/gemm_explore_h200.log), so the
GEMM adds the tensor cores' partial sum into an fp32 accumulator every LITEFFN_PROMOTE_K elements
of K (a config's PROMOTE = interval // BK tiles). The K loop is flat, one tile per iteration and
an fp32 add every PROMOTE iterations, so the MMAs stay asynchronous between promotions. Errors
on the stress inputs (worst shape and input, coherent rows at K=16384), H200:

    interval (K)   128      256      512      1024     0 (never)
    worst error    5.7e-4   1.6e-3   4.2e-3   9.7e-3   1.8e-1

The default, 512, is the cheapest interval that keeps every stress input at every LTX-2 shape
within 5e-3; 128 is the most precise; 0 is Hopper's fast accumulation, allowed but up to 18% off
on coherent sums (1e-3 to 3e-3 on independent inputs). Speed at M=6144, r=64 epilogue,
128x256x128 tiles: 865 us (4096->16384) and 775 us (16384->4096) promoting every 512, against
979/897 promoting every tile (the former default) and 731/661 never promoting.
Configs whose BK does not divide the interval are left out. Triton's max_num_imprecise_acc
(slower) and warp specialization (no effect on Hopper in Triton 3.6) were measured and dropped.
Each promotion still drains the tensor cores here (Triton waits for every in-flight MMA when the
loop reads an accumulator), so from 257 tokens on Hopper scaled_gemm hands the GEMM to fp8_ws.py,
a warp-specialized Gluon kernel that hides the promotion: same function, bit-identical at the same
interval, 1.02-1.29x faster per GEMM (docs/kernels.md). This kernel is the one everywhere else and
the one CPU CI runs (the interpreter cannot run Gluon).

Interpreter (CPU CI): bf16 tl.dot is wrong there, so INTERP upcasts its operands to fp32,
and fp32 -> fp8 casts do not round (and fp32 -> bf16 truncates), so values are rounded in
arithmetic first and the casts are exact.
"""
from __future__ import annotations

import functools
import os

import torch

from . import fp8_ws
from . import gemm as G
from .formats import FP8_MAX

try:
    import triton
    import triton.language as tl

    from .gemm import _dot, _grouped_tile, _split_k_sum, _store_tile, _to_bf16, _to_fp8
except ImportError:  # torch-only installs: dispatch never picks these kernels
    triton = None

H_SCALE_MARGIN = 2.0  # headroom of the static FP8 scale of h over the calibrated absmax
# Up to this many rows act_quant_lowrank without a low rank is one launch.
SINGLE_LAUNCH_M = 256
# act_quant_lowrank's two launches at more than 2048 rows: rows x K columns per program (benches sweep them)
MANY_ROWS_BM, MANY_ROWS_SPLIT = 64, 512
# Up to this many rows, launches with few tiles split K (few_tokens_split); LITEFFN_SPLIT_K=0 turns it off.
SPLIT_K_MAX_M = 256
SPLIT_K_ON = os.environ.get("LITEFFN_SPLIT_K", "1") != "0"


def available() -> bool:
    return triton is not None


def static_scale(amax: torch.Tensor, margin: float = H_SCALE_MARGIN) -> torch.Tensor:
    """Power-of-two per-tensor FP8 scale covering margin * amax (fp32 tensor [1])."""
    a = (amax.float().reshape(-1)[:1] * margin / FP8_MAX).clamp_min(2.0**-100)
    return torch.exp2(torch.ceil(torch.log2(a)))


if triton is not None:

    # ------------------------------------------------------------ 1. quantize + low rank
    @triton.jit
    def _act_quant_rows_kernel(X, XQ, SX, LB, U, Z, M, K, R, RZ, stride_xm, ROWS: tl.constexpr, BM: tl.constexpr,
                               BK: tl.constexpr, BK2: tl.constexpr, RP: tl.constexpr, RZP: tl.constexpr,
                               INTERP: tl.constexpr):
        """Few rows, one launch: each program takes ROWS rows through all of K twice. First the row
        max and u = x B^T (written, no atomics) over [BM, BK] tiles (BM >= 16 rows for the MMA,
        ROWS of them real); then the codes over [ROWS, BK2] tiles (wider: these loads are not
        pipelined, so fewer and larger). Z [M, RZ] (the next linear's u accumulator) is zeroed."""
        i = tl.arange(0, BM)
        rows = tl.program_id(0) * ROWS + i
        rmask = (i < ROWS) & (rows < M)
        xrow = X + rows.to(tl.int64)[:, None] * stride_xm
        amax = tl.zeros([BM], tl.float32)
        if RP > 0:
            rr = tl.arange(0, RP)
            u = tl.zeros([BM, RP], tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            x = tl.load(xrow + ks[None, :], mask=rmask[:, None] & (ks < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), 1))
            if RP > 0:
                b = tl.load(LB + rr[:, None] * K + ks[None, :], mask=(rr < R)[:, None] & (ks < K)[None, :], other=0.0)
                u = _dot(x.to(tl.bfloat16), tl.trans(b), u, INTERP)
        tl.store(SX + rows, tl.maximum(tl.math.div_rn(amax, 448.0), 1e-12), mask=rmask)
        if RP > 0:
            tl.store(U + rows[:, None] * R + rr[None, :], _to_bf16(u, INTERP), mask=rmask[:, None] & (rr < R)[None, :])
        if RZP > 0:
            rz = tl.arange(0, RZP)
            tl.store(Z + rows[:, None] * RZ + rz[None, :], tl.zeros([BM, RZP], tl.float32),
                     mask=rmask[:, None] & (rz < RZ)[None, :])
        tl.debug_barrier()  # the scales just stored, read back in the codes' layout by other threads
        rows2 = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rmask2 = rows2 < M
        s = tl.load(SX + rows2, mask=rmask2, other=1.0)
        xrow2 = X + rows2.to(tl.int64)[:, None] * stride_xm
        qrow = XQ + rows2.to(tl.int64)[:, None] * K
        for k0 in range(0, K, BK2):
            ks = k0 + tl.arange(0, BK2)
            m2 = rmask2[:, None] & (ks < K)[None, :]
            x = tl.load(xrow2 + ks[None, :], mask=m2, other=0.0).to(tl.float32)
            tl.store(qrow + ks[None, :], _to_fp8(tl.math.div_rn(x, s[:, None]), INTERP), mask=m2)

    @triton.jit
    def _round_bf16_kernel(X, Y, n, BLOCK: tl.constexpr, INTERP: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        tl.store(Y + i, _to_bf16(tl.load(X + i, mask=m, other=0.0), INTERP), mask=m)

    # Many rows: two launches over a (row block x K split) grid: the row max and u need all of K,
    # and one program per row block walking all of K was latency-bound there.
    @triton.jit
    def _act_stats_kernel(X, AMAX, XQ, S, LB, LB1, LB2, U, M, K, R, stride_xm, BM: tl.constexpr, BK: tl.constexpr,
                          SPLIT: tl.constexpr, RP: tl.constexpr, NB: tl.constexpr, STATIC: tl.constexpr,
                          INTERP: tl.constexpr):
        """AMAX[m] = max |x[m, :]| (atomic max over K splits); U[g, m] += x[m, split] B_g[:, split]^T for the
        NB (1-3) factors B_g = LB, LB1, LB2 of linears that share this input, from one read of x.
        STATIC: one static scale S (a power of two: exact division) instead, so the codes need no row max
        and this read also stores them (XQ); AMAX is then unused."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < M
        xrow = X + rows.to(tl.int64)[:, None] * stride_xm
        if STATIC:
            s = tl.load(S)
            qrow = XQ + rows.to(tl.int64)[:, None] * K
        else:
            amax = tl.zeros([BM], tl.float32)
        if RP > 0:
            rr = tl.arange(0, RP)
            u = tl.zeros([BM, RP], tl.float32)
            if NB > 1:
                u1 = tl.zeros([BM, RP], tl.float32)
            if NB > 2:
                u2 = tl.zeros([BM, RP], tl.float32)
        kend = tl.minimum((tl.program_id(1) + 1) * SPLIT, K)
        for k0 in range(tl.program_id(1) * SPLIT, kend, BK):
            ks = k0 + tl.arange(0, BK)
            m2 = rmask[:, None] & (ks < kend)[None, :]
            x = tl.load(xrow + ks[None, :], mask=m2, other=0.0)
            if STATIC:
                tl.store(qrow + ks[None, :], _to_fp8(tl.math.div_rn(x.to(tl.float32), s), INTERP), mask=m2)
            else:
                amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), 1))
            if RP > 0:
                boff = rr[:, None] * K + ks[None, :]
                bmask = (rr < R)[:, None] & (ks < kend)[None, :]
                xb = x.to(tl.bfloat16)
                u = _dot(xb, tl.trans(tl.load(LB + boff, mask=bmask, other=0.0)), u, INTERP)
                if NB > 1:
                    u1 = _dot(xb, tl.trans(tl.load(LB1 + boff, mask=bmask, other=0.0)), u1, INTERP)
                if NB > 2:
                    u2 = _dot(xb, tl.trans(tl.load(LB2 + boff, mask=bmask, other=0.0)), u2, INTERP)
        if not STATIC:
            tl.atomic_max(AMAX + rows, amax, mask=rmask, sem="relaxed")
        if RP > 0:
            uoff = rows[:, None] * R + rr[None, :]
            umask = rmask[:, None] & (rr < R)[None, :]
            tl.atomic_add(U + uoff, u, mask=umask, sem="relaxed")
            if NB > 1:
                tl.atomic_add(U + M * R + uoff, u1, mask=umask, sem="relaxed")
            if NB > 2:
                tl.atomic_add(U + 2 * M * R + uoff, u2, mask=umask, sem="relaxed")

    @triton.jit
    def _round_u_rows(U32, U, Z, rows, rmask, M, R, RZ, BM: tl.constexpr, RP: tl.constexpr, RZP: tl.constexpr,
                      NB: tl.constexpr, INTERP: tl.constexpr):
        """These rows of u's fp32 sums (NB of [M, R]) rounded to bf16 in the same layout; Z's rows zeroed."""
        RC: tl.constexpr = 64 if RP > 64 else RP
        for g in tl.static_range(NB if RP > 0 else 0):
            for j in tl.static_range(RP // RC if RP > 0 else 0):
                rr = j * RC + tl.arange(0, RC)
                um = rmask[:, None] & (rr < R)[None, :]
                uo = g * M * R + rows[:, None] * R + rr[None, :]
                tl.store(U + uo, _to_bf16(tl.load(U32 + uo, mask=um, other=0.0), INTERP), mask=um)
        if RZP > 0:
            rz = tl.arange(0, RZP)
            tl.store(Z + rows[:, None] * RZ + rz[None, :], tl.zeros([BM, RZP], tl.float32),
                     mask=rmask[:, None] & (rz < RZ)[None, :])

    @triton.jit
    def _round_u_kernel(U32, U, Z, M, R, RZ, BM: tl.constexpr, RP: tl.constexpr, RZP: tl.constexpr,
                        NB: tl.constexpr, INTERP: tl.constexpr):
        """After the static-scale pass: u rounded, Z zeroed (_round_u_rows), BM rows per program."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        _round_u_rows(U32, U, Z, rows, rows < M, M, R, RZ, BM, RP, RZP, NB, INTERP)

    @triton.jit
    def _act_quant_kernel(X, XQ, AMAX, SX, Z, U32, U, M, K, RZ, R, stride_xm, BM: tl.constexpr, BK: tl.constexpr,
                          SPLIT: tl.constexpr, RZP: tl.constexpr, RP: tl.constexpr, NB: tl.constexpr,
                          INTERP: tl.constexpr):
        """The codes of x / sx; the first K split's programs also store sx, round u's fp32 sums (U32, NB of
        [M, R]) to bf16 (U, the same layout) and zero Z."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < M
        s = tl.maximum(tl.math.div_rn(tl.load(AMAX + rows, mask=rmask, other=0.0), 448.0), 1e-12)
        if tl.program_id(1) == 0:
            tl.store(SX + rows, s, mask=rmask)
            _round_u_rows(U32, U, Z, rows, rmask, M, R, RZ, BM, RP, RZP, NB, INTERP)
        xrow = X + rows.to(tl.int64)[:, None] * stride_xm
        qrow = XQ + rows.to(tl.int64)[:, None] * K
        kend = tl.minimum((tl.program_id(1) + 1) * SPLIT, K)
        for k0 in range(tl.program_id(1) * SPLIT, kend, BK):
            ks = k0 + tl.arange(0, BK)
            m2 = rmask[:, None] & (ks < kend)[None, :]
            x = tl.load(xrow + ks[None, :], mask=m2, other=0.0).to(tl.float32)
            tl.store(qrow + ks[None, :], _to_fp8(tl.math.div_rn(x, s[:, None]), INTERP), mask=m2)

    # ------------------------------------------------------------ 2./3. scaled FP8 GEMM
    @triton.jit
    def _scaled_gemm_kernel(a_desc, b_desc, c_desc, SX, SW, U, LA, BIAS, LB2, U2, SH, WS, CNT,
                            M, N, K, R, R2, M_KEY,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                            EPI_SPLIT: tl.constexpr, PERSIST: tl.constexpr, FLATTEN: tl.constexpr,
                            PROMOTE: tl.constexpr, SPLIT_K: tl.constexpr, ROW_SCALAR: tl.constexpr,
                            HAS_BIAS: tl.constexpr,
                            RB: tl.constexpr, R_CHUNKS: tl.constexpr, GELU: tl.constexpr, OUT_FP8: tl.constexpr,
                            R2B: tl.constexpr, R2_CHUNKS: tl.constexpr, INTERP: tl.constexpr):
        """SPLIT_K > 1 (few tokens, few tiles): SPLIT_K programs per tile share its K tiles (whole
        promotion intervals each), and the last to finish runs the epilogue on the sum (_split_k_sum)."""
        num_pid_m = tl.cdiv(M, BM)
        num_pid_n = tl.cdiv(N, BN)
        num_tiles = num_pid_m * num_pid_n
        k_tiles = tl.cdiv(K, BK)
        kps = k_tiles
        if SPLIT_K > 1:
            kps = tl.cdiv(k_tiles, SPLIT_K)  # K tiles per split, whole promotion intervals
            if PROMOTE > 0:
                kps = tl.cdiv(kps, PROMOTE) * PROMOTE
        # One loop for both launch styles: persistent (grid = #SMs) or one tile per program.
        for item in tl.range(tl.program_id(0), num_tiles * SPLIT_K, tl.num_programs(0), flatten=FLATTEN):
            tile = item // SPLIT_K
            k_lo = (item % SPLIT_K) * kps
            k_hi = tl.minimum(k_lo + kps, k_tiles)
            # grouped order: neighbouring programs share A rows in L2
            pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
            om = pid_m * BM
            on = pid_n * BN
            acc = tl.zeros([BM, BN], tl.float32)
            if PROMOTE == 0:  # Hopper's reduced-precision accumulation over all of K
                for ki in range(k_lo, k_hi):
                    acc = tl.dot(a_desc.load([om, ki * BK]), b_desc.load([on, ki * BK]).T, acc)
            else:
                # The tensor cores accumulate into `part` (reduced precision over PROMOTE * BK products
                # only), added to acc in fp32 every PROMOTE tiles. One tile per iteration, so the
                # pipeliner streams one K tile at a time and keeps the MMAs async between promotions.
                part = tl.zeros([BM, BN], tl.float32)
                for ki in range(k_lo, k_hi):
                    part = tl.dot(a_desc.load([om, ki * BK]), b_desc.load([on, ki * BK]).T, part)
                    if ki % PROMOTE == PROMOTE - 1:
                        acc += part
                        part = tl.zeros([BM, BN], tl.float32)
                acc += part
            last = True
            if SPLIT_K > 1:
                acc, last = _split_k_sum(acc, om + tl.arange(0, BM), on + tl.arange(0, BN), M, N, WS, CNT, tile,
                                         SPLIT_K)
            if last:
                _store_tile(acc, om, on, c_desc, M, N, SX, SW, U, LA, BIAS, LB2, U2, SH, R, R2, BM, BN, EPI_SPLIT,
                            ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, R2B, R2_CHUNKS, INTERP)

    def _set_block_shapes(nargs):
        bm, bn, bk = nargs["BM"], nargs["BN"], nargs["BK"]
        nargs["a_desc"].block_shape = [bm, bk]
        nargs["b_desc"].block_shape = [bn, bk]
        nargs["c_desc"].block_shape = [bm, bn // 2 if nargs["EPI_SPLIT"] else bn]

    def _meta(bm, bn, bk, warps, stages, split, persist, promote, group=8, split_k=1):
        return dict(BM=bm, BN=bn, BK=bk, GROUP_M=group, EPI_SPLIT=split, PERSIST=persist, FLATTEN=False,
                    PROMOTE=promote, SPLIT_K=split_k, num_warps=warps, num_stages=stages)

    # (BM, BN, BK, warps, stages, EPI_SPLIT, persistent). Many rows (H200, promotion every 512,
    # bench/gemm_explore_h200.log): 128x256x128 s3 was fastest at every video shape,
    # 128x128x128 s4 and 128x128x256 s3 within 1-10%. Few rows (M <= 256, the audio FFN at
    # M ~ 126): 64-row tiles. Candidates that do not fit are skipped by the tuner.
    _CANDIDATES = [
        (128, 256, 128, 8, 3, True, True),
        (128, 128, 128, 8, 4, False, True),
        (128, 128, 256, 8, 3, False, True),
        (64, 128, 128, 4, 4, False, False),
        (64, 64, 128, 4, 4, False, False),
        (64, 32, 128, 4, 4, False, False),
        (64, 64, 256, 4, 3, False, False),
    ]

    def gemm_configs(interval: int = G.PROMOTE_K) -> list:
        """Autotuning candidates for a promotion interval (K elements; BK must divide it)."""
        out = []
        for c in _CANDIDATES:
            promote = G.promote_tiles(interval, c[2])
            if promote is not None:
                m = _meta(*c, promote)
                out.append(triton.Config({k: v for k, v in m.items() if not k.startswith("num_")},
                                         num_warps=m["num_warps"], num_stages=m["num_stages"],
                                         pre_hook=_set_block_shapes))
        return out

    GEMM_CONFIGS = gemm_configs()

    def _prune(configs, nargs, **_):
        small = nargs["M_KEY"] <= 256
        return [c for c in configs if (c.kwargs["BM"] == 64) == small]

    _gemm_tuned = triton.autotune(GEMM_CONFIGS, key=["M_KEY", "N", "K", "R", "R2", "GELU", "OUT_FP8"],
                                  prune_configs_by={"early_config_prune": _prune},
                                  reset_to_zero=["U2"])(_scaled_gemm_kernel)

    # Without autotuning: (few rows, many rows).
    DEFAULT_CONFIGS = (_meta(64, 128, 128, 4, 4, False, False, G.promote_tiles(G.PROMOTE_K, 128)),
                       _meta(128, 256, 128, 8, 3, True, True, G.promote_tiles(G.PROMOTE_K, 128)))

    # Fixed small configuration for the interpreter (and for tests that pin one): promotion every
    # tile, so the CPU tests' small K still go through it.
    INTERP_CONFIG = _meta(32, 64, 32, 4, 2, True, True, 1, group=2)

    @functools.lru_cache(maxsize=1024)  # asked on every few-token call: no dict built per call (shared: read only)
    def few_tokens_split(M: int, N: int, sms: int, interval: int = G.PROMOTE_K) -> dict | None:
        """Few tokens and few output channels (8192->2048 at M=126: 32 tiles of 64 x 128 for 132 SMs):
        128 x 64 tiles with K split 2 or 4 ways; None where there are tiles enough. 128-token tiles
        as w4a8's split K (64-token ones gave wrong rows there on the H100)."""
        split = G.split_k(G.cdiv(M, 128) * G.cdiv(N, 64), sms)
        if split == 1:
            return None
        return _meta(128, 64, 128, 4, 4, False, False, G.promote_tiles(interval, 128), split_k=split)

    FP8_GEMM = G.GemmKernel(_scaled_gemm_kernel, _gemm_tuned, DEFAULT_CONFIGS, INTERP_CONFIG, _set_block_shapes,
                            ("a_desc", "b_desc", "c_desc"))


def act_quant_lowrank(x: torch.Tensor, B=None, *, xq=None, sx=None, zero=None, static=None,
                      single: bool | None = None, rows: int | None = None, bm: int | None = None,
                      split: int | None = None, warps: int | None = None):
    """x [M, K] (bf16/fp16/fp32, row stride free, unit column stride) -> (xq fp8 [M, K],
    sx fp32 [M], u = x B^T bf16 [M, r] or None). u is summed in fp32 and rounded to bf16 once here: it
    is only ever a bf16 MMA operand, and so the GEMM reads half the bytes (and with three math warpgroups
    takes U's rows by TMA, fp8_ws._u_ring). B may also be a sequence of 1-3 factors of one shape [r, K], of
    linears that read the same input (an attention's q, k and v): u is then [len(B), M, r], each u[g]
    contiguous, from the same single read of x. zero: an fp32 [M, r2] buffer (the next linear's u
    accumulator) set to zero on the way. single: one launch (default for M <= SINGLE_LAUNCH_M without a low
    rank; rows per program `rows`), else two over K splits (bm rows x split columns per program).
    static: one FP8 scale for all of x (fp32 [1], a power of two; fp8_ffn.static_scale of a calibrated
    absmax), returned as sx: the codes then need no row max, and x is read once (_act_stats_kernel with
    STATIC; with a low rank a second small launch rounds u)."""
    M, K = x.shape
    assert x.stride(1) == 1, "act_quant_lowrank needs unit column stride"
    Bs = None
    if isinstance(B, (list, tuple)):
        Bs = [b for b in B]
        assert 1 <= len(Bs) <= 3 and all(b.shape == Bs[0].shape for b in Bs), "1-3 factors of one shape"
        B = Bs[0]
    nb = 1 if Bs is None else len(Bs)
    r = 0 if B is None else B.shape[0]
    rz = 0 if zero is None else zero.shape[1]
    xq = G.new((M, K), torch.float8_e4m3fn, x.device) if xq is None else xq
    rp = max(16, G.p2(r)) if r else 0
    rzp = max(16, G.p2(rz)) if rz else 0
    if static is None:
        sx = G.new((M,), torch.float32, x.device) if sx is None else sx
        z = zero if rz else sx  # unused pointers: any fp32 tensor of this call
        if single is None:
            # H200, M=126, device time (CUDA graphs, bench/host_overhead_126_rank_h200.md): without a low rank
            # one launch per row is the fastest (K=2048: 4.3 us against 9.2 for two launches); with rank 64 every
            # row's program reads all of B and it is the slowest (17.5 against 11.0), and slower still as K grows
            single = M <= SINGLE_LAUNCH_M and K <= 4096 and r == 0
        assert not (single and r and nb > 1), "act_quant_lowrank: several factors take the two-launch variant"
        if single:
            u = G.new((M, r), torch.bfloat16, x.device) if r else None
            # one row per program was the fastest on the H200 (16.4 us at K=2048, 2 rows 17.7, 16 rows 39);
            # the interpreter's time goes with the number of programs
            rows = rows or (16 if G.INTERP else 1)
            assert rows in (1, 2, 4, 8, 16), "act_quant_lowrank: 1, 2, 4, 8 or 16 rows per program"
            bk, bk2 = (32, 32) if G.INTERP else (256, max(256, 2048 // rows))
            G.launch_kernel(_act_quant_rows_kernel, (G.cdiv(M, rows),),
                            (x, xq, sx, B if r else sx, u if r else sx, z, M, K, r, rz, x.stride(0)),
                            dict(ROWS=rows, BM=16, BK=bk, BK2=bk2, RP=rp, RZP=rzp, INTERP=G.INTERP),
                            num_warps=warps or 4)
            return xq, sx, u
    # (row block x K split) passes. Measured on the H100 (bench/ffn_kernels_explore_h100.log): M=126: 16 rows x
    # 256 columns per program, 13-15 us at K=2048/8192; M=6144, K=4096: 64 x 512, 64 us (2 TB/s)
    bm = bm or (16 if (G.INTERP or M <= 2048) else MANY_ROWS_BM)
    bk = 32 if G.INTERP else 128
    split = split or (64 if G.INTERP else 256 if M <= 2048 else MANY_ROWS_SPLIT)
    split = G.cdiv(split, bk) * bk  # whole load blocks per split
    warps = warps or (8 if nb * rp > 64 else 4)
    grid = (G.cdiv(M, bm), G.cdiv(K, split))
    nu = nb * M * r
    # u's fp32 sums (and, per token, the row max), summed by atomics: one zeroed buffer (one memset launch, not
    # two; u first, so its rows stay 16-byte aligned for the GEMMs' TMA loads)
    n_sums = nu + (M if static is None else 0)
    sums = G.new((n_sums,), torch.float32, x.device, zero=True) if n_sums else None
    u32 = sums[:nu] if r else None
    u = G.new((nb, M, r) if Bs is not None else (M, r), torch.bfloat16, x.device) if r else None
    # per token the row max; with one static scale (a power of two: exact division) the codes need none, and
    # this same read of x stores them
    scale = sums[nu:] if static is None else static.reshape(1)
    lb = [b if r else scale for b in (Bs or [B])] + [scale] * (3 - nb)  # (unused pointers: any tensor)
    # num_stages=1: software-pipelined (2-3 stages, Triton 3.6, H200), this loop's 64-row tiles (wgmma) gave
    # u off by 0.3-1.2% and different on every call (a race: 16- and 32-row tiles and one stage are exact,
    # run to run within 1e-7; bench/act_quant_race_h200.log). One stage is as fast with 4 warps (58 us at
    # M=6144, K=4096, r=64); tests/test_gpu_fp8.py::test_ffn_repeats_itself guards it.
    G.launch_kernel(_act_stats_kernel, grid, (x, scale, xq, scale, *lb, u32 if r else scale, M, K, r, x.stride(0)),
                    dict(BM=bm, BK=bk, SPLIT=split, RP=rp, NB=nb, STATIC=static is not None, INTERP=G.INTERP),
                    num_warps=warps, num_stages=1)
    if static is not None:
        if r or rz:
            G.launch_kernel(_round_u_kernel, (G.cdiv(M, 64),), (u32 if r else scale, u if r else scale,
                                                                zero if rz else scale, M, r, rz),
                            dict(BM=64, RP=rp, RZP=rzp, NB=nb, INTERP=G.INTERP), num_warps=4)
        return xq, scale, u
    G.launch_kernel(_act_quant_kernel, grid, (x, xq, scale, sx, z, u32 if r else sx, u if r else sx, M, K, rz, r,
                                              x.stride(0)),
                    dict(BM=bm, BK=bk, SPLIT=split, RZP=rzp, RP=rp, NB=nb, INTERP=G.INTERP), num_warps=4)
    return xq, sx, u


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """x (fp32, contiguous) rounded to bf16 (nearest even) by a launch that programs.py records (a torch cast
    inside a recorded call would not be repeated)."""
    y = G.new(tuple(x.shape), torch.bfloat16, x.device)
    n = x.numel()
    G.launch_kernel(_round_bf16_kernel, (G.cdiv(n, 1024),), (x, y, n), dict(BLOCK=1024, INTERP=G.INTERP))
    return y


def scaled_gemm(xq, sx, q, q_scale, *, u=None, A=None, bias=None, gelu=False, h_scale=None, next_B=None,
                u_next=None, out=None, out_dtype=torch.bfloat16, config: dict | None = None):
    """out = (xq Q^T) * sx * q_scale + u A^T + bias, optionally GELU(tanh).

    xq fp8 [M, K]; sx fp32 [M] (per token) or [1] (static); q fp8 [N, K]; q_scale fp32 [N];
    u [M, r] (bf16, or the fp32 sum) with A [N, r]; bias [N]. With h_scale (fp32 [1]) the output is FP8 codes of
    out / h_scale (saturating), and with next_B [r2, N] also u_next [M, r2] fp32 += out next_B^T
    (u_next must hold zeros on entry). config: a fixed one (tests, benches), else tuned or the default."""
    M, N = xq.shape[0], q.shape[0]
    out, ptrs, sizes, flags = G.gemm_operands(xq, sx, N, u, A, bias, gelu, h_scale, next_B, u_next, out, out_dtype)
    if config is None and fp8_ws.enabled(xq.device, M):
        # Hopper, many tokens: the warp-specialized Gluon kernel (fp8_ws.py), same function, faster promotion
        if fp8_ws.run(xq, q, out, sx, q_scale, ptrs, sizes[:5], flags, G.PROMOTE_K):
            return out
    if config is None and M <= SPLIT_K_MAX_M and xq.is_cuda and not G.INTERP and SPLIT_K_ON:
        config = few_tokens_split(M, N, G.num_sms(xq.device.index or 0))
    ws, cnt = G.split_operands(xq.device, M, N, config)
    G.launch_gemm(FP8_GEMM, (xq, q, out), (sx, q_scale, *ptrs, ws, cnt, *sizes), flags, M, N, xq.device, config,
                  u_next if next_B is not None else None)
    return out
