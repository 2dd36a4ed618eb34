"""Where FP8 activation quantization loses, and what would win it back (issue 20, item 1), on the CPU.

    python bench/act_quant_error.py [--out bench/act_quant_error_cpu.md]

On the test suite's synthetic layers (tests/test_compress.py: decaying weight spectra, correlated activation
channels with log-normal scales, a mean and 1% outlier channels at 20x; held-out rows), the relative output
error of y = W x with x quantized to FP8 E4M3:
  per-token scale (what the kernels do), SmoothQuant's per-channel migration (x / s, W s; s = amax_x^a /
  amax_w^(1-a)), a blockwise Hadamard rotation of the input space, and per-token scales per block of K
  (1 x b: DeepSeek-V3's fine-grained scaling; b = 512 is the GEMM's promotion interval, where a scale would
  cost one multiply per promotion).
Then the whole compressed layer (calibrated, FP8 residual, r = 0 and 64: the low-rank branch reads x in bf16,
so only the residual sees the activation error) with per-token and 1 x 128 block scales.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401
from _common import emit  # noqa: E402

from liteffn.calibration.compress import compress_linear  # noqa: E402
from liteffn.calibration.stats import LayerStats  # noqa: E402
from liteffn.calibration.synthetic import SyntheticActivations, synthetic_weight  # noqa: E402
from liteffn.kernels import formats as F  # noqa: E402
from liteffn.kernels import reference as R  # noqa: E402

SHAPES = [(1024, 256), (256, 1024), (4096, 1024)]  # (N, K)


def block_fq(x: torch.Tensor, b: int = 128) -> torch.Tensor:
    """E4M3 with one scale per block of b values of a token: the kernels' per-token quantization
    (formats.fake_quant_act_fp8, which scales its last dimension) on x seen as [tokens, K / b, b]."""
    m, k = x.shape
    b = min(b, k)
    return F.fake_quant_act_fp8(x.float().view(m, k // b, b)).view(m, k)


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    cols = ["per token", "smooth a=0.25", "smooth a=0.5", "Hadamard 128", "1x512", "1x256", "1x128", "1x64"]
    lines = [f"# FP8 activation quantization error, CPU, {datetime.date.today()}, torch {torch.__version__}", "",
             "Command: `python bench/act_quant_error.py`. Relative output error ||y' - y|| / ||y|| on 2048 held-out rows.",
             "", "## x quantized, W exact", "", "| layer N<-K | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    layers = {}
    for n, k in SHAPES:
        W = synthetic_weight(n, k, seed=n + k)
        acts = SyntheticActivations(k, structure_seed=k)
        X, Xh = acts.sample(4096, 0), acts.sample(2048, 1)
        layers[(n, k)] = (W, X, Xh)
        Y = Xh @ W.T
        e = lambda yq: float((yq - Y).norm() / Y.norm())  # noqa: E731
        ax, aw = X.abs().amax(0), W.abs().amax(0)
        row = [e(F.fake_quant_act_fp8(Xh) @ W.T)]
        for al in (0.25, 0.5):
            s = (ax ** al / aw ** (1 - al)).clamp_min(1e-5)
            row.append(e(F.fake_quant_act_fp8(Xh / s) @ (W * s).T))
        hb = torch.block_diag(*[hadamard(128)] * (k // 128))
        row.append(e(F.fake_quant_act_fp8(Xh @ hb) @ (W @ hb).T))
        row += [e(block_fq(Xh, b) @ W.T) for b in (512, 256, 128, 64)]
        lines.append(f"| {n}<-{k} | " + " | ".join(f"{100 * v:.2f}%" for v in row) + " |")
        print(lines[-1], flush=True)
    lines += ["", "## The compressed layer (calibrated, FP8 residual): per-token against 1x128 scales", "",
              "| layer N<-K | rank | per token | 1x128 | ratio |", "|---|---|---|---|---|"]
    for (n, k), (W, X, Xh) in layers.items():
        st = LayerStats(X.T @ X, X.abs().amax(0), X.shape[0])
        Y = Xh @ W.T
        for r in (0, 64):
            t = compress_linear(W, None, st, r, "fp8", compare_plain=False).tensors
            y_tok = R.compressed_linear_ref(Xh, "fp8", t)
            # the same layer with 1x128 activation scales: the residual on block-quantized x, the low rank on x
            wres = R.dequant_weight("fp8", t, torch.float32)
            y_lr = (Xh @ t["B"].float().T) @ t["A"].float().T if r else 0.0
            y_blk = block_fq(Xh, 128) @ wres.T + y_lr
            same = F.fake_quant_act_fp8(Xh) @ wres.T + y_lr  # the reference's function, written out as above
            assert float((same - y_tok).norm() / y_tok.norm()) < 1e-5, "the written-out layer is not the reference's"
            et, eb = float((y_tok - Y).norm() / Y.norm()), float((y_blk - Y).norm() / Y.norm())
            lines.append(f"| {n}<-{k} | {r} | {100 * et:.2f}% | {100 * eb:.2f}% | {eb / et:.2f} |")
            print(lines[-1], flush=True)
    emit(lines, a.out)


if __name__ == "__main__":
    main()
