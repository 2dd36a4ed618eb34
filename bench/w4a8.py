"""W4A8 (FP4 residual converted in registers, FP8 tensor cores) against the FP8 path and bf16
at LTX-2 shapes, on the device GPU; issue 6's first measurement.

    python bench/w4a8.py [--out bench/w4a8_h100.md]

Per linear at rank 64, from an input already quantized to FP8 (the GEMM alone; quantizing the
input is the same launch for every residual format): bf16 F.linear, our FP8 GEMM, W4A8 with
MXFP4 and NVFP4 residuals. Times: median device time of CUDA-graph replays, weights rotating
over copies that exceed the L2 cache; autotuned like the FP8 path. Errors: each kernel against
the fp32 reference of the same stored tensors (first 2048 rows), and for W4A8 also against the
exact FP4 weights (NVFP4's fold rounds once more)."""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401
from ffn_kernels import CHECK_ROWS, Rot, act, copies_for, rel, us  # noqa: E402

from liteffn.calibration.synthetic import random_fp4_layer, random_fp8_layer  # noqa: E402
from liteffn.kernels import formats as F  # noqa: E402
from liteffn.kernels import fp8_ffn as K  # noqa: E402
from liteffn.kernels import wfp4  # noqa: E402

SHAPES = [((4096, 16384), (6144, 24576)), ((16384, 4096), (6144,)), ((2048, 8192), (126, 5600)),
          ((8192, 2048), (126, 5600))]
RANK = 64


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = torch.cuda.get_device_name()
    lines = [f"# W4A8 vs FP8 vs bf16, per linear, rank {RANK}", "",
             f"{dev}, torch {torch.__version__}, {datetime.date.today()}; us (ratio = bf16 time / this time)", "",
             "| shape | M | bf16 | FP8 | W4A8 MXFP4 | W4A8 NVFP4 | MX vs FP8 | NV vs FP8 | weight MiB FP8 / FP4 | "
             "err FP8 | err MX | err NV | NV fold vs exact FP4 |", "|---" * 13 + "|"]
    for (k, n), ms in SHAPES:
        c = copies_for(n, k)
        W = Rot([(torch.randn(n, k, device="cuda") / k**0.5).bfloat16() for _ in range(c)])
        b = (torch.randn(n, device="cuda") / 8).bfloat16()
        l8 = Rot([random_fp8_layer(n, k, RANK, seed=i, device="cuda") for i in range(c)])
        l4 = {f: Rot([random_fp4_layer(f, n, k, RANK, seed=i, device="cuda") for i in range(c)])
              for f in ("mxfp4", "nvfp4")}
        w4 = {f: Rot([wfp4.prepare(f, t) for t in l4[f].items]) for f in l4}
        mib8 = F.stored_bytes({k_: v for k_, v in l8.items[0].items() if k_.startswith("q")}) / 2**20
        mib4 = F.stored_bytes({k_: v for k_, v in l4["mxfp4"].items[0].items() if k_.startswith("q")}) / 2**20
        for m in ms:
            x = act(m, k)
            t_bf = us(lambda: Fn.linear(x, W(), b))
            t0 = l8.items[0]
            xq, sx, u = K.act_quant_lowrank(x, t0["B"])
            t_8 = us(lambda: (lambda t: K.scaled_gemm(xq, sx, t["q"], t["q_scale"], u=u, A=t["A"], bias=t["bias"]))(l8()))
            t_4 = {}
            for f in l4:
                t_4[f] = us(lambda f=f: (lambda t, w: K.scaled_gemm(xq, sx, None, None, u=u, A=t["A"], bias=t["bias"],
                                                                     w4=w))(l4[f].items[0], w4[f]()))
            xs = x[:CHECK_ROWS]
            xq_s, sx_s, u_s = K.act_quant_lowrank(xs, t0["B"])
            xf = xq_s.float() * sx_s[:, None]

            def ref(wd, t):
                return Fn.linear(xf, wd) + Fn.linear(Fn.linear(xs.float(), t["B"].float()), t["A"].float()) \
                    + t["bias"].float()

            e8 = rel(K.scaled_gemm(xq_s, sx_s, t0["q"], t0["q_scale"], u=u_s, A=t0["A"], bias=t0["bias"]),
                     ref(t0["q"].float() * t0["q_scale"][:, None], t0))
            e4, fold = {}, None
            for f in l4:
                t, w = l4[f].items[0], w4[f].items[0]
                _, _, u4 = K.act_quant_lowrank(xs, t["B"])
                y = K.scaled_gemm(xq_s, sx_s, None, None, u=u4, A=t["A"], bias=t["bias"], w4=w)
                e4[f] = rel(y, ref(wfp4.dequant(w), t))
                if f == "nvfp4":
                    fold = rel(ref(wfp4.dequant(w), t), ref(F.decode(f, t), t))
            g = lambda t: f"{t:.1f} ({t_bf / t:.2f}x)"  # noqa: E731
            lines.append(f"| {k}->{n} | {m} | {t_bf:.1f} | {g(t_8)} | {g(t_4['mxfp4'])} | {g(t_4['nvfp4'])} | "
                         f"{t_8 / t_4['mxfp4']:.2f}x | {t_8 / t_4['nvfp4']:.2f}x | {mib8:.1f} / {mib4:.1f} | "
                         f"{e8:.1e} | {e4['mxfp4']:.1e} | {e4['nvfp4']:.1e} | {fold:.1e} |")
            print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
