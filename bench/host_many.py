"""Host time of one compressed call at many tokens (video shapes, M=6144), where the GPU is busy for
hundreds of microseconds per call and the host cost per call decides whether a step is host-bound:
each call timed alone (synchronize, then the wall time of the Python call, its kernels only queued),
medians over 30 calls; then cProfile's top entries over 100 such calls of the compressed linear.

    python bench/host_many.py [--out DIR] [--m 6144]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401
from _common import logger  # noqa: E402

from liteffn.calibration.synthetic import random_fp8_layer  # noqa: E402
from liteffn.kernels import fp8_ffn, fp8_ws, fused  # noqa: E402
from liteffn.kernels import modules as Mo  # noqa: E402
from liteffn.kernels.gemm import gemm_operands  # noqa: E402


def alone(fn, n=30):
    for _ in range(5):
        fn()
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return sorted(ts)[n // 2]


def batch(fn, n=30):
    """Host us per call over n back-to-back calls (no synchronization: the GPU queue absorbs the work)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return t


def pieces(say, xq, upt, out, sx, ops_):
    """fp8_ws.launch taken apart: its descriptors, Triton's expansion of them into TMA maps, the compiled
    kernel's launch."""
    from triton.backends.nvidia import driver as D
    W = fp8_ws
    launch = lambda: W.launch(xq, upt["q"], out, sx, upt["q_scale"], ops_[1], ops_[2][:5], ops_[3], 512)  # noqa: E731
    W._LAUNCHES.entries.clear()  # so that the one entry is this launch's
    launch()
    e = next(iter(W._LAUNCHES.entries.values()))
    meta = e.compiled.metadata.tensordesc_meta
    M, N = xq.shape[0], upt["q"].shape[0]
    ph = W._placeholder(xq.device)
    u, la = ops_[1][0], ops_[1][1]
    mk = lambda: (W._desc(xq, (64, 128)), W._desc(upt["q"], (128, 128)), W._desc(out, (64, 128)),  # noqa: E731
                  W._desc(la, (128, 64)), W._desc(u, (64, 64)), ph)
    descs = mk()
    rest = (sx, upt["q_scale"], *ops_[1], *ops_[2][:5])
    grid = (min(W.G.cdiv(M, 192) * W.G.cdiv(N, 128), 132),)
    say(f"pieces (host us per call, {len(descs)} descriptors):")
    say(f"  fp8_ws.launch                {batch(launch):8.1f}")
    say(f"  _desc x 5 + placeholder      {batch(mk):8.1f}")
    expand = lambda: [D.make_tensordesc_arg(d, m) for d, m in zip(descs, meta)]  # noqa: E731
    say(f"  make_tensordesc_arg x 6      {batch(expand):8.1f}")
    say(f"  compiled launch (fast path)  {batch(lambda: e((grid[0],), descs + rest)):8.1f}")
    say(f"  spec_key(rest)               {batch(lambda: fp8_ws.G.spec_key(rest)):8.1f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--m", type=int, default=6144)
    a = ap.parse_args()
    say = logger(a.out, "host_many.log")
    say(f"# {torch.cuda.get_device_name()} {time.strftime('%Y-%m-%d %H:%M')}, M={a.m}, host us per call (median)")
    dim, hid = 4096, 16384
    up = random_fp8_layer(hid, dim, 64, seed=1, device="cuda")
    dn = random_fp8_layer(dim, hid, 64, seed=2, device="cuda")
    dn["input_amax"] = torch.tensor([8.0], device="cuda")
    ffn = Mo.CompressedFFN(Mo.CompressedLinear("fp8", dim, hid, up), Mo.CompressedLinear("fp8", hid, dim, dn))
    lin = Mo.CompressedLinear("fp8", dim, hid, dict(up))
    x = torch.randn(1, a.m, dim, device="cuda").bfloat16()
    x2 = x.reshape(-1, dim)
    W1 = (torch.randn(hid, dim, device="cuda") / dim**0.5).bfloat16()
    upt = ffn.up.tensors()
    xq, sx, u = fp8_ffn.act_quant_lowrank(x2, upt["B"])
    out = torch.empty(a.m, hid, device="cuda", dtype=torch.bfloat16)
    ops_ = gemm_operands(xq, sx, hid, u, upt["A"], upt["bias"], False, None, None, None, out, torch.bfloat16)
    cases = {
        "dense F.linear": lambda: Fn.linear(x, W1, up["bias"]),
        "dense FFN": lambda: Fn.linear(Fn.gelu(Fn.linear(x, W1, up["bias"]), approximate="tanh"), W1.T, None),
        "CompressedLinear.forward": lambda: lin(x),
        "CompressedFFN.forward": lambda: ffn(x),
        "fused.linear": lambda: fused.linear(x2, upt),
        "act_quant_lowrank": lambda: fp8_ffn.act_quant_lowrank(x2, upt["B"]),
        "scaled_gemm": lambda: fp8_ffn.scaled_gemm(xq, sx, upt["q"], upt["q_scale"], u=u, A=upt["A"],
                                                   bias=upt["bias"]),
        "gemm_operands": lambda: gemm_operands(xq, sx, hid, u, upt["A"], upt["bias"], False, None, None, None,
                                               out, torch.bfloat16),
        "fp8_ws.launch": lambda: fp8_ws.launch(xq, upt["q"], out, sx, upt["q_scale"], ops_[1], ops_[2][:5],
                                               ops_[3], 512),
        "one TensorDescriptor": lambda: fp8_ws._desc(xq, (64, 128)),
        "torch.empty": lambda: torch.empty(a.m, hid, device="cuda", dtype=torch.bfloat16),
    }
    for name, fn in cases.items():
        try:
            say(f"{name:28s} {alone(fn):8.1f}")
        except Exception as ex:  # noqa: BLE001
            say(f"{name:28s} FAILED {type(ex).__name__}: {str(ex)[:200]}")
    pieces(say, xq, upt, out, sx, ops_)
    pr = cProfile.Profile()
    for _ in range(100):
        torch.cuda.synchronize()
        pr.enable()
        lin(x)
        pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    say("## cProfile, 100 CompressedLinear.forward calls, by internal time\n" + s.getvalue()[:6000])


if __name__ == "__main__":
    main()
