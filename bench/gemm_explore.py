"""Exploration on the device: accuracy of each promotion interval on stress inputs, speed of GEMM
variants (tiles, promotion interval, flattening). (The host-time part of its first run, in the log,
is bench/host_overhead.py now.)

    python bench/gemm_explore.py [--out DIR] [--quick]

Writes explore.log (everything, as it goes) under --out. Not a timed test; the tables that
decide defaults are copied into bench/gemm_explore_h200.log.
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
from _common import ffn_case  # noqa: E402

from triton.testing import do_bench_cudagraph  # noqa: E402

from liteffn.calibration.synthetic import dense_weight, random_fp8_layer  # noqa: E402
from liteffn.kernels import fp8_ffn as K  # noqa: E402
from liteffn.kernels import fused  # noqa: E402

SHAPES = ((4096, 16384), (16384, 4096), (2048, 8192), (8192, 2048))
LOG = None


def say(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.write(s + "\n")
    LOG.flush()


def us(fn):
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=25, return_mode="median") * 1e3


def inputs(kind, m, k, W, g):
    """Stress inputs: 'coherent' rows are the weight's rows (same-sign sums), the worst case."""
    mag = torch.rand(m, 1, generator=g, device="cuda") * 4 + 0.1
    if kind == "independent":
        x = torch.randn(m, k, generator=g, device="cuda")
    elif kind == "coherent":
        x = W[torch.arange(m, device="cuda") % W.shape[0]] * k**0.5
    elif kind == "partly":
        w = W[torch.arange(m, device="cuda") % W.shape[0]]
        x = 0.3 * w / w.norm(dim=1, keepdim=True) * k**0.5 + torch.randn(m, k, generator=g, device="cuda")
    elif kind == "gelu":
        x = Fn.gelu(torch.randn(m, k, generator=g, device="cuda") * 2, approximate="tanh")
    elif kind == "mean":
        x = 1.0 + 0.5 * torch.randn(m, k, generator=g, device="cuda")
    elif kind == "outliers":
        x = torch.randn(m, k, generator=g, device="cuda")
        x[:, torch.randperm(k, generator=g, device="cuda")[:8]] *= 80
    return (x * mag).bfloat16()


def cfg(bm, bn, bk, warps, stages, promote, split=None, persist=True, flatten=False):
    return dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, EPI_SPLIT=(bn >= 256) if split is None else split, PERSIST=persist,
                FLATTEN=flatten, PROMOTE=promote, num_warps=warps, num_stages=stages)


def accuracy(quick):
    say("\n## Accuracy: relative Frobenius error of the fp32 GEMM output against fp64 of the same FP8 codes and scales")
    say("| K->N | M | inputs | promote every 128 | 256 | 512 | 1024 | never (fast) |")
    say("|---|---|---|---|---|---|---|---|")
    g = torch.Generator(device="cuda").manual_seed(1234)
    m = 2048 if quick else 4096
    for k, n in SHAPES:
        t = random_fp8_layer(n, k, 0, seed=7, device="cuda")
        W = dense_weight(t)
        Wd = t["q"].double() * t["q_scale"].double()[:, None]
        for kind in ("independent", "gelu", "mean", "outliers", "partly", "coherent"):
            x = inputs(kind, m, k, W, g)
            xq, sx, _ = K.act_quant_lowrank(x)
            ref = (xq.double() * sx.double()[:, None]) @ Wd.T
            errs = []
            for p in (1, 2, 4, 8, 0):
                out = K.scaled_gemm(xq, sx, t["q"], t["q_scale"], out_dtype=torch.float32,
                                    config=cfg(128, 128, 128, 8, 4, p))
                errs.append(float((out.double() - ref).norm() / ref.norm()))
            say(f"| {k}->{n} | {m} | {kind} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")
            del ref
        torch.cuda.empty_cache()


