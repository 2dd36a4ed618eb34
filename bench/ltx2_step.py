"""One LTX-2 19B denoising step, every way of running its block linears, in one run: dense bf16;
ComfyUI's handling of an FP8 checkpoint (upcast per layer, and its native FP8 matmul); ComfyUI's
`fp8_e4m3fn_fast`; LiteFFN with `layers` = ffn and ffn+attention. ComfyUI's own LTXAVModel,
built on the device with random weights (no download).

    COMFYUI_PATH=... python bench/ltx2_step.py [--format fp8|mxfp4|nvfp4] [--tokens 6144 24576]
        [--layers ffn ffn+attention] [--no-comfy] [--out F.md] [--json F.json]
    CPU smoke test: COMFYUI_PATH=... python bench/ltx2_step.py --size tiny --tokens 32 --no-comfy --reps 1

Every variant runs in the same process on the same dense model: its linears are swapped in at
their module paths (as ComfyUI's object patches and FP8 ops put them there), measured, and
swapped back. Per variant and video token count (plus 126 audio and 1024 text tokens, batch 1,
one step without CFG, ComfyUI's default attention): step ms (median of --reps synchronised
forwards after warm-up); ms inside the FFN calls and inside the attention projections (CUDA
events around each call, one separate step each); peak allocated = the variant's resident weights +
the step's activation peak above what was resident (the other variants' weights stay on the GPU
in this process, so torch's raw peak would count them too); resident weights; and at the first
token count the outputs' relative difference (Frobenius) against dense bf16.

ComfyUI's FP8 variants: every block linear (FFN, attention projections, gates) as an FP8
checkpoint stores it (E4M3 codes, a per-tensor weight_scale, `comfy_quant` float8_e4m3fn),
loaded by ComfyUI's mixed-precision Linear: `comfy fp8 upcast` with full_precision_mm (weights
dequantized to bf16 per call), `comfy fp8 scaled_mm` without (ComfyUI quantizes the input and
calls _scaled_mm). `comfy fp8_e4m3fn_fast`: ComfyUI's fp8_ops Linear on weights cast to FP8 at
scale 1, as that weight dtype does with a bf16 checkpoint.
LiteFFN: statistics of every selected linear (forward passes at --calib-tokens, in groups that
fit --stats-budget-gb), each compressed at --rank with the --format residual as Compress Model
does; the `ffn` variant swaps in the FFNs only, `ffn+attention` every unit, with q/k/v (k/v) linked to one
input pass as nodes/model.patched links them. `--no-shared-too` adds each variant with an input pass per
linear, `--static-input-too` with inputs quantized by one static scale (LITEFFN_STATIC_INPUT), `--fast`
skips calibration (timing only). Outputs are rewritten after every variant: a run cut short keeps what it
measured.
"""
from __future__ import annotations

import datetime
import itertools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ltx2_e2e as E  # noqa: E402  (imports ComfyUI from COMFYUI_PATH, registers `liteffn`)
from ltx2_e2e import DEV, build, forward, inputs, log, sync  # noqa: E402

import comfy.ops  # noqa: E402

from liteffn.calibration import ltx2  # noqa: E402
from liteffn.calibration.compress import CompressedLayer  # noqa: E402
from liteffn.calibration.residual import quantize_residual  # noqa: E402
from liteffn.kernels import dispatch  # noqa: E402
from liteffn.kernels import modules as kernel_modules  # noqa: E402
from liteffn.kernels.modules import module_from_layers, share_inputs  # noqa: E402

# a bench-only choice: the FFNs and the projections whose input is the video stream (thousands of
# tokens), leaving dense those that see the 126 audio or the 1024 text tokens
VIDEO_TOKENS = "ffn+attention@video-tokens"
VIDEO_INPUT = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
               "audio_to_video_attn.to_q", "audio_to_video_attn.to_out.0", "video_to_audio_attn.to_k",
               "video_to_audio_attn.to_v")


