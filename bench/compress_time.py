"""Compression time per FFN linear at LTX-2 sizes on the GPU, and the projection for all
192 FFN linears of LTX-2 19B (48 blocks x video up/down + audio up/down).

    python bench/compress_time.py [--formats fp8 nvfp4] [--rank 64] [--out bench/compress_time.md]

Weights: random with a decaying spectrum; statistics: X^T X of random correlated
activations (the time does not depend on the values). Stages are timed with synchronisation
around them; the end-to-end compress_linear call is what the projection uses.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401  (registers `liteffn` in a plain checkout)

from liteffn.calibration.compress import compress_linear  # noqa: E402
from liteffn.calibration.lowrank import RankPolicy, Whitening, lowrank_factors  # noqa: E402
from liteffn.calibration.residual import quantize_residual  # noqa: E402
from liteffn.calibration.stats import LayerStats  # noqa: E402

# (name, out N, in K, count in LTX-2 19B)
SHAPES = [("video up 4096->16384", 16384, 4096, 48), ("video down 16384->4096", 4096, 16384, 48),
          ("audio up 2048->8192", 8192, 2048, 48), ("audio down 8192->2048", 2048, 8192, 48)]


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def make(n, k, dev):
    g = torch.Generator(device=dev).manual_seed(0)
    W = torch.randn(n, k, device=dev, generator=g) / k**0.5
    low = torch.randn(n, 64, device=dev, generator=g) @ torch.randn(64, k, device=dev, generator=g) / (64 * k) ** 0.5
    W = (W + 2 * low).bfloat16()
    mix = torch.randn(k, k, device=dev, generator=g) / k**0.5
    X = torch.randn(8192, k, device=dev, generator=g) @ mix
    X[:, : k // 100] *= 20
    return W, LayerStats(X.T @ X, X.abs().amax(0), X.shape[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", nargs="+", default=["fp8", "nvfp4"])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--refit", type=int, default=None,
                    help="refit rounds (default: the format's, formats.refits / refit_gain: FP8 2, FP4 until < 1%%)")
    ap.add_argument("--out")
    ap.add_argument("--torch-loop", action="store_true", help="also time the torch GPTQ loop (slow)")
    a = ap.parse_args()
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    refits = a.refit if a.refit is not None else "by format (FP8 2, FP4 until one gains < 1%)"
    lines = [f"# LiteFFN compression time, {torch.cuda.get_device_name()}, {datetime.date.today()}, "
             f"torch {torch.__version__}, rank {a.rank}, refit {refits}", "",
             "| layer | format | whitening: eigh | whitening: Cholesky (used) | SVD (Gram eigh) | GPTQ residual "
             "(Triton / torch loop) | compress_linear total | x48 | R-weighted error | refits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    totals = {f: 0.0 for f in a.formats}
    make(256, 256, dev)
    compress_linear(torch.randn(256, 256, device=dev), None, make(256, 256, dev)[1], 16, "nvfp4", device=dev)  # warm-up
    for label, n, k, count in SHAPES:
        W, st = make(n, k, dev)
        _, t_eig = timed(lambda: Whitening(st.covariance(), method="eigh"))
        wh, t_chol = timed(lambda: Whitening(st.covariance(), method="cholesky"))
        (A, B, _), t_svd = timed(lambda: lowrank_factors(W.float(), wh, RankPolicy(rank=a.rank)))
        E = W.float() - A @ B
        Hinv = wh.inverse()
        for fmt in a.formats:
            _, t_gptq = timed(lambda: quantize_residual(E, fmt, Hinv, backend="auto"))
            t_loop = float("nan")
            if a.torch_loop:
                _, t_loop = timed(lambda: quantize_residual(E, fmt, Hinv, backend="torch"))
            layer, t_all = timed(lambda: compress_linear(W, None, st, a.rank, fmt, device=dev, refit=a.refit))
            totals[fmt] += t_all * count
            lines.append(f"| {label} | {fmt} | {t_eig:.2f} s | {t_chol:.2f} s | {t_svd:.2f} s | {t_gptq:.2f} s / {t_loop:.2f} s "
                         f"| {t_all:.2f} s | {t_all * count:.0f} s | {100 * layer.info['rel_err']:.2f}% "
                         f"| {layer.info['refit']} |")
            print(lines[-1], flush=True)
        del W, st, wh, E, Hinv
        torch.cuda.empty_cache()
    lines.append("")
    for fmt, t in totals.items():
        lines.append(f"Projected for all 192 FFN linears of LTX-2 19B, {fmt}: {t:.0f} s ({t / 60:.1f} min; goal < 5 min)")
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
