"""Where the rank-64 branch's time goes in the video FFN (H200): the up-projection GEMM with its epilogue
steps added one at a time (GELU + FP8 output, the low-rank up-projection, the next linear's low-rank input
and how it is summed: fp32 atomics, paired vector reductions, or not at all), the down-projection at r = 0
and 64, the input pass with and without the low-rank down-projection, and the whole FFN per U2_MODE.
Variants are interleaved over rounds (the GPU's clock drifts within a run); medians are printed.

    python bench/ws_parts.py [--out DIR] [--rows 6144 24576] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401
from _common import ffn_case, logger, rel, us  # noqa: E402
from ws_check import ws_gemm  # noqa: E402

from liteffn.kernels import fp8_ffn as K  # noqa: E402
from liteffn.kernels import fp8_ws as W  # noqa: E402
from liteffn.kernels import fused  # noqa: E402


def med(v):
    return sorted(v)[len(v) // 2]


def timed(say, title, fns: dict, rounds: int):
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            times[k].append(us(f))
    base = med(times[next(iter(fns))])
    say(f"{title}: " + "; ".join(f"{k} {med(v):.1f} ({med(v) - base:+.1f})" for k, v in times.items()))


ITEM_VARIANTS = {"1 tile per item": dict(ITEMS3=False), "1 tile, 3 stages": dict(ITEMS3=False, STAGES_LOWRANK=3),
                 "2 tiles (sum in smem)": dict(ITEMS3=True, PAIR_TILES=2),
                 "4 tiles (sum in smem)": dict(ITEMS3=True, PAIR_TILES=4)}


def _set(**kv):
    for k, v in kv.items():
        setattr(W, k, v)


def items(say, m, g_up, full, x, up, dn, hs, W1, W2, rounds):
    """Tiles per work item for the up-projection with three math warpgroups: its GEMM and the whole FFN."""
    dflt = {k: getattr(W, k) for k in ("ITEMS3", "PAIR_TILES", "STAGES_LOWRANK")}
    ref_kw = dict(full, u_next=torch.zeros_like(full["u_next"]))
    xq, sx, _ = K.act_quant_lowrank(x, up["B"])
    ref = K.scaled_gemm(xq, sx, up["q"], up["q_scale"], config=dict(K.DEFAULT_CONFIGS[1], PROMOTE=4), **ref_kw)
    line = f"M={m} items, vs Triton:"
    for name, kv in ITEM_VARIANTS.items():
        _set(**kv)
        o = g_up(**full)().clone()
        torch.cuda.synchronize()
        line += (f" [{name}: codes equal {float((o.view(torch.uint8) == ref.view(torch.uint8)).float().mean()):.4f}, "
                 f"u_next rel {rel(full['u_next'], ref_kw['u_next']):.1e}]")
    say(line)
    _set(**dflt)
    fns = {n: (lambda kv=kv: (_set(**kv), g_up(**full)())[1]) for n, kv in ITEM_VARIANTS.items()}
    timed(say, f"M={m} up full (items)", fns, rounds)
    fns = {n: (lambda kv=kv: (_set(**kv), fused.ffn(x, up, dn, hs))[1]) for n, kv in ITEM_VARIANTS.items()}
    t_bf = us(lambda: Fn.linear(Fn.gelu(Fn.linear(x, W1, up["bias"]), approximate="tanh"), W2, dn["bias"]))
    timed(say, f"M={m} FFN r64 (items; bf16 {t_bf:.1f})", fns, rounds)
    _set(**dflt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rows", nargs="*", type=int, default=[6144, 24576])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parts", nargs="*", default=["steps", "items"], help="steps: the epilogue's steps one at a "
                    "time; items: tiles per work item with 3 math warpgroups (ITEMS3, PAIR_TILES)")
    a = ap.parse_args()
    say = logger(a.out, "ws_parts.log")
    say(f"# {torch.cuda.get_device_name()} {time.strftime('%Y-%m-%d %H:%M')}, promote every 512, us (+ vs first)")
    dim = 4096
    for m in a.rows:
        up, dn, hs, x, W1, W2 = ffn_case(dim, m)
        xq, sx, u = K.act_quant_lowrank(x, up["B"])
        u2 = torch.zeros(m, 64, device="cuda")
        hsx = torch.tensor([2.0**-4], device="cuda")

        def g_up(mode=None, **kw):
            def f():
                if mode is not None:
                    W.U2_MODE = mode
                if "u_next" in kw:
                    kw["u_next"].zero_()
                return ws_gemm(xq, sx, up["q"], up["q_scale"], promote_k=512, **kw)
            return f
        full = dict(u=u, A=up["A"], bias=up["bias"], gelu=True, h_scale=hsx, next_B=dn["B"], u_next=u2)
        if "steps" not in a.parts:
            items(say, m, g_up, full, x, up, dn, hs, W1, W2, a.rounds)
            continue
        # correctness of the paired reductions against the atomics
        outs = {}
        for mode in (0, 1):
            W.U2_MODE = mode
            o = g_up(**full)().clone()
            torch.cuda.synchronize()
            outs[mode] = (o, u2.clone())
        say(f"M={m} up full: U2_MODE 1 vs 0: out codes equal {bool((outs[0][0].view(torch.uint8) == outs[1][0].view(torch.uint8)).all())}, "
            f"u_next rel {rel(outs[1][1], outs[0][1]):.1e}")
        timed(say, f"M={m} up 4096->16384", {
            "r0 bias": g_up(bias=up["bias"]),
            "+gelu fp8": g_up(bias=up["bias"], gelu=True, h_scale=hsx),
            "+r64": g_up(u=u, A=up["A"], bias=up["bias"], gelu=True, h_scale=hsx),
            "r0 +next64 atom": g_up(0, bias=up["bias"], gelu=True, h_scale=hsx, next_B=dn["B"], u_next=u2),
            "full atom": g_up(0, **full),
            "full red.v2": g_up(1, **full),
            "full no sum": g_up(2, **full),
        }, a.rounds)
        if "items" in a.parts:
            items(say, m, g_up, full, x, up, dn, hs, W1, W2, a.rounds)
        if "steps" not in a.parts:
            continue
        W.U2_MODE = 1
        hq = g_up(**full)()
        timed(say, f"M={m} down 16384->4096", {
            "r0 bias": lambda: ws_gemm(hq, hs, dn["q"], dn["q_scale"], promote_k=512, bias=dn["bias"]),
            "r64 bias": lambda: ws_gemm(hq, hs, dn["q"], dn["q_scale"], promote_k=512, u=u2, A=dn["A"],
                                        bias=dn["bias"]),
        }, a.rounds)
        timed(say, f"M={m} input pass 4096", {
            "quant only": lambda: K.act_quant_lowrank(x, None),
            "quant + x B^T (r64)": lambda: K.act_quant_lowrank(x, up["B"]),
        }, a.rounds)
        t_bf = us(lambda: Fn.linear(Fn.gelu(Fn.linear(x, W1, up["bias"]), approximate="tanh"), W2, dn["bias"]))
        strip = lambda t: {k: v for k, v in t.items() if k not in ("A", "B")}  # noqa: E731
        fns = {}
        for mode in (0, 1, 2):
            fns[f"U2_MODE {mode}"] = (lambda mode=mode: (setattr(W, "U2_MODE", mode), fused.ffn(x, up, dn, hs))[1])
        timed(say, f"M={m} FFN r64 (bf16 {t_bf:.1f})", fns, a.rounds)
        W.U2_MODE = 1
        try:
            r0 = us(lambda: fused.ffn(x, strip(up), strip(dn), hs))
            say(f"M={m} FFN r0 {r0:.1f} ({t_bf / r0:.2f}x bf16)")
        except Exception as ex:  # noqa: BLE001
            say(f"M={m} FFN r0: {type(ex).__name__}: {str(ex)[:200]}")
        del up, dn, x, W1, W2, xq, u, u2, hq
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