def choice_units(n_blocks, choice):
    if choice != VIDEO_TOKENS:
        return ltx2.units(n_blocks, layers=choice)
    return [u for u in ltx2.units(n_blocks, layers="ffn+attention")
            if ltx2.is_ffn_unit(u) or ".".join(u.split(".")[2:]) in VIDEO_INPUT]


def nbytes(mod) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(mod.parameters(), mod.buffers()))


def qbytes(mod) -> int:
    """Bytes of a module whose weight may be a ComfyUI QuantizedTensor (its codes and scales)."""
    total = 0
    for t in itertools.chain(mod.parameters(), mod.buffers()):
        if type(t).__name__ == "QuantizedTensor" or type(getattr(t, "data", None)).__name__ == "QuantizedTensor":
            q = t.data if type(t).__name__ != "QuantizedTensor" else t
            total += q._qdata.numel() * q._qdata.element_size() + 4
        else:
            total += t.numel() * t.element_size()
    return total


class Swap:
    """Modules put at paths of the model and taken back: {path: module} -> the originals."""

    def __init__(self, model, mods: dict):
        self.model, self.mods, self.orig = model, mods, {}

    def __enter__(self):
        for path, mod in self.mods.items():
            parent, attr = path.rsplit(".", 1)
            p = self.model.get_submodule(parent)
            self.orig[path] = getattr(p, attr)
            setattr(p, attr, mod)
        return self

    def __exit__(self, *exc):
        for path, mod in self.orig.items():
            parent, attr = path.rsplit(".", 1)
            setattr(self.model.get_submodule(parent), attr, mod)


def block_linears(m) -> dict[str, str]:
    """{linear path: kind} of every nn.Linear in the transformer blocks."""
    out = {}
    for n, mod in m.named_modules():
        if n.startswith("transformer_blocks.") and isinstance(mod, torch.nn.Linear):
            out[n] = ltx2.kind_of(n) or "gate"
    return out


# ------------------------------------------------------------------ ComfyUI's FP8 linears
def comfy_mixed_fp8(lin: torch.nn.Linear):
    """The linear as ComfyUI loads it from a scaled FP8 checkpoint (mixed-precision ops)."""
    ops = comfy.ops.mixed_precision_ops({}, torch.bfloat16)
    new = ops.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device=DEV)
    w = lin.weight.float()
    scale = (w.abs().amax() / 448).clamp_min(1e-12)
    sd = {"weight": (w / scale).to(torch.float8_e4m3fn), "weight_scale": scale.reshape(()),
          "comfy_quant": torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)}
    if lin.bias is not None:
        sd["bias"] = lin.bias.detach().clone()
    new.load_state_dict(sd, strict=False)
    return new.eval().requires_grad_(False)


