"""Host time per call of the compressed layers against the dense ones, on the device GPU.

    python bench/host_overhead.py [--out DIR] [--m 126] [--dim 2048] [--calls 300] [--parts host,rotation,rank,profile,device]
                                  [--copies 7] [--dry-run (with --parts rank)]

host: wall microseconds per call over --calls calls with no synchronization inside the loop
(what a sampling loop pays in Python and launches), at M tokens of the audio FFN
(2048 -> 8192 -> 2048, r=64): the dense bf16 FFN (F.linear, GELU tanh, F.linear), CompressedFFN.forward
(FP8, calibrated input_amax: the three-launch fused path), the same with an MXFP4 residual (W4A8),
CompressedLinear.forward, and pieces of the compressed call (fused.ffn, the custom op, one GEMM,
act_quant_lowrank); compressed calls once with cached compiled kernels (gemm.py's fast launch) and
once through Triton's normal launch path, both with the modules' CUDA graphs off; the module calls
once more as ComfyUI runs them, with CUDA graphs (kernels/graphs.py: eager once, captured on the
second call, replayed from then on; the warm-up calls cover both). Also the device time per
call (CUDA events over the same loop after a sync: if it is near the host time, the loop was
GPU-bound and the host time is not the launch overhead). Goal: CompressedFFN.forward within 1.5x the dense FFN's host time.
rotation: the dense FFN and CompressedFFN.forward (FP8; CUDA graphs on, then off: launch programs) with
their weights rotating over 1 and over --copies copies, one module per call, as bench/ffn_kernels.py's python
mode times them (there the weights come from HBM on every call; here also with one copy, from L2).
rank: where the rank-64 branch's device time goes at M tokens (CUDA graphs, as the module replays it): the
fused FFN at r=0 and r=64, then each launch of it at r=0 and with its low-rank part (the input pass with x B^T
and u2 zeroed; the up-projection with u A^T, then with the next linear's low-rank input too; the
down-projection with u2 A2^T). --dry-run: small shapes on the CPU under Triton's interpreter, wall clock.
profile: cProfile's top 20 (internal time) over 200 compressed FFN calls, without and with CUDA graphs.
device: device time (CUDA graphs) of act_quant_lowrank's one-launch few-row variant per rows per
program against the two-launch one, and of the FP8 up-projection GEMM (GELU, FP8 out, next low rank)
per fixed config at M=6144, to check the defaults.

Writes host_overhead.md and host_overhead.json under --out. A case that fails prints its error
and the rest still run.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
import traceback

import torch
import torch.nn.functional as Fn

if "--dry-run" in sys.argv:  # before the kernels are imported: they read it then
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401

from liteffn.calibration.synthetic import random_fp4_layer, random_fp8_layer  # noqa: E402
from liteffn.kernels import fp8_ffn, fused, gemm, graphs, ops  # noqa: E402
from liteffn.kernels import modules as Mo  # noqa: E402

DIM, HID, RANK = 2048, 8192, 64
OUT: dict = {"host": {}, "errors": {}, "device": {}}


def say(*a):
    print(*a, flush=True)


def host_us(fn, calls):
    """(host us per call, device us per call, with-sync us per call)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    e0.record()
    for _ in range(calls):
        fn()
    t_host = (time.perf_counter() - t0) / calls * 1e6
    e1.record()
    torch.cuda.synchronize()
    t_all = (time.perf_counter() - t0) / calls * 1e6
    return t_host, e0.elapsed_time(e1) * 1e3 / calls, t_all


