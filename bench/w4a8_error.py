"""Output error of FP4 against FP8 residuals at ranks 0/32/64/256 on calibrated synthetic layers
(issue 6): how much of FP4's extra error the low-rank branch buys back. CPU is enough.

    python bench/w4a8_error.py [--out bench/w4a8_error.md]

Per linear at the audio FFN's real shapes (2048->8192, 8192->2048; the video FFN's 4x ratio),
synthetic weights with a decaying spectrum and correlated synthetic activations
(calibration/synthetic.py), compressed with calibration statistics from 4096 tokens
(W R^(1/2) -> SVD -> rank r, residual quantized), error = ||y' - y|| / ||y|| on 2048 held-out
tokens against the dense layer, activations quantized to FP8 per token as the kernels do.
"W4A8 NVFP4" is what the kernel multiplies (its E4M3 fold of NVFP4, w4a8.py); MXFP4's fold is
exact, so its kernel error is the MXFP4 column."""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401
from _common import emit  # noqa: E402

from liteffn.calibration.compress import compress_linear  # noqa: E402
from liteffn.calibration.stats import LayerStats  # noqa: E402
from liteffn.calibration.synthetic import SyntheticActivations, synthetic_weight  # noqa: E402
from liteffn.kernels import w4a8  # noqa: E402
from liteffn.kernels.reference import compressed_linear_ref  # noqa: E402

SHAPES = [(8192, 2048), (2048, 8192)]  # (out, in): up- and down-projection of the audio FFN
RANKS = (0, 32, 64, 256)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.manual_seed(0)
    lines = ["# FP4 vs FP8 residual: output error against the dense layer", "",
             f"{datetime.date.today()}, torch {torch.__version__}, CPU; relative output error (FP4 / FP8 in brackets)",
             "", "| layer (in->out) | rank | FP8 | MXFP4 | NVFP4 | W4A8 NVFP4 (kernel's weights) | FP4 extra error "
             "over FP8, MX / NV |", "|---" * 7 + "|"]
    for n, k in SHAPES:
        t0 = time.time()
        W = synthetic_weight(n, k, seed=n + k)
        acts = SyntheticActivations(k, structure_seed=k)
        X, Xh = acts.sample(4096, 0), acts.sample(2048, 1)
        st = LayerStats(X.T @ X, X.abs().amax(0), X.shape[0])
        Y = Xh @ W.T
        err = lambda fmt, t: float((compressed_linear_ref(Xh, fmt, t) - Y).norm() / Y.norm())  # noqa: E731
        for r in RANKS:
            e = {f: err(f, compress_linear(W, None, st, r, f).tensors) for f in ("fp8", "mxfp4", "nvfp4")}
            t_nv = compress_linear(W, None, st, r, "nvfp4").tensors
            e["w4nv"] = err("nvfp4", dict(w4a8.prepare("nvfp4", t_nv), q_scale2=None))
            lines.append(f"| {k}->{n} | {r} | {e['fp8']:.2e} | {e['mxfp4']:.2e} ({e['mxfp4'] / e['fp8']:.2f}x) | "
                         f"{e['nvfp4']:.2e} ({e['nvfp4'] / e['fp8']:.2f}x) | {e['w4nv']:.2e} "
                         f"({e['w4nv'] / e['fp8']:.2f}x) | {e['mxfp4'] - e['fp8']:.1e} / {e['nvfp4'] - e['fp8']:.1e} |")
            print(lines[-1], flush=True)
        print(f"({k}->{n}: {time.time() - t0:.0f} s)", flush=True)
    emit(lines, a.out)


if __name__ == "__main__":
    main()
