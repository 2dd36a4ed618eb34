"""End-to-end LTX-2 19B: dense bf16 FFNs against LiteFFN-compressed FFNs, in ComfyUI's own
LTXAVModel built on the device with random weights (no download).

    COMFYUI_PATH=... python bench/ltx2_e2e.py [--size full] [--tokens 6144 24576] [--rank 64]
        [--format fp8|mxfp4|nvfp4] [--calib-steps 2] [--stats-budget-gb 24] [--reps 3]
        [--out bench/ltx2_e2e_h100.md] [--json bench/ltx2_e2e_h100.json] [--attention default] [--compile]
    CPU smoke test (torch reference path, 2 calibration passes):
    COMFYUI_PATH=... python bench/ltx2_e2e.py --size tiny --tokens 32 --calib-steps 1 --reps 1 \\
        --stats-budget-gb 0.0043

Per video token count (plus 126 audio tokens and 1024 text tokens; batch 1, one denoising step
without CFG) and attention (ComfyUI's default, and the fastest that runs here of torch SDPA's
flash / cuDNN / efficient backends, FA3, flash_attn, sageattention), dense and compressed: step
time (median of --reps synchronised forwards after warm-up); time inside the 96 FFN calls (CUDA
events around each call in a separate pass, no sync per call); peak allocated memory during a
step; resident weight bytes (parameters and buffers). Also the wall time of calibrating (forward
passes with statistics hooks, in groups that fit --stats-budget-gb) and of compressing all 192
FFN linears on the device. With --compile, also the step time with every transformer block
compiled (torch.compile, inductor, as KJNodes' LTX compile nodes do) at the first token count and
ComfyUI's default attention, dense and compressed. Outputs are rewritten after every section: a run cut short keeps what
it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401  (registers `liteffn` in a plain checkout)

sys.path.insert(0, os.environ["COMFYUI_PATH"])
DEV = "cuda" if torch.cuda.is_available() else "cpu"
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = DEV == "cpu"  # must precede the first import of comfy.model_management
import comfy.ldm.modules.attention as comfy_attn  # noqa: E402
import comfy.ops  # noqa: E402
from comfy.ldm.lightricks.av_model import LTXAVModel  # noqa: E402

from liteffn.calibration import ltx2  # noqa: E402
from liteffn.calibration.compress import compress_linear  # noqa: E402
from liteffn.calibration.lowrank import RankPolicy  # noqa: E402
from liteffn.calibration.stats import StatsCollector, plan_passes  # noqa: E402
from liteffn.kernels import dispatch  # noqa: E402
from liteffn.kernels.modules import ffn_from_layers  # noqa: E402

# tests/integration/ltx2_tiny.py's config: FFNs 64<->256 and 32<->128, 2 blocks, small text connectors
TINY = dict(cross_attention_dim=64, audio_cross_attention_dim=32, attention_head_dim=16, audio_attention_head_dim=8,
            num_attention_heads=4, audio_num_attention_heads=4, caption_channels=48, num_layers=2,
            connector_num_attention_heads=4, connector_attention_head_dim=12, connector_num_layers=2)
T0 = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def sync(free=False):
    if free:
        gc.collect()
    if DEV == "cuda":
        torch.cuda.synchronize()
        if free:
            torch.cuda.empty_cache()


@torch.no_grad()
def build(size, dtype, seed=0):
    """N(0, 1/fan_in) matrices keep activations at unit scale through 48 blocks (N(0, 0.02) shrinks
    them); norm weights 1, other vectors N(0, 0.02^2). Generated in place, where the weights live."""
    with torch.device(DEV):
        m = LTXAVModel(dtype=dtype, device=DEV, operations=comfy.ops.disable_weight_init, **(TINY if size == "tiny" else {}))
    g = torch.Generator(DEV).manual_seed(seed)
    for n, p in itertools.chain(m.named_parameters(), m.named_buffers()):
        if p.is_floating_point() and p.dim() > 1:
            p.normal_(0, p[0].numel() ** -0.5, generator=g)
        elif p.is_floating_point():
            p.fill_(1) if "norm" in n else p.normal_(0, 0.02, generator=g)
    return m.eval().requires_grad_(False)


def latent_fhw(n):
    """Video tokens -> latent frames, height, width (patch 1): 6144 -> 16x16x24, 24576 -> 16x32x48."""
    f = next(f for f in (16, 8, 4, 2, 1) if n % f == 0)
    h = max(d for d in range(1, int((n // f) ** 0.5) + 1) if (n // f) % d == 0)
    return f, h, n // f // h


def inputs(m, n_video, a, seed, dtype=torch.bfloat16):
    g = torch.Generator(DEV).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device=DEV, dtype=dtype)  # noqa: E731
    # what ComfyUI hands the model: the text encoder's processed context, 2 x caption_channels wide
    ctx_w = (m.cross_attention_dim + m.audio_cross_attention_dim) if m.caption_proj_before_connector else 2 * m.caption_channels
    x = [rnd(1, m.in_channels, *latent_fhw(n_video)), rnd(1, m.num_audio_channels, a.audio_tokens, m.audio_frequency_bins)]
    return x, torch.rand(1, generator=g, device=DEV) * 0.9 + 0.05, rnd(1, a.context_tokens, ctx_w)


@torch.no_grad()
def forward(m, inp):
    return m(inp[0], inp[1], inp[2], frame_rate=25)


# ------------------------------------------------------------------ attention
def fa3(fn):
    def attention_fa3(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kw):
        if mask is not None:  # FA3 takes no mask
            return comfy_attn.attention_pytorch(q, k, v, heads, mask=mask, skip_reshape=skip_reshape,
                                                skip_output_reshape=skip_output_reshape, **kw)
        if skip_reshape:  # [b, h, s, d] -> [b, s, h, d]
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        else:
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1) for t in (q, k, v))
        out = fn(q, k, v, causal=False)
        out = out[0] if isinstance(out, tuple) else out  # some FA3 versions also return the LSE
        return out.transpose(1, 2) if skip_output_reshape else out.reshape(out.shape[0], out.shape[1], -1)
    return attention_fa3


def attention_options():
    """name -> (attention function, context factory). LTX-2's CrossAttention looks up
    comfy.ldm.modules.attention.optimized_attention at call time, so setting that attribute
    switches every attention of the model; the SDPA backends run ComfyUI's attention_pytorch
    under sdpa_kernel (on Linux comfy.ops calls plain torch SDPA and sets no priority of its own)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    none = contextlib.nullcontext
    opts = {"comfy default": (comfy_attn.optimized_attention, none)}
    for b in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        opts[f"sdpa {b.split('_')[0].lower()}"] = (comfy_attn.attention_pytorch, lambda b=b: sdpa_kernel([getattr(SDPBackend, b)]))
    try:
        import flash_attn_interface
        opts["fa3"] = (fa3(flash_attn_interface.flash_attn_func), none)
    except ImportError:
        pass
    # ComfyUI's own flash_attn / sage functions (on an error they log it and fall back to SDPA)
    if getattr(comfy_attn, "FLASH_ATTENTION_IS_AVAILABLE", False):
        opts["flash_attn"] = (comfy_attn.attention_flash, none)
    if getattr(comfy_attn, "SAGE_ATTENTION_IS_AVAILABLE", False):
        opts["sageattention (8-bit)"] = (comfy_attn.attention_sage, none)
    return opts


