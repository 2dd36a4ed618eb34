"""W4A8 (FP4 residual on FP8 tensor cores) against the FP8 path and bf16
at LTX-2 shapes, on the device GPU (issue 6).

    python bench/w4a8.py [--out bench/w4a8_h100.md]    # the table
    python bench/w4a8.py --sweep                       # every candidate configuration, timed

Per linear at rank 64, from an input already quantized to FP8 (the GEMM alone; quantizing the
input is the same launch for every residual format): bf16 F.linear, our FP8 GEMM, W4A8 with
MXFP4 and NVFP4 residuals, each both ways: converted in registers inside the GEMM, and through a
transient E4M3 copy (w4a8.to_fp8, timed alone too) for the FP8 GEMM; scaled_gemm takes the copy
from w4a8.MATERIALIZE_M tokens, and the ratios against FP8 are for the path it takes. Per FFN (bf16 input -> bf16 output, static hidden scale, three
launches): FP8 against W4A8 residuals. Times: median device time of CUDA-graph replays,
weights rotating over copies that exceed the L2 cache; autotuned. Errors: each kernel against
the fp32 reference of the same stored tensors (first 2048 rows); for NVFP4 also how far its
kernel weights are from the exact FP4 ones (one more E4M3 rounding; MXFP4 is exact)."""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401
from _common import CHECK_ROWS, Rot, act, copies_for, emit, rel, us  # noqa: E402

from liteffn.calibration.synthetic import random_fp4_layer, random_fp8_layer  # noqa: E402
from liteffn.kernels import formats as F  # noqa: E402
from liteffn.kernels import fp8_ffn as K  # noqa: E402
from liteffn.kernels import fused  # noqa: E402
from liteffn.kernels import w4a8  # noqa: E402


def _gemm(xq, sx, t, **kw):
    return fused.GEMMS[fused.layout(t)](xq, sx, t, **kw)


SHAPES = [((4096, 16384), (6144, 24576)), ((16384, 4096), (6144,)), ((2048, 8192), (126, 1024, 5600)),
          ((8192, 2048), (126, 1024, 5600))]
FFNS = [((4096, 16384), (6144, 24576)), ((2048, 8192), (126, 1024, 5600))]
RANK = 64
FMTS = ("mxfp4", "nvfp4")


def layers(n, k, device="cuda"):
    c = copies_for(n, k)
    l8 = Rot([random_fp8_layer(n, k, RANK, seed=i, device=device) for i in range(c)])
    l4 = {f: Rot([w4a8.prepare(f, random_fp4_layer(f, n, k, RANK, seed=i, device=device)) for i in range(c)])
          for f in FMTS}
    return l8, l4


def gemm_row(k, n, m, l8, l4, W, b, lines, t_bf=None):
    x = act(m, k)
    if t_bf is None:
        t_bf = us(lambda: Fn.linear(x, W(), b))
    t0 = l8.items[0]
    xq, sx, u = K.act_quant_lowrank(x, t0["B"])
    t_8 = us(lambda: _gemm(xq, sx, l8(), u=u, A=t0["A"], bias=t0["bias"]))
    t_4 = {(f, mat): us(lambda f=f, mat=mat: w4a8.scaled_gemm(xq, sx, l4[f](), u=u, A=t0["A"], bias=t0["bias"],
                                                              materialize=mat))
           for f in FMTS for mat in (False, True)}
    t_cp = us(lambda: w4a8.to_fp8(l4["mxfp4"]()))
    auto = m >= w4a8.MATERIALIZE_M  # the path scaled_gemm takes at this M
    xs = x[:CHECK_ROWS]
    xq_s, sx_s, _ = K.act_quant_lowrank(xs, t0["B"])
    xf = xq_s.float() * sx_s[:, None]

    def err(t, wd, **kw):
        _, _, u_s = K.act_quant_lowrank(xs, t["B"])
        y = _gemm(xq_s, sx_s, t, u=u_s, A=t["A"], bias=t["bias"], **kw)
        ref = Fn.linear(xf, wd) + Fn.linear(Fn.linear(xs.float(), t["B"].float()), t["A"].float()) + t["bias"].float()
        return rel(y, ref)

    e8 = err(t0, t0["q"].float() * t0["q_scale"][:, None])
    e4 = {f: err(l4[f].items[0], w4a8.dequant(l4[f].items[0]), materialize=auto) for f in FMTS}
    g = lambda t: f"{t:.1f} ({t_bf / t:.2f}x)"  # noqa: E731
    pick = lambda f: ("**{:.2f}x**" if f == "mxfp4" else "{:.2f}x").format(t_8 / t_4[f, auto])  # noqa: E731
    lines.append(f"| {k}->{n} | {m} | {t_bf:.1f} | {g(t_8)} | {t_4['mxfp4', False]:.1f} | {t_4['mxfp4', True]:.1f} | "
                 f"{t_4['nvfp4', False]:.1f} | {t_4['nvfp4', True]:.1f} | {t_cp:.1f} | "
                 f"{'copy' if auto else 'registers'} | {pick('mxfp4')} | {pick('nvfp4')} | "
                 f"{e8:.1e} | {e4['mxfp4']:.1e} | {e4['nvfp4']:.1e} |")
    print(lines[-1], flush=True)


