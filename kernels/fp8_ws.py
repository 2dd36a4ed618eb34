"""Warp-specialized FP8 GEMM for Hopper (sm_90), written in Gluon: the many-token path of the
scaled GEMM (fp8_ffn.scaled_gemm computes the same function; its Triton kernel is the reference
this one is tested against, and the path everywhere else).

Why a second kernel: Hopper's FP8 MMA accumulates in reduced precision, so the partial sums are
added into an fp32 accumulator every few K tiles ("promotion", docs/kernels.md). In Triton 3.6 a
read of an MMA accumulator inside the K loop makes every warp wait for every in-flight MMA, so each
promotion idles the tensor cores: promoting every 512 of K cost 16-18%. Here, as in DeepGEMM, math
warpgroups each own 64 rows of a tile (128 or 192 x 128: two or three warpgroups, MATH_WGS) and run as
separate partitions; one warp issues the TMA loads into a ring of stages. A warpgroup waits for its own
MMA and promotes while the others' MMAs keep the tensor cores busy: with two, 0.93-1.02x cuBLAS with
promoted accumulation on the H200 (bench/gluon_explore_h200.log), where the Triton kernel reaches
0.78-0.90x promoting every 512; with three, 1.00-1.06x (residual only, bench/ws_check_3wg_h200.log).

Epilogue, per warpgroup on its 64 x 128 part of the tile (the same steps as fp8_ffn's): scales
(per token or one static scale, per channel), the low-rank up-projection U A^T as bf16 wgmmas into
the same accumulator, bias, GELU(tanh), output in bf16/fp16/fp32 or FP8 codes of out / h_scale
through shared memory and TMA, and the next linear's low-rank input u_next += h B2^T (bf16 wgmma, the
partial sums added by TMA reduce from shared memory; fp32 atomics for ranks above 64).
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from . import gemm as G

try:
    from triton.experimental import gluon
    from triton.runtime.errors import OutOfResources
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # Triton 3.6 names the TMA copies async_copy_*; newer versions async_load / async_store.
    _tma_load = getattr(tma, "async_load", tma.async_copy_global_to_shared)
    _tma_store = getattr(tma, "async_store", tma.async_copy_shared_to_global)
    # TMA reduce-add (cp.reduce.async.bulk.tensor .add): Triton 3.9's tma.async_atomic_add; 3.6 has the IR
    # builder's op but no Gluon function for it, so one is made here the way 3.9 makes it
    from triton.experimental.gluon.language._core import builtin as _builtin
    _tma_add = getattr(tma, "async_atomic_add", None)
    if _tma_add is None:
        from triton._C.libtriton import ir as _ir

        @_builtin
        def _tma_add(tensor_desc, coord, src, _semantic=None):
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                      src.handle)
except Exception:  # no Triton, or a Triton without Gluon's Hopper API: the Triton kernel runs instead
    gluon = None

HM, BN, BK = 64, 128, 128  # rows per math warpgroup, tile columns, K tile: plain ints for the host side;
# the kernels see the constexpr copies below
# Math warpgroups per CTA, each 64 rows of a tile (benches compare 2 and 3). Three keep the tensor cores busier
# while each waits for its own MMAs (one promotes while two issue): H200, M = 6144, residual only, 4096->16384
# 706 -> 672 us, 16384->4096 705 -> 675 (cuBLAS promoted: 711, 674); the video FFN 1.53x -> 1.62x bf16
# (bench/ws_check_3wg_h200.log). With 3, U's rows come from global memory (a 192-row U tile does not fit in
# shared memory), the math warpgroups get 160 / 152 registers instead of 256 / 232, and an epilogue that
# sums the next linear's low-rank input works one tile at a time (a tile pair's sum would spill).
MATH_WGS = 3
# ... except for epilogues with GELU or the next linear's low-rank input (the FFN up-projection) over fewer
# than HEAVY_MIN_K of K. With fp32 atomics the audio up-projection (K = 2048) lost on three (263 -> 278 us at
# M = 6144, no tile pairs there); with the TMA reduce three are level or ahead (audio FFN 441 -> 434 us at 5600
# tokens, 122.5 -> 121.4 at 1400; H200, bench/ws_sweep_h200.log)
HEAVY_MIN_K = 2048
# ... and only where their waves of 192-row tiles cover at most WAVE_SLACK times the rows that the waves of
# 128-row tiles do (a last wave partly empty costs the larger tiles more). H200, r = 64: 4096x4096 at
# M = 1024 (2 waves either way: 384 rows against 256) 48 -> 60 us; 8192->2048 at M = 1400 (1 wave against
# 2; two runs) 50 -> 40 us; 4096->2048 at 6144 (768 rows both) 145 us both; the video GEMMs (within 2%) 5% faster
WAVE_SLACK = 1.05


def _three_fit(M: int, N: int, sms: int) -> bool:
    waves = lambda bm: G.cdiv(G.cdiv(M, bm) * G.cdiv(N, BN), sms) * bm  # noqa: E731
    return waves(3 * HM) <= WAVE_SLACK * waves(2 * HM)


MATH3_REGS = 160  # the two worker math warpgroups; the default one gets what is left (152)
MAXNREG3 = 128  # 16 warps at launch (the loader warp padded to a warpgroup): 65536 / 512
# (128 + 128) x 128 bytes per stage: 5 stages measured level with 4 and 6 (bench/gluon_explore_h200.log); with
# the low-rank epilogues' staging buffers only 4 fit in shared memory.
STAGES = 5
STAGES_LOWRANK = 4
MIN_M = 257  # fewer tokens: fp8_ffn's few-token configurations (64-row tiles) fill the GPU better
PREFETCH = True  # TMA-prefetch the epilogue's operands (ranks up to 64); benches turn it off to compare
U_RING = True  # bf16 U's rows through the K ring with 3 math warpgroups (benches turn it off to compare)
# Tiles per work item when the epilogue sums the next linear's low-rank input (two warpgroups only). Pairs halved
# its fp32 atomics; with the TMA reduce one tile is as fast or faster: audio FFN at 1400 tokens 129.9 -> 122.5 us,
# video at 24576 6066 -> 5941, equal at 5600 and 43400 (H200, bench/ws_sweep_h200.log). Benches compare 2.
PAIR_TILES = 1
U2_TMA = True  # that sum by TMA reduce from shared memory, one tile at a time, instead of fp32 atomics


log = logging.getLogger("liteffn")
# LITEFFN_GLUON=0: the Triton GEMM everywhere (for comparison, or if this kernel misbehaves on some setup).
_ENABLED = os.environ.get("LITEFFN_GLUON", "1") != "0" and os.environ.get("TRITON_INTERPRET") != "1"
_disabled_reason: str | None = None


def available() -> bool:
    return gluon is not None


def supports(device: torch.device) -> bool:
    """wgmma and setmaxnreg are sm_90 instructions: Hopper only (Ada and Blackwell take the Triton kernel)."""
    return gluon is not None and device.type == "cuda" and G.capability(device.index or 0) == (9, 0)


def enabled(device: torch.device, M: int) -> bool:
    return _ENABLED and _disabled_reason is None and M >= MIN_M and supports(device)


def run(xq, q, out, sx, q_scale, ptrs, sizes, flags, promote_k: int) -> bool:
    """launch(); False (and the Triton kernel from then on, logged once) if it fails to compile or launch."""
    global _disabled_reason
    try:
        launch(xq, q, out, sx, q_scale, ptrs, sizes, flags, promote_k)
        return True
    except Exception as e:  # a Triton version whose Gluon differs, a driver without sm_90a support
        _disabled_reason = f"{type(e).__name__}: {e}"
        log.warning("LiteFFN: the warp-specialized FP8 GEMM failed (%s); using the Triton GEMM from now on "
                    "(same results, 10-20%% slower)", _disabled_reason.splitlines()[0][:300])
        return False


if gluon is not None:
    _BN, _BK = gl.constexpr(BN), gl.constexpr(BK)
    _HM = gl.constexpr(HM)
    _MATH3_REGS = gl.constexpr(MATH3_REGS)

    @gluon.constexpr_function
    def _swizzle(inner_bytes):
        return 128 if inner_bytes % 128 == 0 else 64 if inner_bytes % 64 == 0 else 32

    @gluon.jit
    def _tile(item, M, N, GROUP_M: gl.constexpr, TN: gl.constexpr, TM: gl.constexpr):
        """Grouped order: GROUP_M row tiles at a time share the weights' column tiles in L2. TN: the
        columns of a work item (NT tiles of _BN); TM: its rows."""
        num_pid_m = gl.cdiv(M, TM)
        num_pid_n = gl.cdiv(N, TN)
        group = GROUP_M * num_pid_n
        first = (item // group) * GROUP_M
        size = gl.minimum(num_pid_m - first, GROUP_M)
        return (first + (item % group) % size) * TM, ((item % group) // size) * TN

    # Triton 3.6 spells a shared buffer's reinterpretation _reinterpret, later versions reinterpret
    _NEW_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))

    @_builtin
    def _view(buf, dtype, shape, layout, _semantic=None):
        """buf's bytes seen as another dtype, shape and layout (no copy)."""
        f = buf.reinterpret if hasattr(buf, "reinterpret") else buf._reinterpret
        return f(dtype, shape, layout, _semantic=_semantic)

    @gluon.jit
    def _as(buf, desc):
        """buf seen as a tile of desc's block (dtype, shape, layout)."""
        if _NEW_REINTERPRET:
            return buf.reinterpret(desc.dtype, desc.block_type.shape, desc.layout)
        else:
            return buf._reinterpret(desc.dtype, desc.block_type.shape, desc.layout)

    @gluon.constexpr_function
    def _shares_c(u2_dtype, out_fp8):
        """The TMA reduce's fp32 staging (16 KB per warpgroup) also holds the FP8 output tile (8 KB): both fit
        beside 4 stages of the ring with three warpgroups, where separate buffers left 3."""
        return u2_dtype == gl.float32 and out_fp8

    @gluon.constexpr_function
    def _u_ring(nwg, u_rows):
        """Three math warpgroups and bf16 U: U's rows of a tile (64 per warpgroup, rank <= 64) and A's tile come
        by TMA into one more stage of the K ring after the tile's K tiles (bf16 [64, 64] takes the bytes and
        the 128-byte swizzle of an FP8 [64, 128] A tile, bf16 [128, 64] those of the B tile), so the epilogue's
        low-rank MMA reads shared memory instead of loading U's rows from global memory."""
        return nwg == 3 and u_rows == HM

    @gluon.jit
    def _gelu_tanh(y):
        # (tanh.approx.f16x2 on pairs, half the MUFU ops, was slower and less accurate: commit 5f405e6)
        z = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        t = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z], dtype=gl.float32, is_pure=True,
                                      pack=1)
        return 0.5 * y * (1.0 + t)

    @gluon.jit
    def _epilogue(acc, om, on, t, p, u2acc, ur_s, lar_s, WG: gl.constexpr, ROW_SCALAR: gl.constexpr,
                  HAS_BIAS: gl.constexpr, RB: gl.constexpr, R_CHUNKS: gl.constexpr, GELU: gl.constexpr,
                  OUT_FP8: gl.constexpr, R2B: gl.constexpr, R2_CHUNKS: gl.constexpr, PREFETCH: gl.constexpr,
                  NT: gl.constexpr):
        """t: this program's tile count (the phase of the prefetched epilogue operands). NT > 1: the
        next linear's low-rank partial sum is added into u2acc (returned) instead of into U2. ur_s, lar_s:
        this warpgroup's rows of U and A's tile in a stage of the ring (_u_ring), else unused."""
        (a_desc, b_desc, c_desc, la_desc, u_desc, b2_desc, u2_desc, SX, SW, U, LA, BIAS, LB2, U2, SH, M, N, K, R, R2,
         GROUP_M, a_bufs, b_bufs, c_bufs, la_bufs, b2_bufs, la_s, u_s, b2_s, r_bufs, ready, empty, epi_ready,
         epi_empty) = p
        HM: gl.constexpr = _HM
        mma16: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, _BN, 16])
        acc = gl.convert_layout(acc, mma16)
        rows = om + WG * HM + gl.arange(0, HM, layout=gl.SliceLayout(1, mma16))
        cols = on + gl.arange(0, _BN, layout=gl.SliceLayout(0, mma16))
        rmask = rows < M
        cmask = cols < N
        if ROW_SCALAR:
            acc = acc * gl.load(SX)
        else:
            acc = acc * gl.expand_dims(gl.load(SX + rows, mask=rmask, other=0.0), 1)
        acc = acc * gl.expand_dims(gl.load(SW + cols, mask=cmask, other=0.0), 0)
        if PREFETCH:  # the loader warp brought U, A and B2's tiles for this tile into shared memory
            mbarrier.wait(epi_ready, t & 1)
        U_RING: gl.constexpr = _u_ring(c_bufs.type.shape[0], u_desc.block_type.shape[0])
        if U_RING and R_CHUNKS > 0:  # (the caller waited for the stage)
            acc = warpgroup_mma(ur_s, lar_s.permute((1, 0)), acc)
        if PREFETCH and R_CHUNKS > 0 and not U_RING:
            blk_u: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [4, 1], [1, 0])
            u_op1: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma16, k_width=2)
            if u_desc.block_type.shape[0] == _HM * c_bufs.type.shape[0]:  # U's tile was prefetched
                u = u_s.slice(WG * HM, HM).load(blk_u)
                acc = warpgroup_mma(gl.convert_layout(u.to(gl.bfloat16), u_op1), la_s.permute((1, 0)), acc)
            else:
                # U's rows from global memory, in the MMA operand's own layout (a conversion would take
                # shared memory), 16 ranks at a time (a whole 64 x 64 operand's 64-bit addresses spill)
                ur = om + WG * HM + gl.arange(0, HM, layout=gl.SliceLayout(1, u_op1))
                urow = U + gl.expand_dims(ur, 1) * R
                rmu = gl.expand_dims(ur < M, 1)
                for kc in gl.static_range(RB // 16):
                    uc = kc * 16 + gl.arange(0, 16, layout=gl.SliceLayout(0, u_op1))
                    u = gl.load(urow + gl.expand_dims(uc, 0), mask=rmu & gl.expand_dims(uc < R, 0), other=0.0)
                    acc = warpgroup_mma(u.to(gl.bfloat16), la_s.slice(kc * 16, 16, dim=1).permute((1, 0)), acc)
        if (not PREFETCH) and R_CHUNKS > 0:  # low-rank up-projection into the same accumulator: acc += U[rows] A[cols]^T
            blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
            u_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma16, k_width=2)
            br = om + WG * HM + gl.arange(0, HM, layout=gl.SliceLayout(1, blk))
            bc = on + gl.arange(0, _BN, layout=gl.SliceLayout(1, blk))
            la_s = la_bufs.index(WG)
            for j in gl.static_range(R_CHUNKS):
                rr = j * RB + gl.arange(0, RB, layout=gl.SliceLayout(0, blk))
                u = gl.load(U + gl.expand_dims(br, 1) * R + gl.expand_dims(rr, 0),
                            mask=gl.expand_dims(br < M, 1) & gl.expand_dims(rr < R, 0), other=0.0)
                la = gl.load(LA + gl.expand_dims(bc, 1) * R + gl.expand_dims(rr, 0),
                             mask=gl.expand_dims(bc < N, 1) & gl.expand_dims(rr < R, 0), other=0.0)
                la_s.store(la.to(gl.bfloat16))
                fence_async_shared()
                acc = warpgroup_mma(gl.convert_layout(u.to(gl.bfloat16), u_op), la_s.permute((1, 0)), acc)
        if HAS_BIAS:
            acc = acc + gl.expand_dims(gl.load(BIAS + cols, mask=cmask, other=0.0).to(gl.float32), 0)
        if GELU:
            acc = _gelu_tanh(acc)
        SHARE_C: gl.constexpr = _shares_c(u2_desc.dtype, OUT_FP8)
        if SHARE_C:
            c_s = _as(r_bufs.index(WG), c_desc)
        else:
            c_s = c_bufs.index(WG)
        tma.store_wait(pendings=0)  # this warpgroup's previous store (and reduce) has left c_s
        if OUT_FP8:
            c_s.store(gl.minimum(gl.maximum(acc * (1.0 / gl.load(SH)), -448.0), 448.0).to(gl.float8e4nv))
        else:
            c_s.store(acc.to(c_desc.dtype))
        fence_async_shared()
        _tma_store(c_desc, [om + WG * HM, on], c_s)
        if R2_CHUNKS > 0:  # the next linear's low-rank input from the unquantized output: u2 += h B2[:, cols]^T
            mma2: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, R2B, 16])
            h_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma2, k_width=2)
            blk2: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
            h = gl.convert_layout(acc.to(gl.bfloat16), h_op)
        if PREFETCH and R2_CHUNKS > 0 and NT > 1:
            u2acc = warpgroup_mma(h, b2_s.permute((1, 0)), u2acc)
        if PREFETCH and R2_CHUNKS > 0 and NT == 1:
            part = warpgroup_mma(h, b2_s.permute((1, 0)), gl.zeros([HM, R2B], gl.float32, mma2))
            _add_u2(part, om, U2, M, R2, WG, R2B, u2_desc, r_bufs, OUT_FP8)
        if (not PREFETCH) and R2_CHUNKS > 0:
            b2_stage = b2_bufs.index(WG)
            bcol = on + gl.arange(0, _BN, layout=gl.SliceLayout(0, blk2))
            for j in gl.static_range(R2_CHUNKS):
                rr = j * R2B + gl.arange(0, R2B, layout=gl.SliceLayout(1, blk2))
                b2 = gl.load(LB2 + gl.expand_dims(rr, 1) * N + gl.expand_dims(bcol, 0),
                             mask=gl.expand_dims(rr < R2, 1) & gl.expand_dims(bcol < N, 0), other=0.0)
                b2_stage.store(b2)
                fence_async_shared()
                part = warpgroup_mma(h, b2_stage.permute((1, 0)), gl.zeros([HM, R2B], gl.float32, mma2))
                _atomic_u2(part, om, j * R2B, U2, M, R2, WG, R2B)
        return u2acc

    @gluon.jit
    def _add_u2(part, om, U2, M, R2, WG: gl.constexpr, R2B: gl.constexpr, u2_desc, r_bufs, OUT_FP8: gl.constexpr):
        """U2[this warpgroup's rows of the tile, :R2B] += part: by TMA reduce from shared memory where launch()
        gave U2's descriptor (a TMA add of the staged tile where fp32 atomics of 64 partial sums per row cost L2
        throughput: the video FFN 1546 -> 1512 us at 6144 tokens, bench/ws_parts_h200.log), else by atomics."""
        if u2_desc.dtype == gl.float32:
            if _shares_c(u2_desc.dtype, OUT_FP8):
                tma.store_wait(pendings=0)  # the output tile's store has left the shared staging
            r_s = r_bufs.index(WG)  # (else its previous reduce was waited for before the output tile's store)
            r_s.store(part)
            fence_async_shared()
            _tma_add(u2_desc, [om + WG * _HM, 0], r_s)
        else:
            _atomic_u2(part, om, 0, U2, M, R2, WG, R2B)

    @gluon.jit
    def _atomic_u2(part, om, c0, U2, M, R2, WG: gl.constexpr, R2B: gl.constexpr):
        """U2[this warpgroup's rows of the tile, c0:c0 + R2B] += part (fp32 atomics)."""
        HM: gl.constexpr = _HM
        mma2: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, R2B, 16])
        r2rows = om + WG * HM + gl.arange(0, HM, layout=gl.SliceLayout(1, mma2))
        rc = c0 + gl.arange(0, R2B, layout=gl.SliceLayout(0, mma2))
        gl.atomic_add(U2 + gl.expand_dims(r2rows, 1) * R2 + gl.expand_dims(rc, 0), part,
                      mask=gl.expand_dims(r2rows < M, 1) & gl.expand_dims(rc < R2, 0), sem="relaxed")

    @gluon.jit
    def _math(p, WG: gl.constexpr, ROW_SCALAR: gl.constexpr, HAS_BIAS: gl.constexpr, RB: gl.constexpr,
              R_CHUNKS: gl.constexpr, GELU: gl.constexpr, OUT_FP8: gl.constexpr, R2B: gl.constexpr,
              R2_CHUNKS: gl.constexpr, PROMOTE: gl.constexpr, PREFETCH: gl.constexpr, NT: gl.constexpr):
        """One math warpgroup: rows WG*64..+64 of every tile. The tensor cores sum PROMOTE K tiles into
        `part` (reduced precision), then it is added to the fp32 accumulator; waiting for its own MMAs
        stalls only this warpgroup. A work item is NT tiles side by side along N; with NT > 1 the next
        linear's low-rank partial sums of its tiles are added up in registers and reach U2 once per item."""
        (a_desc, b_desc, c_desc, la_desc, u_desc, b2_desc, u2_desc, SX, SW, U, LA, BIAS, LB2, U2, SH, M, N, K, R, R2,
         GROUP_M, a_bufs, b_bufs, c_bufs, la_bufs, b2_bufs, la_s, u_s, b2_s, r_bufs, ready, empty, epi_ready,
         epi_empty) = p
        TM: gl.constexpr = _HM * c_bufs.type.shape[0]  # rows of a tile: 64 per math warpgroup
        ASPLIT: gl.constexpr = a_desc.block_type.shape[0] == _HM  # each warpgroup's rows in their own buffer
        HM: gl.constexpr = _HM
        NS: gl.constexpr = b_bufs.type.shape[0]
        NWG: gl.constexpr = c_bufs.type.shape[0]
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, _BN, 32])
        mma2: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, R2B, 16])
        U_RING: gl.constexpr = _u_ring(NWG, u_desc.block_type.shape[0])
        k_tiles = gl.cdiv(K, _BK)
        num_items = gl.cdiv(M, TM) * gl.cdiv(N, _BN * NT)
        g = 0
        t = 0
        for item in range(gl.program_id(0), num_items, gl.num_programs(0)):
            om, on0 = _tile(item, M, N, GROUP_M, _BN * NT, TM)
            if NT > 1:
                u2acc = gl.zeros([HM, R2B], gl.float32, mma2)
            else:
                u2acc = 0.0  # unused
            for j in gl.static_range(NT):
                on = on0 + j * _BN
                if NT == 1 or on < N:  # (NT == 1: no test, the tile exists)
                    acc = gl.zeros([HM, _BN], gl.float32, mma)
                    part = gl.zeros([HM, _BN], gl.float32, mma)
                    for kk in range(k_tiles):
                        s = g % NS
                        mbarrier.wait(ready.index(s), (g // NS) & 1)
                        if ASPLIT:
                            a_t = a_bufs.index(s * NWG + WG)
                        else:
                            a_t = a_bufs.index(s).slice(WG * HM, HM)
                        part = warpgroup_mma(a_t, b_bufs.index(s).permute((1, 0)),
                                             part, use_acc=(kk % PROMOTE) != 0, is_async=True)
                        # Each MMA is waited for at once: keeping one in flight until the next was issued
                        # was 10-20% slower (bench/ws_check_h200.log); the other warpgroup fills the gap.
                        part = warpgroup_mma_wait(num_outstanding=0, deps=(part, ))
                        mbarrier.arrive(empty.index(s), count=1)
                        if (kk % PROMOTE == PROMOTE - 1) | (kk == k_tiles - 1):  # end of a promotion interval
                            acc += part
                        g += 1
                    if U_RING and R_CHUNKS > 0:  # U's rows and A's tile: the ring's next stage
                        s = g % NS
                        mbarrier.wait(ready.index(s), (g // NS) & 1)
                        ur_s = _as(a_bufs.index(s * NWG + WG), u_desc)
                        lar_s = _as(b_bufs.index(s), la_desc)
                    else:
                        ur_s = u_s
                        lar_s = la_s
                    u2acc = _epilogue(acc, om, on, t, p, u2acc, ur_s, lar_s, WG, ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS,
                                      GELU, OUT_FP8, R2B, R2_CHUNKS, PREFETCH, NT)
                    if U_RING and R_CHUNKS > 0:  # (the low-rank MMA was waited for)
                        mbarrier.arrive(empty.index(s), count=1)
                        g += 1
                    if PREFETCH:
                        mbarrier.arrive(epi_empty, count=1)
                    t += 1
            if NT > 1 and R2_CHUNKS > 0:
                _add_u2(u2acc, om, U2, M, R2, WG, R2B, u2_desc, r_bufs, OUT_FP8)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _math1(p, ROW_SCALAR: gl.constexpr, HAS_BIAS: gl.constexpr, RB: gl.constexpr, R_CHUNKS: gl.constexpr,
               GELU: gl.constexpr, OUT_FP8: gl.constexpr, R2B: gl.constexpr, R2_CHUNKS: gl.constexpr,
               PROMOTE: gl.constexpr, PREFETCH: gl.constexpr, NT: gl.constexpr):
        _math(p, 1, ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, R2B, R2_CHUNKS, PROMOTE, PREFETCH, NT)

    @gluon.jit
    def _math2(p, ROW_SCALAR: gl.constexpr, HAS_BIAS: gl.constexpr, RB: gl.constexpr, R_CHUNKS: gl.constexpr,
               GELU: gl.constexpr, OUT_FP8: gl.constexpr, R2B: gl.constexpr, R2_CHUNKS: gl.constexpr,
               PROMOTE: gl.constexpr, PREFETCH: gl.constexpr, NT: gl.constexpr):
        _math(p, 2, ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, R2B, R2_CHUNKS, PROMOTE, PREFETCH, NT)

    @gluon.jit
    def _loader(p, ROW_SCALAR: gl.constexpr, HAS_BIAS: gl.constexpr, RB: gl.constexpr, R_CHUNKS: gl.constexpr,
                GELU: gl.constexpr, OUT_FP8: gl.constexpr, R2B: gl.constexpr, R2_CHUNKS: gl.constexpr,
                PROMOTE: gl.constexpr, PREFETCH: gl.constexpr, NT: gl.constexpr):
        """One warp: TMA loads of the activation [TM, _BK] and weight [_BN, _BK] tiles into the stage ring,
        each stage freed when both math warpgroups have finished their MMAs on it. With PREFETCH, after a
        tile's last K tile also the epilogue's operands (U's rows, A's and B2's columns of the tile), so
        they arrive while the math warpgroups finish the tile instead of being fetched by the epilogue."""
        (a_desc, b_desc, c_desc, la_desc, u_desc, b2_desc, u2_desc, SX, SW, U, LA, BIAS, LB2, U2, SH, M, N, K, R, R2,
         GROUP_M, a_bufs, b_bufs, c_bufs, la_bufs, b2_bufs, la_s, u_s, b2_s, r_bufs, ready, empty, epi_ready,
         epi_empty) = p
        NWG: gl.constexpr = c_bufs.type.shape[0]
        TM: gl.constexpr = _HM * NWG
        NA: gl.constexpr = TM // a_desc.block_type.shape[0]  # TMA loads of A per stage
        NS: gl.constexpr = b_bufs.type.shape[0]
        nbytes: gl.constexpr = NA * a_desc.block_type.nbytes + b_desc.block_type.nbytes
        k_tiles = gl.cdiv(K, _BK)
        num_items = gl.cdiv(M, TM) * gl.cdiv(N, _BN * NT)
        U_TILE: gl.constexpr = u_desc.block_type.shape[0] == TM  # U's tile prefetched (else read by the epilogue)
        U_RING: gl.constexpr = _u_ring(NWG, u_desc.block_type.shape[0])
        ring_bytes: gl.constexpr = NWG * u_desc.block_type.nbytes + la_desc.block_type.nbytes
        epi_bytes: gl.constexpr = ((la_desc.block_type.nbytes if R_CHUNKS > 0 and not U_RING else 0)
                                   + (u_desc.block_type.nbytes if R_CHUNKS > 0 and U_TILE else 0)
                                   + (b2_desc.block_type.nbytes if R2_CHUNKS > 0 else 0))
        g = 0
        t = 0
        for item in range(gl.program_id(0), num_items, gl.num_programs(0)):
            om, on0 = _tile(item, M, N, GROUP_M, _BN * NT, TM)
            for j in gl.static_range(NT):
                on = on0 + j * _BN
                if NT == 1 or on < N:  # (NT == 1: no test, the tile exists)
                    for kk in range(k_tiles):
                        s = g % NS
                        mbarrier.wait(empty.index(s), ((g // NS) & 1) ^ 1)  # a new barrier counts as freed once
                        mbarrier.expect(ready.index(s), nbytes)
                        for w in gl.static_range(NA):
                            _tma_load(a_desc, [om + w * _HM, kk * _BK], ready.index(s), a_bufs.index(s * NA + w))
                        _tma_load(b_desc, [on, kk * _BK], ready.index(s), b_bufs.index(s))
                        g += 1
                    if U_RING and R_CHUNKS > 0:
                        s = g % NS
                        mbarrier.wait(empty.index(s), ((g // NS) & 1) ^ 1)
                        mbarrier.expect(ready.index(s), ring_bytes)
                        for w in gl.static_range(NWG):
                            _tma_load(u_desc, [om + w * _HM, 0], ready.index(s),
                                      _as(a_bufs.index(s * NA + w), u_desc))
                        _tma_load(la_desc, [on, 0], ready.index(s),
                                  _as(b_bufs.index(s), la_desc))
                        g += 1
                    if PREFETCH:
                        mbarrier.wait(epi_empty, (t & 1) ^ 1)  # both epilogues of the previous tile are done
                        mbarrier.expect(epi_ready, epi_bytes)
                        if R_CHUNKS > 0 and not U_RING:
                            _tma_load(la_desc, [on, 0], epi_ready, la_s)
                            if U_TILE:
                                _tma_load(u_desc, [om, 0], epi_ready, u_s)
                        if R2_CHUNKS > 0:
                            _tma_load(b2_desc, [0, on], epi_ready, b2_s)
                    t += 1

    @gluon.jit
    def _ws_gemm_kernel(a_desc, b_desc, c_desc, la_desc, u_desc, b2_desc, u2_desc, SX, SW, U, LA, BIAS, LB2, U2, SH,
                        M, N, K, R, R2, GROUP_M: gl.constexpr, NSTAGES: gl.constexpr, PROMOTE: gl.constexpr,
                        PREFETCH: gl.constexpr, NT: gl.constexpr, NWG: gl.constexpr,
                        ROW_SCALAR: gl.constexpr, HAS_BIAS: gl.constexpr, RB: gl.constexpr, R_CHUNKS: gl.constexpr,
                        GELU: gl.constexpr, OUT_FP8: gl.constexpr, R2B: gl.constexpr, R2_CHUNKS: gl.constexpr,
                        num_warps: gl.constexpr):
        # A: one [128, BK] tile per stage (2 math warpgroups), or one [64, BK] tile per warpgroup and stage
        # (3: Gluon's shapes are powers of two)
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [NSTAGES * (_HM * NWG // a_desc.block_type.shape[0])]
                                           + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [NSTAGES] + b_desc.block_type.shape, b_desc.layout)
        # each math warpgroup's staging of its partial sum of the next linear's low-rank input for the TMA reduce
        # (a 16 x 16 placeholder descriptor when the sum goes by atomics)
        r_bufs = gl.allocate_shared_memory(u2_desc.dtype, [NWG] + u2_desc.block_type.shape, u2_desc.layout)
        if _shares_c(u2_desc.dtype, OUT_FP8):  # the output tiles live in r_bufs (_shares_c): a view to carry types
            c_bufs = _view(r_bufs, c_desc.dtype, [NWG] + c_desc.block_type.shape, c_desc.layout)
        else:
            c_bufs = gl.allocate_shared_memory(c_desc.dtype, [NWG] + c_desc.block_type.shape, c_desc.layout)
        la_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=_swizzle((16 if PREFETCH else RB) * 2),
                                                       element_bitwidth=16,
                                                       rank=2)
        LBR: gl.constexpr = 16 if PREFETCH else RB  # staging for the unprefetched path only
        LBN: gl.constexpr = 16 if PREFETCH else _BN
        if PREFETCH:  # (unused: views to carry types)
            la_bufs = _view(r_bufs, gl.bfloat16, [NWG, LBN, LBR], la_layout)
        else:
            la_bufs = gl.allocate_shared_memory(gl.bfloat16, [NWG, LBN, LBR], la_layout)
        b2_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=_swizzle(LBN * 2), element_bitwidth=16,
                                                       rank=2)
        LB2R: gl.constexpr = 16 if PREFETCH else R2B
        if PREFETCH:
            b2_bufs = _view(r_bufs, gl.bfloat16, [NWG, LB2R, LBN], b2_layout)
        else:
            b2_bufs = gl.allocate_shared_memory(gl.bfloat16, [NWG, LB2R, LBN], b2_layout)
        # prefetched epilogue operands (placeholder 16 x 16 descriptors when unused)
        if _u_ring(NWG, u_desc.block_type.shape[0]):  # A's tile comes through the ring
            la_s = gl.allocate_shared_memory(gl.bfloat16, [16, 16], gl.NVMMASharedLayout(swizzle_byte_width=32,
                                                                                         element_bitwidth=16, rank=2))
        else:
            la_s = gl.allocate_shared_memory(la_desc.dtype, la_desc.block_type.shape, la_desc.layout)
        u_s = gl.allocate_shared_memory(u_desc.dtype, u_desc.block_type.shape, u_desc.layout)
        b2_s = gl.allocate_shared_memory(b2_desc.dtype, b2_desc.block_type.shape, b2_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NSTAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NSTAGES, 1], mbarrier.MBarrierLayout())
        epi_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        epi_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for j in gl.static_range(NSTAGES):
            mbarrier.init(ready.index(j), count=1)
            mbarrier.init(empty.index(j), count=NWG)  # every math warpgroup releases a stage
        mbarrier.init(epi_ready, count=1)
        mbarrier.init(epi_empty, count=NWG)
        p = (a_desc, b_desc, c_desc, la_desc, u_desc, b2_desc, u2_desc, SX, SW, U, LA, BIAS, LB2, U2, SH, M, N, K, R,
             R2, GROUP_M, a_bufs, b_bufs, c_bufs, la_bufs, b2_bufs, la_s, u_s, b2_s, r_bufs, ready, empty, epi_ready,
             epi_empty)
        # (the flags are spelled out: a tuple built by concatenation reaches the partitions as tensors)
        if NWG == 3:
            gl.warp_specialize([
                (_math, (p, 0, ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, R2B, R2_CHUNKS, PROMOTE, PREFETCH,
                         NT)),
                (_math1, (p, ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, R2B, R2_CHUNKS, PROMOTE, PREFETCH, NT)),
                (_math2, (p, ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, R2B, R2_CHUNKS, PROMOTE, PREFETCH, NT)),
                (_loader, (p, ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, R2B, R2_CHUNKS, PROMOTE, PREFETCH,
                           NT)),
            ], [4, 4, 1], [_MATH3_REGS, _MATH3_REGS, 40])
        else:
            gl.warp_specialize([
                (_math, (p, 0, ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, R2B, R2_CHUNKS, PROMOTE, PREFETCH,
                         NT)),
                (_math1, (p, ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, R2B, R2_CHUNKS, PROMOTE, PREFETCH, NT)),
                (_loader, (p, ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, R2B, R2_CHUNKS, PROMOTE, PREFETCH,
                           NT)),
            ], [4, 1], [232, 40])


@functools.lru_cache(maxsize=None)
def _layout(shape: tuple, dtype: torch.dtype):
    gdt = {torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16,
           torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for(list(shape), gdt)


def _desc(t: torch.Tensor, block: tuple):
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block), _layout(block, t.dtype))


SMEM = 232448 - 256  # bytes per CTA on sm_90, less the mbarriers


def _stages(out_bytes: int, rb: int, r2b: int, u_bytes: int, prefetch: bool, wgs: int = 2, ring: bool = False,
            u2_tma: bool = False) -> int:
    """Stages of the K ring that fit beside the output tiles and the epilogue's operand buffers
    (the kernel's allocations, as _ws_gemm_kernel makes them), with wgs math warpgroups (64 rows each;
    with 3 the U tile is not prefetched). ring: U's rows and A's tile come through the ring (_u_ring).
    u2_tma: each warpgroup stages its fp32 partial sum of the next low-rank input for a TMA reduce."""
    bm, ph = HM * wgs, 16 * 16 * 2  # tile rows; a placeholder buffer
    fixed = bm * r2b * 4 if u2_tma else wgs * ph  # the TMA reduce's staging
    fixed += 0 if u2_tma and out_bytes == 1 else bm * BN * out_bytes  # the output tiles (FP8: in that staging)
    if prefetch:  # (the unused staging buffers are views)
        fixed += BN * rb * 2 if rb and not ring else ph  # A's tile
        fixed += bm * rb * u_bytes if rb and wgs == 2 else ph  # U's tile
        fixed += r2b * BN * 2 if r2b else ph
    else:
        fixed += wgs * BN * max(rb, 16) * 2 + wgs * max(r2b, 16) * BN * 2 + ph * 3
    stage = (bm + BN) * BK
    return max(2, min(STAGES if not (rb or r2b) else STAGES_LOWRANK, (SMEM - fixed) // stage))


@functools.lru_cache(maxsize=None)
def _placeholder(device: torch.device) -> torch.Tensor:
    """The 16 x 16 tensor whose descriptor stands in for epilogue operands a launch does not use."""
    return G.persistent(torch.zeros(16, 16, device=device, dtype=torch.bfloat16))


PH_BLOCK = (16, 16)


def tiles_per_item(M: int, N: int, sms: int) -> int:
    """Tiles per work item where the epilogue sums the next linear's low-rank input (FFN up-projection):
    PAIR_TILES side by side along N (when set above its default 1) add their sums once (the sum of both stays
    in registers), unless the larger items add more than 1% at the end (M=6144, 4096->16384: 47 waves of
    tiles, 48 of tile pairs; M=24576: 187 and 188). With fp32 atomics pairs paid (H200, bench/ws_check_h200.log:
    the FFN 1.51x -> 1.61x bf16 at M=24576); with the TMA reduce they do not (PAIR_TILES' comment)."""
    if PAIR_TILES <= 1:
        return 1
    bm = 2 * HM  # (2 math warpgroups: the only ones that take pairs)
    tiles = G.cdiv(M, bm) * G.cdiv(N, BN)
    items = G.cdiv(M, bm) * G.cdiv(N, BN * PAIR_TILES)
    return PAIR_TILES if PAIR_TILES * G.cdiv(items, sms) <= 1.01 * G.cdiv(tiles, sms) else 1


def _knobs() -> tuple:
    """The module settings a launch plan depends on (benches change them between calls)."""
    return (MATH_WGS, HEAVY_MIN_K, WAVE_SLACK, PREFETCH, U_RING, PAIR_TILES, U2_TMA, STAGES, STAGES_LOWRANK)


@functools.lru_cache(maxsize=4096)
def _plan(M: int, N: int, K: int, R: int, R2: int, flags: tuple, u_dtype: torch.dtype, out_dtype: torch.dtype,
          promote_k: int, sms: int, knobs: tuple):
    """What a launch of this shape decides, computed once per shape (planning cost ~25 us of host time per
    call at M = 6144 on the H200's host, bench/host_many_h200.log): (grid, constexprs, block shapes of the
    activation, A, U and B2 descriptors, or None where a placeholder goes)."""
    f = dict(zip(FLAG_NAMES, flags))
    rc, r2c = f["R_CHUNKS"], f["R2_CHUNKS"]
    u_bytes, out_bytes = u_dtype.itemsize, out_dtype.itemsize
    prefetch = bool(PREFETCH and rc <= 1 and r2c <= 1 and (rc or r2c) and u_dtype in (torch.float32, torch.bfloat16)
                    and (not rc or (R * 2 % 16 == 0 and R * u_bytes % 16 == 0)))
    # (ranks above 64, a LoRA appended, stage their operands per warpgroup in shared memory: with 3 the ring
    # got 2 stages and the video FFN at r = 256 went 1.12x -> 0.90x bf16)
    two = (((f["GELU"] or r2c) and K < HEAVY_MIN_K) or ((rc or r2c) and not prefetch)
           or not _three_fit(M, N, sms))
    wgs = 2 if two else MATH_WGS
    bm = HM * wgs
    # 3 warpgroups: bf16 U's rows (rank 33-64) come through the ring (_u_ring), else the epilogue reads them
    ring = bool(prefetch and rc and wgs == 3 and f["RB"] == 64 and u_dtype == torch.bfloat16 and U_RING)
    la_blk = (BN, f["RB"]) if prefetch and rc else None
    u_blk = (bm if wgs == 2 else HM, f["RB"]) if prefetch and rc and (wgs == 2 or ring) else None
    b2_blk = (f["R2B"], BN) if prefetch and r2c else None
    # (tile pairs keep 32 more registers per thread: with 3 math warpgroups' 160 the epilogue spills)
    nt = tiles_per_item(M, N, sms) if (prefetch and r2c == 1 and wgs == 2) else 1
    # the next low-rank input's partial sums by TMA reduce (its rows' stride 16-byte aligned, as TMA needs)
    u2_blk = (HM, f["R2B"]) if U2_TMA and prefetch and r2c == 1 and R2 * 4 % 16 == 0 else None
    stages = _stages(out_bytes, f["RB"] if rc else 0, f["R2B"] if r2c else 0, u_bytes, prefetch, wgs, ring,
                     u2_blk is not None)
    grid = (min(G.cdiv(M, bm) * G.cdiv(N, BN * nt), sms),)
    consts = dict(GROUP_M=8, NSTAGES=stages, PROMOTE=max(1, promote_k // BK) if promote_k else 1 << 20,  # 0: never
                  PREFETCH=prefetch, NT=nt, NWG=wgs, **f)
    # A as one TMA box per tile (2 warpgroups) or per warpgroup (3: Gluon's shapes are powers of two)
    return grid, consts, (bm if wgs == 2 else HM, BK), la_blk, u_blk, b2_blk, u2_blk


FLAG_NAMES = ("ROW_SCALAR", "HAS_BIAS", "RB", "R_CHUNKS", "GELU", "OUT_FP8", "R2B", "R2_CHUNKS")  # (not INTERP: never here)


def launch(xq, q, out, sx, q_scale, ptrs, sizes, flags, promote_k: int) -> None:
    """The GEMM of fp8_ffn.scaled_gemm with this kernel: ptrs (U, LA, BIAS, LB2, U2, SH), sizes
    (M, N, K, R, R2) and flags (ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, R2B, R2_CHUNKS)
    as fp8_ffn._gemm_operands makes them. promote_k: promotion interval in K (a multiple of 128).
    Low ranks up to 64 (one chunk) have their epilogue operands prefetched by TMA (their rows must be
    16-byte aligned); larger ones (a LoRA appended) are loaded by the epilogue."""
    M, N, K, R, R2 = sizes
    U, LA, _, LB2, U2, _ = ptrs
    dev = xq.device
    args = (M, N, K, R, R2, tuple(flags.get(k, False) for k in FLAG_NAMES), U.dtype, out.dtype, promote_k,
            G.num_sms(dev.index or 0), _knobs())
    grid, consts, a_blk, la_blk, u_blk, b2_blk, u2_blk = _plan(*args)
    ph = _placeholder(dev)
    # the seven descriptors' tensors and blocks (a placeholder where the launch has no such operand)
    tensors = (xq, q, out, LA if la_blk else ph, U if u_blk else ph, LB2 if b2_blk else ph, U2 if u2_blk else ph)
    blocks = (a_blk, (BN, BK), (HM, BN), la_blk or PH_BLOCK, u_blk or PH_BLOCK, b2_blk or PH_BLOCK, u2_blk or PH_BLOCK)
    # the compiled kernel is found by the plan's inputs (they fix its constexprs and the descriptors' blocks)
    # and the descriptors' dtypes
    _launch(grid, tensors, blocks, (sx, q_scale, *ptrs, *sizes), consts,
            (dev.index, xq.dtype, q.dtype, LA.dtype, LB2.dtype, args))


_LAUNCHES = G.LaunchCache() if gluon is not None else None


def _launch(grid, tensors, blocks, rest, consts, plan_key=None) -> None:
    """_ws_gemm_kernel[grid](...) the first time per specialization, then its compiled kernel called
    directly (as gemm.launch_kernel does for the Triton kernels: Triton's binder costs ~100 us of host
    time for these 32 arguments, the whole GEMM at M = 1400 being ~50 us of device time). tensors: those
    of the descriptors, with their blocks (made here only for Triton's own launch paths)."""
    key = None
    if G._FAST_OK:
        spec = G.spec_key(rest)
        if spec is not None:
            key = (plan_key, spec) if plan_key is not None else (
                rest[0].device.index, tuple((t.dtype, b) for t, b in zip(tensors, blocks)), *consts.values(), spec)
    e = _LAUNCHES.get(key)
    if e is not None:
        try:
            return e(grid, tensors + rest)
        except Exception as ex:  # noqa: BLE001  (a launch that raises has not run)
            G._disable_fast(ex)
    descs = tuple(_desc(t, b) for t, b in zip(tensors, blocks))
    three = consts["NWG"] == 3
    while True:
        try:
            compiled = _ws_gemm_kernel[grid](*descs, *rest, **consts, num_warps=4, maxnreg=MAXNREG3 if three else 168)
            break
        except OutOfResources:
            # _stages() counts the kernel's own buffers, not the compiler's scratch for layout conversions,
            # which varies with the specialization: one stage fewer (at the first launch only)
            if consts["NSTAGES"] <= 2:
                raise
            consts = dict(consts, NSTAGES=consts["NSTAGES"] - 1)
    _LAUNCHES.put(key, _ws_gemm_kernel, compiled, len(descs) + len(rest), dict(consts, num_warps=4), None, blocks,
                  _desc)
