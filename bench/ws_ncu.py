"""The warp-specialized GEMM (kernels/fp8_ws.py) with 2 or 3 math warpgroups, one launch after the
compiling one, for Nsight Compute (video 4096->16384, M=6144: residual only, or the FFN up-projection's
epilogue):

    ncu --clock-control none -k regex:_ws_gemm_kernel --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats python bench/ws_ncu.py --wgs 3

(bench/ws_ncu_epi_h200.txt was made with this script's earlier --epi option, at commit 49b92fd.)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401

from liteffn.calibration.synthetic import random_fp8_layer  # noqa: E402
from liteffn.kernels import fp8_ffn as K  # noqa: E402
from liteffn.kernels import fp8_ws as W  # noqa: E402
from liteffn.kernels.gemm import gemm_operands  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wgs", type=int, default=3, choices=[2, 3], help="math warpgroups")
    ap.add_argument("--case", default="r0", choices=["r0", "up"])
    a = ap.parse_args()
    W.MATH_WGS = a.wgs
    W.HEAVY_MIN_K, W.WAVE_SLACK = 0, 1e9  # every epilogue and size on a.wgs warpgroups
    m, k, n = 6144, 4096, 16384
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(m, k, generator=g, device="cuda").bfloat16()
    t = random_fp8_layer(n, k, 64, seed=2, device="cuda")
    xq, sx, u = K.act_quant_lowrank(x, t["B"])
    kw = {}
    if a.case == "up":
        kw = dict(u=u, A=t["A"], bias=t["bias"], gelu=True, h_scale=torch.tensor([2.0**-4], device="cuda"),
                  next_B=random_fp8_layer(512, n, 64, seed=3, device="cuda")["B"],
                  u_next=torch.zeros(m, 64, device="cuda"))
    out, ptrs, sizes, flags = gemm_operands(xq, sx, n, kw.get("u"), kw.get("A"), kw.get("bias"),
                                            kw.get("gelu", False), kw.get("h_scale"), kw.get("next_B"),
                                            kw.get("u_next"), None, torch.bfloat16)
    for _ in range(2):
        W.launch(xq, t["q"], out, sx, t["q_scale"], ptrs, sizes[:5],
                 {k_: v for k_, v in flags.items() if k_ != "INTERP"}, 512)
    torch.cuda.synchronize()
    print("done", a.wgs, a.case)


if __name__ == "__main__":
    main()