def ffn_row(d, hdim, m, lines):
    up8, up4 = layers(hdim, d)
    dn8, dn4 = layers(d, hdim)
    x = act(m, d)
    hs = torch.tensor([0.25], device="cuda")
    t_8 = us(lambda: fused.ffn(x, up8(), dn8(), hs))
    t_4 = {f: us(lambda f=f: fused.ffn(x, up4[f](), dn4[f](), hs)) for f in FMTS}
    mib = lambda ls: sum(F.stored_bytes({k: v for k, v in t.items() if k in ("q", "q_scale", "sb")})  # noqa: E731
                         for t in (ls[0].items[0], ls[1].items[0])) / 2**20
    lines.append(f"| {d}->{hdim}->{d} | {m} | {t_8:.1f} | {t_4['mxfp4']:.1f} | {t_4['nvfp4']:.1f} | "
                 f"**{t_8 / t_4['mxfp4']:.2f}x** | {t_8 / t_4['nvfp4']:.2f}x | {mib((up8, dn8)):.1f} / "
                 f"{mib((up4['mxfp4'], dn4['mxfp4'])):.1f} / {mib((up4['nvfp4'], dn4['nvfp4'])):.1f} |")
    print(lines[-1], flush=True)


def sweep():
    """Every candidate configuration of the in-register kernel at each shape (rank 64, MXFP4): time
    and error against the fp32 reference of the same tensors; the FP8 path tuned."""
    cands = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in w4a8.GEMM_CONFIGS]
    cands += [dict(cands[i], SPLIT_K=s) for i in (1, 2) for s in (2, 4, 8)]  # split K: few tokens, BM=128 only
    for (k, n), ms in SHAPES:
        l8, l4 = layers(n, k)
        for m in ms:
            x = act(m, k)
            t0 = l8.items[0]
            xq, sx, u = K.act_quant_lowrank(x, t0["B"])
            w0 = l4["mxfp4"].items[0]
            xs = x[:CHECK_ROWS]
            xq_s, sx_s, u_s = K.act_quant_lowrank(xs, w0["B"])
            ref = (Fn.linear(xq_s.float() * sx_s[:, None], w4a8.dequant(w0))
                   + Fn.linear(Fn.linear(xs.float(), w0["B"].float()), w0["A"].float()) + w0["bias"].float())
            row = [f"{k}->{n} M={m}: FP8 {us(lambda: _gemm(xq, sx, l8(), u=u, A=t0['A'], bias=t0['bias'])):.1f}"]
            for cfg in cands:
                if cfg["SPLIT_K"] > 1 and m > w4a8.SPLIT_K_MAX_M:
                    continue
                name = "BN{BN} BM{BM} w{num_warps} s{num_stages} p{PROMOTE} k{SPLIT_K}{s}{q}".format(
                    **cfg, s=" split" if cfg["EPI_SPLIT"] else "",
                    q=" persist" if cfg["PERSIST"] else "")
                try:
                    t = us(lambda: w4a8.scaled_gemm(xq, sx, l4["mxfp4"](), u=u, A=t0["A"], bias=t0["bias"],
                                                    config=cfg, materialize=False))
                    e = rel(w4a8.scaled_gemm(xq_s, sx_s, w0, u=u_s, A=w0["A"], bias=w0["bias"], config=cfg,
                                             materialize=False), ref)
                    row.append(f"{name}: {t:.1f} ({e:.1e})")
                except Exception as e:  # out of shared memory and the like
                    row.append(f"{name}: {type(e).__name__}")
            print("\n  ".join(row), flush=True)
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args()
    if a.sweep:
        return sweep()
    dev = torch.cuda.get_device_name()
    lines = [f"# W4A8 vs FP8 vs bf16 (rank {RANK})", "",
             f"{dev}, torch {torch.__version__}, {datetime.date.today()}; us (ratio = bf16 time / this time)", "",
             "## Per linear (input already in FP8)", "",
             "| shape | M | bf16 | FP8 | MX in registers | MX via E4M3 copy | NV in registers | NV via E4M3 copy | "
             "copy alone | path taken | MX vs FP8 | NV vs FP8 | err FP8 | err MX | err NV |",
             "|---" * 15 + "|"]
    for (k, n), ms in SHAPES:
        c = copies_for(n, k)
        W = Rot([(torch.randn(n, k, device="cuda") / k**0.5).bfloat16() for _ in range(c)])
        b = (torch.randn(n, device="cuda") / 8).bfloat16()
        l8, l4 = layers(n, k)
        for m in ms:
            gemm_row(k, n, m, l8, l4, W, b, lines)
        del W, l8, l4
        torch.cuda.empty_cache()
    lines += ["", "## Per FFN (bf16 in, bf16 out, three launches)", "",
              "| FFN | M | FP8 | W4A8 MXFP4 | W4A8 NVFP4 | MX vs FP8 | NV vs FP8 | residual MiB FP8 / MX / NV |",
              "|---" * 8 + "|"]
    for (d, hdim), ms in FFNS:
        for m in ms:
            ffn_row(d, hdim, m, lines)
        torch.cuda.empty_cache()
    emit(lines, a.out)


if __name__ == "__main__":
    main()