def comfy_fp8_fast(lin: torch.nn.Linear):
    """ComfyUI's fp8_ops Linear on the weight cast to FP8 at scale 1 (weight dtype fp8_e4m3fn_fast)."""
    new = comfy.ops.fp8_ops.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device=DEV,
                                   dtype=torch.float8_e4m3fn)
    new.weight = torch.nn.Parameter(lin.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    if lin.bias is not None:
        new.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return new.eval().requires_grad_(False)


# ------------------------------------------------------------------ LiteFFN
def fake_all(m, a, names):
    """Timing only (--fast): the residual rounded to nearest from W itself, random rank-r factors,
    a fixed input range; same tensors, shapes and kernel paths as compress_linear's, seconds instead
    of minutes, but not W: the output difference is meaningless."""
    mods, layers = dict(m.named_modules()), {}
    g = torch.Generator(DEV).manual_seed(0)
    for n in names:
        lin = mods[n]
        W = lin.weight.float()
        q, _ = quantize_residual(W, a.format)
        r = min(a.rank, min(W.shape) // 2)
        t = {k: v.contiguous().cpu() for k, v in q.items()}
        t["A"] = (torch.randn(W.shape[0], r, generator=g, device=DEV) * 1e-2).bfloat16().cpu()
        t["B"] = (torch.randn(r, W.shape[1], generator=g, device=DEV) * 1e-2).bfloat16().cpu()
        t["input_amax"] = torch.tensor([8.0])
        if lin.bias is not None:
            t["bias"] = lin.bias.detach().bfloat16().cpu()
        layers[n] = CompressedLayer(t, dict(format=a.format, in_features=W.shape[1], out_features=W.shape[0]))
    return layers


def liteffn_modules(layers, units) -> dict:
    mods = {u: module_from_layers([layers[n] for n in ltx2.linears_of(u)]).to(DEV) for u in units}
    share_inputs(mods, ltx2.shared_inputs(list(mods)))  # as nodes/model.patched links them
    return mods


# ------------------------------------------------------------------ measurement
def measure(m, inp, a, ffn_paths, attn_paths, weights_bytes):
    for _ in range(a.warmup):
        forward(m, inp)
    sync()
    base = torch.cuda.memory_allocated() if DEV == "cuda" else 0
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    host = []
    for _ in range(a.reps):
        t = time.perf_counter()
        forward(m, inp)
        host.append(time.perf_counter() - t)  # the host's own time: near step_ms when the GPU waits on it
        sync()
        times.append(time.perf_counter() - t)
    r = {"step_ms": 1e3 * statistics.median(times), "host_ms": 1e3 * statistics.median(host),
         "weights_gib": weights_bytes / 2**30}
    if DEV == "cuda":
        r["peak_gib"] = (weights_bytes + torch.cuda.max_memory_allocated() - base) / 2**30
    r["ffn_ms"] = E.call_ms(m, inp, ffn_paths)  # one step each: events around 96 / 1152 calls
    r["attn_by_projection_ms"] = {}
    r["attn_linear_ms"] = E.call_ms(m, inp, attn_paths, r["attn_by_projection_ms"])
    return r


def rel(y, ref) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


# ------------------------------------------------------------------ report
def write(R, a):
    h = R["meta"]
    lines = [f"# LTX-2 {h['size']}: one step, every way of running the block linears", "",
             f"{h['device']}, {h['date']}, torch {h['torch']}, triton {h['triton']}; {h['params_b']:.3g}B parameters, "
             f"random weights; batch 1, one step without CFG, {a.audio_tokens} audio + {a.context_tokens} text tokens, "
             f"ComfyUI's default attention (`{h['attention']}`); median of {a.reps} after {a.warmup} warm-up. "
             f"LiteFFN: rank {a.rank}, residual {a.format}" + (" (--fast: timing only, not compressed from W: ignore the "
        "output difference)" if a.fast else "") + f". Command: `{h['command']}`.", "",
             "| video tokens | variant | step ms | vs dense | host ms | FFN ms | attention-projection ms | peak GiB "
             "| weights GiB | output rel. diff video / audio |", "|" + "---|" * 10]
    for n, rows in R["rows"].items():
        dense = rows.get("dense bf16", {}).get("step_ms")
        for v, r in rows.items():
            d = R["diff"].get(v)
            lines.append(f"| {n} | {v} | {r['step_ms']:.1f} | {E.fmt(dense, r['step_ms'], '.2f', 'x')} | {r['host_ms']:.1f} | {r['ffn_ms']:.1f} "
                         f"| {r['attn_linear_ms']:.1f} | {E.fmt(r.get('peak_gib'), 1, '.2f')} | {r['weights_gib']:.2f} "
                         f"| {'—' if d is None or int(n) != a.tokens[0] else f'{d[0]:.2e} / {d[1]:.2e}'} |")
    lines.append("")
    if "compress" in R:
        c = R["compress"]
        lines.append(f"- LiteFFN calibration: {c['passes']} passes x {c['calib_steps']} steps at {c['calib_tokens']} "
                     f"video tokens, {c['calib_s']:.1f} s; compression of {c['linears']} linears on the device "
                     f"{c['compress_s']:.1f} s")
        for k, v in c["by_kind"].items():
            lines.append(f"  - {k}: {v['linears']} linears, {v['seconds']:.1f} s, R-weighted relative weight error "
                         f"median {v['rel_err_median']:.4f}, max {v['rel_err_max']:.4f}")
    for n, rows in R["rows"].items():
        names = list(next(iter(rows.values()), {}).get("attn_by_projection_ms", {}))
        if names:
            lines += ["", f"Attention projections at {n} video tokens, ms per step by projection (all blocks):", "",
                      "| projection | " + " | ".join(rows) + " |", "|" + "---|" * (len(rows) + 1)]
            lines += [f"| {k} | " + " | ".join(f"{r.get('attn_by_projection_ms', {}).get(k, 0):.1f}" for r in rows.values())
                      + " |" for k in names]
    lines.append("")
    if R.get("paths"):
        lines.append(f"- LiteFFN calls by path (dispatch.counts): {R['paths']}")
    text = "\n".join(lines) + "\n"
    for path, body in ((a.out, text), (a.json, json.dumps(R, indent=1))):
        if path:
            with open(path, "w") as f:
                f.write(body)
    return text


# ------------------------------------------------------------------ main
def main():
    ap = E.arguments(__doc__, calib_steps=1, stats_budget_gb=60.0)
    ap.add_argument("--layers", nargs="+", default=["ffn", "ffn+attention"], choices=[*ltx2.LAYERS, VIDEO_TOKENS])
    ap.add_argument("--no-comfy", action="store_true", help="leave out ComfyUI's FP8 variants")
    ap.add_argument("--no-programs-too", action="store_true",
                    help="each LiteFFN variant also with recorded launch programs off (kernels/programs.py), and "
                         "with neither programs nor raw launches (gemm._Raw): the compiled kernels' runners")
    ap.add_argument("--no-shared-too", action="store_true",
                    help="each LiteFFN variant with attention also with its q/k/v (k/v) input passes one per "
                         "linear (kernels/modules.SHARE_INPUTS off)")
    ap.add_argument("--static-input-too", action="store_true",
                    help="each LiteFFN variant also with calibrated linears' inputs quantized with one static scale "
                         "(kernels/modules.STATIC_INPUT)")
    ap.add_argument("--fast", action="store_true", help="timing only: no calibration, residuals rounded from W, "
                                                        "random factors (the output difference means nothing)")
    a = E.parsed(ap)
    tv = E.triton_version()
    import comfy.ldm.modules.attention as comfy_attn

    m = build(a.size, torch.bfloat16)
    sync()
    dense_bytes = nbytes(m)
    n_blocks = len(m.transformer_blocks)
    kinds = block_linears(m)
    ffn_paths = ltx2.ffn_modules(n_blocks)
    attn_paths = [p for p, k in kinds.items() if k == "attention"]
    R = {"meta": dict(size=a.size, format=a.format, rank=a.rank, device=torch.cuda.get_device_name() if DEV == "cuda" else "CPU",
                      date=str(datetime.datetime.now())[:16], torch=torch.__version__, triton=tv,
                      attention=comfy_attn.optimized_attention.__name__, command="python " + " ".join(sys.argv),
                      params_b=sum(p.numel() for p in m.parameters()) / 1e9,
                      block_linear_params_b=sum(m.get_submodule(p).weight.numel() for p in kinds) / 1e9),
         "rows": {str(n): {} for n in a.tokens}, "diff": {}}
    log(f"built {a.size}: {R['meta']['params_b']:.3g}B parameters ({R['meta']['block_linear_params_b']:.3g}B in "
        f"{len(kinds)} block linears), {dense_bytes / 2**30:.3g} GiB")
    inps = {n: inputs(m, n, a, seed=n) for n in a.tokens}
    # the reference is a second call: since 12-02 the first forward of a fresh model differs from every later one
    # by 1.1e-2 (dense against itself; 0 on 12-01), so that first call is a warm-up
    forward(m, inps[a.tokens[0]])
    ref = [t.clone() for t in forward(m, inps[a.tokens[0]])]

    def run(variant, swaps: dict, weights_bytes: int, setup=None):
        with Swap(m, swaps):
            if setup:
                setup()
            out = forward(m, inps[a.tokens[0]])
            R["diff"][variant] = (rel(out[0], ref[0]), rel(out[1], ref[1]))
            for n in a.tokens:
                R["rows"][str(n)][variant] = r = measure(m, inps[n], a, ffn_paths, attn_paths, weights_bytes)
                log(f"{n} video tokens, {variant}: step {r['step_ms']:.1f} ms, FFN {r['ffn_ms']:.1f}, attention "
                    f"projections {r['attn_linear_ms']:.1f}, peak {r.get('peak_gib', 0):.2f} GiB, diff "
                    f"{R['diff'][variant][0]:.2e}")
        sync(free=True)
        write(R, a)

    run("dense bf16", {}, dense_bytes)
    if not a.no_comfy:
        mixed = {p: comfy_mixed_fp8(m.get_submodule(p)) for p in kinds}
        wb = dense_bytes - sum(nbytes(m.get_submodule(p)) for p in kinds) + sum(qbytes(x) for x in mixed.values())

        def full_precision(on):
            for x in mixed.values():
                x._full_precision_mm = on
        run("comfy fp8 upcast", mixed, wb, lambda: full_precision(True))
        run("comfy fp8 scaled_mm", mixed, wb, lambda: full_precision(False))
        del mixed
        sync(free=True)
        fast = {p: comfy_fp8_fast(m.get_submodule(p)) for p in kinds}
        run("comfy fp8_e4m3fn_fast", fast, wb)
        del fast
        sync(free=True)

    units = {layers: choice_units(n_blocks, layers) for layers in a.layers}
    needed = sorted({n for u in set().union(*units.values()) for n in ltx2.linears_of(u)})
    if a.fast:
        layers = fake_all(m, a, needed)
    else:
        layers, R["compress"] = E.calibrate_and_compress(m, a, needed)
    write(R, a)
    dispatch.counts.clear()
    for choice, us in units.items():
        mods = liteffn_modules(layers, us)
        replaced = sum(nbytes(m.get_submodule(u)) for u in us)
        wb = dense_bytes - replaced + sum(nbytes(x) for x in mods.values())
        run(f"LiteFFN {a.format} {choice}", mods, wb)
        R["paths"] = dict(dispatch.counts)
        for flag, attr, value, label in ((a.no_shared_too and any(ltx2.shared_inputs(us)), "SHARE_INPUTS", False,
                                          "input pass per linear"),
                                         (a.static_input_too, "STATIC_INPUT", True, "static input scale")):
            if flag:  # the same modules once more with one kernels/modules.py setting flipped
                before = getattr(kernel_modules, attr)
                setattr(kernel_modules, attr, value)
                try:
                    run(f"LiteFFN {a.format} {choice}, {label}", mods, wb)
                finally:
                    setattr(kernel_modules, attr, before)
        if a.no_programs_too:
            from liteffn.kernels import gemm
            from liteffn.kernels.programs import PROGRAMS
            PROGRAMS.enabled = False
            try:
                run(f"LiteFFN {a.format} {choice}, no programs", mods, wb)
                gemm.RAW_LAUNCH = False
                run(f"LiteFFN {a.format} {choice}, no programs, no raw launch", mods, wb)
            finally:
                PROGRAMS.enabled, gemm.RAW_LAUNCH = None, True
        del mods
        sync(free=True)
    run("dense bf16 (again, last)", {}, dense_bytes)  # the GPU after minutes of compression: clocks, allocator
    if DEV == "cuda" and not any(k.endswith(":triton") for k in R.get("paths", {})):
        log("WARNING: no LiteFFN call took the Triton kernels: the LiteFFN numbers are the torch reference's")
    print(write(R, a), flush=True)


if __name__ == "__main__":
    main()
