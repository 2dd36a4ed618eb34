"""The pack's FP8 kernels against bf16, cuBLAS FP8 and ComfyUI's FP8 linear at LTX-2 shapes, in one run.

    python bench/ffn_kernels.py [--out bench/ffn_kernels_h200.md] [--json bench/results/ffn_kernels_h200.json]
                                [--autotune] [--sections linear,ffn] [--families video,audio]
    python bench/ffn_kernels.py --dry-run        # tiny shapes on the CPU (Triton interpreter): checks the writers

Shapes: video linears 4096->16384 and 16384->4096 at M = 6144, 24576, 43400; audio 2048->8192 and
8192->2048 at M = 126, 1400, 5600; the video FFN 4096->16384->4096 and the audio FFN 2048->8192->2048
at the same M. Each implementation is timed two ways, in microseconds:

  device  median device time of CUDA-graph replays (triton.testing.do_bench_cudagraph): no host cost;
  python  as ComfyUI calls it, from Python without graphs: the median over repeats of (wall time of
          N back-to-back calls + synchronize) / N after warm-up; includes the host's launch cost,
          which dominates at small M.

Weights (and with them the low-rank factors) rotate over enough copies per timed set of calls to
exceed the 50 MB L2, in both modes, so every call reads its weights from HBM as in a model.

Per linear: bf16 F.linear(x, W, b); cuBLAS FP8 with the input already in FP8 and row-wise scales
(torch._scaled_mm, fast accumulation and promoted accumulation); ComfyUI's FP8 linear as it runs an
fp8_e4m3fn_fast checkpoint (x clamped to +-448 and cast to FP8 at scale 1 in a separate pass, then
_scaled_mm with scalar scales and its default promoted accumulation; the cast is timed); the pack's
linear from a bf16 input (quantize + low-rank down-projection, then the GEMM) at r = 0, 64, 256; the
pack's GEMM with the input already in FP8 (its quantization done once, outside the timing) at r = 0
and 64; in python mode also the CompressedLinear module at r = 64.
Per FFN (Linear -> GELU(tanh) -> Linear): bf16; the pack's fused FFN (static FP8 scale of the hidden
activation from the absmax of the dense bf16 FFN's hidden activation on the same input) at r = 0, 64,
256; ComfyUI-style unfused FP8 (its FP8 linear twice, torch GELU between); in python mode also the
CompressedFFN module at r = 64 (two CompressedLinear with input_amax: the fused path), which is what
ComfyUI calls. Ratios are bf16 time / this time, in the same mode of the same run. At M <= 256, where host
time is what a call costs and the host's speed drifts between minutes, the module and the bf16 FFN are also
timed interleaved (rounds of N calls of each, alternating), and the goal takes both figures. The FFN's device
times of bf16 and ours at r = 0 and r = 64 (the goals' ratios) are medians of three rounds that time the
three one after another, since the GPU's clock drifts between cases by about what the rank-64 branch costs.

Correctness (r = 64, first 2048 rows): relative Frobenius error of the pack's output against the fp32
torch reference of the same compressed tensors (kernels/reference.py); for the FFN also the error of
the pack's FFN against the dense FFN of the dequantized weights (rounded to bf16, computed in fp32)
divided by the same error of the fp32 torch reference ("kernel/reference error ratio"; the bf16
reference path's error is reported too).

Environment: LITEFFN_AUTOTUNE is set to 0 unless --autotune (the kernels then run their fixed default
configurations); LITEFFN_PROMOTE_K, if set, is reported. With $OUT set, the markdown, the JSON and a
log are also written there. Outputs are rewritten after every case, so a run cut short keeps what it
measured; a failing case prints its error and the run goes on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as Fn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import Rot, bf16_ffn  # noqa: E402

FULL = dict(linear={"video": ((4096, 16384), (16384, 4096)), "audio": ((2048, 8192), (8192, 2048)),
                    # issue 18: the attention projections (linears only): video tokens (q/k/v/out 4096->4096,
                    # q, k and v of one input as one 4096->12288, the audio<->video mixes), the text's
                    # 1024 tokens (attn2's k and v, alone and as one), the audio stream's 126
                    "attention": ((4096, 4096), (4096, 12288), (4096, 2048), (2048, 4096)),
                    "text": ((4096, 4096), (4096, 8192)), "audio_attention": ((2048, 2048), (2048, 6144))},
            ffn={"video": 4096, "audio": 2048},
            M={"video": (6144, 24576, 43400), "audio": (126, 1400, 5600), "attention": (6144, 24576),
               "text": (1024,), "audio_attention": (126,)})
# --dry-run: tiny shapes, CPU, Triton interpreter: exercises every call and the writers, times nothing real
DRY = dict(linear={"video": ((128, 256), (256, 128)), "audio": ((64, 128), (128, 64)), "attention": ((128, 128),),
                   "text": ((128, 256),), "audio_attention": ((64, 192),)},
           ffn={"video": 128, "audio": 64},
           M={"video": (48,), "audio": (16, 40), "attention": (48,), "text": (32,), "audio_attention": (16,)})
RANKS = (0, 64, 256)  # the pack's linear and FFN
GEMM_RANKS = (0, 64)  # the pack's GEMM with the input already in FP8
ROUNDS = 2  # more device timings of the bf16 FFN and ours at r = 0 and 64, in rounds (median of 1 + ROUNDS)
CHECK_ROWS = 2048
ROT_BYTES = 200 * 2**20  # bf16 weight bytes per rotation: several times the 50 MB L2
LOG = []  # open log files


def say(*a):
    s = " ".join(str(v) for v in a)
    print(s, flush=True)
    for f in LOG:
        f.write(s + "\n")
        f.flush()


# ------------------------------------------------------------------ the kernels
class Kernels:
    """What the bench calls: fused.linear / fused.ffn (whole layers), fp8_ffn's act_quant_lowrank,
    scaled_gemm and static_scale, the modules, the reference and dispatch."""

    def __init__(self):
        from liteffn.kernels import dispatch, fp8_ffn, fused, modules, reference

        self.R, self.Mo, self.dispatch, self.fp8_ffn, self.fused = reference, modules, dispatch, fp8_ffn, fused
        self.notes = []
        self.linear, self.ffn, self.source = fused.linear, fused.ffn, "kernels.fused (linear, ffn)"
        self.act_quant_lowrank, self.scaled_gemm = fp8_ffn.act_quant_lowrank, fp8_ffn.scaled_gemm
        self.static_scale = fp8_ffn.static_scale

    def attr(self, name, default=None):
        for mod in (self.fp8_ffn, self.fused):
            if mod is not None and hasattr(mod, name):
                return getattr(mod, name)
        return default


# ------------------------------------------------------------------ timing
class Timer:
    def __init__(self, a, gpu: bool):
        self.gpu, self.rep, self.target, self.repeats = gpu, a.rep, a.target_ms / 1e3, a.repeats
        self.max_n = a.max_calls

    def sync(self):
        if self.gpu:
            torch.cuda.synchronize()

    def device(self, fn) -> float:
        fn()
        self.sync()
        if not self.gpu:  # dry run: no graphs on the CPU; one call (the interpreter is slow)
            return self._wall(fn, 1, 1)
        from triton.testing import do_bench_cudagraph
        return do_bench_cudagraph(fn, rep=self.rep, return_mode="median") * 1e3

    def python(self, fn) -> float:
        if not self.gpu:
            return self._wall(fn, 1, 1)
        return self._wall(fn, self._calls(fn), self.repeats)

    def _calls(self, fn) -> int:
        """Back-to-back calls per timing: about target ms of them, after warm-up."""
        for _ in range(2):
            fn()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        self.sync()
        per = (time.perf_counter() - t0) / 3
        return max(2, min(self.max_n, math.ceil(self.target / max(per, 1e-7))))

    def paired(self, fa, fb, rounds: int = 15) -> tuple:
        """(us of fa, us of fb): medians over rounds that time n calls of each back to back, alternating
        which goes first. The host's speed drifts tens of percent between minutes, so two cases timed a
        minute apart compare poorly where host time is what they cost (few tokens)."""
        if not self.gpu:
            return self._wall(fa, 1, 1), self._wall(fb, 1, 1)
        self._calls(fb)  # (its warm-up)
        n = self._calls(fa)
        ta, tb = [], []
        for i in range(rounds):
            for f, ts in ((fa, ta), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fa, ta)):
                ts.append(self._wall(f, n, 1))
        return statistics.median(ta), statistics.median(tb)

    def _wall(self, fn, n, repeats) -> float:
        ts = []
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            self.sync()
            ts.append((time.perf_counter() - t0) / n)
        return statistics.median(ts) * 1e6


def copies_for(n, k, dry=False) -> int:
    return 2 if dry else min(64, max(2, math.ceil(ROT_BYTES / (n * k * 2))))


def rel(a, b) -> float:
    """Relative Frobenius error of a against b (4 significant digits)."""
    a, b = a.float(), b.float()
    return float(f"{float((a - b).norm() / b.norm()):.4g}")


def free():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ results and writers
LIN_IMPLS = [  # (impl, rank, column title)
    ("bf16", None, "bf16"),
    ("cublas_fp8_fast", None, "cuBLAS FP8 fast acc. (x FP8)"),
    ("cublas_fp8_promoted", None, "cuBLAS FP8 promoted (x FP8)"),
    ("comfy_fp8", None, "ComfyUI FP8 (cast + GEMM)"),
    ("ours", 0, "ours r=0"), ("ours", 64, "ours r=64"), ("ours", 256, "ours r=256"),
    ("ours_static", 64, "ours r=64, static input scale"),
    ("ours_gemm_fp8in", 0, "our GEMM x FP8 r=0"), ("ours_gemm_fp8in", 64, "our GEMM x FP8 r=64"),
]
FFN_IMPLS = [
    ("bf16", None, "bf16"),
    ("ours_fused", 0, "ours fused r=0"), ("ours_fused", 64, "r=64"), ("ours_fused", 256, "r=256"),
    ("comfy_fp8", None, "ComfyUI FP8 unfused"),
]


class Report:
    def __init__(self, header: dict, cfg: dict, md_paths, json_paths, t_start):
        self.header, self.cfg, self.recs = header, cfg, []
        self.md_paths, self.json_paths, self.t_start = md_paths, json_paths, t_start

    def add(self, **rec):
        self.recs.append(rec)
        return rec

    def find(self, kind, shape, M, mode, impl, rank=None):
        for r in self.recs:
            if (r["kind"], r["shape"], r["M"], r["mode"], r["impl"], r["rank"]) == (kind, shape, M, mode, impl, rank):
                return r
        return None

    def us(self, *key, **kw):
        r = self.find(*key, **kw)
        return None if r is None else r.get("us")

    # ---- markdown
    def cell(self, t, base):
        if t is None:
            return "-"
        return f"{t:.1f} ({base / t:.2f}x)" if base else f"{t:.1f}"

    def linear_table(self, mode, lines):
        cols = list(LIN_IMPLS) + ([("module", 64, "CompressedLinear r=64")] if mode == "python" else [])
        extra = ["cuBLAS promoted / our GEMM r=64", "rank-64 overhead: GEMM x FP8, linear"]
        if mode == "device":
            extra.append("err r=64 vs fp32 ref: linear, GEMM")
        lines += ["| shape | M | " + " | ".join(c[2] for c in cols) + " | " + " | ".join(extra) + " |",
                  "|---" * (2 + len(cols) + len(extra)) + "|"]
        for fam, shapes in self.cfg["linear"].items():
            for k, n in shapes:
                shape = f"{k}x{n}"
                for m in self.cfg["M"][fam]:
                    if not any(r["kind"] == "linear" and r["shape"] == shape and r["M"] == m and r["mode"] == mode
                               for r in self.recs):
                        continue
                    t = {(i, rk): self.us("linear", shape, m, mode, i, rank=rk) for i, rk, _ in cols}
                    b = t[("bf16", None)]
                    row = [f"{fam} {k}->{n}", str(m)] + [self.cell(t[(i, rk)], b) for i, rk, _ in cols]
                    row.append(ratio(t[("cublas_fp8_promoted", None)], t[("ours_gemm_fp8in", 64)]))
                    row.append(f"{pct(t[('ours_gemm_fp8in', 64)], t[('ours_gemm_fp8in', 0)])}, "
                               f"{pct(t[('ours', 64)], t[('ours', 0)])}")
                    if mode == "device":
                        e1 = (self.find("linear", shape, m, mode, "ours", 64) or {}).get("err")
                        e2 = (self.find("linear", shape, m, mode, "ours_gemm_fp8in", 64) or {}).get("err")
                        row.append(f"{fmt_e(e1)}, {fmt_e(e2)}")
                    lines.append("| " + " | ".join(row) + " |")

    def ffn_table(self, lines):
        cols = list(FFN_IMPLS) + [("module", 64, "CompressedFFN r=64 (python)")]
        extra = ["rank-64 overhead", "err r=64 vs fp32 ref", "err vs dense: kernel / fp32 ref / bf16 ref",
                 "kernel/reference error ratio"]
        lines += ["| FFN | M | mode | " + " | ".join(c[2] for c in cols) + " | " + " | ".join(extra) + " |",
                  "|---" * (3 + len(cols) + len(extra)) + "|"]
        for fam, dim in self.cfg["ffn"].items():
            for m in self.cfg["M"][fam]:
                for mode in ("device", "python"):
                    if not any(r["kind"] == "ffn" and r["shape"] == str(dim) and r["M"] == m and r["mode"] == mode
                               for r in self.recs):
                        continue
                    t = {(i, rk): self.us("ffn", str(dim), m, mode, i, rank=rk) for i, rk, _ in cols}
                    b = t[("bf16", None)]
                    row = [f"{fam} {dim}->{4 * dim}->{dim}", str(m), mode] + [self.cell(t[(i, rk)], b)
                                                                             for i, rk, _ in cols]
                    row.append(pct(t[("ours_fused", 64)], t[("ours_fused", 0)]))
                    c = self.find("ffn", str(dim), m, "device", "ours_fused", 64) or {}
                    if mode == "device":
                        row += [fmt_e(c.get("err")), " / ".join(fmt_e(c.get(x)) for x in
                                                                ("err_dense", "err_dense_ref", "err_dense_ref_bf16")),
                                "-" if c.get("err_ratio") is None else
                                f"{c['err_ratio']:.3f} (vs bf16 ref {fmt_f(c.get('err_ratio_bf16_ref'))})"]
                    else:
                        row += ["", "", ""]
                    lines.append("| " + " | ".join(row) + " |")

    def goals(self, lines):
        cfg, out = self.cfg, []
        mv, ma = cfg["M"]["video"], cfg["M"]["audio"]
        verdict = lambda ok: "not measured" if ok is None else ("**met**" if ok else "**not met**")  # noqa: E731

        def allok(vals, good):
            vals = [v for v in vals if v is not None]
            return None if not vals else all(good(v) for v in vals)

        # 1. our GEMM r=64 (x FP8) >= cuBLAS promoted, per video shape
        for k, n in cfg["linear"].get("video", ()):
            shape = f"{k}x{n}"
            rs = {m: rdiv(self.us("linear", shape, m, "device", "cublas_fp8_promoted"),
                          self.us("linear", shape, m, "device", "ours_gemm_fp8in", rank=64)) for m in mv}
            out.append(f"- Our FP8 GEMM r=64 (x already FP8) at least as fast as cuBLAS promoted, video {k}->{n}: "
                       + ", ".join(f"M={m} {fmt_x(v)}" for m, v in rs.items())
                       + f" (cuBLAS time / ours, goal >= 1.00x): {verdict(allok(rs.values(), lambda v: v >= 1.0))}")
        # 2. video FFN r=64 >= 1.8x bf16 (device)
        dv, da = str(cfg["ffn"].get("video")), str(cfg["ffn"].get("audio"))
        fr = lambda d, m, mode, impl="ours_fused": rdiv(self.us("ffn", d, m, mode, "bf16"),  # noqa: E731
                                                         self.us("ffn", d, m, mode, impl, rank=64))
        if "video" in cfg["ffn"]:
            rs = {m: fr(dv, m, "device") for m in mv}
            out.append("- Video FFN r=64 >= 1.8x bf16 (device time): " + ", ".join(
                f"M={m} {fmt_x(v)}" for m, v in rs.items()) + f": {verdict(allok(rs.values(), lambda v: v >= 1.8))}")
        if "audio" in cfg["ffn"]:
            v = fr(da, ma[-1], "device")
            out.append(f"- Audio FFN r=64 at M={ma[-1]} >= 1.5x bf16 (device time): {fmt_x(v)}: "
                       f"{verdict(allok([v], lambda x: x >= 1.5))}")
            vm, vd = fr(da, ma[0], "python", "module"), fr(da, ma[0], "python")
            pr = self.find("ffn", str(da), ma[0], "python", "module_interleaved", rank=64)
            vi = rdiv(pr.get("bf16_us"), pr.get("us")) if pr else None
            inter = (f"; interleaved with the bf16 FFN in the same rounds {pr['us']:.1f} against {pr['bf16_us']:.1f} "
                     f"us, {fmt_x(vi)}" if vi is not None else "")
            out.append(f"- Audio FFN r=64 at M={ma[0]} called from Python without graphs >= 1.0x bf16: "
                       f"CompressedFFN module {fmt_x(vm)} (the kernels' ffn called directly {fmt_x(vd)}){inter}: "
                       f"{verdict(allok([vm] + ([vi] if vi is not None else []), lambda x: x >= 1.0))}")
        # 3. rank-64 overhead <= 5% (device time)
        groups = {"fused FFN": [], "our GEMM x FP8": [], "our linear from bf16": []}
        for fam, dim in cfg["ffn"].items():
            for m in cfg["M"][fam]:
                t = {rk: self.us("ffn", str(dim), m, "device", "ours_fused", rank=rk) for rk in (0, 64)}
                groups["fused FFN"].append((f"{fam} M={m}", ovh(t[64], t[0])))
        for fam, shapes in cfg["linear"].items():
            for k, n in shapes:
                for m in cfg["M"][fam]:
                    s = f"{k}x{n}"
                    groups["our GEMM x FP8"].append((f"{k}->{n} M={m}", ovh(
                        self.us("linear", s, m, "device", "ours_gemm_fp8in", rank=64),
                        self.us("linear", s, m, "device", "ours_gemm_fp8in", rank=0))))
                    groups["our linear from bf16"].append((f"{k}->{n} M={m}", ovh(
                        self.us("linear", s, m, "device", "ours", rank=64),
                        self.us("linear", s, m, "device", "ours", rank=0))))
        for name, vals in groups.items():
            got = [(w, v) for w, v in vals if v is not None]
            if not got:
                out.append(f"- Rank-64 branch <= 5% over r=0, {name}: not measured")
                continue
            worst = max(got, key=lambda wv: wv[1])
            out.append(f"- Rank-64 branch <= 5% over r=0 (device time), {name}: worst {100 * worst[1]:+.1f}% "
                       f"({worst[0]}); all: " + ", ".join(f"{w} {100 * v:+.1f}%" for w, v in got)
                       + f": {verdict(all(v <= 0.05 for _, v in got))}")
        # 4. accuracy of the fused FFN relative to the torch reference
        rs = [(f"{fam} M={m}", (self.find("ffn", str(dim), m, "device", "ours_fused", 64) or {}).get("err_ratio"))
              for fam, dim in cfg["ffn"].items() for m in cfg["M"][fam]]
        got = [(w, v) for w, v in rs if v is not None]
        out.append("- FFN kernel/reference error ratio <= 1.05 (error vs the dense FFN, kernel over the fp32 "
                   "torch reference; not an issue-17 goal): "
                   + (", ".join(f"{w} {v:.3f}" for w, v in got) if got else "-")
                   + f": {verdict(None if not got else all(v <= 1.05 for _, v in got))}")
        lines += out

    def markdown(self) -> str:
        h = self.header
        promote = (f"LITEFFN_PROMOTE_K={h['promote_k']}" if h["promote_k"]
                   else "kernel default (LITEFFN_PROMOTE_K unset)")
        lines = [f"# FP8 kernels at LTX-2 shapes: {h['device']}, {h['date']}, torch {h['torch']}, "
                 f"triton {h['triton']}, "
                 f"autotune {'on' if h['autotune'] else 'off'}, promotion interval {promote}"
                 + (", DRY RUN (CPU, interpreter: times mean nothing)" if h["dry_run"] else ""),
                 "",
                 f"Kernels from {h['kernels']}; default configs {h.get('default_configs', '-')}. "
                 f"Command: `{h['command']}`. Elapsed {h.get('elapsed_s', 0):.0f} s"
                 + ("" if h.get("complete") else " (run incomplete: tables hold what was measured so far)") + ".",
                 ""]
        lines += [f"- {n}" for n in h.get("notes", [])]
        lines += ["", __doc__.strip().split("\n\n", 2)[2].split("\n\nEnvironment")[0], ""]
        lines += ["## Per linear, device time (us; CUDA-graph replay medians; ratio = bf16 / this)", ""]
        self.linear_table("device", lines)
        lines += ["", "## Per linear, called from Python (us; no graphs, host cost included; ratio = bf16 / this)", ""]
        self.linear_table("python", lines)
        lines += ["", "## Whole FFN, Linear -> GELU(tanh) -> Linear (us; both modes; ratio = bf16 / this, same mode)",
                  ""]
        self.ffn_table(lines)
        lines += ["", "## Goals (issue 17)", ""]
        self.goals(lines)
        fails = [r for r in self.recs if r.get("error")]
        if fails:
            lines += ["", "## Failures", ""]
            lines += [f"- {r['kind']} {r['shape']} M={r['M']} {r['impl']} r={r['rank']} {r['mode']}: {r['error']}"
                      for r in fails]
        if h.get("tuned_configs"):
            lines += ["", "## Autotuned GEMM configurations chosen", "",
                      "| key (M bucket, N, K, r, r2, GELU, FP8 out) | config |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in h["tuned_configs"]]
        if h.get("dispatch_counts"):
            lines += ["", f"Module paths taken (dispatch.counts): {h['dispatch_counts']}"]
        return "\n".join(lines) + "\n"

    def write(self):
        self.header["elapsed_s"] = round(time.time() - self.t_start, 1)
        text = self.markdown()
        js = json.dumps([dict(kind="header", **self.header)] + self.recs, indent=1)
        for paths, data in ((self.md_paths, text), (self.json_paths, js)):
            for p in paths:
                try:
                    os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
                    with open(p + ".tmp", "w") as f:
                        f.write(data)
                    os.replace(p + ".tmp", p)
                except OSError as e:
                    say(f"! could not write {p}: {e}")


def rdiv(a, b):
    return None if a is None or b is None or b == 0 else a / b


def ovh(t64, t0):
    r = rdiv(t64, t0)
    return None if r is None else r - 1


def ratio(a, b):
    v = rdiv(a, b)
    return "-" if v is None else f"{v:.2f}x"


def pct(t64, t0):
    v = ovh(t64, t0)
    return "-" if v is None else f"{100 * v:+.1f}%"


def fmt_e(e):
    return "-" if e is None else f"{e:.2e}"


def fmt_f(v):
    return "-" if v is None else f"{v:.3f}"


def fmt_x(v):
    return "-" if v is None else f"{v:.2f}x"


# ------------------------------------------------------------------ measuring
class Bench:
    def __init__(self, a, kern: Kernels, report: Report, timer: Timer, dev):
        self.a, self.K, self.rep, self.T, self.dev = a, kern, report, timer, dev

    def act(self, m, k, seed):
        from liteffn.calibration.synthetic import random_activations
        try:
            return random_activations(m, k, seed=seed, device=self.dev)
        except TypeError:  # a changed signature: same distribution, drawn here
            g = torch.Generator(device=self.dev).manual_seed(seed)
            return (torch.randn(m, k, generator=g, device=self.dev)
                    * torch.rand(m, 1, generator=g, device=self.dev) * 4).bfloat16()

    def layer(self, n, k, r, seed):
        from liteffn.calibration.synthetic import random_fp8_layer
        return random_fp8_layer(n, k, r, seed=seed, device=self.dev)

    @staticmethod
    def dense(t):
        """bf16 W' = dequant(q) + A B (the bf16 model the compressed layer stands for)."""
        w = t["q"].float() * t["q_scale"].float()[:, None]
        if t.get("A") is not None:
            w = w + t["A"].float() @ t["B"].float()
        return w.bfloat16()

    def measure(self, base, impl, rank, fn, modes=("device", "python"), **extra):
        """Times fn in each mode; a failure is recorded and printed, never raised."""
        out = {}
        for mode in modes:
            rec = self.rep.add(**base, rank=rank, mode=mode, impl=impl, us=None, **extra)
            try:
                rec["us"] = round(getattr(self.T, mode)(fn), 2)
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                say(f"  ! {base['kind']} {base['shape']} M={base['M']} {impl} r={rank} {mode}: {rec['error']}")
                say("    " + traceback.format_exc().strip().splitlines()[-3][:300])
            out[mode] = rec["us"]
        return out

    def check(self, what, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            say(f"  ! correctness {what}: {type(e).__name__}: {str(e)[:300]}")
            return None

    # ---- linears
    def linears(self, fam, k, n, ms, si):
        c = copies_for(n, k, self.a.dry_run)
        layers = {r: Rot([self.layer(n, k, r, seed=100 * si + i) for i in range(c)]) for r in RANKS}
        W = Rot([(self.dense(t), t["bias"]) for t in layers[64].items])
        one = torch.ones((), device=self.dev, dtype=torch.float32)
        comfy_w = Rot([(t["q"], t["q_scale"].amax().reshape(()).contiguous(), t["bias"]) for t in layers[0].items])
        for m in ms:
            t0 = time.time()
            try:
                self.linear_case(fam, k, n, m, layers, W, comfy_w, one)
            except Exception:  # noqa: BLE001
                say(f"! linear {k}->{n} M={m} failed:\n{traceback.format_exc()[-1500:]}")
            self.rep.write()
            self.say_case("linear", fam, f"{k}->{n}", f"{k}x{n}", m, LIN_IMPLS + [("module", 64, "module")],
                          time.time() - t0)
            free()
        del layers, W, comfy_w
        free()

    def linear_case(self, fam, k, n, m, layers, W, comfy_w, one):
        """One (shape, M): correctness at r=64, then every implementation in both modes."""
        K, R = self.K, self.K.R
        shape = f"{k}x{n}"
        base = dict(kind="linear", shape=shape, M=m)
        x = self.act(m, k, seed=20_000 + 7 * m + k)
        # correctness at r=64 on the first rows (also compiles the kernels of this shape)
        t64, xs = layers[64].items[0], x[:CHECK_ROWS]
        ref = self.check("reference", lambda: R.compressed_linear_ref(xs, "fp8", t64, dtype=torch.float32))
        e_lin = e_gemm = None
        if ref is not None:
            e_lin = self.check("linear", lambda: rel(K.linear(xs, t64), ref))
            e_gemm = self.check("gemm", lambda: (lambda q, s, u: rel(K.scaled_gemm(
                q, s, t64["q"], t64["q_scale"], u=u, A=t64["A"], bias=t64["bias"]), ref))(
                *K.act_quant_lowrank(xs, t64["B"])))
        # inputs already in FP8 (quantized once, outside the timing)
        pre = {}
        for r in GEMM_RANKS:
            pre[r] = self.check(f"act_quant r={r}", lambda r=r: K.act_quant_lowrank(x, layers[r].items[0].get("B")))
        cb_err = {}
        if pre.get(0) is not None:
            xq, sx, _ = pre[0]
            sxc = sx[:, None]
            t0l = layers[0].items[0]
            ref0 = self.check("reference r=0", lambda: R.compressed_linear_ref(xs, "fp8", t0l, dtype=torch.float32))
            for fa in (True, False):
                if ref0 is not None:
                    cb_err[fa] = self.check("cuBLAS", lambda fa=fa: rel(torch._scaled_mm(
                        xq[:CHECK_ROWS], t0l["q"].t(), scale_a=sxc[:CHECK_ROWS], scale_b=t0l["q_scale"][None, :],
                        bias=t0l["bias"], out_dtype=torch.bfloat16, use_fast_accum=fa), ref0))

        self.measure(base, "bf16", None, lambda: (lambda w: Fn.linear(x, w[0], w[1]))(W()))
        if pre.get(0) is not None:
            for fa, name in ((True, "cublas_fp8_fast"), (False, "cublas_fp8_promoted")):
                self.measure(base, name, None, lambda fa=fa: (lambda t: torch._scaled_mm(
                    xq, t["q"].t(), scale_a=sxc, scale_b=t["q_scale"][None, :], bias=t["bias"],
                    out_dtype=torch.bfloat16, use_fast_accum=fa))(layers[0]()), err=cb_err.get(fa))
        self.measure(base, "comfy_fp8", None, lambda: comfy_linear(x, *comfy_w(), one))
        for r in RANKS:
            self.measure(base, "ours", r, lambda r=r: K.linear(x, layers[r]()), err=e_lin if r == 64 else None)
        # the input quantized with one static scale (modules.STATIC_INPUT): one read of x in the input pass
        xs_scale = K.static_scale(x.abs().amax().float().reshape(1))
        self.measure(base, "ours_static", 64, lambda: K.linear(x, dict(layers[64](), x_scale=xs_scale)))
        for r in GEMM_RANKS:
            if pre.get(r) is None:
                continue
            xq8, sx8, u8 = pre[r]
            self.measure(base, "ours_gemm_fp8in", r, lambda r=r, xq8=xq8, sx8=sx8, u8=u8: (lambda t: K.scaled_gemm(
                xq8, sx8, t["q"], t["q_scale"], u=u8, A=t.get("A"), bias=t["bias"]))(layers[r]()),
                err=e_gemm if r == 64 else None)
        try:
            mods = Rot([K.Mo.CompressedLinear("fp8", k, n, dict(t)) for t in layers[64].items])
            x3 = x[None]
            self.measure(base, "module", 64, lambda: mods()(x3), modes=("python",))
        except Exception as e:  # noqa: BLE001
            say(f"  ! linear module: {type(e).__name__}: {e}")

    # ---- FFNs
    def ffns(self, fam, dim, ms, si):
        hid = 4 * dim
        c = copies_for(hid, dim, self.a.dry_run)
        layers = {r: Rot([(self.layer(hid, dim, r, seed=1000 * si + 2 * i),
                           self.layer(dim, hid, r, seed=1000 * si + 2 * i + 1)) for i in range(c)]) for r in RANKS}
        dense = Rot([(self.dense(u), u["bias"], self.dense(d), d["bias"]) for u, d in layers[64].items])
        one = torch.ones((), device=self.dev, dtype=torch.float32)
        comfy_w = Rot([(u["q"], u["q_scale"].amax().reshape(()).contiguous(), u["bias"],
                        d["q"], d["q_scale"].amax().reshape(()).contiguous(), d["bias"]) for u, d in layers[0].items])
        for m in ms:
            t0 = time.time()
            try:
                self.ffn_case(dim, m, layers, dense, comfy_w, one)
            except Exception:  # noqa: BLE001
                say(f"! ffn {dim} M={m} failed:\n{traceback.format_exc()[-1500:]}")
            self.rep.write()
            self.say_case("ffn", fam, f"{dim}->{hid}->{dim}", str(dim), m, FFN_IMPLS + [("module", 64, "module")],
                          time.time() - t0)
            free()
        del layers, dense, comfy_w
        free()

    def ffn_case(self, dim, m, layers, dense, comfy_w, one):
        """One M: hidden scale, correctness at r=64, then every implementation in both modes."""
        K, R = self.K, self.K.R
        hid = 4 * dim
        base = dict(kind="ffn", shape=str(dim), M=m)
        x = self.act(m, dim, seed=40_000 + 7 * m + dim)
        W1, b1, W2, b2 = dense.items[0]
        # static hidden scale from the absmax of the dense bf16 FFN's hidden activation on this input
        h_amax = torch.stack([Fn.gelu(Fn.linear(xc, W1, b1), approximate="tanh").abs().amax().float()
                              for xc in x.split(8192)]).amax().reshape(1)
        hs = K.static_scale(h_amax)
        x_amax = x.abs().amax().float().reshape(1)
        # correctness at r=64 on the first rows
        up, dn = layers[64].items[0]
        xs = x[:CHECK_ROWS]
        acc = {}
        try:
            y = K.ffn(xs, up, dn, hs)
            ref32 = R.compressed_ffn_ref(xs, "fp8", up, "fp8", dn, h_scale=hs, dtype=torch.float32)
            refbf = R.compressed_ffn_ref(xs, "fp8", up, "fp8", dn, h_scale=hs)  # the path as the pack runs it
            dense32 = Fn.linear(Fn.gelu(Fn.linear(xs.float(), W1.float(), b1.float()), approximate="tanh"),
                                W2.float(), b2.float())
            acc = dict(err=rel(y, ref32), err_dense=rel(y, dense32), err_dense_ref=rel(ref32, dense32),
                       err_dense_ref_bf16=rel(refbf, dense32))
            acc["err_ratio"] = rdiv(acc["err_dense"], acc["err_dense_ref"])
            acc["err_ratio_bf16_ref"] = rdiv(acc["err_dense"], acc["err_dense_ref_bf16"])
            acc = {k: (None if v is None else float(f"{v:.4g}")) for k, v in acc.items()}
            del y, ref32, refbf, dense32
        except Exception as e:  # noqa: BLE001
            say(f"  ! correctness ffn {dim} M={m}: {type(e).__name__}: {str(e)[:300]}")

        self.measure(base, "bf16", None, lambda: bf16_ffn(x, *dense()))
        for r in RANKS:
            self.measure(base, "ours_fused", r, lambda r=r: K.ffn(x, *layers[r](), hs), **(acc if r == 64 else {}))
        self.measure(base, "comfy_fp8", None, lambda: comfy_ffn(x, *comfy_w(), one))
        # the goals' three device times again, in rounds: the GPU's clock drifts between cases by a few
        # percent, as much as the rank-64 branch costs (median of the first measurement and ROUNDS more)
        rounds = {("bf16", None): lambda: bf16_ffn(x, *dense()),
                  ("ours_fused", 0): lambda: K.ffn(x, *layers[0](), hs),
                  ("ours_fused", 64): lambda: K.ffn(x, *layers[64](), hs)}
        more = {k: [] for k in rounds}
        for _ in range(ROUNDS):
            for k, fn in rounds.items():
                more[k].append(self.check(f"ffn {dim} M={m} {k} round", lambda fn=fn: self.T.device(fn)))
        for (impl, r), ts in more.items():
            rec = self.rep.find("ffn", str(dim), m, "device", impl, rank=r)
            if rec is not None and rec.get("us") is not None and None not in ts:
                rec["us_rounds"] = [rec["us"]] + [round(t, 2) for t in ts]
                rec["us"] = round(statistics.median(rec["us_rounds"]), 2)
        try:
            mk = K.Mo.CompressedLinear
            mods = Rot([K.Mo.CompressedFFN(mk("fp8", dim, hid, dict(u, input_amax=x_amax)),
                                           mk("fp8", hid, dim, dict(d, input_amax=h_amax)))
                        for u, d in layers[64].items])
            if mods.items[0].h_scale is None:
                say("  ! CompressedFFN has no h_scale: it would take the unfused path")
            x3 = x[None]
            self.measure(base, "module", 64, lambda: mods()(x3), modes=("python",))
            if m <= 256:  # host-bound: the module and the bf16 FFN interleaved, in the same minutes
                tb, tm = self.T.paired(lambda: bf16_ffn(x, *dense()), lambda: mods()(x3))
                self.rep.add(**base, rank=64, mode="python", impl="module_interleaved", us=round(tm, 2),
                             bf16_us=round(tb, 2))
        except Exception as e:  # noqa: BLE001
            say(f"  ! ffn module: {type(e).__name__}: {e}")

    def say_case(self, kind, fam, label, shape, m, impls, secs):
        for mode in ("device", "python"):
            b = self.rep.us(kind, shape, m, mode, "bf16")
            parts = []
            for impl, rk, _ in impls:
                t = self.rep.us(kind, shape, m, mode, impl, rank=rk)
                if t is not None:
                    parts.append(f"{impl}{'' if rk is None else f'@{rk}'} {t:.1f}" + (f" ({b / t:.2f}x)" if b else ""))
            say(f"{kind} {fam} {label} M={m} [{mode}] " + ", ".join(parts))
        say(f"  ({secs:.1f} s, total {time.time() - self.rep.t_start:.0f} s)")


def comfy_linear(x, w8, w_scale, b, one):
    """ComfyUI's fp8_linear for an fp8_e4m3fn_fast checkpoint without an input scale: clamp in
    place to +-448, cast to FP8 at scale 1, _scaled_mm with scalar scales (default accumulation)."""
    x8 = torch.clamp(x, min=-448, max=448, out=x).reshape(-1, x.shape[-1]).to(torch.float8_e4m3fn).contiguous()
    return torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=w_scale, bias=b, out_dtype=torch.bfloat16)