@contextlib.contextmanager
def attention(opt):
    saved, comfy_attn.optimized_attention = comfy_attn.optimized_attention, opt[0]
    try:
        with opt[1]():
            yield
    finally:
        comfy_attn.optimized_attention = saved


# ------------------------------------------------------------------ measurement
def weight_gib(m):
    return sum(t.numel() * t.element_size() for t in itertools.chain(m.parameters(), m.buffers())) / 2**30


def measure(m, inp, a, ffn=True):
    """Step ms (median of reps after warm-up), peak allocated GiB during those steps, FFN ms."""
    for _ in range(a.warmup):
        forward(m, inp)
    sync()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.reps):
        t = time.perf_counter()
        forward(m, inp)
        sync()
        times.append(time.perf_counter() - t)
    r = {"step_ms": 1e3 * statistics.median(times)}
    if DEV == "cuda":
        r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if ffn:
        r["ffn_ms"] = ffn_ms(m, inp, a.reps)
    return r


def call_ms(m, inp, paths, by=None) -> float:
    """ms inside the calls of the modules at paths during one step: CUDA events recorded around each
    call and read once the step has synchronised, so the step runs as it would unobserved. by: a dict
    filled with ms per path below its block (`ff`, `attn1.to_q`), summed over the blocks."""
    marks = []

    def stamp_for(path):
        key = ".".join(path.split(".")[2:])

        def stamp(*_):
            if DEV == "cuda":
                marks.append((key, torch.cuda.Event(enable_timing=True)))
                marks[-1][1].record()
            else:
                marks.append((key, time.perf_counter()))
        return stamp

    hooks = []
    for p in paths:
        mod, stamp = m.get_submodule(p), stamp_for(p)
        hooks += [mod.register_forward_pre_hook(stamp), mod.register_forward_hook(stamp)]
    try:
        forward(m, inp)
        sync()
    finally:
        for h in hooks:
            h.remove()
    total = 0.0
    for (k, s), (_, e) in zip(marks[::2], marks[1::2]):
        ms = s.elapsed_time(e) if DEV == "cuda" else 1e3 * (e - s)
        total += ms
        if by is not None:
            by[k] = by.get(k, 0.0) + ms
    return total


