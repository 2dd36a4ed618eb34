"""Past one GPU (issue 22), on one machine with >= 2 CUDA GPUs:

    python bench/multi_gpu.py --out bench/multi_gpu_h200.md --json bench/results/multi_gpu_h200.json \\
        [--devices cuda:0,cuda:1] [--blocks 16] [--tokens 24576] [--parts calib,compress,sp] [--workdir DIR]
    python bench/multi_gpu.py --cpu-smoke --out /tmp/mg.md --json /tmp/mg.json   # CPU, gloo, tiny (a CPU test runs it)

calib: one LTX-2 block at full width (video FFN 4096<->16384, audio 2048<->8192, nn.Linear's
  default random init, the same on every rank) calibrated on each GPU with its own seeds
  (kernel_inputs "outliers" activations, --calib-tokens per rank and batch, 2 batches), each
  rank's statistics saved, then reduced over NCCL (calibration/distributed.py, methods ordered
  and all_reduce) into one file by rank 0: compared byte for byte with `liteffn merge-stats` of
  the per-rank files, with the reduction's time.
compress: a checkpoint of --blocks LTX-2 19B blocks' FFN linears at full size (4 per block:
  video 4096->16384, 16384->4096, audio 2048->8192, 8192->2048; default 16 blocks = 64 of the
  192 linears; --blocks 48 for all, ~80 GB of files) with random weights (a decaying low-rank
  part plus noise, drawn with synthetic.generator on the GPU) and statistics (X^T X of 4096
  correlated, outlier-channel rows per layer), written to --workdir; then `compress_checkpoint`
  (FP8 residual, r=64, GPTQ) on 1 GPU and on 2..N GPUs (one process per GPU, layers divided by
  cost): wall time (N GPUs: including starting the processes), each rank's busy time, and
  whether the files are byte-identical.
sp: the compressed video FFN at LTX-2 size (FP8, r=64, calibrated hidden scale: the fused
  three-launch path) on --tokens video tokens: on one GPU, and with the tokens sharded over 2
  GPUs (seq_parallel.shard / gather: all_gather of the outputs); relative difference of the
  gathered output against one GPU's, time per forward (median, CUDA events); and one Ulysses
  attention layer at LTX-2's shape (32 heads of 128, SDPA) sharded against whole, with its
  all-to-alls.

Writes the markdown table and the JSON after every part; a part that fails records its error and
the rest still run.
"""
from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401

from liteffn.calibration import compressed_file, ltx2  # noqa: E402
from liteffn.calibration import seq_parallel as sp  # noqa: E402
from liteffn.calibration.checkpoint import compress_checkpoint  # noqa: E402
from liteffn.calibration.cli import main as cli  # noqa: E402
from liteffn.calibration.distributed import launch, parse_devices, reduce_and_save  # noqa: E402
from liteffn.calibration.st_writer import StreamingSafetensorsWriter  # noqa: E402
from liteffn.calibration.stats import ActivationStats, LayerStats, StatsCollector  # noqa: E402
from liteffn.calibration.synthetic import generator, kernel_inputs, random_fp8_layer  # noqa: E402

P = ltx2.CKPT_PREFIX
OUT: dict = {"config": {}, "calib": [], "compress": [], "sp": [], "errors": {}}


def say(*a):
    print(*a, flush=True)


def cfg(a) -> dict:
    """Sizes: LTX-2 19B's, or tiny ones for --cpu-smoke."""
    if a.cpu_smoke:
        return {"vdim": 64, "adim": 32, "heads": 4, "rank": 8, "calib_tokens": 64, "stat_rows": 256,
                "tokens": 64, "budget": 2 * (256 * 256 * 4 + 256 * 4)}
    return {"vdim": 4096, "adim": 2048, "heads": 32, "rank": 64, "calib_tokens": a.calib_tokens, "stat_rows": 4096,
            "tokens": a.tokens, "budget": 3 << 29}  # 1.5 GiB: the 1 GiB video down layer travels alone


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, device, iters):
    """Median seconds per call (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ------------------------------------------------------------------ calib
def ltx2_like(blocks: int, vdim: int, adim: int, device) -> torch.nn.Module:
    """Modules named as LTX-2's FFN linears (transformer_blocks.N.ff.net.0.proj, ...), nn.Linear init."""
    root = torch.nn.Module()
    root.transformer_blocks = torch.nn.ModuleList()
    for _ in range(blocks):
        b = torch.nn.Module()
        for s, d in (("ff", vdim), ("audio_ff", adim)):
            ff = torch.nn.Module()
            ff.net = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Identity(), torch.nn.Linear(4 * d, d, device=device)])
            ff.net[0].proj = torch.nn.Linear(d, 4 * d, device=device)
            setattr(b, s, ff)
        root.transformer_blocks.append(b)
    return root