def comfy_ffn(x, w1, s1, b1, w2, s2, b2, one):
    h = Fn.gelu(comfy_linear(x, w1, s1, b1, one), approximate="tanh")
    return comfy_linear(h, w2, s2, b2, one)


# ------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="markdown report (default bench/ffn_kernels_h200.md; "
                                                 "dry run: $TMPDIR/ffn_kernels_dryrun.md)")
    ap.add_argument("--json", default=None, help="JSON records (default bench/results/ffn_kernels_h200.json; "
                                                  "dry run: $TMPDIR/ffn_kernels_dryrun.json)")
    ap.add_argument("--autotune", action="store_true", help="LITEFFN_AUTOTUNE=1 (default 0: fixed configs)")
    ap.add_argument("--sections", default="linear,ffn", help="comma list of linear, ffn, run in the order given")
    ap.add_argument("--families", default="video,audio", help="comma list of video, audio, attention, text, "
                                                                 "audio_attention (the last three: linears only)")
    ap.add_argument("--rep", type=int, default=20, help="ms of graph replays per device timing (do_bench_cudagraph)")
    ap.add_argument("--target-ms", type=float, default=15.0, help="wall ms per repeat of the python timing")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of the python timing (median)")
    ap.add_argument("--max-calls", type=int, default=200, help="most back-to-back calls per python repeat")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    t_start = time.time()
    # before any kernel module is imported: they read these at import
    os.environ["LITEFFN_AUTOTUNE"] = "1" if a.autotune else "0"
    if a.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import _package  # noqa: F401  (registers the repository as `liteffn`)

    gpu = torch.cuda.is_available() and not a.dry_run
    if not gpu and not a.dry_run:
        sys.exit("no CUDA device: use --dry-run to check the script on the CPU")
    dev = "cuda" if gpu else "cpu"
    cfg = DRY if a.dry_run else FULL
    fams = [f for f in a.families.split(",") if f]
    cfg = dict(linear={f: cfg["linear"][f] for f in fams}, ffn={f: cfg["ffn"][f] for f in fams if f in cfg["ffn"]},
               M=cfg["M"])
    tmp = tempfile.gettempdir()
    md = a.out or (os.path.join(tmp, "ffn_kernels_dryrun.md") if a.dry_run
                   else os.path.join(HERE, "ffn_kernels_h200.md"))
    js = a.json or (os.path.join(tmp, "ffn_kernels_dryrun.json") if a.dry_run
                    else os.path.join(HERE, "results", "ffn_kernels_h200.json"))
    md_paths, js_paths = [md], [js]
    if os.environ.get("OUT"):
        o = os.environ["OUT"]
        os.makedirs(o, exist_ok=True)
        md_paths.append(os.path.join(o, os.path.basename(md)))
        js_paths.append(os.path.join(o, os.path.basename(js)))
        LOG.append(open(os.path.join(o, os.path.splitext(os.path.basename(md))[0] + ".log"), "a"))

    import triton

    kern = Kernels()
    kern.dispatch.set_mode("triton")  # the module timings must run the kernels, never fall back silently
    dc = kern.attr("DEFAULT_CONFIGS")
    header = dict(
        device=torch.cuda.get_device_name() if gpu else "CPU (dry run)",
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), torch=torch.__version__, triton=triton.__version__,
        autotune=bool(kern.attr("AUTOTUNE", a.autotune)), promote_k=os.environ.get("LITEFFN_PROMOTE_K"),
        kernels=kern.source, dry_run=a.dry_run, command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        default_configs=None if not dc else "; ".join(
            f"{'few' if i == 0 else 'many'} rows: {c.get('BM')}x{c.get('BN')}x{c.get('BK')} promote={c.get('PROMOTE')}"
            for i, c in enumerate(dc)),
        rot_bytes=ROT_BYTES, rep_ms=a.rep, python_target_ms=a.target_ms, python_repeats=a.repeats,
        notes=kern.notes, complete=False)
    report = Report(header, cfg, md_paths, js_paths, t_start)
    say(f"# {header['device']} torch {header['torch']} triton {header['triton']} autotune={header['autotune']} "
        f"LITEFFN_PROMOTE_K={header['promote_k']} kernels={header['kernels']}")
    for n in kern.notes:
        say(f"  note: {n}")
    report.write()
    torch.manual_seed(0)
    bench = Bench(a, kern, report, Timer(a, gpu), dev)
    for section in [s for s in a.sections.split(",") if s]:
        ts = time.time()
        say(f"\n## {section}")
        try:
            if section == "linear":
                for si, (fam, shapes) in enumerate(cfg["linear"].items()):
                    for j, (k, n) in enumerate(shapes):
                        try:
                            bench.linears(fam, k, n, cfg["M"][fam], 10 * si + j)
                        except Exception:  # noqa: BLE001
                            say(f"! linear {k}->{n} failed:\n{traceback.format_exc()[-1500:]}")
                        free()
            elif section == "ffn":
                for si, (fam, dim) in enumerate(cfg["ffn"].items()):
                    try:
                        bench.ffns(fam, dim, cfg["M"][fam], si)
                    except Exception:  # noqa: BLE001
                        say(f"! ffn {dim} failed:\n{traceback.format_exc()[-1500:]}")
                    free()
            else:
                say(f"! unknown section {section}")
        except Exception:  # noqa: BLE001
            say(f"! section {section} failed:\n{traceback.format_exc()[-1500:]}")
        say(f"[{section}: {time.time() - ts:.0f} s]")
        report.write()
    tuned = kern.attr("_gemm_tuned")
    if a.autotune and tuned is not None:
        try:
            header["tuned_configs"] = [(", ".join(str(v) for v in key[:7]), f"{c.kwargs}, warps {c.num_warps}, "
                                        f"stages {c.num_stages}") for key, c in sorted(tuned.cache.items(), key=str)]
        except Exception as e:  # noqa: BLE001
            say(f"! tuned configs: {e}")
    header["dispatch_counts"] = dict(kern.dispatch.counts)
    header["complete"] = True
    report.write()
    goals = []
    report.goals(goals)
    say("\n## Goals\n" + "\n".join(goals))
    say(f"\nwrote {', '.join(md_paths + js_paths)} in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
