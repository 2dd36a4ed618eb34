"""Triton kernels of the compressed FFN on FP8 tensor cores; their torch references are in
reference.py (`act_quant_lowrank_ref`, `compressed_linear_ref`, `compressed_ffn_ref`).

One FFN, y = W2 GELU(W1 x + b1) + b2 with W = A B + dequant(Q), is three launches:

  1. act_quant_lowrank(x, B1): per-token FP8 quantization of x (scale sx = rowmax/448) and the
     low-rank down-projection u1 = x B1^T, computed from the same read of x as the row max;
     a second launch writes the FP8 codes (x is read twice, written once at 1 byte).
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

Accumulation: Hopper's FP8 MMA accumulates in reduced precision. Over all of K that cost up to
17% relative error on some inputs (measured: 16384->4096, 17%; audio 8192->2048, 9.6%;
bench/ffn_kernels_explore_h100.log), so the GEMM adds the tensor cores' result into an fp32
accumulator every PROMOTE K-tiles of BK (DeepGEMM promotes likewise). It costs 30-40% of the
GEMM's speed at BK=128 and less at BK=256, which the tuner mostly picks; errors then are
2.3e-3 against fp32 at every LTX-2 shape.

Interpreter (CPU CI): bf16 tl.dot is wrong there, so INTERP upcasts its operands to fp32,
and fp32 -> fp8 casts do not round (and fp32 -> bf16 truncates), so values are rounded in
arithmetic first and the casts are exact.
"""
from __future__ import annotations

import functools
import os

import torch

from .formats import FP8_MAX

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .gptq import _round_e4m3
except ImportError:  # torch-only installs: dispatch never picks these kernels
    triton = None

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
# LITEFFN_AUTOTUNE=0: skip autotuning (a few seconds per new shape) and use DEFAULT_CONFIGS.
AUTOTUNE = os.environ.get("LITEFFN_AUTOTUNE", "1") != "0"
H_SCALE_MARGIN = 2.0  # headroom of the static FP8 scale of h over the calibrated absmax


def available() -> bool:
    return triton is not None


def static_scale(amax: torch.Tensor, margin: float = H_SCALE_MARGIN) -> torch.Tensor:
    """Power-of-two per-tensor FP8 scale covering margin * amax (fp32 tensor [1])."""
    a = (amax.float().reshape(-1)[:1] * margin / FP8_MAX).clamp_min(2.0**-100)
    return torch.exp2(torch.ceil(torch.log2(a)))


