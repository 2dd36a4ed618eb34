"""Knob sweep of the warp-specialized GEMM's dispatch for the FFNs (H200): tiles per work item
(PAIR_TILES) and whether the audio up-projection (K = 2048) takes three math warpgroups (HEAVY_MIN_K),
now that the next linear's low-rank sums go by TMA reduce (fp8_ws.U2_TMA) instead of fp32 atomics,
which is what tile pairs and the two-warpgroup rule were measured against. Whole fused FFN at r=64,
variants interleaved over rounds, medians.

    python bench/ws_sweep.py [--out DIR] [--rounds 3]
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

VARIANTS = {  # name: (PAIR_TILES, HEAVY_MIN_K); the first run (19:38-19:40) had pairs and 4096 as defaults
    "default": (W.PAIR_TILES, W.HEAVY_MIN_K),
    "2 WGs below K=4096": (1, 4096),
    "2 WGs below K=4096, tile pairs": (2, 4096),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    say = logger(a.out, "ws_sweep.log")
    say(f"# {torch.cuda.get_device_name()} {time.strftime('%Y-%m-%d %H:%M')}, fused FFN r=64, us (ratio to bf16)")
    base = (W.PAIR_TILES, W.HEAVY_MIN_K)
    for dim, m in [(2048, 1400), (2048, 5600), (4096, 24576), (4096, 43400)]:
        up, dn, hs, x, W1, W2 = ffn_case(dim, m)
        t_bf = us(lambda: bf16_ffn(x, W1, up["bias"], W2, dn["bias"]))
        ref = compressed_ffn_ref(x, "fp8", up, "fp8", dn, hs, dtype=torch.float32)
        times = {k: [] for k in VARIANTS}
        errs = {k: set() for k in VARIANTS}
        for _ in range(a.rounds):
            for k, v in VARIANTS.items():
                W.PAIR_TILES, W.HEAVY_MIN_K = v
                y = fused.ffn(x, up, dn, hs).float()
                errs[k].add(f"{rel(y, ref):.2e}" if bool(torch.isfinite(y).all()) else "NOT FINITE")
                times[k].append(us(lambda: fused.ffn(x, up, dn, hs)))
        W.PAIR_TILES, W.HEAVY_MIN_K = base
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        say(f"dim {dim} M={m} (bf16 {t_bf:.1f}): " + "; ".join(f"{k} {t:.1f} ({t_bf / t:.2f}x, error vs fp32 "
                                                             f"reference {'/'.join(sorted(errs[k]))})"
                                                             for k, t in med.items()))
        del up, dn, x, W1, W2, ref, y
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
