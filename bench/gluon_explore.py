"""Exploration (device only, not used by the pack): can a Gluon FP8 GEMM promote every K tile
and still run at cuBLAS speed?

Triton 3.6's pipeliner waits for all in-flight wgmmas (wgmma.wait_group 0) whenever a loop reads
an MMA accumulator, so a promotion stalls the tensor cores (bench/gemm_explore_h200_run1.log:
promotion every 512 costs 18%). Gluon lets the kernel say what to wait for: two partial
accumulators alternate over K tiles; while the MMA of tile k runs into one, the other (tile k-1,
waited with wgmma.wait_group 1) is added into the fp32 accumulator. Promotion every 128 (the
most precise interval) then costs FADDs that overlap the next MMA, as in DeepGEMM and CUTLASS.

    python bench/gluon_explore.py [--out DIR]

The warp-specialized variant measured in bench/gluon_explore_h200.log ("ws") became the pack's
kernel, kernels/fp8_ws.py (with the full epilogue; bench/ws_check.py measures it), so it is not
repeated here. Epilogue here is only scales + bias -> bf16 (the pack's kernels also fuse the low-rank branch,
GELU, FP8 output and the next low-rank input): this measures the main loop.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_init, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _origin(tile, num_pid_m, num_pid_n, BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr):
    """Grouped tile order (GROUP_M row tiles share the weights' column tiles in L2) -> (om, on)."""
    group = GROUP_M * num_pid_n
    first = (tile // group) * GROUP_M
    size = gl.minimum(num_pid_m - first, GROUP_M)
    return (first + (tile % group) % size) * BM, ((tile % group) // size) * BN


@gluon.jit
def _ring(a_desc, b_desc, c_desc, STAGES: gl.constexpr):
    """STAGES stages of A and B tiles with their barriers, and the output tile."""
    a_s = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_s = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    c_s = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(STAGES):
        mbarrier.init(bars.index(j), count=1)
    return a_s, b_s, c_s, bars


@gluon.jit
def _load(a_desc, b_desc, a_s, b_s, bars, s, om, on, k):
    """TMA loads of the K tile at k into stage s, completing on its barrier."""
    mbarrier.expect(bars.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [om, k], bars.index(s), a_s.index(s))
    tma.async_copy_global_to_shared(b_desc, [on, k], bars.index(s), b_s.index(s))


@gluon.jit
def _store(acc, om, on, SX, SW, BIAS, M, N, c_s, c_desc, mma: gl.constexpr):
    """acc * sx[row] * sw[col] + bias -> c_desc through c_s (after the previous tile's store left it)."""
    rows = om + gl.arange(0, c_desc.block_type.shape[0], layout=gl.SliceLayout(1, mma))
    cols = on + gl.arange(0, c_desc.block_type.shape[1], layout=gl.SliceLayout(0, mma))
    sx = gl.load(SX + rows, mask=rows < M, other=0.0)
    sw = gl.load(SW + cols, mask=cols < N, other=0.0)
    bias = gl.load(BIAS + cols, mask=cols < N, other=0.0).to(gl.float32)
    out = acc * gl.expand_dims(sx, 1) * gl.expand_dims(sw, 0) + gl.expand_dims(bias, 0)
    tma.store_wait(pendings=0)
    c_s.store(out.to(c_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(c_desc, [om, on], c_s)


@gluon.jit
def _fp8_gemm_dual(a_desc, b_desc, c_desc, SX, SW, BIAS, M, N, K,
                   STAGES: gl.constexpr, GROUP_M: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = c_desc.block_type.shape[0]
    BN: gl.constexpr = c_desc.block_type.shape[1]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BN, 32])
    a_s, b_s, c_s, bars = _ring(a_desc, b_desc, c_desc, STAGES)

    num_pid_m = gl.cdiv(M, BM)
    num_pid_n = gl.cdiv(N, BN)
    k_tiles = gl.cdiv(K, BK)  # even (K a multiple of 2 * BK), >= STAGES - 1
    num_tiles = num_pid_m * num_pid_n
    done = 0  # K tiles consumed by this program so far: stage = g % STAGES, phase = (g // STAGES) & 1
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        om, on = _origin(tile, num_pid_m, num_pid_n, BM, BN, GROUP_M)
        for i in gl.static_range(STAGES - 1):
            _load(a_desc, b_desc, a_s, b_s, bars, (done + i) % STAGES, om, on, i * BK)
        acc = gl.zeros([BM, BN], gl.float32, mma)
        pa = gl.zeros([BM, BN], gl.float32, mma)
        pb = warpgroup_mma_init(gl.zeros([BM, BN], gl.float32, mma))  # loop-carried as an in-flight result
        for kk in range(0, k_tiles, 2):
            # tile kk into pa; then tile kk-1 (pb) is complete: add it, and refill its stage
            g = done + kk
            s = g % STAGES
            mbarrier.wait(bars.index(s), (g // STAGES) & 1)
            pa = warpgroup_mma(a_s.index(s), b_s.index(s).permute((1, 0)), pa, use_acc=False, is_async=True)
            pb = warpgroup_mma_wait(num_outstanding=1, deps=(pb, ))
            acc += pb
            nk = kk + STAGES - 1
            if nk < k_tiles:
                sn = (g + STAGES - 1) % STAGES
                _load(a_desc, b_desc, a_s, b_s, bars, sn, om, on, nk * BK)
            # tile kk+1 into pb; then tile kk (pa) is complete
            g = g + 1
            s = g % STAGES
            mbarrier.wait(bars.index(s), (g // STAGES) & 1)
            pb = warpgroup_mma(a_s.index(s), b_s.index(s).permute((1, 0)), pb, use_acc=False, is_async=True)
            pa = warpgroup_mma_wait(num_outstanding=1, deps=(pa, ))
            acc += pa
            nk = nk + 1
            if nk < k_tiles:
                sn = (g + STAGES - 1) % STAGES
                _load(a_desc, b_desc, a_s, b_s, bars, sn, om, on, nk * BK)
        pb = warpgroup_mma_wait(num_outstanding=0, deps=(pb, ))
        acc += pb
        done += k_tiles
        _store(acc, om, on, SX, SW, BIAS, M, N, c_s, c_desc, mma)
    tma.store_wait(pendings=0)
    for j in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(j))


@gluon.jit
def _fp8_gemm_pair(a_desc, b_desc, c_desc, SX, SW, BIAS, M, N, K,
                   STAGES: gl.constexpr, GROUP_M: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = c_desc.block_type.shape[0]
    BN: gl.constexpr = c_desc.block_type.shape[1]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BN, 32])
    a_s, b_s, c_s, bars = _ring(a_desc, b_desc, c_desc, STAGES)

    num_pid_m = gl.cdiv(M, BM)
    num_pid_n = gl.cdiv(N, BN)
    k_tiles = gl.cdiv(K, BK)  # even (K a multiple of 2 * BK), >= STAGES - 1
    num_tiles = num_pid_m * num_pid_n
    done = 0  # K tiles consumed by this program so far: stage = g % STAGES, phase = (g // STAGES) & 1
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        om, on = _origin(tile, num_pid_m, num_pid_n, BM, BN, GROUP_M)
        for i in gl.static_range(STAGES - 1):
            _load(a_desc, b_desc, a_s, b_s, bars, (done + i) % STAGES, om, on, i * BK)
        acc = gl.zeros([BM, BN], gl.float32, mma)
        pa = gl.zeros([BM, BN], gl.float32, mma)
        pb = gl.zeros([BM, BN], gl.float32, mma)
        for kk in range(0, k_tiles, 2):
            # both tiles of the pair in flight; the first is added while the second runs
            g = done + kk
            s = g % STAGES
            mbarrier.wait(bars.index(s), (g // STAGES) & 1)
            pa = warpgroup_mma(a_s.index(s), b_s.index(s).permute((1, 0)), pa, use_acc=False, is_async=True)
            s1 = (g + 1) % STAGES
            mbarrier.wait(bars.index(s1), ((g + 1) // STAGES) & 1)
            pb = warpgroup_mma(a_s.index(s1), b_s.index(s1).permute((1, 0)), pb, use_acc=False, is_async=True)
            pa = warpgroup_mma_wait(num_outstanding=1, deps=(pa, ))
            acc += pa
            pb = warpgroup_mma_wait(num_outstanding=0, deps=(pb, ))
            acc += pb
            for j in gl.static_range(2):
                nk = kk + STAGES - 1 + j
                if nk < k_tiles:
                    sn = (g + STAGES - 1 + j) % STAGES
                    _load(a_desc, b_desc, a_s, b_s, bars, sn, om, on, nk * BK)
        done += k_tiles
        _store(acc, om, on, SX, SW, BIAS, M, N, c_s, c_desc, mma)
    tma.store_wait(pendings=0)
    for j in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(j))


@gluon.jit
def _fp8_gemm_single(a_desc, b_desc, c_desc, SX, SW, BIAS, M, N, K,
                     STAGES: gl.constexpr, GROUP_M: gl.constexpr, PROMOTE: gl.constexpr, num_warps: gl.constexpr):
    """Control: one chained accumulator, promoted (wait 0) every PROMOTE tiles; PROMOTE=0 never."""
    BM: gl.constexpr = c_desc.block_type.shape[0]
    BN: gl.constexpr = c_desc.block_type.shape[1]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BN, 32])
    a_s, b_s, c_s, bars = _ring(a_desc, b_desc, c_desc, STAGES)
    num_pid_m = gl.cdiv(M, BM)
    num_pid_n = gl.cdiv(N, BN)
    k_tiles = gl.cdiv(K, BK)
    num_tiles = num_pid_m * num_pid_n
    done = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        om, on = _origin(tile, num_pid_m, num_pid_n, BM, BN, GROUP_M)
        for i in gl.static_range(STAGES - 1):
            _load(a_desc, b_desc, a_s, b_s, bars, (done + i) % STAGES, om, on, i * BK)
        acc = gl.zeros([BM, BN], gl.float32, mma)
        part = gl.zeros([BM, BN], gl.float32, mma)
        for kk in range(k_tiles):
            g = done + kk
            s = g % STAGES
            mbarrier.wait(bars.index(s), (g // STAGES) & 1)
            part = warpgroup_mma(a_s.index(s), b_s.index(s).permute((1, 0)), part, is_async=True)
            part = warpgroup_mma_wait(num_outstanding=1, deps=(part, ))
            nk = kk + STAGES - 1
            if nk < k_tiles:
                sn = (g + STAGES - 1) % STAGES
                _load(a_desc, b_desc, a_s, b_s, bars, sn, om, on, nk * BK)
            if PROMOTE > 0:
                if kk % PROMOTE == PROMOTE - 1:
                    part = warpgroup_mma_wait(num_outstanding=0, deps=(part, ))
                    acc += part
                    part = gl.zeros([BM, BN], gl.float32, mma)
        part = warpgroup_mma_wait(num_outstanding=0, deps=(part, ))
        acc += part
        done += k_tiles
        _store(acc, om, on, SX, SW, BIAS, M, N, c_s, c_desc, mma)
    tma.store_wait(pendings=0)
    for j in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(j))



def descs(xq, q, out, bm, bn, bk, cm=None):
    cm = cm or bm
    la = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.float8e4nv)
    lb = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.float8e4nv)
    lc = gl.NVMMASharedLayout.get_default_for([cm, bn], gl.bfloat16)
    return (TensorDescriptor.from_tensor(xq, [bm, bk], la), TensorDescriptor.from_tensor(q, [bn, bk], lb),
            TensorDescriptor.from_tensor(out, [cm, bn], lc))


def gemm(xq, sx, q, qs, bias, kind="dual", bm=128, bn=128, bk=128, stages=4, warps=8, promote=1, out=None):
    M, K = xq.shape
    N = q.shape[0]
    out = torch.empty(M, N, device=xq.device, dtype=torch.bfloat16) if out is None else out
    a, b, c = descs(xq, q, out, bm, bn, bk)
    sms = torch.cuda.get_device_properties(xq.device).multi_processor_count
    grid = (min(sms, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
    if kind in ("dual", "pair"):
        (_fp8_gemm_dual if kind == "dual" else _fp8_gemm_pair)[grid](a, b, c, sx, qs, bias, M, N, K, STAGES=stages, GROUP_M=8, num_warps=warps)
    else:
        _fp8_gemm_single[grid](a, b, c, sx, qs, bias, M, N, K, STAGES=stages, GROUP_M=8, PROMOTE=promote,
                               num_warps=warps)
    return out


def main():
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _package  # noqa: F401
    from triton.testing import do_bench_cudagraph

    import torch.nn.functional as Fn
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    log = open(os.path.join(a.out, "gluon.log"), "a")

    def say(s):
        print(s, flush=True)
        log.write(s + "\n")
        log.flush()

    def us(fn):
        fn()
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn, rep=25, return_mode="median") * 1e3

    say(f"# {torch.cuda.get_device_name()} {time.strftime('%Y-%m-%d %H:%M')} triton {triton.__version__}")
    variants = {
        "dual 128x128x128 s4 (promote every 128)": dict(kind="dual", stages=4),
        "dual 128x128x128 s5": dict(kind="dual", stages=5),
        "dual 128x128x128 s3": dict(kind="dual", stages=3),
        "pair 128x128x128 s4": dict(kind="pair", stages=4),
        "pair 128x128x128 s6": dict(kind="pair", stages=6),
        "single 128x128x128 s4 promote 4 (every 512)": dict(kind="single", stages=4, promote=4),
        "single 128x128x128 s4 never (fast)": dict(kind="single", stages=4, promote=0),
        "single 128x256x128 s3 never (fast)": dict(kind="single", bn=256, stages=3, promote=0),
        "single 128x256x128 s4 never (fast)": dict(kind="single", bn=256, stages=4, promote=0),
    }
    only = os.environ.get("GLUON_ONLY")
    if only:
        variants = {k: v for k, v in variants.items() if any(o in k for o in only.split(","))}
    g = torch.Generator(device="cuda").manual_seed(0)
    for (k, n) in ((4096, 16384), (16384, 4096), (2048, 8192), (8192, 2048)):
        for m in ((6144, 24576) if k >= 4096 else (5600,)):
            xq = (torch.randn(m, k, generator=g, device="cuda") * 3).to(torch.float8_e4m3fn)
            sx = torch.rand(m, generator=g, device="cuda") + 0.5
            qs_ = [((torch.randn(n, k, generator=g, device="cuda") * 3).to(torch.float8_e4m3fn),
                    torch.rand(n, generator=g, device="cuda") / 100 + 1e-3,
                    torch.randn(n, generator=g, device="cuda").bfloat16()) for _ in range(3)]
            i = [0]

            def nxt():
                i[0] = (i[0] + 1) % 3
                return qs_[i[0]]
            xb = torch.randn(m, k, device="cuda").bfloat16()
            Wb = [torch.randn(n, k, device="cuda").bfloat16() for _ in range(3)]
            t_bf = us(lambda: Fn.linear(xb, Wb[i[0] % 3]))
            sxc = sx[:, None]
            t_cb = {fa: us(lambda fa=fa: (lambda t: torch._scaled_mm(xq, t[0].t(), scale_a=sxc, scale_b=t[1][None, :],
                                                                     bias=t[2], out_dtype=torch.bfloat16,
                                                                     use_fast_accum=fa))(nxt())) for fa in (True, False)}
            q0, s0, b0 = qs_[0]
            ref = ((xq.double() * sx.double()[:, None]) @ (q0.double() * s0.double()[:, None]).T + b0.double())
            say(f"\n{k}->{n} M={m}: bf16 {t_bf:.1f} us; cuBLAS fast {t_cb[True]:.1f} ({t_bf / t_cb[True]:.2f}x), "
                f"promoted {t_cb[False]:.1f} ({t_bf / t_cb[False]:.2f}x)")
            for name, v in variants.items():
                try:
                    out = gemm(xq, sx, q0, s0, b0, **v)
                    torch.cuda.synchronize()
                    err = float((out.double() - ref).norm() / ref.norm())
                    t = us(lambda v=v: (lambda t: gemm(xq, sx, t[0], t[1], t[2], **v))(nxt()))
                    say(f"  {name:44s} {t:8.1f} us {t_bf / t:5.2f}x bf16 {t_cb[False] / t:5.2f}x cuBLAS-promoted "
                        f"err {err:.1e}")
                except Exception as ex:  # noqa: BLE001
                    say(f"  {name:44s} failed: {type(ex).__name__}: {str(ex)[:300]}")
            del ref, xq, qs_, xb, Wb
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
