"""The input pass (act_quant_lowrank: per-token FP8 quantization + the low-rank down-projection) at
many tokens: rows x K columns per program swept, alone and inside the whole fused FFN (r=64, FP8), on
the device GPU. The split sets how many programs add into u and the row max with atomics (K / split
per row block); bf16 FFN time of the same run for the ratios.

    python bench/act_quant_sweep.py [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401
from _common import bf16_ffn, ffn_case, logger  # noqa: E402

from triton.testing import do_bench_cudagraph  # noqa: E402

from liteffn.kernels import fp8_ffn as K  # noqa: E402
from liteffn.kernels import fused  # noqa: E402

CONFIGS = [(64, 512), (64, 1024), (64, 2048), (64, 4096), (128, 1024), (128, 4096), (32, 512), (32, 2048)]


def us(fn):
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=25, return_mode="median") * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    say = logger(a.out, "act_quant_sweep.log")
    default = (K.MANY_ROWS_BM, K.MANY_ROWS_SPLIT)
    say(f"# {torch.cuda.get_device_name()} {time.strftime('%Y-%m-%d %H:%M')}, r=64; us (device time, CUDA graphs)")
    for dim, m in ((4096, 6144), (4096, 24576), (2048, 5600)):
        up, dn, hs, x, W1, W2 = ffn_case(dim, m)
        h = (torch.randn(m, 4 * dim, device="cuda")).bfloat16()
        t_bf = us(lambda: bf16_ffn(x, W1, up["bias"], W2, dn["bias"]))
        ref = fused.ffn(x, up, dn, hs)
        line = f"M={m} dim {dim}: bf16 FFN {t_bf:.1f}; act quant r0 x {us(lambda: K.act_quant_lowrank(x)):.1f}"
        say(line)
        for bm, split in CONFIGS:
            K.MANY_ROWS_BM, K.MANY_ROWS_SPLIT = bm, split
            try:
                q1 = us(lambda: K.act_quant_lowrank(x, up["B"]))
                q2 = us(lambda: K.act_quant_lowrank(h, dn["B"]))  # a 4*dim-wide input (the unfused path's)
                got = fused.ffn(x, up, dn, hs)
                diff = float((got.float() - ref.float()).norm() / ref.float().norm())
                tf = us(lambda: fused.ffn(x, up, dn, hs))
                say(f"  {bm:3d} rows x {split:5d}: act quant r64 x {q1:7.1f}, h {q2:7.1f}; FFN {tf:8.1f} "
                    f"({t_bf / tf:.3f}x bf16), output vs default config {diff:.1e}")
            except Exception as e:  # noqa: BLE001
                say(f"  {bm} x {split}: FAILED {type(e).__name__}: {str(e)[:200]}")
        K.MANY_ROWS_BM, K.MANY_ROWS_SPLIT = default
        del up, dn, x, h, W1, W2
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
