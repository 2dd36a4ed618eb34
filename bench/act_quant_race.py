"""The input pass's low-rank sum u = x B^T at M=6144, K=4096, r=64 (act_quant_lowrank, two launches)
against an fp32 product, four calls each, by rows per program, warps, columns per program and the
software pipeline's stages of its first kernel (_act_stats_kernel): found a race at 64 rows with 2-3
stages (bench/act_quant_race_h200.log).

    python bench/act_quant_race.py
"""
import sys, os, functools
sys.path.insert(0, "bench")
import _package  # noqa
import torch
from liteffn.kernels import fp8_ffn as K, gemm as G
from liteffn.calibration.synthetic import random_fp8_layer
up = random_fp8_layer(16384, 4096, 64, seed=1, device="cuda")
x = (torch.randn(6144, 4096, device="cuda") * 2).bfloat16()
want = x.float() @ up["B"].float().T
orig = G.launch_kernel
STAGES = [3]
def patched(kernel, grid, args, consts, num_warps=4, num_stages=3, cache=G.LAUNCHES):
    if kernel is K._act_stats_kernel:
        num_stages = STAGES[0]
    return orig(kernel, grid, args, consts, num_warps=num_warps, num_stages=num_stages, cache=cache)
K.G.launch_kernel = patched
for bm, warps, split, st in [(64, 8, 512, 3), (64, 8, 512, 1), (64, 8, 512, 2), (64, 4, 512, 1), (32, 4, 512, 3), (32, 4, 512, 1), (64, 8, 1024, 1)]:
    STAGES[0] = st
    us_ = []
    for _ in range(4):
        xq, sx, u = K.act_quant_lowrank(x, up["B"], single=False, bm=bm, warps=warps, split=split)
        us_.append(u.clone())
    torch.cuda.synchronize()
    d = max(float((a - us_[0]).norm() / us_[0].norm()) for a in us_[1:])
    e = max(float((a - want).norm() / want.norm()) for a in us_)
    import triton.testing as tt
    t = tt.do_bench_cudagraph(lambda: K.act_quant_lowrank(x, up["B"], single=False, bm=bm, warps=warps, split=split), rep=20) * 1e3
    print(f"bm {bm} warps {warps} split {split} stages {st}: run-to-run {d:.1e}, vs fp32 x B^T {e:.1e}, {t:.1f} us", flush=True)
