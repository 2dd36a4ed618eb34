"""Fused FP8 FFN kernels against bf16 and cuBLAS FP8 at LTX-2 shapes, on the device GPU.

    python bench/ffn_kernels.py [--out bench/ffn_kernels_h100.md]       # full tables
    python bench/ffn_kernels.py --sweep                                 # per-config timings

Per linear (video 4096<->16384 at M = 6144, 24576, 43400; audio 2048<->8192 at M = 126, 1400,
5600): bf16 F.linear; cuBLAS FP8 (torch._scaled_mm, input already FP8, row-wise scales), with
Hopper's fast accumulation and with promoted accumulation (what our kernels do, for accuracy); ours from a bf16 input (quantize + low-rank down-projection, then the GEMM) at
ranks 0/32/64/256; ours from an input already in FP8 (how the second linear runs inside the
FFN). Per FFN: bf16 Linear -> GELU -> Linear against ours fused (static hidden scale) at each
rank and unfused (per-token hidden scale) at rank 64. Every time is the median device time of
CUDA-graph replays (triton.testing.do_bench_cudagraph), so Python launch overhead is out of
the numbers, and weights rotate over enough copies to exceed the L2 cache. Correctness: each
kernel against the fp32 reference of the same compressed tensors (first 2048 rows).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys

import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401

import triton  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

from liteffn.calibration.synthetic import random_activations, random_fp8_layer  # noqa: E402
from liteffn.kernels import fp8_ffn as K  # noqa: E402
from liteffn.kernels import fused  # noqa: E402
from liteffn.kernels import reference as R  # noqa: E402

VIDEO, AUDIO = ((4096, 16384), (16384, 4096)), ((2048, 8192), (8192, 2048))
M_VIDEO, M_AUDIO = (6144, 24576, 43400), (126, 1400, 5600)
RANKS = (0, 32, 64, 256)
ROT_BYTES = 200 * 2**20  # weights of one timed set of calls: several times the 50 MB L2
CHECK_ROWS = 2048


def us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


class Rot:
    """Cycles through copies of some weights, one per call (also inside a captured graph)."""

    def __init__(self, items):
        self.items, self.i = items, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def copies_for(n, k) -> int:
    return max(1, math.ceil(ROT_BYTES / (n * k * 2)))


def act(m, k, seed=0):
    return random_activations(m, k, seed, "cuda")


def quant_torch(x):
    s = x.float().abs().amax(1, keepdim=True) / 448
    return (x.float() / s).to(torch.float8_e4m3fn), s


def linear_table(lines, summary):
    lines += ["", "## Per linear (us; ratio = bf16 time / this time)", "",
              "| shape | M | bf16 | cuBLAS FP8, fast acc. (x in FP8) | cuBLAS FP8, promoted acc. | ours r=0 | r=32 | r=64 | "
              "r=256 | ours, x in FP8: r=0 | r=64 | err r=64 vs fp32 ref |", "|---" * 12 + "|"]
    for (k, n), ms in [(s, M_VIDEO) for s in VIDEO] + [(s, M_AUDIO) for s in AUDIO]:
        c = copies_for(n, k)
        W = Rot([(torch.randn(n, k, device="cuda") / k**0.5).bfloat16() for _ in range(c)])
        b = (torch.randn(n, device="cuda") / 8).bfloat16()
        layers = {r: Rot([random_fp8_layer(n, k, r, seed=i, device="cuda") for i in range(c)]) for r in RANKS}
        for m in ms:
            x = act(m, k)
            t_bf = us(lambda: Fn.linear(x, W(), b))
            xq, sx = quant_torch(x)
            t_cb, t_cbp = (us(lambda fa=fa: (lambda t: torch._scaled_mm(
                xq, t["q"].t(), scale_a=sx, scale_b=t["q_scale"][None, :], bias=t["bias"], out_dtype=torch.bfloat16,
                use_fast_accum=fa))(layers[0]())) for fa in (True, False))
            t_r = {r: us(lambda r=r: fused.linear(x, layers[r]())) for r in RANKS}
            pre = {}
            for r in (0, 64):
                t0 = layers[r].items[0]
                xq8, sx8, u8 = K.act_quant_lowrank(x, t0.get("B"))
                pre[r] = us(lambda r=r, xq8=xq8, sx8=sx8, u8=u8: (lambda t: K.scaled_gemm(
                    xq8, sx8, t["q"], t["q_scale"], u=u8, A=t.get("A"), bias=t["bias"]))(layers[r]()))
            t64 = layers[64].items[0]
            xs = x[:CHECK_ROWS]
            err = rel(fused.linear(xs, t64), R.compressed_linear_ref(xs, "fp8", t64, dtype=torch.float32))
            kind = "video" if (k, n) in VIDEO else "audio"
            summary.append(dict(kind=kind, k=k, n=n, m=m, bf16=t_bf, cublas=t_cb, cublas_p=t_cbp,
                                **{f"r{r}": t_r[r] for r in RANKS},
                                pre0=pre[0], pre64=pre[64], err=err))
            f = lambda t: f"{t:.1f} ({t_bf / t:.2f}x)"  # noqa: E731
            lines.append(f"| {kind} {k}->{n} | {m} | {t_bf:.1f} | {f(t_cb)} | {f(t_cbp)} | "
                         + " | ".join(f(t_r[r]) for r in RANKS)
                         + f" | {f(pre[0])} | {f(pre[64])} | {err:.2e} |")
            print(lines[-1], flush=True)
        torch.cuda.empty_cache()


def ffn_table(lines, summary):
    lines += ["", "## Whole FFN, Linear -> GELU(tanh) -> Linear (us; ratio = bf16 time / this time)", "",
              "| FFN | M | bf16 | fused r=0 | r=32 | r=64 | r=256 | unfused r=64 (per-token h) | err fused r=64 | "
              "err unfused r=64 |", "|---" * 10 + "|"]
    for dim, ms in ((4096, M_VIDEO), (2048, M_AUDIO)):
        hid = 4 * dim
        c = copies_for(hid, dim)
        dense = Rot([tuple((torch.randn(*s, device="cuda") / s[1]**0.5).bfloat16() for s in ((hid, dim), (dim, hid)))
                     for _ in range(c)])
        b1, b2 = (torch.randn(hid, device="cuda") / 8).bfloat16(), (torch.randn(dim, device="cuda") / 8).bfloat16()
        ffns = {r: Rot([(random_fp8_layer(hid, dim, r, 2 * i, "cuda"), random_fp8_layer(dim, hid, r, 2 * i + 1, "cuda"))
                        for i in range(c)]) for r in RANKS}
        for m in ms:
            x = act(m, dim)

            def bf16_ffn():
                w1, w2 = dense()
                return Fn.linear(Fn.gelu(Fn.linear(x, w1, b1), approximate="tanh"), w2, b2)

            t_bf = us(bf16_ffn)
            # static hidden scale from the hidden activation's range (what calibration records)
            up0, down0 = ffns[64].items[0]
            xs = x[:CHECK_ROWS]
            h = Fn.gelu(R.compressed_linear_ref(xs, "fp8", up0, dtype=torch.float32), approximate="tanh")
            hs = K.static_scale(h.abs().amax())
            t_f = {r: us(lambda r=r: fused.ffn(x, *ffns[r](), hs)) for r in RANKS}
            t_dyn = us(lambda: fused.ffn(x, *ffns[64](), None))
            e_f = rel(fused.ffn(xs, up0, down0, hs),
                      R.compressed_ffn_ref(xs, "fp8", up0, "fp8", down0, h_scale=hs, dtype=torch.float32))
            e_d = rel(fused.ffn(xs, up0, down0, None),
                      R.compressed_ffn_ref(xs, "fp8", up0, "fp8", down0, dtype=torch.float32, h_dtype=torch.bfloat16))
            summary.append(dict(kind="ffn", dim=dim, m=m, bf16=t_bf, **{f"r{r}": t_f[r] for r in RANKS}, dyn=t_dyn,
                                err=e_f, err_dyn=e_d))
            f = lambda t: f"{t:.1f} ({t_bf / t:.2f}x)"  # noqa: E731
            lines.append(f"| {'video' if dim == 4096 else 'audio'} {dim} | {m} | {t_bf:.1f} | "
                         + " | ".join(f(t_f[r]) for r in RANKS) + f" | {f(t_dyn)} | {e_f:.2e} | {e_d:.2e} |")
            print(lines[-1], flush=True)
        torch.cuda.empty_cache()


def goals(lines, summary):
    vid = [s for s in summary if s["kind"] == "video"]
    ffn = [s for s in summary if s["kind"] == "ffn"]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    lines += ["", "## Against the goals (H100 goals of the kernels issue)", ""]
    lines.append(f"- Per linear, r=64, mean ratio over the {len(vid)} video (shape, M) cases (each runs once per "
                 f"block): from bf16 input {mean([s['bf16'] / s['r64'] for s in vid]):.2f}x; with the input already in "
                 f"FP8 (as inside the FFN) {mean([s['bf16'] / s['pre64'] for s in vid]):.2f}x; cuBLAS FP8 GEMM alone "
                 f"{mean([s['bf16'] / s['cublas'] for s in vid]):.2f}x with fast accumulation, "
                 f"{mean([s['bf16'] / s['cublas_p'] for s in vid]):.2f}x promoted (goal 1.8x)")
    lines.append("- Whole FFN, r=64: " + ", ".join(f"{'video' if s['dim'] == 4096 else 'audio'} M={s['m']} "
                                                   f"{s['bf16'] / s['r64']:.2f}x" for s in ffn) + " (goal 1.9x)")
    lines.append("- Rank-64 branch over r=0, fused FFN: " + ", ".join(
        f"M={s['m']} {100 * (s['r64'] / s['r0'] - 1):+.1f}%" for s in ffn) + "; per linear from FP8 input: " + ", ".join(
        f"{s['k']}->{s['n']} M={s['m']} {100 * (s['pre64'] / s['pre0'] - 1):+.1f}%" for s in vid) + " (goal <= 5%)")


def chosen_configs(lines):
    lines += ["", "## Autotuned GEMM configurations chosen", "",
              "| M bucket, N, K, r, r2, GELU, FP8 out | BM x BN x BK, warps, stages, split epilogue, persistent |",
              "|---|---|"]
    for key, cfg in sorted(K._gemm_tuned.cache.items(), key=str):
        kw = cfg.kwargs
        lines.append(f"| {', '.join(str(v) for v in key[:7])} | {kw['BM']}x{kw['BN']}x{kw['BK']}, {cfg.num_warps}, "
                     f"{cfg.num_stages}, {kw['EPI_SPLIT']}, {kw['PERSIST']} |")


def sweep():
    """Every candidate configuration (fixed, no autotuning) at the video shapes, M = 6144, and
    the cost and error of promoting Hopper's FP8 accumulation every BK."""
    m = 6144
    print("| shape | r | config | us | vs bf16 | err vs fp32 ref |\n|---|---|---|---|---|---|")
    for k, n in VIDEO:
        W = (torch.randn(n, k, device="cuda") / k**0.5).bfloat16()
        x = act(m, k)
        t_bf = us(lambda: Fn.linear(x, W))
        xq, sx = quant_torch(x)
        s = W.float().abs().amax(1) / 448
        wq = (W.float() / s[:, None]).to(torch.float8_e4m3fn)
        t_cb = us(lambda: torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=s[None, :], out_dtype=torch.bfloat16,
                                           use_fast_accum=True))
        print(f"| {k}->{n} | - | bf16 {t_bf:.1f} us, cuBLAS FP8 {t_cb:.1f} us ({t_bf / t_cb:.2f}x) | | | |", flush=True)
        for r in (0, 64):
            t = random_fp8_layer(n, k, r, seed=1, device="cuda")
            xq8, sx8, u8 = K.act_quant_lowrank(x, t.get("B"))
            ref = R.compressed_linear_ref(x[:CHECK_ROWS], "fp8", t, dtype=torch.float32)
            cfgs = [(c.kwargs, c.num_warps, c.num_stages) for c in K.GEMM_CONFIGS if c.kwargs["BM"] == 128]
            cfgs += [(dict(cfgs[0][0], PROMOTE=0), cfgs[0][1], cfgs[0][2]),
                     (dict(cfgs[0][0], FLATTEN=True), cfgs[0][1], cfgs[0][2])]
            for kw, w, st in cfgs:
                cfg = dict(kw, num_warps=w, num_stages=st)
                name = (f"{kw['BM']}x{kw['BN']}x{kw['BK']} w{w} s{st} split={kw['EPI_SPLIT']} "
                        f"persist={kw['PERSIST']} flatten={kw['FLATTEN']} promote={kw['PROMOTE']}")
                try:
                    f = lambda: K.scaled_gemm(xq8, sx8, t["q"], t["q_scale"], u=u8, A=t.get("A"), bias=t["bias"],  # noqa
                                              config=cfg)
                    y = f()
                    err = rel(y[:CHECK_ROWS], ref)
                    tt = us(f)
                    print(f"| {k}->{n} | {r} | {name} | {tt:.1f} | {t_bf / tt:.2f}x | {err:.2e} |", flush=True)
                except Exception as e:  # a configuration that does not compile here is a result too
                    print(f"| {k}->{n} | {r} | {name} | failed: {type(e).__name__}: {str(e)[:120]} | | |", flush=True)
    # the quantize + low-rank pass alone, and the fused FFN with the default (untuned) configs
    for dim in (4096, 2048):
        x = act(m, dim)
        B = (torch.randn(64, dim, device="cuda") / dim**0.5).bfloat16()
        tq = us(lambda: K.act_quant_lowrank(x, B))
        print(f"act_quant_lowrank M={m} K={dim} r=64: {tq:.1f} us ({m * dim * 3 / tq / 1e3:.0f} GB/s counting 3 B/elem)")
        w1, w2 = (torch.randn(4 * dim, dim, device="cuda") / dim**0.5).bfloat16(), (torch.randn(
            dim, 4 * dim, device="cuda") / (4 * dim)**0.5).bfloat16()
        t_bf = us(lambda: Fn.linear(Fn.gelu(Fn.linear(x, w1), approximate="tanh"), w2))
        up, down = random_fp8_layer(4 * dim, dim, 64, 1, "cuda"), random_fp8_layer(dim, 4 * dim, 64, 2, "cuda")
        hs = K.static_scale(torch.tensor([4.0], device="cuda"))
        for cfg in K.DEFAULT_CONFIGS[1:] + (dict(K.DEFAULT_CONFIGS[1], EPI_SPLIT=False, BN=128, num_stages=4),):
            tf = us(lambda: fused.ffn(x, up, down, hs, config=cfg))
            td = us(lambda: fused.ffn(x, up, down, None, config=cfg))
            print(f"FFN dim={dim} M={m} r=64 cfg={cfg}: bf16 {t_bf:.1f} us, fused {tf:.1f} us ({t_bf / tf:.2f}x), "
                  f"unfused {td:.1f} us ({t_bf / td:.2f}x)", flush=True)


