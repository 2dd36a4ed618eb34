"""Where the W4A8 GEMM's time goes: one launch per configuration at the video up-projection
(4096->16384, M=6144, rank 64, MXFP4), and the FP8 path's GEMM, for Nsight Compute:

    ncu --clock-control none -k regex:'_w4a8_kernel|_scaled_gemm_kernel' --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy python bench/w4a8_ncu.py

--audio: the audio FFN's up-projection at M=126 as the fused FFN runs it (GELU, FP8 output, the
down-projection's low-rank input), W4A8 with its few-token configuration and FP8 with the one
given as JSON in --fp8 (what its tuner picked; add --section SourceCounters for stalls per
instruction, ncu --page source --print-source sass to read them).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401
from _common import act  # noqa: E402

from liteffn.calibration.synthetic import random_fp4_layer, random_fp8_layer  # noqa: E402
from liteffn.kernels import fp8_ffn as K  # noqa: E402
from liteffn.kernels import w4a8  # noqa: E402

# The tuner's usual winner, and a two-warpgroup tile.
CONFIGS = [dict(BN=64, BM=128, GROUP_M=8, PERSIST=False, EPI_SPLIT=False, PROMOTE=2, num_warps=4, num_stages=2),
           dict(BN=128, BM=128, GROUP_M=8, PERSIST=True, EPI_SPLIT=False, PROMOTE=2, num_warps=8, num_stages=3)]
FP8 = dict(BM=128, BN=256, BK=256, GROUP_M=8, EPI_SPLIT=True, PERSIST=True, FLATTEN=False, PROMOTE=1, num_warps=8,
           num_stages=2)

def audio(fp8_cfg: dict):
    n, k, m = 8192, 2048, 126
    t8 = random_fp8_layer(n, k, 64, seed=0, device="cuda")
    t4 = w4a8.prepare("mxfp4", random_fp4_layer("mxfp4", n, k, 64, seed=0, device="cuda"))
    xq, sx, u = K.act_quant_lowrank(act(m, k), t8["B"])
    hs = torch.tensor([0.25], device="cuda")
    b2 = (torch.randn(64, n, device="cuda") / n**0.5).bfloat16()
    u2 = torch.zeros(m, 64, device="cuda")
    w4a8.scaled_gemm(xq, sx, t4, u=u, A=t4["A"], bias=t4["bias"], gelu=True, h_scale=hs, next_B=b2, u_next=u2,
                     materialize=False)
    K.scaled_gemm(xq, sx, t8["q"], t8["q_scale"], u=u, A=t8["A"], bias=t8["bias"], gelu=True, h_scale=hs,
                  next_B=b2, u_next=u2, config=fp8_cfg)
    torch.cuda.synchronize()


if __name__ == "__main__":
    if "--audio" in sys.argv:
        import json
        audio(json.loads(sys.argv[sys.argv.index("--fp8") + 1]))
        sys.exit()
    n, k, m = 16384, 4096, 6144
    t8 = random_fp8_layer(n, k, 64, seed=0, device="cuda")
    t4 = w4a8.prepare("mxfp4", random_fp4_layer("mxfp4", n, k, 64, seed=0, device="cuda"))
    xq, sx, u = K.act_quant_lowrank(act(m, k), t8["B"])
    for cfg in CONFIGS:
        print(cfg, flush=True)
        w4a8.scaled_gemm(xq, sx, t4, u=u, A=t4["A"], bias=t4["bias"], config=cfg, materialize=False)
    K.scaled_gemm(xq, sx, t8["q"], t8["q_scale"], u=u, A=t8["A"], bias=t8["bias"], config=FP8)
    torch.cuda.synchronize()