def ffn_ms(m, inp, reps):
    """ms inside the 96 FFN calls of one step, median over reps."""
    paths = ltx2.ffn_modules(len(m.transformer_blocks))
    return statistics.median(call_ms(m, inp, paths) for _ in range(reps))


def compiled(m, a, key, R):
    """Step time with each block compiled (the first call, compile included, timed apart); then back to eager."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.utils.counters.clear()
    inp = inputs(m, a.tokens[0], a, seed=a.tokens[0])
    for blk in m.transformer_blocks:
        blk.compile()
    try:
        t = time.perf_counter()
        forward(m, inp)
        sync()
        first = time.perf_counter() - t
        r = measure(m, inp, a, ffn=False)
    finally:
        for blk in m.transformer_blocks:
            blk._compiled_call_impl = None
    r.update(first_call_s=first, graph_breaks=sum(torch._dynamo.utils.counters["graph_break"].values()),
             break_reasons=[b.splitlines()[0][:120] for b in torch._dynamo.utils.counters["graph_break"]][:5])
    R.setdefault("compiled", {})[key] = r
    log(f"{a.tokens[0]} video tokens, {key}, blocks compiled: step {r['step_ms']:.1f} ms (first call {first:.1f} s), "
        f"{r['graph_breaks']} graph breaks {r['break_reasons']}")
    del inp
    sync(free=True)


# ------------------------------------------------------------------ compression
def calibrate_and_compress(m, a, names) -> tuple[dict, dict]:
    """{name: CompressedLayer} of names, calibrated in passes that fit --stats-budget-gb and compressed
    on the device as Compress Model does, and the timings: passes, calib_s, compress_s, and per kind of
    linear (ltx2.kind_of) its count, seconds and R-weighted errors."""
    mods = dict(m.named_modules())
    budget = int(a.stats_budget_gb * 2**30)
    groups = plan_passes({n: mods[n].in_features for n in names}, budget)
    # the same inputs for every group, so each group sees the activations the others saw
    calib = [inputs(m, a.calib_tokens, a, seed=1000 + i) for i in range(a.calib_steps)]
    log(f"calibrating {len(names)} linears in {len(groups)} passes x {a.calib_steps} steps at {a.calib_tokens} video tokens")
    layers, t_cal, t_comp, kinds = {}, 0.0, 0.0, {}
    for gi, group in enumerate(groups):
        t = time.perf_counter()
        with StatsCollector(m, group, budget_bytes=budget) as col:
            for inp in calib:
                forward(m, inp)
        sync()
        t_cal += time.perf_counter() - t
        t = time.perf_counter()
        for n in group:
            lin = mods[n]
            rank = min(a.rank, min(lin.weight.shape) // 2)  # binds only at tiny size
            t1 = time.perf_counter()
            layers[n] = compress_linear(lin.weight, lin.bias, col.stats.layers.pop(n), RankPolicy(rank=rank),
                                        a.format, device=DEV, name=n)
            k = kinds.setdefault(ltx2.kind_of(n), {"n": 0, "s": 0.0, "err": []})
            k["n"] += 1
            k["s"] += time.perf_counter() - t1
            k["err"].append(layers[n].info["rel_err"])
        sync()
        t_comp += time.perf_counter() - t
        del col
        sync(free=True)
        log(f"  pass {gi + 1}/{len(groups)}: {len(group)} linears; calibration {t_cal:.1f} s, compression {t_comp:.1f} s so far")
    info = dict(linears=len(names), passes=len(groups), calib_steps=a.calib_steps, calib_tokens=a.calib_tokens,
                calib_s=t_cal, compress_s=t_comp,
                by_kind={k: dict(linears=v["n"], seconds=v["s"], rel_err_median=statistics.median(v["err"]),
                                 rel_err_max=max(v["err"])) for k, v in kinds.items()})
    return layers, info


def compress(m, a, R):
    n_blocks = len(m.transformer_blocks)
    names = [f"{f}.{s}" for f in ltx2.ffn_modules(n_blocks) for s in (ltx2.UP, ltx2.DOWN)]
    layers, info = calibrate_and_compress(m, a, names)
    errs = sorted(c.info["rel_err"] for c in layers.values())
    t = time.perf_counter()
    for f in ltx2.ffn_modules(n_blocks):
        parent, attr = f.rsplit(".", 1)
        new = ffn_from_layers(layers.pop(f"{f}.{ltx2.UP}"), layers.pop(f"{f}.{ltx2.DOWN}")).to(DEV)
        setattr(m.get_submodule(parent), attr, new)  # drops the dense FFN
    sync(free=True)
    R["compress"] = dict(info, replace_s=time.perf_counter() - t, rel_err_median=errs[len(errs) // 2],
                         rel_err_max=errs[-1])
    R["weights_gib_liteffn"] = weight_gib(m)
    log(f"compressed: {R['compress']}, weights {R['weights_gib_liteffn']:.3g} GiB")


# ------------------------------------------------------------------ report
def fmt(x, y=1.0, spec=".1f", suffix=""):
    """x / y formatted; '—' where a number is missing (not measured yet, or no GPU)."""
    return "—" if x is None or y is None else f"{x / y:{spec}}{suffix}"


def write(R, a):
    h, w = R["meta"], (R.get("weights_gib_dense"), R.get("weights_gib_liteffn"))
    lines = [f"# LTX-2 {h['size']} end to end: dense bf16 vs LiteFFN {h['format']} r={h['rank']}", "",
             f"{h['device']}, {h['date']}, torch {h['torch']}, triton {h['triton']}; {h['params_b']:.3g}B parameters, "
             f"random weights; batch 1, one step without CFG, {a.audio_tokens} audio + {a.context_tokens} text tokens; "
             f"median of {a.reps} after {a.warmup} warm-up. ComfyUI's default attention: `{h['comfy_attention']}`.", "",
             "| video tokens | attention | step ms dense | step ms LiteFFN | speedup | FFN ms dense | FFN ms LiteFFN "
             "| FFN speedup | FFN share dense / LiteFFN | peak GiB dense / LiteFFN | peak reduction | weights GiB dense / LiteFFN |",
             "|" + "---|" * 12]
    for row in R["rows"]:
        b, c = row.get("base", {}), row.get("comp", {})
        bs, cs, bf, cf, bp, cp = (d.get(k) for k in ("step_ms", "ffn_ms", "peak_gib") for d in (b, c))
        red = None if bp is None or cp is None else 1 - cp / bp
        lines.append(f"| {row['video_tokens']} | {row['attention']} | {fmt(bs)} | {fmt(cs)} | {fmt(bs, cs, '.2f', 'x')} "
                     f"| {fmt(bf)} | {fmt(cf)} | {fmt(bf, cf, '.2f', 'x')} | {fmt(bf, bs, '.0%')} / {fmt(cf, cs, '.0%')} "
                     f"| {fmt(bp, 1, '.2f')} / {fmt(cp, 1, '.2f')} | {fmt(red, 1, '.0%')} | {fmt(w[0], 1, '.3g')} / {fmt(w[1], 1, '.3g')} |")
    lines.append("")
    for n, cand in R["candidates"].items():
        lines.append(f"- dense step ms by attention at {n} video tokens: "
                     + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} failed ({v})" for k, v in cand.items()))
    if "compress" in R:
        c = R["compress"]
        lines.append(f"- calibration: {c['passes']} passes x {c['calib_steps']} steps at {c['calib_tokens']} video tokens "
                     f"(statistics budget {a.stats_budget_gb} GiB) {c['calib_s']:.1f} s; compression of {c['linears']} "
                     f"linears on the device {c['compress_s']:.1f} s; module build and swap {c['replace_s']:.1f} s; "
                     f"R-weighted relative error median {c['rel_err_median']:.4f}, max {c['rel_err_max']:.4f}")
    if "compiled" in R:
        c, e = R["compiled"], {r["key"]: r for r in R["rows"] if r["video_tokens"] == a.tokens[0]}.get("comfy default", {})
        parts = []
        for k, base in (("dense", e.get("base", {})), ("LiteFFN", e.get("comp", {}))):
            if k in c:
                parts.append(f"{k} {c[k]['step_ms']:.1f} ms (eager {fmt(base.get('step_ms'))} ms, first call with "
                             f"compilation {c[k]['first_call_s']:.0f} s, {c[k]['graph_breaks']} graph breaks)")
        ratio = fmt(c["dense"]["step_ms"], c["LiteFFN"]["step_ms"], ".2f", "x") if len(c) == 2 else "—"
        lines.append(f"- torch.compile of every block (inductor) at {a.tokens[0]} video tokens, ComfyUI's default attention: "
                     + "; ".join(parts) + f"; compiled LiteFFN vs compiled dense: {ratio}")
    if "paths" in R:
        lines.append(f"- compressed FFN calls by path (dispatch.counts): {R['paths']}")
    text = "\n".join(lines) + "\n"
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(R, f, indent=1)
    return text


# ------------------------------------------------------------------ main
def arguments(doc: str, calib_steps: int, stats_budget_gb: float) -> argparse.ArgumentParser:
    """The options this bench and bench/ltx2_step.py share."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--size", choices=("tiny", "full"), default="full")
    ap.add_argument("--tokens", type=int, nargs="+", help="video tokens (default 6144 24576; tiny 32)")
    ap.add_argument("--audio-tokens", type=int, default=126)
    ap.add_argument("--context-tokens", type=int, default=1024, help="ComfyUI pads LTX-2's Gemma prompt to 1024")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--format", default="fp8", choices=("fp8", "mxfp4", "nvfp4"))
    ap.add_argument("--calib-steps", type=int, default=calib_steps)
    ap.add_argument("--calib-tokens", type=int, help="video tokens of calibration steps (default 6144; tiny: first --tokens)")
    ap.add_argument("--stats-budget-gb", type=float, default=stats_budget_gb,
                    help="GiB of X^T X statistics per calibration pass")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", help="markdown table")
    ap.add_argument("--json", help="raw numbers")
    return ap