def explore():
    """Accumulation variants (time and error on inputs where Hopper's fast accumulation is far
    off) and shapes of the quantize kernels."""
    cases = []
    for (k, n, m, seed) in ((4096, 16384, 6144, 1), (16384, 4096, 6144, 1), (8192, 2048, 1400, 0)):
        t = random_fp8_layer(n, k, 64, 0 if k == 8192 else 1, "cuda")
        x = act(m, k, seed)
        cases.append((k, n, m, t, x))
    base = K.DEFAULT_CONFIGS[1]
    variants = {"fast": dict(base, PROMOTE=0),
                "promote 1": base, "promote 2": dict(base, PROMOTE=2), "promote 4": dict(base, PROMOTE=4),
                "promote 1, 128x128 s4": dict(base, PROMOTE=1, BN=128, EPI_SPLIT=False, num_stages=4),
                "promote 2, 128x128 s4": dict(base, PROMOTE=2, BN=128, EPI_SPLIT=False, num_stages=4),
                "promote 1, not persistent": dict(base, PERSIST=False)}
    for k, n, m, t, x in cases:
        xq, sx, u = K.act_quant_lowrank(x, t["B"])
        ref = R.compressed_linear_ref(x[:CHECK_ROWS], "fp8", t, dtype=torch.float32)
        cfgs = dict(variants) if m > 256 else {"fast": dict(K.DEFAULT_CONFIGS[0], PROMOTE=0), "promote 1": K.DEFAULT_CONFIGS[0]}
        if m <= 1400:
            cfgs.update({"small fast": dict(K.DEFAULT_CONFIGS[0], PROMOTE=0), "small promote 1": K.DEFAULT_CONFIGS[0],
                         "small promote 2": dict(K.DEFAULT_CONFIGS[0], PROMOTE=2)})
        for name, cfg in cfgs.items():
            try:
                f = lambda: K.scaled_gemm(xq, sx, t["q"], t["q_scale"], u=u, A=t["A"], bias=t["bias"], config=cfg)  # noqa
                err = rel(f()[:CHECK_ROWS], ref)
                print(f"{k}->{n} M={m} [{name}]: {us(f):.1f} us, err {err:.2e}", flush=True)
            except Exception as e:
                print(f"{k}->{n} M={m} [{name}]: failed {type(e).__name__}: {str(e)[:100]}", flush=True)
    for m, k in ((6144, 4096), (6144, 16384), (126, 2048), (126, 8192), (1400, 2048), (43400, 4096)):
        x = act(m, k)
        B = (torch.randn(64, k, device="cuda") / k**0.5).bfloat16()
        for bm, split in ((32, 512), (64, 512), (32, 1024), (32, 256), (16, 256)):
            tq = us(lambda: K.act_quant_lowrank(x, B, bm=bm, split=split))
            print(f"act_quant M={m} K={k} r=64 bm={bm} split={split}: {tq:.1f} us ({m * k * 5 / tq / 1e3:.0f} GB/s "
                  f"counting 5 B/elem)", flush=True)