if triton is not None:

    @triton.jit
    def _grouped_tile(tile, num_grouped, num_other, GROUP: tl.constexpr):
        """Tile index -> (pid along the grouped axis, pid along the other), GROUP tiles of the grouped
        axis at a time: neighbouring programs share the other axis's operand in L2."""
        group = GROUP * num_other
        first = (tile // group) * GROUP
        size = min(num_grouped - first, GROUP)
        return first + (tile % group) % size, (tile % group) // size

    @triton.jit
    def _dot(a, b, acc, INTERP: tl.constexpr):
        """bf16 MMA with fp32 accumulation (fp32 operands under the interpreter)."""
        if INTERP:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc)

    @triton.jit
    def _to_bf16(v, INTERP: tl.constexpr):
        """Round-to-nearest-even to bf16 (the interpreter's cast truncates)."""
        if INTERP:
            b = v.to(tl.float32).to(tl.uint32, bitcast=True)
            v = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return v.to(tl.bfloat16)

    @triton.jit
    def _to_fp8(v, INTERP: tl.constexpr):
        """Saturating round-to-nearest-even to E4M3."""
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        if INTERP:
            v = _round_e4m3(v)
        return v.to(tl.float8e4nv)

    @triton.jit
    def _gelu_tanh(y, INTERP: tl.constexpr):
        z = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        if INTERP:  # no inline asm in the interpreter
            t = 1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * z, 80.0)) + 1.0)
        else:  # one MUFU op per element (exp + reciprocal would be two: the epilogue is MUFU-bound)
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z], dtype=tl.float32,
                                          is_pure=True, pack=1)
        return 0.5 * y * (1.0 + t)

    # ------------------------------------------------------------ 1. quantize + low rank
    # Two launches over a (row block x K split) grid: the row max and u need all of K, and one
    # program per row block walking all of K was latency-bound (M=126, K=8192: 196 us).
    @triton.jit
    def _act_stats_kernel(X, AMAX, LB, U, M, K, R, stride_xm, BM: tl.constexpr, BK: tl.constexpr,
                          SPLIT: tl.constexpr, RP: tl.constexpr, INTERP: tl.constexpr):
        """AMAX[m] = max |x[m, :]| (atomic max over K splits); U[m] += x[m, split] B[:, split]^T."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < M
        xrow = X + rows.to(tl.int64)[:, None] * stride_xm
        amax = tl.zeros([BM], tl.float32)
        if RP > 0:
            rr = tl.arange(0, RP)
            u = tl.zeros([BM, RP], tl.float32)
        kend = tl.minimum((tl.program_id(1) + 1) * SPLIT, K)
        for k0 in range(tl.program_id(1) * SPLIT, kend, BK):
            ks = k0 + tl.arange(0, BK)
            x = tl.load(xrow + ks[None, :], mask=rmask[:, None] & (ks < kend)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), 1))
            if RP > 0:
                b = tl.load(LB + rr[:, None] * K + ks[None, :], mask=(rr < R)[:, None] & (ks < kend)[None, :],
                            other=0.0)
                u = _dot(x.to(tl.bfloat16), tl.trans(b), u, INTERP)
        tl.atomic_max(AMAX + rows, amax, mask=rmask, sem="relaxed")
        if RP > 0:
            tl.atomic_add(U + rows[:, None] * R + rr[None, :], u, mask=rmask[:, None] & (rr < R)[None, :], sem="relaxed")

    @triton.jit
    def _act_quant_kernel(X, XQ, AMAX, SX, M, K, stride_xm, BM: tl.constexpr, BK: tl.constexpr,
                          SPLIT: tl.constexpr, INTERP: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < M
        s = tl.maximum(tl.math.div_rn(tl.load(AMAX + rows, mask=rmask, other=0.0), 448.0), 1e-12)
        if tl.program_id(1) == 0:
            tl.store(SX + rows, s, mask=rmask)
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
    def _scale_lowrank(acc, rows, cols, M, N, SX, SW, U, LA, R, ROW_SCALAR: tl.constexpr, RB: tl.constexpr,
                       R_CHUNKS: tl.constexpr, SWAP: tl.constexpr, INTERP: tl.constexpr):
        """acc * sx[row] * sw[col] + U[rows] LA[cols]^T. SWAP: acc is [cols, rows] (w4a8's tiles) and
        the low-rank MMA runs as LA U^T, accumulating in acc's own layout."""
        rmask = rows < M
        cmask = cols < N
        if ROW_SCALAR:
            acc = acc * tl.load(SX)
        elif SWAP:
            acc = acc * tl.load(SX + rows, mask=rmask, other=0.0)[None, :]
        else:
            acc = acc * tl.load(SX + rows, mask=rmask, other=0.0)[:, None]
        if SWAP:
            acc = acc * tl.load(SW + cols, mask=cmask, other=0.0)[:, None]
        else:
            acc = acc * tl.load(SW + cols, mask=cmask, other=0.0)[None, :]
        for j in tl.static_range(R_CHUNKS):  # low-rank up-projection into the same accumulator
            rr = j * RB + tl.arange(0, RB)
            a = tl.load(LA + cols[:, None] * R + rr[None, :], mask=cmask[:, None] & (rr < R)[None, :], other=0.0)
            u = tl.load(U + rows[:, None] * R + rr[None, :], mask=rmask[:, None] & (rr < R)[None, :], other=0.0)
            u = _to_bf16(u, INTERP)  # u2 arrives as the fp32 atomic sum
            if SWAP:
                acc = _dot(a, tl.trans(u), acc, INTERP)
            else:
                acc = _dot(u, tl.trans(a), acc, INTERP)
        return acc

    @triton.jit
    def _epilogue(acc, rows, cols, c_desc, om, on, M, N, SX, SW, U, LA, BIAS, SH, R,
                  ROW_SCALAR: tl.constexpr, HAS_BIAS: tl.constexpr, RB: tl.constexpr, R_CHUNKS: tl.constexpr,
                  GELU: tl.constexpr, OUT_FP8: tl.constexpr, INTERP: tl.constexpr, SCALED: tl.constexpr):
        """SCALED: acc already holds the scaled product plus the low-rank term (w4a8's tiles)."""
        cmask = cols < N
        if not SCALED:
            acc = _scale_lowrank(acc, rows, cols, M, N, SX, SW, U, LA, R, ROW_SCALAR, RB, R_CHUNKS, False, INTERP)
        if HAS_BIAS:
            acc = acc + tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if GELU:
            acc = _gelu_tanh(acc, INTERP)
        if OUT_FP8:
            c_desc.store([om, on], _to_fp8(acc * (1.0 / tl.load(SH)), INTERP))
        elif c_desc.dtype == tl.bfloat16:
            c_desc.store([om, on], _to_bf16(acc, INTERP))
        else:
            c_desc.store([om, on], acc.to(c_desc.dtype))
        return _to_bf16(acc, INTERP)  # the unquantized output, for the next linear's low rank

    @triton.jit
    def _next_lowrank(h0, h1, cols0, cols1, rows, M, N, LB2, U2, R2, R2B: tl.constexpr, R2_CHUNKS: tl.constexpr,
                      TWO: tl.constexpr, INTERP: tl.constexpr):
        """u2[rows] += h B2[:, cols]^T over the tile's one or two column halves: one atomic per
        element of u2 per tile."""
        rmask = rows < M
        for j in tl.static_range(R2_CHUNKS):
            rr = j * R2B + tl.arange(0, R2B)
            b = tl.load(LB2 + rr[:, None] * N + cols0[None, :], mask=(rr < R2)[:, None] & (cols0 < N)[None, :], other=0.0)
            part = _dot(h0, tl.trans(b), None, INTERP)
            if TWO:
                b = tl.load(LB2 + rr[:, None] * N + cols1[None, :], mask=(rr < R2)[:, None] & (cols1 < N)[None, :],
                            other=0.0)
                part = _dot(h1, tl.trans(b), part, INTERP)
            tl.atomic_add(U2 + rows[:, None] * R2 + rr[None, :], part, mask=rmask[:, None] & (rr < R2)[None, :],
                          sem="relaxed")

    @triton.jit
    def _store_tile(acc, om, on, c_desc, M, N, SX, SW, U, LA, BIAS, LB2, U2, SH, R, R2,
                    BM: tl.constexpr, BN: tl.constexpr, EPI_SPLIT: tl.constexpr, ROW_SCALAR: tl.constexpr,
                    HAS_BIAS: tl.constexpr, RB: tl.constexpr, R_CHUNKS: tl.constexpr, GELU: tl.constexpr,
                    OUT_FP8: tl.constexpr, R2B: tl.constexpr, R2_CHUNKS: tl.constexpr, INTERP: tl.constexpr,
                    SCALED: tl.constexpr = False):
        """Epilogue of one [BM tokens, BN channels] accumulator tile (this GEMM's and W4A8's)."""
        rows = om + tl.arange(0, BM)
        if EPI_SPLIT:  # two half-width epilogues: fewer live registers, smaller store tile
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
            cols0 = on + tl.arange(0, BN // 2)
            cols1 = cols0 + BN // 2
            h0 = _epilogue(acc0, rows, cols0, c_desc, om, on, M, N, SX, SW, U, LA, BIAS, SH, R,
                           ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, INTERP, SCALED)
            h1 = _epilogue(acc1, rows, cols1, c_desc, om, on + BN // 2, M, N, SX, SW, U, LA, BIAS, SH, R,
                           ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, INTERP, SCALED)
            if R2_CHUNKS > 0:
                _next_lowrank(h0, h1, cols0, cols1, rows, M, N, LB2, U2, R2, R2B, R2_CHUNKS, True, INTERP)
        else:
            cols = on + tl.arange(0, BN)
            h = _epilogue(acc, rows, cols, c_desc, om, on, M, N, SX, SW, U, LA, BIAS, SH, R,
                          ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, INTERP, SCALED)
            if R2_CHUNKS > 0:
                _next_lowrank(h, h, cols, cols, rows, M, N, LB2, U2, R2, R2B, R2_CHUNKS, False, INTERP)

    @triton.jit
    def _scaled_gemm_kernel(a_desc, b_desc, c_desc, SX, SW, U, LA, BIAS, LB2, U2, SH,
                            M, N, K, R, R2, M_KEY,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                            EPI_SPLIT: tl.constexpr, PERSIST: tl.constexpr, FLATTEN: tl.constexpr,
                            PRECISE_ACC: tl.constexpr, PROMOTE: tl.constexpr, WS: tl.constexpr,
                            ROW_SCALAR: tl.constexpr, HAS_BIAS: tl.constexpr, RB: tl.constexpr,
                            R_CHUNKS: tl.constexpr, GELU: tl.constexpr, OUT_FP8: tl.constexpr,
                            R2B: tl.constexpr, R2_CHUNKS: tl.constexpr, INTERP: tl.constexpr):
        num_pid_m = tl.cdiv(M, BM)
        num_pid_n = tl.cdiv(N, BN)
        num_tiles = num_pid_m * num_pid_n
        k_tiles = tl.cdiv(K, BK)
        # One loop for both launch styles: persistent (grid = #SMs) or one tile per program.
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN, warp_specialize=WS):
            # grouped order: neighbouring programs share A rows in L2
            pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
            om = pid_m * BM
            on = pid_n * BN
            acc = tl.zeros([BM, BN], tl.float32)
            if PROMOTE == 0:  # Hopper's reduced-precision accumulation over all of K
                for ki in range(k_tiles):
                    acc = tl.dot(a_desc.load([om, ki * BK]), b_desc.load([on, ki * BK]).T, acc)
            else:
                # The tensor cores accumulate into `part` (reduced precision over PROMOTE * BK products
                # only), added to acc in fp32 every PROMOTE tiles. One tile per iteration, so the
                # pipeliner streams one K tile at a time and keeps the MMAs async between promotions.
                part = tl.zeros([BM, BN], tl.float32)
                for ki in range(k_tiles):
                    part = tl.dot(a_desc.load([om, ki * BK]), b_desc.load([on, ki * BK]).T, part)
                    if ki % PROMOTE == PROMOTE - 1:
                        acc += part
                        part = tl.zeros([BM, BN], tl.float32)
                acc += part
            _store_tile(acc, om, on, c_desc, M, N, SX, SW, U, LA, BIAS, LB2, U2, SH, R, R2, BM, BN, EPI_SPLIT,
                        ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, R2B, R2_CHUNKS, INTERP)

    def _set_block_shapes(nargs):
        bm, bn, bk = nargs["BM"], nargs["BN"], nargs["BK"]
        nargs["a_desc"].block_shape = [bm, bk]
        nargs["b_desc"].block_shape = [bn, bk]
        nargs["c_desc"].block_shape = [bm, bn // 2 if nargs["EPI_SPLIT"] else bn]

    def _config(bm, bn, bk, warps, stages, split, persist, flatten=False, precise=False, ws=False, promote=1):
        return triton.Config(dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, EPI_SPLIT=split, PERSIST=persist,
                                  FLATTEN=flatten, PRECISE_ACC=precise, PROMOTE=promote, WS=ws),
                             num_warps=warps, num_stages=stages, pre_hook=_set_block_shapes)

    # Candidates autotuned per (M bucket, N, K, ranks, variant); bench/ffn_kernels.py prints the
    # winners at LTX-2 shapes. Few rows (the audio FFN, M ~ 126) get 64-row tiles.
    # Measured on the H100 (bench/ffn_kernels_explore_h100.log): warp specialization and flattening
    # did not help; with promotion, BK=256 (half the promotions) wins most LTX-2 shapes
    # (bench/ffn_kernels_h100.md). Candidates that do not fit are skipped by the tuner.
    GEMM_CONFIGS = [
        _config(128, 256, 128, 8, 3, True, True),
        _config(128, 128, 128, 8, 4, False, True),
        _config(128, 256, 256, 8, 2, True, True),
        _config(128, 128, 256, 8, 2, False, True),
        _config(128, 128, 256, 8, 3, False, True),
        _config(64, 128, 128, 4, 4, False, False),
        _config(64, 64, 128, 4, 4, False, False),
        _config(64, 32, 128, 4, 4, False, False),
        _config(64, 64, 256, 4, 3, False, False),
    ]

    def _prune(configs, nargs, **_):
        small = nargs["M_KEY"] <= 256
        return [c for c in configs if (c.kwargs["BM"] == 64) == small]

    _gemm_tuned = triton.autotune(GEMM_CONFIGS, key=["M_KEY", "N", "K", "R", "R2", "GELU", "OUT_FP8"],
                                  prune_configs_by={"early_config_prune": _prune},
                                  reset_to_zero=["U2"])(_scaled_gemm_kernel)

    # Without autotuning: (few rows, many rows). These are what the GPU tests ran with
    # (bench/gpu_tests_h100.log); the tuner mostly picks BK=256 variants (bench/ffn_kernels_h100.md).
    DEFAULT_CONFIGS = (dict(BM=64, BN=128, BK=128, GROUP_M=8, EPI_SPLIT=False, PERSIST=False, FLATTEN=False,
                            PRECISE_ACC=False, PROMOTE=1, WS=False, num_warps=4, num_stages=4),
                       dict(BM=128, BN=256, BK=128, GROUP_M=8, EPI_SPLIT=True, PERSIST=True, FLATTEN=False,
                            PRECISE_ACC=False, PROMOTE=1, WS=False, num_warps=8, num_stages=3))

    # Fixed small configuration for the interpreter (and for tests that pin one).
    INTERP_CONFIG = dict(BM=32, BN=64, BK=32, GROUP_M=2, EPI_SPLIT=True, PERSIST=True, FLATTEN=False,
                         PRECISE_ACC=False, PROMOTE=1, WS=False, num_warps=4, num_stages=2)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _scratch(device: torch.device) -> torch.Tensor:
    return torch.zeros(16, device=device, dtype=torch.float32)


def _rank_chunk(r: int) -> tuple[int, int]:
    """(chunk, chunks) covering rank r with MMA-friendly chunks of 16..64 (masked tail)."""
    if r <= 0:
        return 16, 0
    chunk = 16 if r <= 16 else 32 if r <= 32 else 64
    return chunk, -(-r // chunk)


def _p2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def out_dtype(x: torch.Tensor) -> torch.dtype:
    """Output dtype of the kernels for input x: bf16 and fp16 stay, anything else gives bf16."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def act_quant_lowrank(x: torch.Tensor, B: torch.Tensor | None = None, *, xq=None, sx=None,
                      bm: int | None = None, split: int | None = None, warps: int | None = None):
    """x [M, K] (bf16/fp16/fp32, row stride free, unit column stride) -> (xq fp8 [M, K],
    sx fp32 [M], u = x B^T fp32 [M, r] or None). u stays fp32 (an atomic sum over K splits);
    the GEMM epilogue rounds it to bf16 for the MMA."""
    M, K = x.shape
    assert x.stride(1) == 1, "act_quant_lowrank needs unit column stride"
    r = 0 if B is None else B.shape[0]
    xq = torch.empty(M, K, device=x.device, dtype=torch.float8_e4m3fn) if xq is None else xq
    sx = torch.empty(M, device=x.device, dtype=torch.float32) if sx is None else sx
    amax = torch.zeros(M, device=x.device, dtype=torch.float32)
    u = torch.zeros(M, r, device=x.device, dtype=torch.float32) if r else None
    rp = max(16, _p2(r)) if r else 0
    # measured on the H100 (bench/ffn_kernels.py --explore): M=126: 16 rows x 256 columns per
    # program, 13-15 us at K=2048/8192; M=6144, K=4096: 64 x 512, 64 us (2 TB/s)
    bm = bm or (16 if (INTERP or M <= 2048) else 64)
    bk = 32 if INTERP else 128
    split = split or (64 if INTERP else 256 if M <= 2048 else 512)
    split = -(-split // bk) * bk  # whole load blocks per split
    warps = warps or (8 if (rp > 64 or bm == 64) else 4)
    grid = (triton.cdiv(M, bm), triton.cdiv(K, split))
    _act_stats_kernel[grid](x, amax, B if r else amax, u if r else amax, M, K, r, x.stride(0),
                            BM=bm, BK=bk, SPLIT=split, RP=rp, INTERP=INTERP, num_warps=warps)
    _act_quant_kernel[grid](x, xq, amax, sx, M, K, x.stride(0), BM=bm, BK=bk, SPLIT=split, INTERP=INTERP,
                            num_warps=4)
    return xq, sx, u


def scaled_gemm(xq, sx, q, q_scale, *, u=None, A=None, bias=None, gelu=False, h_scale=None, next_B=None,
                u_next=None, out=None, out_dtype=torch.bfloat16, config: dict | None = None):
    """out = (xq Q^T) * sx * q_scale + u A^T + bias, optionally GELU(tanh).

    xq fp8 [M, K]; sx fp32 [M] (per token) or [1] (static); q fp8 [N, K]; q_scale fp32 [N];
    u [M, r] (bf16, or the fp32 sum) with A [N, r]; bias [N]. With h_scale (fp32 [1]) the output is FP8 codes of
    out / h_scale (saturating), and with next_B [r2, N] also u_next [M, r2] fp32 += out next_B^T
    (u_next must hold zeros on entry)."""
    M, N = xq.shape[0], q.shape[0]
    out, ptrs, sizes, flags = _gemm_operands(xq, sx, N, u, A, bias, gelu, h_scale, next_B, u_next, out, out_dtype)
    # Block shapes are placeholders here; the config's pre_hook sets the real ones.
    descs = [TensorDescriptor.from_tensor(t, [16, 16]) for t in (xq, q, out)]
    _launch(_scaled_gemm_kernel, _gemm_tuned, DEFAULT_CONFIGS, INTERP_CONFIG, _set_block_shapes,
            dict(a_desc=descs[0], b_desc=descs[1], c_desc=descs[2]), (*descs, sx, q_scale, *ptrs, *sizes), flags,
            M, N, xq.device, config, u_next if next_B is not None else None)
    return out


def _gemm_operands(xq, sx, N, u, A, bias, gelu, h_scale, next_B, u_next, out, out_dtype):
    """What the scaled-GEMM kernels (this file's and w4a8's) take alike: the output, the epilogue's
    pointers (U, LA, BIAS, LB2, U2, SH), the sizes (M, N, K, R, R2, M_KEY) and the epilogue's flags."""
    M, K = xq.shape
    r = 0 if A is None else A.shape[1]
    r2 = 0 if next_B is None else next_B.shape[0]
    fp8_out = h_scale is not None
    if out is None:
        out = torch.empty(M, N, device=xq.device, dtype=torch.float8_e4m3fn if fp8_out else out_dtype)
    rb, rc = _rank_chunk(r)
    r2b, r2c = _rank_chunk(r2)
    # Unused pointers get a scratch buffer, never a caller's tensor: the tuner zeroes U2 before its
    # timing runs (reset_to_zero), which once zeroed the layer's q_scale when U2 had no use.
    dummy = _scratch(xq.device)
    ptrs = (u if r else dummy, A if r else dummy, bias if bias is not None else dummy, next_B if r2 else dummy,
            u_next if r2 else dummy, h_scale if fp8_out else dummy)
    flags = dict(ROW_SCALAR=sx.numel() == 1, HAS_BIAS=bias is not None, RB=rb, R_CHUNKS=rc,
                 GELU=gelu, OUT_FP8=fp8_out, R2B=r2b, R2_CHUNKS=r2c, INTERP=INTERP)
    return out, ptrs, (M, N, K, r, r2, min(_p2(M), 65536)), flags


def _launch(kernel, tuned, defaults, interp_config, set_block_shapes, descs: dict, args, flags, M, N, device,
            config, u_next=None):
    """Launch a scaled-GEMM kernel (this file's or w4a8's): autotuned with `tuned`; with
    LITEFFN_AUTOTUNE=0 the fixed `defaults` (few rows, many rows); a given config completes
    the interpreter's small one."""
    tiles = lambda m: triton.cdiv(M, m["BM"]) * triton.cdiv(N, m["BN"]) * m.get("SPLIT_K", 1)  # noqa: E731
    if config is None and not INTERP and not AUTOTUNE:
        config = defaults[M > 256]
    if config is None and not INTERP:
        sms = _num_sms(device.index or 0)
        grid = lambda m: (min(tiles(m), sms) if m["PERSIST"] else tiles(m),)  # noqa: E731
        n = len(tuned.cache)
        tuned[grid](*args, **flags)
        if u_next is not None and len(tuned.cache) != n:
            # This call tuned: its timing runs added into u_next too, and Triton 3.6 leaves their
            # sum there (newer versions zero it); seen on the H100 as a wrong first FFN per shape.
            u_next.zero_()
            tuned[grid](*args, **flags)
        return
    cfg = dict(interp_config, **(config or {}))
    meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages", "programs")}
    set_block_shapes({**descs, **meta, **flags})
    progs = _num_sms(device.index or 0) if device.type == "cuda" else 3  # persistent: few programs, many tiles
    grid = (cfg.get("programs") or (min(tiles(cfg), progs) if cfg["PERSIST"] else tiles(cfg)),)
    kernel[grid](*args, **meta, **flags, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# ---------------------------------------------------------------- whole layers
def _gemm(xq, sx, t: dict, **kw):
    """scaled_gemm of one kernel layer: FP8 weights (q, q_scale) or FP4 ones (w4a8.prepare)."""
    if "sb" in t:
        from . import w4a8
        return w4a8.scaled_gemm(xq, sx, t, **kw)
    return scaled_gemm(xq, sx, t["q"], t["q_scale"], **kw)


def linear_fp8(x2: torch.Tensor, t: dict, config=None) -> torch.Tensor:
    """One compressed linear on a [M, K] input: kernel 1 + kernel 2 -> bf16. t: the layer's
    q, q_scale (FP8 residual) or w4a8.prepare's operands (FP4), with A, B, bias."""
    xq, sx, u = act_quant_lowrank(x2, t.get("B"))
    return _gemm(xq, sx, t, u=u, A=t.get("A"), bias=t.get("bias"), out_dtype=out_dtype(x2), config=config)


def ffn_fp8(x2: torch.Tensor, up: dict, down: dict, h_scale: torch.Tensor | None, config=None) -> torch.Tensor:
    """Linear -> GELU(tanh) -> Linear on [M, dim]. With h_scale (static FP8 scale of the hidden
    activation) the three-launch fused path; without it the hidden activation goes through
    bf16 and a per-token quantization pass (four launches)."""
    y_dtype = out_dtype(x2)
    xq, sx, u = act_quant_lowrank(x2, up.get("B"))
    B2 = down.get("B")
    if h_scale is None:
        h = _gemm(xq, sx, up, u=u, A=up.get("A"), bias=up.get("bias"), gelu=True, out_dtype=y_dtype, config=config)
        hq, sh, u2 = act_quant_lowrank(h, B2)
    else:
        r2 = 0 if B2 is None else B2.shape[0]
        u2 = torch.zeros(x2.shape[0], r2, device=x2.device, dtype=torch.float32) if r2 else None
        hq = _gemm(xq, sx, up, u=u, A=up.get("A"), bias=up.get("bias"), gelu=True, h_scale=h_scale, next_B=B2,
                   u_next=u2, config=config)
        sh = h_scale
    return _gemm(hq, sh, down, u=u2, A=down.get("A"), bias=down.get("bias"), out_dtype=y_dtype, config=config)