def modules(m):
    """(FP8 FFN module, MXFP4 FFN module, FP8 linear module, dense weights, x)."""
    up = random_fp8_layer(HID, DIM, RANK, seed=1, device="cuda")
    dn = random_fp8_layer(DIM, HID, RANK, seed=2, device="cuda")
    dn["input_amax"] = torch.tensor([8.0], device="cuda")  # calibrated: the three-launch path
    ffn8 = Mo.CompressedFFN(Mo.CompressedLinear("fp8", DIM, HID, up), Mo.CompressedLinear("fp8", HID, DIM, dn))
    ffn4 = None
    try:
        up4 = random_fp4_layer("mxfp4", HID, DIM, RANK, seed=1, device="cuda")
        dn4 = random_fp4_layer("mxfp4", DIM, HID, RANK, seed=2, device="cuda")
        dn4["input_amax"] = torch.tensor([8.0], device="cuda")
        ffn4 = Mo.CompressedFFN(Mo.CompressedLinear("mxfp4", DIM, HID, up4),
                                Mo.CompressedLinear("mxfp4", HID, DIM, dn4))
    except Exception:  # noqa: BLE001
        OUT["errors"]["mxfp4 modules"] = traceback.format_exc()[-1500:]
        say("MXFP4 modules failed:", OUT["errors"]["mxfp4 modules"])
    lin = Mo.CompressedLinear("fp8", DIM, HID, dict(up))
    W1 = (torch.randn(HID, DIM, device="cuda") / DIM**0.5).bfloat16()
    W2 = (torch.randn(DIM, HID, device="cuda") / HID**0.5).bfloat16()
    x = torch.randn(1, m, DIM, device="cuda").bfloat16()
    return ffn8, ffn4, lin, (W1, up["bias"], W2, dn["bias"]), x


