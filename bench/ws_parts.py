"""Where the rank-64 branch's time goes in the video FFN (H200): the up-projection GEMM with its epilogue
steps added one at a time (GELU + FP8 output, the low-rank up-projection with U's rows through the K ring
or read by the epilogue, the next linear's low-rank input), the down-projection at r = 0 and 64, the input
pass with and without the low-rank down-projection, and the whole FFN with and without the ring. (Runs in
bench/ws_parts_h200.log also timed U2_MODE and ITEMS3 variants, commit de94f29, and GELU_F16X2, 5f405e6.)
Variants are interleaved over rounds (the GPU's clock drifts within a run); medians are printed.

    python bench/ws_parts.py [--out DIR] [--rows 6144 24576] [--rounds 3] [--only-u2 | --only-u2bf16]
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


def ffn_switch(say, title, rounds, x, up, dn, hs, W1, W2, obj, attr: str, names: tuple):
    """The whole FFN with obj.attr True, then False (names), interleaved over rounds; obj.attr left True.
    Returns the dense bf16 FFN's time."""
    t_bf = us(lambda: bf16_ffn(x, W1, up["bias"], W2, dn["bias"]))
    timed(say, f"{title} (bf16 {t_bf:.1f})", {
        names[0]: lambda: (setattr(obj, attr, True), fused.ffn(x, up, dn, hs))[1],
        names[1]: lambda: (setattr(obj, attr, False), fused.ffn(x, up, dn, hs))[1],
    }, rounds)
    setattr(obj, attr, True)
    return t_bf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rows", nargs="*", type=int, default=[6144, 24576])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only-u2", action="store_true", help="only TMA reduce against atomics (U2_TMA)")
    ap.add_argument("--dims", nargs="*", type=int, default=[4096], help="FFN widths (2048: audio)")
    ap.add_argument("--only-u2bf16", action="store_true",
                    help="only u2 rounded to bf16 before the down-projection against fp32 u2 (fused.U2_BF16)")
    a = ap.parse_args()
    say = logger(a.out, "ws_parts.log")
    say(f"# {torch.cuda.get_device_name()} {time.strftime('%Y-%m-%d %H:%M')}, promote every 512, us (+ vs first)")
    for dim, m in [(d, m) for d in a.dims for m in a.rows]:
        up, dn, hs, x, W1, W2 = ffn_case(dim, m)
        xq, sx, u = K.act_quant_lowrank(x, up["B"])
        u32 = u.float()
        u2 = torch.zeros(m, 64, device="cuda")
        hsx = torch.tensor([2.0**-4], device="cuda")

        def g_up(ring=True, tma=True, **kw):
            def f():
                W.U_RING, W.U2_TMA = ring, tma
                if "u_next" in kw:
                    kw["u_next"].zero_()
                return ws_gemm(xq, sx, up["q"], up["q_scale"], promote_k=512, **kw)
            return f
        full = dict(u=u, A=up["A"], bias=up["bias"], gelu=True, h_scale=hsx, next_B=dn["B"], u_next=u2)
        # U's rows through the ring against read by the epilogue: same codes, same u_next
        o1, n1 = g_up(True, **full)().clone(), u2.clone()
        o0, n0 = g_up(False, **full)().clone(), u2.clone()
        torch.cuda.synchronize()
        same = bool((o1.view(torch.uint8) == o0.view(torch.uint8)).all())
        say(f"M={m} dim {dim} up full, ring vs epilogue loads: codes equal {same}, "
            f"u_next rel {rel(n1, n0):.1e}")
        # the next low-rank input summed by TMA reduce against fp32 atomics: same codes, u_next up to fp32 order
        o2, n2 = g_up(True, False, **full)().clone(), u2.clone()
        torch.cuda.synchronize()
        same = bool((o1.view(torch.uint8) == o2.view(torch.uint8)).all())
        say(f"M={m} dim {dim} up full, TMA reduce vs atomics: codes equal {same}, u_next rel {rel(n1, n2):.1e}")
        if a.only_u2bf16:
            hq = g_up(**full)()
            u2b = K.round_bf16(u2)
            outs = []
            for flag in (True, False):
                fused.U2_BF16 = flag
                outs.append(fused.ffn(x, up, dn, hs).clone())
            torch.cuda.synchronize()
            say(f"M={m} dim {dim} FFN, u2 in bf16 vs fp32: outputs equal {bool(torch.equal(*outs))}, rel {rel(*outs):.1e}")
            timed(say, f"M={m} down {4 * dim}->{dim} r64", {
                "u2 fp32 (epilogue reads)": lambda: ws_gemm(hq, hs, dn["q"], dn["q_scale"], promote_k=512, u=u2,
                                                           A=dn["A"], bias=dn["bias"]),
                "u2 bf16 (ring)": lambda: ws_gemm(hq, hs, dn["q"], dn["q_scale"], promote_k=512, u=u2b, A=dn["A"],
                                                  bias=dn["bias"]),
                "r0": lambda: ws_gemm(hq, hs, dn["q"], dn["q_scale"], promote_k=512, bias=dn["bias"]),
                "the rounding alone": lambda: K.round_bf16(u2),
            }, a.rounds)
            ffn_switch(say, f"M={m} dim {dim} FFN r64", a.rounds, x, up, dn, hs, W1, W2, fused, "U2_BF16",
                       ("u2 bf16", "u2 fp32"))
            del up, dn, x, W1, W2, xq, u, u2, hq
            torch.cuda.empty_cache()
            continue
        if a.only_u2:
            timed(say, f"M={m} up {dim}->{4 * dim}", {
                "r0 bias": g_up(bias=up["bias"]),
                "full (TMA reduce)": g_up(True, True, **full),
                "full (atomics)": g_up(True, False, **full),
                "no next rank": g_up(True, u=u, A=up["A"], bias=up["bias"], gelu=True, h_scale=hsx),
            }, a.rounds)
            ffn_switch(say, f"M={m} dim {dim} FFN r64", a.rounds, x, up, dn, hs, W1, W2, W, "U2_TMA",
                       ("TMA reduce", "atomics"))
            del up, dn, x, W1, W2, xq, u, u2
            torch.cuda.empty_cache()
            continue
        timed(say, f"M={m} up {dim}->{4 * dim}", {
            "r0 bias": g_up(bias=up["bias"]),
            "+gelu fp8": g_up(bias=up["bias"], gelu=True, h_scale=hsx),
            "+r64 (ring)": g_up(True, u=u, A=up["A"], bias=up["bias"], gelu=True, h_scale=hsx),
            "+r64 (bf16 U by epilogue)": g_up(False, u=u, A=up["A"], bias=up["bias"], gelu=True, h_scale=hsx),
            "+r64 (fp32 U by epilogue)": g_up(False, u=u32, A=up["A"], bias=up["bias"], gelu=True, h_scale=hsx),
            "full (ring)": g_up(True, **full),
            "full (ring, atomics)": g_up(True, False, **full),
            "full (fp32 U by epilogue)": g_up(False, **dict(full, u=u32)),
        }, a.rounds)
        W.U_RING = True
        hq = g_up(**full)()
        timed(say, f"M={m} down {4 * dim}->{dim}", {
            "r0 bias": lambda: ws_gemm(hq, hs, dn["q"], dn["q_scale"], promote_k=512, bias=dn["bias"]),
            "r64 bias": lambda: ws_gemm(hq, hs, dn["q"], dn["q_scale"], promote_k=512, u=u2, A=dn["A"],
                                        bias=dn["bias"]),
        }, a.rounds)
        timed(say, f"M={m} input pass {dim}", {
            "quant only": lambda: K.act_quant_lowrank(x, None),
            "quant + x B^T (r64)": lambda: K.act_quant_lowrank(x, up["B"]),
        }, a.rounds)
        t_bf = ffn_switch(say, f"M={m} dim {dim} FFN r64", a.rounds, x, up, dn, hs, W1, W2, W, "U_RING",
                          ("U ring", "no ring"))
        strip = lambda t: {k: v for k, v in t.items() if k not in ("A", "B")}  # noqa: E731
        r0 = us(lambda: fused.ffn(x, strip(up), strip(dn), hs))
        say(f"M={m} FFN r0 {r0:.1f} ({t_bf / r0:.2f}x bf16)")
        del up, dn, x, W1, W2, xq, u, u2, hq
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
