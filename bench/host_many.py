"""Host time of one compressed call at many tokens (video shapes, M=6144), where the GPU is busy for
hundreds of microseconds per call and the host cost per call decides whether a step is host-bound:
each call timed alone (synchronize, then the wall time of the Python call, its kernels only queued),
medians over 30 calls: the compressed calls and their pieces with the raw launch (gemm._Raw) and
through the compiled kernels' runners, the module-level steps of a call, then cProfile's top entries
over 100 such calls of the compressed FFN.

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


def pieces(say, xq, upt, out, sx, ops_):
    """fp8_ws.launch taken apart: its plan, the cached launch entry with the raw C launch (TMA maps kept)
    and through the compiled kernel's runner (descriptor objects, Triton's expansion into TMA maps)."""
    W, G = fp8_ws, fp8_ws.G
    launch = lambda: W.launch(xq, upt["q"], out, sx, upt["q_scale"], ops_[1], ops_[2][:5], ops_[3], 512)  # noqa: E731
    W._LAUNCHES.entries.clear()  # so that the one entry is this launch's
    launch()
    e = next(iter(W._LAUNCHES.entries.values()))
    M, N = xq.shape[0], upt["q"].shape[0]
    ph = W._placeholder(xq.device)
    u, la = ops_[1][0], ops_[1][1]
    tensors = (xq, upt["q"], out, la, u, ph, ph)
    rest = (sx, upt["q_scale"], *ops_[1], *ops_[2][:5])
    grid = (min(G.cdiv(M, 192) * G.cdiv(N, 128), 132),)
    say(f"pieces of fp8_ws.launch (host us per call, alone; raw launch available: {e.raw is not None}):")
    for raw in (True, False):
        G.RAW_LAUNCH = raw
        say(f"  fp8_ws.launch, raw {raw!s:5s}          {alone(launch):8.1f}")
        say(f"  cached entry call, raw {raw!s:5s}      {alone(lambda: e(grid, tensors + rest)):8.1f}")
    G.RAW_LAUNCH = True
    if e.raw is not None:
        r = e.raw
        maps = lambda: [r.map_of(k, t.data_ptr(), t.shape, t.stride()) for k, t in zip(r.kinds, tensors)]  # noqa: E731
        say(f"  raw: TMA map lookup x 7          {alone(maps):8.1f}")
        flat = []
        for k, a in zip(r.kinds, tensors + rest):
            flat.extend([a.data_ptr()] if k == 0 else [a] if k == 1 else r.map_of(k, a.data_ptr(), a.shape, a.stride()))
        stream = G._raw_stream(xq.device.index)
        say(f"  raw: the C launcher alone        {alone(lambda: r.launch_flat(grid, flat, stream)):8.1f}")
    args = (M, N, xq.shape[1], u.shape[1], 0, tuple(ops_[3].get(k, False) for k in W.FLAG_NAMES), u.dtype, out.dtype,
            512, 132, W._knobs())
    say(f"  _plan (cached)                   {alone(lambda: W._plan(*args)):8.1f}")
    say(f"  spec_key(rest)                   {alone(lambda: G.spec_key(rest)):8.1f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--m", type=int, default=6144)
    a = ap.parse_args()
    say = logger(a.out, "host_many.log")
    from liteffn.kernels import dispatch, gemm, graphs
    say(f"# {torch.cuda.get_device_name()} {time.strftime('%Y-%m-%d %H:%M')}, M={a.m}, host us per call (median "
        f"of calls timed alone), raw launch {gemm._RAW_OK}")
    dim, hid = 4096, 16384
    up = random_fp8_layer(hid, dim, 64, seed=1, device="cuda")
    dn = random_fp8_layer(dim, hid, 64, seed=2, device="cuda")
    dn["input_amax"] = torch.tensor([8.0], device="cuda")
    ffn = Mo.CompressedFFN(Mo.CompressedLinear("fp8", dim, hid, up), Mo.CompressedLinear("fp8", hid, dim, dn))
    lin = Mo.CompressedLinear("fp8", dim, hid, dict(up))
    x = torch.randn(1, a.m, dim, device="cuda").bfloat16()
    x2 = x.reshape(-1, dim)
    W1 = (torch.randn(hid, dim, device="cuda") / dim**0.5).bfloat16()
    upt, dnt, hs = ffn.up.tensors(), ffn.down.tensors(), ffn.h_scale
    xq, sx, u = fp8_ffn.act_quant_lowrank(x2, upt["B"])
    out = torch.empty(a.m, hid, device="cuda", dtype=torch.bfloat16)
    u2 = torch.empty(a.m, 64, device="cuda")
    ops_ = gemm_operands(xq, sx, hid, u, upt["A"], upt["bias"], False, None, None, None, out, torch.bfloat16)
    up_ffn = lambda: fp8_ffn.scaled_gemm(xq, sx, upt["q"], upt["q_scale"], u=u, A=upt["A"], bias=upt["bias"],  # noqa: E731
                                         gelu=True, h_scale=hs, next_B=dnt["B"], u_next=u2)
    key_ops = (*ffn.up._operands(), *ffn.down._operands(), ffn.down._parameters["input_scale"])
    from liteffn.kernels.programs import PROGRAMS

    def no_program(fn):
        def call():
            PROGRAMS.enabled = False
            try:
                return fn()
            finally:
                PROGRAMS.enabled = None
        return call

    cases = {
        "dense F.linear": lambda: Fn.linear(x, W1, up["bias"]),
        "dense FFN": lambda: Fn.linear(Fn.gelu(Fn.linear(x, W1, up["bias"]), approximate="tanh"), W1.T, None),
        "CompressedLinear.forward": lambda: lin(x),
        "CompressedFFN.forward": lambda: ffn(x),
        "CompressedLinear.forward, no program": no_program(lambda: lin(x)),
        "CompressedFFN.forward, no program": no_program(lambda: ffn(x)),
        "fused.linear": lambda: fused.linear(x2, upt),
        "fused.ffn": lambda: fused.ffn(x2, upt, dnt, hs),
        "act_quant_lowrank": lambda: fp8_ffn.act_quant_lowrank(x2, upt["B"]),
        "act_quant_lowrank, zeroing u2": lambda: fp8_ffn.act_quant_lowrank(x2, upt["B"], zero=u2),
        "scaled_gemm": lambda: fp8_ffn.scaled_gemm(xq, sx, upt["q"], upt["q_scale"], u=u, A=upt["A"],
                                                   bias=upt["bias"]),
        "scaled_gemm, FFN up": up_ffn,
    }
    # module-level pieces (no launches)
    parts = {
        "gemm_operands": lambda: gemm_operands(xq, sx, hid, u, upt["A"], upt["bias"], False, None, None, None,
                                               out, torch.bfloat16),
        "graphs key (operands tuple + key)": lambda: graphs.GRAPHS.key(x, (*ffn.up._operands(), *ffn.down._operands(),
                                                                          ffn.down._parameters["input_scale"])),
        "graphs key alone": lambda: graphs.GRAPHS.key(x, key_ops),
        "tensors() x 2 + scale": lambda: (ffn.up.tensors(x.device), ffn.down.tensors(x.device),
                                          ffn.down.scale_on(x.device)),
        "dispatch.choose": lambda: dispatch.choose(x, [ffn.up.kernel_layer(upt), ffn.down.kernel_layer(dnt)]),
        "reshape + contiguous": lambda: x.reshape(-1, dim).contiguous(),
        "torch.empty": lambda: torch.empty(a.m, hid, device="cuda", dtype=torch.bfloat16),
        "torch.zeros (small)": lambda: torch.zeros(a.m * 65, device="cuda"),
        "a view": lambda: u2[:10].view(-1),
        "one TensorDescriptor": lambda: fp8_ws._desc(xq, (64, 128)),
    }
    graphs.GRAPHS.enabled = False  # (never at these M anyway)
    for raw in (True, False):
        gemm.RAW_LAUNCH = raw
        for name, fn in cases.items():
            try:
                say(f"{name + (', raw' if raw else ', runner'):36s} {alone(fn):8.1f}")
            except Exception as ex:  # noqa: BLE001
                say(f"{name:36s} FAILED {type(ex).__name__}: {str(ex)[:200]}")
    gemm.RAW_LAUNCH = True
    for name, fn in parts.items():
        say(f"{name:36s} {alone(fn):8.1f}")
    pieces(say, xq, upt, out, sx, ops_)
    for _ in range(3):
        ffn(x)
    prog = next((p for p in PROGRAMS.states.get(ffn, {}).values() if not isinstance(p, int)), None)
    if prog is not None:
        say(f"FFN program: {len(prog.launches)} launches, workspace {prog.ws / 2**20:.1f} MiB, zeroed {prog.zs} B")
        say(f"  Program.run                      {alone(lambda: prog.run(x2)):8.1f}")
        say(f"  PROGRAMS.key                     {alone(lambda: PROGRAMS.key(x, key_ops)):8.1f}")
    # interleaved: the host's speed drifts by tens of percent between minutes (the rows above were timed
    # one case after another); alternating the calls compares them at the same speed
    inter = {"dense FFN": cases["dense FFN"], "CompressedFFN.forward": cases["CompressedFFN.forward"],
             "CompressedFFN.forward, no program": cases["CompressedFFN.forward, no program"],
             "dense F.linear": cases["dense F.linear"], "CompressedLinear.forward": cases["CompressedLinear.forward"]}
    ts = {k: [] for k in inter}
    for _ in range(200):
        for k, fn in inter.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            ts[k].append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    med = {k: sorted(v)[len(v) // 2] for k, v in ts.items()}
    say("interleaved, 200 rounds (median us; ratio to the dense call it replaces):")
    for k, v in med.items():
        ref = med["dense F.linear" if k in ("dense F.linear", "CompressedLinear.forward") else "dense FFN"]
        say(f"  {k:36s} {v:8.1f}  {v / ref:5.2f}x")
    pr = cProfile.Profile()
    for _ in range(100):
        torch.cuda.synchronize()
        pr.enable()
        ffn(x)
        pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    say("## cProfile, 100 CompressedFFN.forward calls, by internal time\n" + s.getvalue()[:6000])
    say(f"programs: {dict(PROGRAMS.stats)} disabled: {PROGRAMS.disabled}")


if __name__ == "__main__":
    main()