def host(m, calls):
    say(f"\n## Host time per call, M={m} (audio FFN {DIM}->{HID}->{DIM}, r={RANK}), {calls} calls, no CUDA graph")
    ffn8, ffn4, lin, (W1, b1, W2, b2), x = modules(m)
    x2 = x.reshape(-1, DIM)
    up, dn = ffn8.up.tensors(), ffn8.down.tensors()
    hs = ffn8.h_scale
    xq, sx, u = fp8_ffn.act_quant_lowrank(x2, up["B"])
    cases = {
        "dense bf16 FFN": lambda: Fn.linear(Fn.gelu(Fn.linear(x, W1, b1), approximate="tanh"), W2, b2),
        "dense bf16 linear": lambda: Fn.linear(x, W1, b1),
        "CompressedFFN.forward (FP8)": lambda: ffn8(x),
        "CompressedFFN.forward (MXFP4)": (lambda: ffn4(x)) if ffn4 is not None else None,
        "CompressedLinear.forward (FP8)": lambda: lin(x),
        "fused.ffn (FP8)": lambda: fused.ffn(x2, up, dn, hs),
        "ops.fp8_ffn_op (custom op, FP8)": lambda: ops.fp8_ffn_op(x, up["q"], up["q_scale"], up["A"], up["B"],
                                                                   up["bias"], dn["q"], dn["q_scale"], dn["A"],
                                                                   dn["B"], dn["bias"], hs),
        "scaled_gemm (up, FP8)": lambda: fp8_ffn.scaled_gemm(xq, sx, up["q"], up["q_scale"], u=u, A=up["A"],
                                                             bias=up["bias"]),
        "act_quant_lowrank (one launch)": lambda: fp8_ffn.act_quant_lowrank(x2, up["B"]),
        "act_quant_lowrank (two launches)": lambda: fp8_ffn.act_quant_lowrank(x2, up["B"], single=False),
        "torch.empty": lambda: torch.empty(m, HID, device="cuda"),
    }
    fast0 = gemm._FAST_OK
    say(f"fast launch available: {fast0}, raw launch: {gemm._RAW_OK} (triton {gemm.triton.__version__})")
    G = graphs.GRAPHS
    rows = []
    for name, fn in cases.items():
        if fn is None:
            continue
        dense = name.startswith(("dense", "torch"))
        # (label suffix, fast launch, raw launch, CUDA graphs): the module calls also as ComfyUI runs them,
        # with graphs (few tokens)
        variants = [("", True, True, False)] if dense else [
            ("raw launch", True, True, False), ("fast launch", True, False, False), ("normal launch", False, False, False)]
        if name.endswith(".forward (FP8)") or name.endswith(".forward (MXFP4)"):
            variants.append(("CUDA graphs", True, True, True))
        for suffix, fast, raw, use_graphs in variants:
            label = f"{name}, {suffix}" if suffix else name
            gemm._FAST_OK = fast0 and fast
            gemm.RAW_LAUNCH = raw
            G.enabled = use_graphs
            try:
                s0, g0 = dict(gemm.LAUNCHES.stats), dict(G.stats)
                t_host, t_dev, t_all = host_us(fn, calls)
                n_fast = gemm.LAUNCHES.stats["fast"] - s0["fast"]
                n_norm = gemm.LAUNCHES.stats["normal"] - s0["normal"]
                n_graph = {k: v - g0.get(k, 0) for k, v in G.stats.items() if v != g0.get(k, 0)}
                OUT["host"][label] = dict(host_us=t_host, device_us=t_dev, with_sync_us=t_all,
                                          fast_launches=n_fast, normal_launches=n_norm, graphs=n_graph)
                rows.append(label)
                say(f"  {label:58s} host {t_host:7.1f} us  device {t_dev:7.1f} us  with sync {t_all:7.1f} us  "
                    f"(launches fast {n_fast}, normal {n_norm}; graphs {n_graph or '-'})")
            except Exception:  # noqa: BLE001
                OUT["errors"][label] = traceback.format_exc()[-1500:]
                say(f"  {label}: FAILED\n{OUT['errors'][label]}")
    gemm._FAST_OK = fast0
    gemm.RAW_LAUNCH = True
    G.enabled = None
    if G.disabled:
        OUT["errors"]["CUDA graphs"] = G.disabled
        say(f"CUDA graphs were turned off: {G.disabled}")
    ref = OUT["host"].get("dense bf16 FFN", {})
    lines = [f"## Host time per call, M={m}, audio FFN {DIM}->{HID}->{DIM}, r={RANK} ({torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}, triton {gemm.triton.__version__})", "",
             "| call | host us | vs dense FFN | device us | with sync us | launches fast / normal | graphs (calls) |",
             "|---|---|---|---|---|---|---|"]
    for label in rows:
        r = OUT["host"][label]
        ratio = f"{r['host_us'] / ref['host_us']:.2f}x" if ref else "-"
        g = ", ".join(f"{k} {v}" for k, v in sorted(r["graphs"].items())) or "-"
        lines.append(f"| {label} | {r['host_us']:.1f} | {ratio} | {r['device_us']:.1f} | {r['with_sync_us']:.1f} | "
                     f"{r['fast_launches']} / {r['normal_launches']} | {g} |")
    lines.append("")
    for label in ("CompressedFFN.forward (FP8), raw launch", "CompressedFFN.forward (FP8), fast launch",
                  "CompressedFFN.forward (FP8), CUDA graphs"):
        if ref and label in OUT["host"]:
            r = OUT["host"][label]
            lines.append(f"{label} / dense FFN: host **{r['host_us'] / ref['host_us']:.2f}x** (goal <= 1.5x), "
                         f"with sync {r['with_sync_us'] / ref['with_sync_us']:.2f}x (goal <= 1x)  ")
    return lines