def run_ffns(root, x_v, x_a):
    for b in root.transformer_blocks:
        for ff, x in ((b.ff, x_v), (b.audio_ff, x_a)):
            ff.net[2](Fn.gelu(ff.net[0].proj(x), approximate="tanh"))


def calib_worker(rank, world, device, tmp, c):
    torch.manual_seed(0)  # the same weights on every rank
    m = ltx2_like(1, c["vdim"], c["adim"], device)
    names = ltx2.select(n for n, _ in m.named_modules())
    with StatsCollector(m, names) as col, torch.no_grad():
        for i in range(2):
            seed = 1000 * (rank + 1) + i
            t = c["calib_tokens"]
            run_ffns(m, kernel_inputs("outliers", t, c["vdim"], seed=seed, device=device).float(),
                     kernel_inputs("outliers", t // 4, c["adim"], seed=seed, device=device).float())
    stats = col.stats
    stats.meta.update(model_family=ltx2.FAMILY, runs=1,
                      fingerprint=compressed_file.fingerprint((n, m.get_submodule(n).weight) for n in names))
    own = os.path.join(tmp, f"rank{rank}.safetensors")
    stats.save(own)
    res = {}
    for method in ("ordered", "all_reduce"):
        s = ActivationStats.load(own, device=device)
        torch.distributed.barrier()
        sync(device)
        t = time.perf_counter()
        reduce_and_save(s, os.path.join(tmp, f"{method}.safetensors"), c["budget"], method)
        sync(device)
        res[method] = time.perf_counter() - t
        del s
    return res


def part_calib(a, c, devices):
    tmp = tempfile.mkdtemp(prefix="mg-calib-", dir=a.workdir)
    try:
        for n in sorted({2, len(devices)}):
            say(f"calib: {n} ranks")
            times = launch(calib_worker, devices[:n], tmp, c)
            ranks = [os.path.join(tmp, f"rank{r}.safetensors") for r in range(n)]
            merged = os.path.join(tmp, "merged.safetensors")
            assert cli(["merge-stats", *ranks, "-o", merged]) == 0
            m = ActivationStats.load(merged)
            for method in ("ordered", "all_reduce"):
                path = os.path.join(tmp, f"{method}.safetensors")
                d = ActivationStats.load(path)
                rel = max(float((d[k].xtx.double() - m[k].xtx.double()).norm() / m[k].xtx.double().norm())
                          for k in m.names())
                OUT["calib"].append({
                    "ranks": n, "method": method, "identical_bytes": filecmp.cmp(path, merged, shallow=False),
                    "max_rel_diff": rel, "rows_equal": all(d[k].rows == m[k].rows for k in m.names()),
                    "reduce_s": max(t[method] for t in times), "bytes": os.path.getsize(path)})
                say(OUT["calib"][-1])
            write(a)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ compress
def make_checkpoint(a, c, workdir, device) -> tuple[str, str]:
    """Full-size FFN linears of --blocks blocks, random (seeded), plus their statistics."""
    ckpt, stats_path = os.path.join(workdir, "ltx2_ffn.safetensors"), os.path.join(workdir, "stats.safetensors")
    w = StreamingSafetensorsWriter(ckpt)
    w.add(P + ltx2.MARKER, torch.zeros(4, 4, dtype=torch.bfloat16))
    stats = ActivationStats(meta={"model_family": ltx2.FAMILY, "runs": 1})
    i = 0
    for b in range(a.blocks):
        for s, d in (("ff", c["vdim"]), ("audio_ff", c["adim"])):
            for sub, (n, k) in (("net.0.proj", (4 * d, d)), ("net.2", (d, 4 * d))):
                name = f"transformer_blocks.{b}.{s}.{sub}"
                g = generator("bench/multi_gpu/weight", i, device)
                W = torch.randn(n, k, generator=g, device=device) / k**0.5
                W += 2 * (torch.randn(n, 64, generator=g, device=device) @ torch.randn(64, k, generator=g, device=device)) / (64 * k) ** 0.5
                w.add(f"{P}{name}.weight", W.bfloat16())
                w.add(f"{P}{name}.bias", (torch.randn(n, generator=g, device=device) / 8).bfloat16())
                rows = c["stat_rows"]
                X = torch.randn(rows, k, generator=g, device=device) + torch.randn(rows, 32, generator=g, device=device) @ torch.randn(32, k, generator=g, device=device)
                X[:, : max(1, k // 100)] *= 20
                stats.layers[name] = LayerStats((X.T @ X).cpu(), X.abs().amax(0).cpu(), rows)
                del W, X
                i += 1
    w.close({})
    stats.save(stats_path)
    return ckpt, stats_path


def part_compress(a, c, devices):
    workdir = tempfile.mkdtemp(prefix="mg-compress-", dir=a.workdir)
    try:
        t = time.perf_counter()
        ckpt, stats = make_checkpoint(a, c, workdir, devices[0])
        OUT["config"]["compress_files_s"] = time.perf_counter() - t
        OUT["config"]["compress_files_gb"] = (os.path.getsize(ckpt) + os.path.getsize(stats)) / 1e9
        say(f"compress: {4 * a.blocks} linears written in {time.perf_counter() - t:.0f} s")
        outs = {}
        for n in [1] + sorted({2, len(devices)}):
            out = os.path.join(workdir, f"out{n}.safetensors")
            tim = {}
            sync(devices[0])
            t = time.perf_counter()
            kw = {"devices": devices[:n]} if n > 1 else {"device": devices[0]}
            infos = compress_checkpoint(ckpt, out, stats, c["rank"], "fp8", progress=False, timings=tim, **kw)
            wall = time.perf_counter() - t
            outs[n] = out
            row = {"devices": n, "layers": len(infos), "wall_s": wall,
                   "busy_s": [round(r["busy_s"], 2) for r in tim["ranks"]],
                   "layers_per_rank": [r["layers"] for r in tim["ranks"]], "write_after_s": tim.get("write_s", 0.0),
                   "identical_to_1": filecmp.cmp(out, outs[1], shallow=False), "bytes": os.path.getsize(out)}
            row["speedup"] = OUT["compress"][0]["wall_s"] / wall if OUT["compress"] else 1.0
            OUT["compress"].append(row)
            say(row)
            write(a)
    finally:
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------ sp
def video_ffn(c, device):
    from liteffn.kernels.modules import CompressedFFN, CompressedLinear

    d, h = c["vdim"], 4 * c["vdim"]
    up = random_fp8_layer(h, d, c["rank"], seed=1, device=device)
    dn = random_fp8_layer(d, h, c["rank"], seed=2, device=device)
    dn["input_amax"] = torch.tensor([8.0], device=device)  # calibrated hidden range: the fused path
    return CompressedFFN(CompressedLinear("fp8", d, h, up), CompressedLinear("fp8", h, d, dn))


def sp_worker(rank, world, device, c, iters):
    dist = torch.distributed
    tokens, d, heads = c["tokens"], c["vdim"], c["heads"]
    ffn = video_ffn(c, device)
    x = kernel_inputs("gelu", tokens, d, seed=7, device=device).reshape(1, tokens, d)
    if not str(device).startswith("cuda"):
        x = x.float()  # the CPU reference computes in fp32
    hd = d // heads
    g = generator("bench/multi_gpu/qkv", 0, device)
    q, k, v = (torch.randn(1, tokens, heads, hd, generator=g, device=device, dtype=x.dtype) for _ in range(3))
    res = {}
    with torch.no_grad():
        dist.barrier()
        if rank == 0:  # one GPU: the whole sequence, the others wait
            whole = ffn(x)
            res["ffn_1gpu_s"] = timed(lambda: ffn(x), device, iters)
            a_whole = sp.attention(q, k, v)
            res["attn_1gpu_s"] = timed(lambda: sp.attention(q, k, v), device, iters)
        dist.barrier()
        xs = sp.shard(x)
        gathered = sp.gather(ffn(xs))
        res["ffn_shard_s"] = timed(lambda: ffn(xs), device, iters)
        res["ffn_shard_gather_s"] = timed(lambda: sp.gather(ffn(xs)), device, iters)
        qs, ks, vs = (sp.shard(t) for t in (q, k, v))
        a_gathered = sp.gather(sp.ulysses_attention(qs, ks, vs))
        res["attn_ulysses_s"] = timed(lambda: sp.ulysses_attention(qs, ks, vs), device, iters)
        if rank == 0:
            res["ffn_rel_diff"] = float((gathered.float() - whole.float()).norm() / whole.float().norm())
            res["ffn_identical"] = bool(torch.equal(gathered, whole))
            res["attn_rel_diff"] = float((a_gathered.float() - a_whole.float()).norm() / a_whole.float().norm())
            from liteffn.kernels import dispatch

            res["path"] = dict(dispatch.counts) if hasattr(dispatch, "counts") else {}
    return res


def part_sp(a, c, devices):
    for n in sorted({2, len(devices)}):
        if c["tokens"] % n or c["heads"] % n:
            continue
        say(f"sp: {c['tokens']} tokens over {n} ranks")
        res = launch(sp_worker, devices[:n], c, a.iters)
        r0 = res[0]
        row = {"ranks": n, "tokens": c["tokens"],
               "ffn_1gpu_ms": 1e3 * r0["ffn_1gpu_s"], "ffn_shard_ms": 1e3 * max(r["ffn_shard_s"] for r in res),
               "ffn_shard_gather_ms": 1e3 * max(r["ffn_shard_gather_s"] for r in res),
               "ffn_rel_diff": r0["ffn_rel_diff"], "ffn_identical": r0["ffn_identical"],
               "attn_1gpu_ms": 1e3 * r0["attn_1gpu_s"], "attn_ulysses_ms": 1e3 * max(r["attn_ulysses_s"] for r in res),
               "attn_rel_diff": r0["attn_rel_diff"], "path": {k: v for k, v in r0.get("path", {}).items() if v}}
        OUT["sp"].append(row)
        say(row)
        write(a)


# ------------------------------------------------------------------ output
def write(a):
    c = OUT["config"]
    z = c["sizes"]
    lines = [f"# Past one GPU: {c.get('device')} x {c.get('n_devices')}, {c.get('date')}, torch {torch.__version__}", ""]
    if OUT["calib"]:
        lines += [f"## Calibration statistics reduced across GPUs (one LTX-2 block: video FFN {z['vdim']} wide, audio "
                  f"{z['adim']}; 4 linears; {z['calib_tokens']} video tokens per rank and batch, 2 batches)", "",
                  "| ranks | method | same bytes as merge-stats of the per-rank files | max rel. diff of X^T X | "
                  "rows equal | reduce + write s | file GB |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['ranks']} | {r['method']} | {'yes' if r['identical_bytes'] else 'no'} | {r['max_rel_diff']:.1e} "
                  f"| {'yes' if r['rows_equal'] else 'no'} | {r['reduce_s']:.2f} | {r['bytes'] / 1e9:.2f} |"
                  for r in OUT["calib"]]
        lines.append("")
    if OUT["compress"]:
        lines += [f"## Compression of {4 * a.blocks} FFN linears ({a.blocks} blocks, video {z['vdim']}<->{4 * z['vdim']}, "
                  f"audio {z['adim']}<->{4 * z['adim']}), FP8 r={z['rank']} "
                  f"GPTQ (files: {c.get('compress_files_gb', 0):.1f} GB, written in {c.get('compress_files_s', 0):.0f} s)",
                  "", "| GPUs | layers | wall s | speedup | busy s per rank | layers per rank | rank 0 writing after the "
                  "others s | same bytes as 1 GPU |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['devices']} | {r['layers']} | {r['wall_s']:.1f} | {r['speedup']:.2f}x | "
                  f"{', '.join(f'{b:.1f}' for b in r['busy_s'])} | {', '.join(map(str, r['layers_per_rank']))} | "
                  f"{r['write_after_s']:.1f} | {'yes' if r['identical_to_1'] else 'NO'} |" for r in OUT["compress"]]
        lines += ["", "Wall time with N GPUs includes starting N processes (CUDA and Triton start-up in each); "
                  "1 GPU runs in the already started bench process.", ""]
    if OUT["sp"]:
        lines += [f"## Sequence parallel: the compressed video FFN ({z['vdim']}->{4 * z['vdim']}->{z['vdim']}, FP8 "
                  f"r={z['rank']}) and one Ulysses attention layer ({z['heads']} heads), tokens sharded", "",
                  "| ranks | tokens | FFN 1 GPU ms | FFN per rank ms | + all_gather ms | rel. diff vs 1 GPU | identical | "
                  "attention 1 GPU ms | Ulysses per rank ms | attention rel. diff | path |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['ranks']} | {r['tokens']} | {r['ffn_1gpu_ms']:.2f} | {r['ffn_shard_ms']:.2f} | "
                  f"{r['ffn_shard_gather_ms']:.2f} | {r['ffn_rel_diff']:.1e} | {'yes' if r['ffn_identical'] else 'no'} | "
                  f"{r['attn_1gpu_ms']:.2f} | {r['attn_ulysses_ms']:.2f} | {r['attn_rel_diff']:.1e} | "
                  f"{', '.join(f'{k} {v}' for k, v in r['path'].items())} |" for r in OUT["sp"]]
        lines.append("")
    for part, err in OUT["errors"].items():
        lines += [f"**{part} failed**: `{err.strip().splitlines()[-1]}`", ""]
    for path, text in ((a.out, "\n".join(lines)), (a.json, json.dumps(OUT, indent=1))):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", help="default: every CUDA device (at least 2)")
    ap.add_argument("--blocks", type=int, default=16, help="LTX-2 blocks of FFN linears to compress (48: all 192)")
    ap.add_argument("--tokens", type=int, default=24576, help="video tokens of the sharded forward")
    ap.add_argument("--calib-tokens", type=int, default=6144, help="video tokens per rank and batch in calib")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--parts", default="calib,compress,sp")
    ap.add_argument("--workdir", default=None, help="where the compress part's big files go (default: the temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the compress part's files")
    ap.add_argument("--out", help="markdown table")
    ap.add_argument("--json")
    ap.add_argument("--cpu-smoke", action="store_true", help="2 CPU processes (gloo), tiny sizes: checks the script")
    a = ap.parse_args()
    if a.cpu_smoke:
        devices = ["cpu", "cpu"]
        a.blocks, a.iters = 1, 2
        os.environ["OMP_NUM_THREADS"] = "1"  # CPU results depend on the thread count: the same in every process
        torch.set_num_threads(1)
    else:
        if torch.cuda.device_count() < 2:
            sys.exit(f"multi_gpu.py needs at least 2 CUDA GPUs (this machine has {torch.cuda.device_count()}); "
                     "--cpu-smoke runs it on CPU")
        devices = parse_devices(a.devices or ",".join(f"cuda:{i}" for i in range(torch.cuda.device_count())))
    c = cfg(a)
    OUT["config"].update(date=datetime.date.today().isoformat(), torch=torch.__version__, n_devices=len(devices),
                         devices=devices, blocks=a.blocks, sizes=c,
                         device=torch.cuda.get_device_name(0) if not a.cpu_smoke else "CPU (gloo smoke)")
    for part, fn in (("calib", part_calib), ("compress", part_compress), ("sp", part_sp)):
        if part not in a.parts.split(","):
            continue
        try:
            fn(a, c, devices)
        except Exception:
            OUT["errors"][part] = traceback.format_exc()
            say(f"{part} failed:\n{OUT['errors'][part]}")
        write(a)
    say("\n" + (open(a.out).read() if a.out else json.dumps(OUT, indent=1)))
    return 1 if OUT["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