def speed(quick):
    say("\n## GEMM variants, input already FP8, r=64 + bias epilogue, bf16 out (device us, CUDA graphs)")
    variants = {
        "cur 128x256x128 s3 P1": cfg(128, 256, 128, 8, 3, 1),
        "cur 128x256x256 s2 P1": cfg(128, 256, 256, 8, 2, 1),
        "cur 128x128x256 s3 P1": cfg(128, 128, 256, 8, 3, 1),
        "fast 128x256x128 s3": cfg(128, 256, 128, 8, 3, 0),
        "fast 128x256x128 s4": cfg(128, 256, 128, 8, 4, 0),
        "fast 128x128x128 s4": cfg(128, 128, 128, 8, 4, 0),
        "fast 128x256x128 s3 flat": cfg(128, 256, 128, 8, 3, 0, flatten=True),
        "flat 128x256x128 s3 P2": cfg(128, 256, 128, 8, 3, 2),
        "flat 128x256x128 s3 P4": cfg(128, 256, 128, 8, 3, 4),
        "flat 128x128x128 s4 P2": cfg(128, 128, 128, 8, 4, 2),
        "flat 128x128x128 s4 P4": cfg(128, 128, 128, 8, 4, 4),
        "flat 128x128x128 s5 P4": cfg(128, 128, 128, 8, 5, 4),
        "flat 128x128x128 s4 P4 split": cfg(128, 128, 128, 8, 4, 4, split=True),
        "flat 128x128x128 s4 P4 flatten": cfg(128, 128, 128, 8, 4, 4, flatten=True),
        "flat 128x128x128 s4 P4 nonpersist": cfg(128, 128, 128, 8, 4, 4, persist=False),
        "flat 128x128x256 s3 P2": cfg(128, 128, 256, 8, 3, 2),
        "flat 64x128x128 w4 s4 P4 nonpersist": cfg(64, 128, 128, 4, 4, 4, persist=False),
        "flat 64x256x128 w4 s3 P4 nonpersist": cfg(64, 256, 128, 4, 3, 4, persist=False),
        "flat 256x128x128 s3 P4": cfg(256, 128, 128, 8, 3, 4),
    }
    if quick:
        variants = dict(list(variants.items())[:6])
    res = {}
    for (k, n) in SHAPES[:2]:
        for m in (6144, 24576) if not quick else (6144,):
            x8 = (torch.randn(m, k, device="cuda") * 2).to(torch.float8_e4m3fn)
            sx = torch.rand(m, device="cuda") + 0.5
            ts = [random_fp8_layer(n, k, 64, seed=i, device="cuda") for i in range(3)]
            u = torch.randn(m, 64, device="cuda").bfloat16()
            W = [(torch.randn(n, k, device="cuda") / k**0.5).bfloat16() for _ in range(3)]
            xb = torch.randn(m, k, device="cuda").bfloat16()
            i = [0]

            def nxt(lst):
                i[0] = (i[0] + 1) % len(lst)
                return lst[i[0]]
            t_bf = us(lambda: Fn.linear(xb, nxt(W)))
            sxc = sx[:, None]
            t_fast = us(lambda: (lambda t: torch._scaled_mm(x8, t["q"].t(), scale_a=sxc, scale_b=t["q_scale"][None, :],
                                                            bias=t["bias"], out_dtype=torch.bfloat16,
                                                            use_fast_accum=True))(nxt(ts)))
            t_prom = us(lambda: (lambda t: torch._scaled_mm(x8, t["q"].t(), scale_a=sxc, scale_b=t["q_scale"][None, :],
                                                            bias=t["bias"], out_dtype=torch.bfloat16,
                                                            use_fast_accum=False))(nxt(ts)))
            say(f"\n{k}->{n} M={m}: bf16 {t_bf:.1f} us, cuBLAS fast {t_fast:.1f} ({t_bf / t_fast:.2f}x), "
                f"promoted {t_prom:.1f} ({t_bf / t_prom:.2f}x)")
            ref = K.scaled_gemm(x8, sx, ts[0]["q"], ts[0]["q_scale"], u=u, A=ts[0]["A"], bias=ts[0]["bias"],
                                config=cfg(128, 128, 128, 8, 4, 1)).float()
            for name, c in variants.items():
                try:
                    out = K.scaled_gemm(x8, sx, ts[0]["q"], ts[0]["q_scale"], u=u, A=ts[0]["A"], bias=ts[0]["bias"],
                                        config=c).float()
                    e = float((out - ref).norm() / ref.norm())
                    t = us(lambda c=c: (lambda t: K.scaled_gemm(x8, sx, t["q"], t["q_scale"], u=u, A=t["A"],
                                                                bias=t["bias"], config=c))(nxt(ts)))
                    res[(k, n, m, name)] = t
                    say(f"  {name:40s} {t:8.1f} us  {t_bf / t:.2f}x bf16  {t_prom / t:.2f}x cuBLAS-promoted  "
                        f"(vs P1 ref {e:.1e})")
                except Exception as ex:  # noqa: BLE001
                    say(f"  {name:40s} failed: {type(ex).__name__}: {str(ex)[:120]}")
            del x8, ts, W, xb
            torch.cuda.empty_cache()
    return res


