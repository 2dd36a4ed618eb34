"""The built-in default job: no ComfyUI, no downloads.

A small LTX-2-shaped stack (per block a video and an audio self-attention, `attn1` and
`audio_attn1`, then the video `ff` and audio `audio_ff`; random structured weights) is calibrated
with forward hooks on synthetic activations, and its FFNs and attention projections are
compressed at several ranks and residual formats with and without the statistics. Printed: each
setting's FFN output error on held-out activations and its bytes, then the error of each kind of
linear (ffn, attention), each linear on its own held-out input, plain against calibrated.

The compression and measuring run as jobs, one per unit (an FFN or an attention projection) and
setting, on worker processes (one per CPU, at most 8, a torch thread each): GPTQ rounds a column at
a time, so the work is bound by Python, where torch's threads gain nothing and processes do.
"""
from __future__ import annotations

import io
import os
import signal
import time

import torch

from ..kernels.modules import CompressedFFN, CompressedLinear, linear_from_layer
from . import ltx2
from .compress import compress_linear
from .lowrank import RankPolicy
from .stats import LayerStats, StatsCollector
from .synthetic import SyntheticLTX2

KINDS = ("ffn", "attention")  # the order of the per-kind table


def calibrate(model: SyntheticLTX2, batches: int, tokens: int, seed: int = 0, layers: str = "ffn+attention",
              holdout_rows: int = 0):
    """Statistics of the model's linears of the kinds `layers` selects (ltx2.LAYERS); on a stack
    without attention, ffn+attention and ffn record the same FFN linears. holdout_rows: rows held out
    of them and kept, as LiteFFN Calibrate keeps them (stats.py)."""
    names = ltx2.select([n for n, _ in model.named_modules()], "all", layers)
    with StatsCollector(model, names, budget_bytes=1 << 30, holdout_rows=holdout_rows) as col, torch.no_grad():
        for i in range(batches):
            model(model.video_acts.sample(tokens, seed + i), model.audio_acts.sample(tokens // 4, seed + i))
    return col.stats


def _is_ffn(name: str) -> bool:
    return name.startswith("transformer_blocks.") and name.count(".") == 2 and ltx2.is_ffn_unit(name)


def held_out(model: SyntheticLTX2, tokens: int, seed: int) -> dict:
    """(input, output) of every FFN (`transformer_blocks.N.ff`) and of every linear LiteFFN compresses
    (FFN linears, attention projections) in a fresh sample's run through the dense stack."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, y, n=n: seen.__setitem__(n, (a[0], y)))
             for n, m in model.named_modules() if ltx2.kind_of(n) or _is_ffn(n)]
    with torch.no_grad():
        model(model.video_acts.sample(tokens, seed), model.audio_acts.sample(tokens // 4, seed))
    for h in hooks:
        h.remove()
    return seen


def compress_projection(lin: torch.nn.Linear, name: str, stats, policy, fmt: str) -> CompressedLinear:
    """One linear (e.g. an attention projection) as the pack replaces it: a CompressedLinear."""
    return linear_from_layer(compress_linear(lin.weight, lin.bias, stats[name] if stats else None, policy, fmt,
                                             name=name))


def _bytes(c: CompressedLinear) -> int:
    """Stored bytes of a compressed linear: factors, codes and scales (not the bias)."""
    return sum(v.numel() * v.element_size() for k, v in c.tensors().items() if k != "bias")


def _rel(y: torch.Tensor, yc: torch.Tensor) -> float:
    return float((yc.float() - y.float()).norm() / y.float().norm())


# ------------------------------------------------------------------ jobs: here or on worker processes
# A job is (unit, format, rank, calibrated): compress the unit's linears, run them on their held-out
# inputs; its result the relative errors and bytes. The workers get everything once, as torch.save
# bytes (no shared memory), and send back a few numbers per job.
_WORK: dict = {}


def _job_data(model, units: list[str], stats, held: dict) -> dict:
    """By unit: its output on the held-out input (FFNs) and per linear (name, weight, bias, statistics,
    held-out input and output)."""
    data = {}
    for u in units:
        lins = []
        for n in ltx2.linears_of(u):
            m, s = model.get_submodule(n), stats[n]
            lins.append((n, m.weight.detach(), None if m.bias is None else m.bias.detach(), s.xtx, s.absmax,
                         s.rows, *held[n]))
        data[u] = (held[u][1] if ltx2.is_ffn_unit(u) else None, lins)
    return data


def _unit_job(job, data: dict | None = None) -> dict:
    unit, fmt, rank, calibrated = job
    y_unit, lins = (_WORK if data is None else data)[unit]
    out, comp = {}, []
    for n, w, b, xtx, absmax, rows, x, y in lins:
        stats = LayerStats(xtx, absmax, rows) if calibrated else None
        c = linear_from_layer(compress_linear(w, b, stats, RankPolicy(rank=rank), fmt, name=n))
        with torch.no_grad():
            out[n] = (_rel(y, c(x)), _bytes(c))  # the linear alone: FP8 activations per token
        comp.append(c)
    if y_unit is None:
        return {"linears": out}
    with torch.no_grad():  # the whole FFN as the pack runs it: hidden activation with its static FP8 scale
        return {"linears": out, "unit": _rel(y_unit, CompressedFFN(*comp)(lins[0][6]))}


def _pack(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _worker_init(blob: bytes, threads: int) -> None:
    import logging

    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C: the parent says it, workers just end
    logging.getLogger("liteffn").setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    _WORK.update(torch.load(io.BytesIO(blob), weights_only=True))


def default_workers() -> int:
    """One worker process per CPU this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _results(jobs: list, data: dict, workers: int):
    """The jobs' results in order: on `workers` spawned processes, or here when workers is 1 (or when
    the processes cannot start, e.g. `liteffn` is not importable by name: then the rest run here)."""
    done = 0
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool
        from multiprocessing import get_context

        ex = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(_pack(data), max(1, default_workers() // workers)))
        try:
            for res in ex.map(_unit_job, jobs):
                yield res
                done += 1
            return
        except BrokenProcessPool as e:
            print(f"worker processes failed ({e}); running the remaining {len(jobs) - done} jobs here", flush=True)
        finally:
            ex.shutdown(wait=False, cancel_futures=True)
    for job in jobs[done:]:
        yield _unit_job(job, data)


def run(blocks: int = 2, video_dim: int = 256, audio_dim: int = 128, ranks=(0, 16, 64),
        formats=("fp8", "nvfp4", "mxfp4"), batches: int = 8, tokens: int = 1024, seed: int = 0,
        workers: int | None = None) -> list[dict]:
    """Returns a row per (format, rank): the FFN output error (err_plain, err_cal, bytes, bytes_ratio)
    and row["kinds"][kind], the same per kind of linear (mean over its linears; `linears`: how many).
    workers: processes that compress (default default_workers(); 1: all in this process)."""
    import logging

    logging.getLogger("liteffn").setLevel(logging.ERROR)  # the uncalibrated runs are deliberate
    torch.manual_seed(seed)
    workers = default_workers() if workers is None else max(1, int(workers))
    say = _progress()
    say(f"building a synthetic LTX-2-shaped stack: {blocks} block(s), video attn1 {video_dim}->{video_dim} "
        f"(q, k, v, out) and ff {video_dim}<->{4 * video_dim}, audio_attn1 {audio_dim}->{audio_dim} and "
        f"audio_ff {audio_dim}<->{4 * audio_dim}")
    model = SyntheticLTX2(blocks, video_dim, audio_dim, seed, attention=True)
    say(f"calibrating: {batches} batches of {tokens} video / {tokens // 4} audio tokens through forward hooks")
    t0 = time.time()
    stats = calibrate(model, batches, tokens, seed)
    linears = stats.names()
    kind = {n: ltx2.kind_of(n) for n in linears}
    count = {k: sum(kind[n] == k for n in linears) for k in KINDS}
    print(f"calibrated {count['ffn']} FFN linears and {count['attention']} attention projections on {batches} "
          f"batches in {time.time() - t0:.1f} s", flush=True)
    held = held_out(model, tokens, seed + 1000)
    units = list(dict.fromkeys(ltx2.unit_of(n) for n in linears))
    ffns = [u for u in units if ltx2.is_ffn_unit(u)]
    dense = {n: 2 * model.get_submodule(n).weight.numel() for n in linears}
    dense_bytes = sum(dense[n] for n in linears if kind[n] == "ffn")
    kind_dense = {k: sum(dense[n] for n in linears if kind[n] == k) for k in KINDS}
    settings = [(fmt, r) for fmt in formats for r in ranks]
    say(f"compressing {len(ffns)} FFNs at {len(settings)} settings (format x rank), with the blocks' "
        f"{count['attention']} attention projections, each without and with the statistics, and measuring on "
        f"held-out activations ({workers} {'worker processes' if workers > 1 else 'process'})")
    jobs = [(u, fmt, r, cal) for fmt, r in settings for cal in (False, True) for u in units]
    results = _results(jobs, _job_data(model, units, stats, held), workers)
    rows, t1 = [], time.time()
    try:
        for i, (fmt, r) in enumerate(settings, 1):
            row = {"format": fmt, "rank": r, "kinds": {k: {"linears": count[k]} for k in KINDS}}
            for cal in (False, True):
                key = "err_cal" if cal else "err_plain"
                errs, lin = [], {}
                for u in units:
                    res = next(results)
                    errs += [res["unit"]] if "unit" in res else []
                    lin.update(res["linears"])
                row[key] = sum(errs) / len(errs)
                row["bytes"] = sum(lin[n][1] for n in linears if kind[n] == "ffn")
                for k in KINDS:
                    mine = [lin[n] for n in linears if kind[n] == k]
                    if mine:
                        nbytes = sum(b for _, b in mine)
                        row["kinds"][k].update({key: sum(e for e, _ in mine) / len(mine), "bytes": nbytes,
                                                "bytes_ratio": nbytes / kind_dense[k]})
            row["bytes_ratio"] = row["bytes"] / dense_bytes
            rows.append(row)
            att = row["kinds"]["attention"]
            say(f"[{i}/{len(settings)}] {fmt} rank {r}: plain {100 * row['err_plain']:.2f}%, calibrated "
                f"{100 * row['err_cal']:.2f}%; attention projections plain {100 * att['err_plain']:.2f}%, "
                f"calibrated {100 * att['err_cal']:.2f}% ({time.time() - t1:.1f} s)")
            t1 = time.time()
    finally:
        results.close()  # on Ctrl-C or an error: the workers' queued jobs are dropped
    print_table(rows, dense_bytes)
    print_kind_table(rows, kind_dense)
    return rows


def _progress():
    t0 = time.time()

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:5.1f} s] {msg}", flush=True)
    return say


def print_table(rows, dense_bytes: int) -> None:
    print(f"\nFFN output error on held-out activations (mean over FFNs; bf16 weights = {dense_bytes / 2**20:.2f} MiB)")
    print(f"{'residual':<8} {'rank':>5} {'plain SVD+RTN':>14} {'calibrated':>11} {'gain':>6} {'MiB':>7} {'vs bf16':>8}")
    for r in rows:
        gain = 1 - r["err_cal"] / r["err_plain"]
        print(f"{r['format']:<8} {r['rank']:>5} {100 * r['err_plain']:>13.2f}% {100 * r['err_cal']:>10.2f}% "
              f"{100 * gain:>5.0f}% {r['bytes'] / 2**20:>7.2f} {r['bytes_ratio']:>8.2f}")


def print_kind_table(rows, kind_dense: dict) -> None:
    """Per kind of linear: mean relative output error ||y' - y|| / ||y|| over the kind's linears, each
    compressed alone and run on its own held-out input (FP8 activations per token)."""
    present = [k for k in KINDS if kind_dense.get(k) and rows and "err_cal" in rows[0]["kinds"][k]]
    counts = ", ".join(f"{k} {rows[0]['kinds'][k]['linears']} linears, {kind_dense[k] / 2**20:.2f} MiB"
                       for k in present)
    print(f"\nError per kind of linear on held-out activations (mean over the kind's linears, each on its own "
          f"input; bf16: {counts})")
    print(f"{'kind':<10} {'residual':<8} {'rank':>5} {'plain SVD+RTN':>14} {'calibrated':>11} {'gain':>6} "
          f"{'MiB':>7} {'vs bf16':>8}")
    for k in present:
        for r in rows:
            e = r["kinds"][k]
            gain = 1 - e["err_cal"] / e["err_plain"]
            print(f"{k:<10} {r['format']:<8} {r['rank']:>5} {100 * e['err_plain']:>13.2f}% "
                  f"{100 * e['err_cal']:>10.2f}% {100 * gain:>5.0f}% {e['bytes'] / 2**20:>7.2f} "
                  f"{e['bytes_ratio']:>8.2f}")