def rotation(m, calls, copies):
    """Back-to-back calls with weights rotating over copies (bench/ffn_kernels.py's python mode)."""
    G = graphs.GRAPHS
    mods, dense = [], []
    for i in range(copies):
        up = random_fp8_layer(HID, DIM, RANK, seed=10 + 2 * i, device="cuda")
        dn = random_fp8_layer(DIM, HID, RANK, seed=11 + 2 * i, device="cuda")
        up["input_amax"] = torch.tensor([4.0], device="cuda")
        dn["input_amax"] = torch.tensor([8.0], device="cuda")
        mods.append(Mo.CompressedFFN(Mo.CompressedLinear("fp8", DIM, HID, up), Mo.CompressedLinear("fp8", HID, DIM, dn)))
        dense.append(((torch.randn(HID, DIM, device="cuda") / DIM**0.5).bfloat16(), up["bias"],
                      (torch.randn(DIM, HID, device="cuda") / HID**0.5).bfloat16(), dn["bias"]))
    x = torch.randn(1, m, DIM, device="cuda").bfloat16()
    lines = ["", f"## Rotation: weights over 1 and {copies} copies, M={m}, back-to-back calls (us per call)", "",
             "| call | copies | host us | device us | with sync us | graphs (calls) |", "|---|---|---|---|---|---|"]
    for n in (1, copies):
        it = {"i": 0}

        def nxt(seq):
            it["i"] = (it["i"] + 1) % n
            return seq[it["i"]]

        cases = [("dense bf16 FFN", None, lambda: (lambda W1, b1, W2, b2: Fn.linear(
                     Fn.gelu(Fn.linear(x, W1, b1), approximate="tanh"), W2, b2))(*nxt(dense))),
                 ("CompressedFFN.forward (FP8), CUDA graphs", True, lambda: nxt(mods)(x)),
                 ("CompressedFFN.forward (FP8), no graphs (programs)", False, lambda: nxt(mods)(x))]
        for label, use_graphs, fn in cases:
            G.enabled = use_graphs
            try:
                g0 = dict(G.stats)
                for _ in range(2 * n + 2):  # eager and capture calls of every copy before the timed ones
                    fn()
                t_host, t_dev, t_all = host_us(fn, calls)
                ng = {k: v - g0.get(k, 0) for k, v in G.stats.items() if v != g0.get(k, 0)}
                OUT.setdefault("rotation", {})[f"{label}, {n} copies"] = dict(
                    host_us=t_host, device_us=t_dev, with_sync_us=t_all, graphs=ng)
                g = ", ".join(f"{k} {v}" for k, v in sorted(ng.items())) or "-"
                lines.append(f"| {label} | {n} | {t_host:.1f} | {t_dev:.1f} | {t_all:.1f} | {g} |")
                say(f"  {label:52s} copies {n:2d}: host {t_host:7.1f}  device {t_dev:7.1f}  with sync {t_all:7.1f}  {g}")
            except Exception:  # noqa: BLE001
                OUT["errors"][f"rotation {label} {n}"] = traceback.format_exc()[-1500:]
                say(f"  {label} copies {n}: FAILED\n{OUT['errors'][f'rotation {label} {n}']}")
            finally:
                G.enabled = None
    return lines


def device_us(fn) -> float:
    """Median device time of CUDA-graph replays of fn, us."""
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=25, return_mode="median") * 1e3


