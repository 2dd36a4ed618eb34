"""The built-in default job: no ComfyUI, no downloads.

A small LTX-2-shaped stack (video `ff` and audio `audio_ff` per block, random structured
weights) is calibrated with forward hooks on synthetic activations, compressed at several
ranks and residual formats with and without the statistics, and each setting's output error
on held-out activations and its bytes are printed.
"""
from __future__ import annotations

import time

import torch

from ..kernels.modules import CompressedFFN, CompressedLinear
from . import ltx2
from .compress import compress_linear
from .lowrank import RankPolicy
from .stats import StatsCollector
from .synthetic import SyntheticLTX2


def calibrate(model: SyntheticLTX2, batches: int, tokens: int, seed: int = 0):
    names = ltx2.select(n for n, _ in model.named_modules())
    with StatsCollector(model, names, budget_bytes=1 << 30) as col, torch.no_grad():
        for i in range(batches):
            model(model.video_acts.sample(tokens, seed + i), model.audio_acts.sample(tokens // 4, seed + i))
    return col.stats


def ffn_inputs(model: SyntheticLTX2, tokens: int, seed: int) -> dict:
    """Held-out input of every FFN, from a fresh sample run through the stack."""
    xs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: xs.__setitem__(n, a[0]))
             for n, m in model.named_modules() if n.endswith(("ff", "audio_ff")) and n.count(".") == 2]
    with torch.no_grad():
        model(model.video_acts.sample(tokens, seed), model.audio_acts.sample(tokens // 4, seed))
    for h in hooks:
        h.remove()
    return xs


def compress_ffn(ffn, prefix: str, stats, policy, fmt: str) -> CompressedFFN:
    mods = []
    for sub in (ltx2.UP, ltx2.DOWN):
        lin = ffn.get_submodule(sub)
        name = f"{prefix}.{sub}"
        layer = compress_linear(lin.weight, lin.bias, stats[name] if stats else None, policy, fmt, name=name)
        mods.append(CompressedLinear(fmt, lin.in_features, lin.out_features, layer.tensors))
    return CompressedFFN(*mods)


def run(blocks: int = 2, video_dim: int = 256, audio_dim: int = 128, ranks=(0, 16, 64),
        formats=("fp8", "nvfp4", "mxfp4"), batches: int = 8, tokens: int = 1024, seed: int = 0) -> list[dict]:
    import logging

    logging.getLogger("liteffn").setLevel(logging.ERROR)  # the uncalibrated runs are deliberate
    torch.manual_seed(seed)
    say = _progress()
    say(f"building a synthetic LTX-2-shaped stack: {blocks} block(s), video ff {video_dim}<->{4 * video_dim}, "
        f"audio_ff {audio_dim}<->{4 * audio_dim}")
    model = SyntheticLTX2(blocks, video_dim, audio_dim, seed)
    say(f"calibrating: {batches} batches of {tokens} video / {tokens // 4} audio tokens through forward hooks")
    t0 = time.time()
    stats = calibrate(model, batches, tokens, seed)
    print(f"calibrated {len(stats.names())} FFN linears on {batches} batches in {time.time() - t0:.1f} s", flush=True)
    held = ffn_inputs(model, tokens, seed + 1000)
    ffns = {n: model.get_submodule(n) for n in held}
    dense_bytes = sum(2 * p.numel() for n in ffns for p in ffns[n].parameters() if p.dim() == 2)
    rows = []
    settings = [(fmt, r) for fmt in formats for r in ranks]
    say(f"compressing {len(ffns)} FFNs at {len(settings)} settings (format x rank), each without and with the "
        f"statistics, and measuring on held-out activations")
    for i, (fmt, r) in enumerate(settings, 1):
        t1 = time.time()
        row = {"format": fmt, "rank": r}
        for calibrated in (False, True):
            errs, nbytes = [], 0
            for n, ffn in ffns.items():
                c = compress_ffn(ffn, n, stats if calibrated else None, RankPolicy(rank=r), fmt)
                with torch.no_grad():
                    y, yc = ffn(held[n]), c(held[n])
                errs.append(float((yc - y).norm() / y.norm()))
                nbytes += sum(v.numel() * v.element_size() for lin in (c.up, c.down)
                              for k, v in lin.tensors().items() if k != "bias")
            row["err_cal" if calibrated else "err_plain"] = sum(errs) / len(errs)
            row["bytes"] = nbytes
        row["bytes_ratio"] = row["bytes"] / dense_bytes
        rows.append(row)
        say(f"[{i}/{len(settings)}] {fmt} rank {r}: plain {100 * row['err_plain']:.2f}%, calibrated "
            f"{100 * row['err_cal']:.2f}% ({time.time() - t1:.1f} s)")
    print_table(rows, dense_bytes)
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