def parsed(ap) -> argparse.Namespace:
    a = ap.parse_args()
    a.tokens = a.tokens or ([32] if a.size == "tiny" else [6144, 24576])
    a.calib_tokens = a.calib_tokens or (a.tokens[0] if a.size == "tiny" else 6144)
    return a


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "none"


def main():
    ap = arguments(__doc__, calib_steps=2, stats_budget_gb=24.0)
    ap.add_argument("--attention", choices=("all", "default"), default="all",
                    help="all: also try every other attention that runs here and report the fastest")
    ap.add_argument("--compile", action="store_true", help="also time compiled blocks (first token count)")
    a = parsed(ap)
    tv = triton_version()

    m = build(a.size, torch.bfloat16)
    sync()
    opts, default = attention_options(), comfy_attn.optimized_attention.__name__
    if a.attention == "default":
        opts = {"comfy default": opts["comfy default"]}
    R = {"meta": dict(size=a.size, format=a.format, rank=a.rank, device=torch.cuda.get_device_name() if DEV == "cuda" else "CPU",
                      date=str(datetime.date.today()), torch=torch.__version__, triton=tv, comfy_attention=default,
                      params_b=sum(p.numel() for p in m.parameters()) / 1e9),
         "weights_gib_dense": weight_gib(m), "rows": [], "candidates": {}}
    log(f"built LTXAVModel {a.size} on {R['meta']['device']}: {R['meta']['params_b']:.3g}B parameters, "
        f"{R['weights_gib_dense']:.3g} GiB; ComfyUI's attention: {default}; options: {', '.join(opts)}")

    for n in a.tokens:  # dense: every attention option, then FFN time for the default and the fastest
        inp, res = inputs(m, n, a, seed=n), {}
        cand = R["candidates"][str(n)] = {}
        for name, opt in opts.items():
            try:
                with attention(opt):
                    res[name] = measure(m, inp, a, ffn=False)
                cand[name] = res[name]["step_ms"]
                log(f"{n} video tokens, dense, {name}: step {cand[name]:.1f} ms")
            except Exception as e:  # a backend that cannot run these shapes on this device
                cand[name] = f"{type(e).__name__}: {str(e).split('. ')[0][:100]}"
                log(f"{n} video tokens, {name} failed: {cand[name]}")
                sync(free=True)
        best = min(res, key=lambda k: res[k]["step_ms"])
        for name in dict.fromkeys(["comfy default", best]):
            with attention(opts[name]):
                res[name]["ffn_ms"] = ffn_ms(m, inp, a.reps)
            label = (f"comfy default ({default})" if name == "comfy default" else name) + (" (fastest)" if name == best else "")
            R["rows"].append(dict(video_tokens=n, audio_tokens=a.audio_tokens, attention=label, key=name, base=res[name]))
            log(f"{n} video tokens, dense, {name}: FFN {res[name]['ffn_ms']:.1f} ms of {res[name]['step_ms']:.1f} ms")
        del inp
        sync(free=True)
        print(write(R, a), flush=True)
    if a.compile:
        compiled(m, a, "dense", R)

    compress(m, a, R)
    write(R, a)
    dispatch.counts.clear()
    for row in R["rows"]:
        inp = inputs(m, row["video_tokens"], a, seed=row["video_tokens"])
        with attention(opts[row["key"]]):
            row["comp"] = measure(m, inp, a)
        R["paths"] = dict(dispatch.counts)
        log(f"{row['video_tokens']} video tokens, LiteFFN, {row['key']}: step {row['comp']['step_ms']:.1f} ms, "
            f"FFN {row['comp']['ffn_ms']:.1f} ms; paths so far {R['paths']}")
        del inp
        sync(free=True)
        write(R, a)
    if a.compile:
        compiled(m, a, "LiteFFN", R)
    if DEV == "cuda" and not R["paths"].get("ffn:triton"):
        log("WARNING: no compressed FFN call took the Triton kernels: the LiteFFN numbers are the torch reference's")
    print(write(R, a), flush=True)


if __name__ == "__main__":
    main()