def wall_us(fn) -> float:
    """One call's wall time after one warm-up, us (a CPU dry run: checks the script, measures nothing)."""
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def rank(m, calls, dim=DIM, dry=False):
    """Device time of the FFN's launches without and with their rank-64 parts (module docstring)."""
    hid, dev = 4 * dim, "cpu" if dry else "cuda"
    us = wall_us if dry else device_us

    lines = ["", f"## Rank-{RANK} branch at M={m}, FFN {dim}->{hid}->{dim}: device time per launch "
                 f"({'wall clock, CPU interpreter: checks the script only' if dry else 'CUDA graphs'}, us)", "",
             "| launch | without the part | with it | difference |", "|---|---|---|---|"]
    up = {r: random_fp8_layer(hid, dim, r, seed=1, device=dev) for r in (0, RANK)}
    dn = {r: random_fp8_layer(dim, hid, r, seed=2, device=dev) for r in (0, RANK)}
    hs = torch.tensor([2.0**-6], device=dev)
    x = torch.randn(m, dim, device=dev).bfloat16()
    u2 = torch.zeros(m, RANK, device=dev)
    xq, sx, u = fp8_ffn.act_quant_lowrank(x, up[RANK]["B"], single=False)
    hq = torch.randn(m, hid, device=dev).clamp(-400, 400).to(torch.float8_e4m3fn)
    up_kw = dict(bias=up[RANK]["bias"], gelu=True, h_scale=hs)
    cases = {  # each timed once
        "ffn r=0": lambda: fused.ffn(x, up[0], dn[0], hs, single=False),
        "ffn": lambda: fused.ffn(x, up[RANK], dn[RANK], hs, single=False),
        "input r=0": lambda: fp8_ffn.act_quant_lowrank(x, None, single=False),
        "input": lambda: fp8_ffn.act_quant_lowrank(x, up[RANK]["B"], zero=u2, single=False),
        "up r=0": lambda: fp8_ffn.scaled_gemm(xq, sx, up[0]["q"], up[0]["q_scale"], **up_kw),
        "up uA": lambda: fp8_ffn.scaled_gemm(xq, sx, up[RANK]["q"], up[RANK]["q_scale"], u=u, A=up[RANK]["A"],
                                             **up_kw),
        "up": lambda: fp8_ffn.scaled_gemm(xq, sx, up[RANK]["q"], up[RANK]["q_scale"], u=u, A=up[RANK]["A"],
                                          next_B=dn[RANK]["B"], u_next=u2.zero_(), **up_kw),
        "down r=0": lambda: fp8_ffn.scaled_gemm(hq, hs, dn[0]["q"], dn[0]["q_scale"], bias=dn[0]["bias"]),
        "down": lambda: fp8_ffn.scaled_gemm(hq, hs, dn[RANK]["q"], dn[RANK]["q_scale"], u=u2, A=dn[RANK]["A"],
                                            bias=dn[RANK]["bias"]),
    }
    times = {}
    for key, fn in cases.items():
        try:
            times[key] = us(fn)
        except Exception:  # noqa: BLE001
            OUT["errors"][f"rank {key}"] = traceback.format_exc()[-1500:]
            say(f"  {key}: FAILED\n{OUT['errors'][f'rank {key}']}")
    OUT["device"]["rank"] = times
    for name, k0, k1 in (("whole fused FFN, r=0 / r=64", "ffn r=0", "ffn"),
                         ("input pass (two launches): + x B^T, u2 zeroed", "input r=0", "input"),
                         ("up-projection (GELU, FP8 out): + u A^T", "up r=0", "up uA"),
                         ("up-projection: + the next low-rank input", "up uA", "up"),
                         ("down-projection (split K at few tokens): + u2 A2^T", "down r=0", "down")):
        if k0 in times and k1 in times:
            t0, t1 = times[k0], times[k1]
            lines.append(f"| {name} | {t0:.1f} | {t1:.1f} | {t1 - t0:+.1f} |")
            say(f"  {name:50s} {t0:8.1f} -> {t1:8.1f}  ({t1 - t0:+.1f} us)")
    return lines


def profile(m, calls):
    ffn8, _, _, _, x = modules(m)
    lines = []
    for use_graphs in (False, True):
        graphs.GRAPHS.enabled = use_graphs
        try:
            for _ in range(20):
                ffn8(x)
            torch.cuda.synchronize()
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(200):
                ffn8(x)
            pr.disable()
            torch.cuda.synchronize()
        finally:
            graphs.GRAPHS.enabled = None
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(20)
        text = s.getvalue()
        say(text)
        what = "with CUDA graphs" if use_graphs else "without CUDA graphs"
        OUT["profile" + (" graphs" if use_graphs else "")] = text
        lines += ["", f"## cProfile of 200 CompressedFFN.forward (FP8) calls {what}, top 20 by internal time", "",
                  "```", text.strip()[:8000], "```"]
    return lines