def diag():
    """Accuracy of the fused FFN at the GPU test's case (M=700) and at M=2048: the first GEMM's
    unquantized output, fast vs promoted FP8 accumulation, per-row errors."""
    dim, r = 4096, 64
    hid = 4 * dim
    up, down = random_fp8_layer(hid, dim, r, 1, "cuda"), random_fp8_layer(dim, hid, r, 2, "cuda")
    for m, seed in ((700, 1), (2048, 0), (1024, 1)):
        x = act(m, dim, seed)
        h = Fn.gelu(R.compressed_linear_ref(x, "fp8", up, dtype=torch.float32), approximate="tanh")
        hs = K.static_scale(h.abs().amax())
        want = R.compressed_ffn_ref(x, "fp8", up, "fp8", down, dtype=torch.float32, h_scale=hs)
        bf = R.compressed_ffn_ref(x, "fp8", up, "fp8", down, h_scale=hs)
        print(f"M={m}: bf16 torch reference {rel(bf, want):.2e}", flush=True)
        for name, cfg in (("fast acc", dict(K.DEFAULT_CONFIGS[1], PROMOTE=0)), ("promoted acc", K.DEFAULT_CONFIGS[1]),
                          ("fast, 64-row tiles", dict(K.DEFAULT_CONFIGS[0], PROMOTE=0))):
            xq, sx, u = K.act_quant_lowrank(x, up["B"])
            hb = K.scaled_gemm(xq, sx, up["q"], up["q_scale"], u=u, A=up["A"], bias=up["bias"], gelu=True, config=cfg)
            y = fused.ffn(x, up, down, hs, config=cfg)
            rows = ((y.float() - want).norm(dim=1) / want.norm(dim=1))
            top = rows.topk(3)
            print(f"   {name}: h before FP8 {rel(hb, h):.2e}; FFN {rel(y, want):.2e}; worst rows "
                  f"{[(int(i), round(float(v), 4)) for v, i in zip(top.values, top.indices)]}; "
                  f"median row {float(rows.median()):.2e}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--explore", action="store_true")
    ap.add_argument("--diag", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    head = (f"# Fused FP8 FFN kernels, {dev}, {datetime.date.today()}, torch {torch.__version__}, "
            f"triton {triton.__version__}")
    print(head, flush=True)
    if args.sweep:
        return sweep()
    if args.explore:
        return explore()
    if args.diag:
        return diag()
    lines, summary = [head, "", __doc__.strip().split("\n\n", 1)[1]], []
    linear_table(lines, summary)
    ffn_table(lines, summary)
    goals(lines, summary)
    chosen_configs(lines)
    text = "\n".join(lines) + "\n"
    print("\n".join(lines[-12:]))
    for path in filter(None, (args.out, os.path.join(os.environ["OUT"], "ffn_kernels.md") if os.environ.get("OUT") else None)):
        with open(path, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