def speed2(quick):
    say("\n## GEMM variants, round 2 (same setup as above)")
    variants = {
        "flat 128x256x128 s3 P4": cfg(128, 256, 128, 8, 3, 4),
        "flat 128x256x128 s4 P4": cfg(128, 256, 128, 8, 4, 4),
        "flat 128x256x64 s5 P8": cfg(128, 256, 64, 8, 5, 8),
        "flat 128x256x64 s6 P8": cfg(128, 256, 64, 8, 6, 8),
        "flat 128x256x128 s3 P4 nosplit": cfg(128, 256, 128, 8, 3, 4, split=False),
        "flat 128x256x128 s3 P2": cfg(128, 256, 128, 8, 3, 2),
        "fast 128x256x128 s3": cfg(128, 256, 128, 8, 3, 0),
    }
    for (k, n) in SHAPES:
        m = 6144 if k >= 4096 else 5600
        x8 = (torch.randn(m, k, device="cuda") * 2).to(torch.float8_e4m3fn)
        sx = torch.rand(m, device="cuda") + 0.5
        ts = [random_fp8_layer(n, k, 64, seed=i, device="cuda") for i in range(3)]
        u = torch.randn(m, 64, device="cuda").bfloat16()
        i = [0]

        def nxt(lst):
            i[0] = (i[0] + 1) % len(lst)
            return lst[i[0]]
        sxc = sx[:, None]
        t_prom = us(lambda: (lambda t: torch._scaled_mm(x8, t["q"].t(), scale_a=sxc, scale_b=t["q_scale"][None, :],
                                                        bias=t["bias"], out_dtype=torch.bfloat16,
                                                        use_fast_accum=False))(nxt(ts)))
        say(f"\n{k}->{n} M={m}: cuBLAS promoted {t_prom:.1f}")
        for name, c in variants.items():
            try:
                t = us(lambda c=c: (lambda t: K.scaled_gemm(x8, sx, t["q"], t["q_scale"], u=u, A=t["A"],
                                                            bias=t["bias"], config=c))(nxt(ts)))
                say(f"  {name:40s} {t:8.1f} us  {t_prom / t:.2f}x cuBLAS-promoted")
            except Exception as ex:  # noqa: BLE001
                say(f"  {name:40s} failed: {type(ex).__name__}: {str(ex)[:120]}")
        del x8, ts
        torch.cuda.empty_cache()


def ffn(quick):
    say("\n## Whole FFN (device us, CUDA graphs), per config of both GEMMs")
    for dim, ms in ((4096, (6144,)), (2048, (5600, 126))):
        for m in ms:
            up, dn, hs, x, W1, W2 = ffn_case(dim, m)
            b1, b2 = up["bias"], dn["bias"]
            t_bf = us(lambda: Fn.linear(Fn.gelu(Fn.linear(x, W1, b1), approximate="tanh"), W2, b2))
            line = f"FFN {dim} M={m}: bf16 {t_bf:.1f}"
            for name, c in (("cur P1", None), ("flat 128x128 P4", cfg(128, 128, 128, 8, 4, 4)),
                            ("flat 128x128 P2", cfg(128, 128, 128, 8, 4, 2)),
                            ("fast 128x256", cfg(128, 256, 128, 8, 3, 0))):
                if m <= 256 and c is not None:
                    continue
                try:
                    t = us(lambda c=c: fused.ffn(x, up, dn, hs, config=c))
                    line += f"; {name} {t:.1f} ({t_bf / t:.2f}x)"
                except Exception as ex:  # noqa: BLE001
                    line += f"; {name} failed {type(ex).__name__}"
            t = us(lambda: K.act_quant_lowrank(x, up["B"]))
            line += f"; act_quant {t:.1f}"
            say(line)


def main():
    global LOG
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="accuracy,speed,ffn")
    a = ap.parse_args()
    LOG = open(os.path.join(a.out, "explore.log"), "a")
    say(f"# {torch.cuda.get_device_name()} torch {torch.__version__} {time.strftime('%Y-%m-%d %H:%M')}")
    for part in a.parts.split(","):
        t0 = time.time()
        try:
            globals()[part](a.quick)
        except Exception:  # noqa: BLE001
            import traceback
            say(f"{part} FAILED: {traceback.format_exc()[-2000:]}")
        say(f"[{part}: {time.time() - t0:.0f} s]")


if __name__ == "__main__":
    main()