def device(m, calls):
    us = device_us
    lines = ["", "## Device time (CUDA graphs, us)", "", "| case | us |", "|---|---|"]

    def row(name, fn):
        try:
            t = us(fn)
            OUT["device"][name] = t
            lines.append(f"| {name} | {t:.1f} |")
            say(f"  {name:60s} {t:8.1f} us")
        except Exception:  # noqa: BLE001
            OUT["errors"][name] = traceback.format_exc()[-1500:]
            say(f"  {name}: FAILED\n{OUT['errors'][name]}")

    for k in (2048, 4096, 8192):
        x = torch.randn(m, k, device="cuda").bfloat16()
        B = (torch.randn(RANK, k, device="cuda") / k**0.5).bfloat16()
        z = torch.empty(m, RANK, device="cuda")
        row(f"act_quant M={m} K={k} r={RANK} two launches", lambda: fp8_ffn.act_quant_lowrank(x, B, single=False))
        for rows in (1, 2, 4, 8, 16):
            row(f"act_quant M={m} K={k} r={RANK} one launch, {rows} rows/program",
                lambda rows=rows: fp8_ffn.act_quant_lowrank(x, B, single=True, rows=rows, zero=z))
    mm, d = 6144, 4096
    up = random_fp8_layer(4 * d, d, RANK, seed=1, device="cuda")
    B2 = (torch.randn(RANK, 4 * d, device="cuda") / (4 * d)**0.5).bfloat16()
    x = torch.randn(mm, d, device="cuda").bfloat16()
    xq, sx, u = fp8_ffn.act_quant_lowrank(x, up["B"])
    u2 = torch.zeros(mm, RANK, device="cuda")
    hs = torch.tensor([2.0**-6], device="cuda")
    base = fp8_ffn.DEFAULT_CONFIGS[1]
    for name, cfg in (("128x256x128 s3 split (default)", base),
                      ("128x128x128 s4", dict(base, BN=128, EPI_SPLIT=False, num_stages=4)),
                      ("128x128x256 s3", dict(base, BN=128, BK=256, EPI_SPLIT=False, PROMOTE=base["PROMOTE"] // 2))):
        row(f"FP8 up GEMM {d}->{4 * d} M={mm} GELU+FP8 out+next r={RANK}: {name} P{cfg['PROMOTE']}",
            lambda cfg=cfg: fp8_ffn.scaled_gemm(xq, sx, up["q"], up["q_scale"], u=u, A=up["A"], bias=up["bias"],
                                                gelu=True, h_scale=hs, next_B=B2, u_next=u2, config=cfg))
        row(f"FP8 GEMM {d}->{4 * d} M={mm} bf16 out r={RANK}: {name} P{cfg['PROMOTE']}",
            lambda cfg=cfg: fp8_ffn.scaled_gemm(xq, sx, up["q"], up["q_scale"], u=u, A=up["A"], bias=up["bias"],
                                                config=cfg))
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--m", type=int, default=126)
    ap.add_argument("--dim", type=int, default=DIM, help="rank part: the FFN's width (audio 2048, video 4096)")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--parts", default="host,profile,device", help="comma list of host, rotation, profile, device")
    ap.add_argument("--copies", type=int, default=7, help="rotation: weight copies (7: ffn_kernels.py's at the audio FFN)")
    ap.add_argument("--dry-run", action="store_true", help="rank only: small shapes on the CPU (Triton interpreter)")
    a = ap.parse_args()
    if a.dry_run and a.parts != "rank":
        ap.error("--dry-run runs only --parts rank")
    os.makedirs(a.out, exist_ok=True)
    say(f"# {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'} torch {torch.__version__} "
        f"{time.strftime('%Y-%m-%d %H:%M')} "
        f"LITEFFN_PROMOTE_K={gemm.PROMOTE_K} autotune={gemm.AUTOTUNE}")
    md = []
    for part in a.parts.split(","):
        t0 = time.time()
        try:
            if part == "rotation":
                md += rotation(a.m, a.calls, a.copies)
            elif part == "rank":
                md += rank(a.m, a.calls, 64 if a.dry_run else a.dim, a.dry_run)
            else:
                md += globals()[part](a.m, a.calls)
        except Exception:  # noqa: BLE001
            OUT["errors"][part] = traceback.format_exc()[-3000:]
            say(f"{part} FAILED:\n{OUT['errors'][part]}")
        say(f"[{part}: {time.time() - t0:.0f} s]")
    if OUT["errors"]:
        md += ["", "## Errors", ""] + [f"- {k}: `{v.strip().splitlines()[-1]}`" for k, v in OUT["errors"].items()]
    with open(os.path.join(a.out, "host_overhead.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(a.out, "host_overhead.json"), "w") as f:
        json.dump(OUT, f, indent=1)
    say(f"wrote {a.out}/host_overhead.md and host_overhead.json")


if __name__ == "__main__":
    main()
