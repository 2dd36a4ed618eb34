"""The next tile's first K tiles issued during a tile's epilogue (fp8_ws.EARLY), H200: the whole fused FFN at
r = 64 (and r = 0) with three math warpgroups (the default before), two, two with EARLY, and the
up-projection alone on two with EARLY (HEAVY_MIN_K above every K: the down-projection keeps three).
Variants interleaved over rounds, device time of CUDA-graph replays, medians; each variant's error against
the fp32 reference of the same compressed tensors.

    python bench/ws_early.py [--out DIR] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401
from _common import bf16_ffn, ffn_case, logger, rel, us  # noqa: E402

from liteffn.kernels import fp8_ws as W  # noqa: E402
from liteffn.kernels import fused  # noqa: E402
from liteffn.kernels.reference import compressed_ffn_ref  # noqa: E402

BIG = 1 << 30
VARIANTS = {  # name: (MATH_WGS, HEAVY_MIN_K, EARLY)
    "3 WGs": (3, W.HEAVY_MIN_K, (0, 0)),
    "2 WGs": (2, W.HEAVY_MIN_K, (0, 0)),
    "2 WGs early 2+0": (2, W.HEAVY_MIN_K, (2, 0)),
    "2 WGs early 1+1": (2, W.HEAVY_MIN_K, (1, 1)),
    "2 WGs early 2+1": (2, W.HEAVY_MIN_K, (2, 1)),
    "2 WGs early 1+2": (2, W.HEAVY_MIN_K, (1, 2)),
    "up 2 WGs early 2+1, down 3": (3, BIG, (2, 1)),
    "up 2 WGs early 1+2, down 3": (3, BIG, (1, 2)),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names from VARIANTS (each compiles)")
    ap.add_argument("--r0", action="store_true", help="also time r = 0 (twice the compiles)")
    ap.add_argument("--cases", nargs="*", default=["4096:6144", "4096:24576", "4096:43400", "2048:5600",
                                                   "2048:1400"])
    a = ap.parse_args()
    say = logger(a.out, "ws_early.log")
    say(f"# {torch.cuda.get_device_name()} {time.strftime('%Y-%m-%d %H:%M')}, fused FFN, us (ratio to bf16)")
    t_start = time.time()
    base = (W.MATH_WGS, W.HEAVY_MIN_K, W.EARLY)
    variants = {k: VARIANTS[k] for k in a.variants}
    for case in a.cases:
        dim, m = (int(v) for v in case.split(":"))
        up, dn, hs, x, W1, W2 = ffn_case(dim, m)
        up0 = dict(up, A=None, B=None)
        dn0 = dict(dn, A=None, B=None)
        t_bf = us(lambda: bf16_ffn(x, W1, up["bias"], W2, dn["bias"]))
        ref = compressed_ffn_ref(x, "fp8", up, "fp8", dn, hs, dtype=torch.float32)
        times = {k: [] for k in variants}
        times0 = {k: [float("nan")] for k in variants}
        errs = {k: set() for k in variants}
        for _ in range(a.rounds):
            for k, v in variants.items():
                W.MATH_WGS, W.HEAVY_MIN_K, W.EARLY = v
                y = fused.ffn(x, up, dn, hs).float()
                errs[k].add(f"{rel(y, ref):.2e}" if bool(torch.isfinite(y).all()) else "NOT FINITE")
                times[k].append(us(lambda: fused.ffn(x, up, dn, hs)))
                if a.r0:
                    times0[k].append(us(lambda: fused.ffn(x, up0, dn0, hs)))
        W.MATH_WGS, W.HEAVY_MIN_K, W.EARLY = base
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        say(f"dim {dim} M={m} (bf16 {t_bf:.1f}; {time.time() - t_start:.0f} s into the run):")
        for k in variants:
            t, t0 = med(times[k]), med(times0[k])
            say(f"  {k}: r64 {t:.1f} ({t_bf / t:.3f}x), r0 {t0:.1f} ({t_bf / t0:.3f}x), rank-64 +{100 * (t / t0 - 1):.1f}%"
                f"; error vs fp32 reference {'/'.join(sorted(errs[k]))}; rounds r64 "
                + " ".join(f"{v:.0f}" for v in times[k]))
        del up, dn, x, W1, W2, ref, y
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
