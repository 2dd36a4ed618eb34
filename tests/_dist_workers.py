"""What each process runs in tests/test_distributed.py (and bench/multi_gpu.py --cpu-smoke).

Spawned processes import their function by module name, which a pytest test module (imported
by path) does not have; this module is imported through sys.path instead.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as Fn

from liteffn.calibration import compressed_file, ltx2
from liteffn.calibration import seq_parallel as sp
from liteffn.calibration.compress import compress_linear
from liteffn.calibration.distributed import AgreedError, plan_groups, reduce_and_save, reduce_stats
from liteffn.calibration.stats import ActivationStats, StatsCollector
from liteffn.calibration.synthetic import SyntheticActivations, SyntheticFFN, SyntheticLTX2, generator
from liteffn.kernels.modules import CompressedFFN, CompressedLinear

# ------------------------------------------------------------------ statistics


def model():
    return SyntheticLTX2(blocks=2, video_dim=32, audio_dim=16, seed=0)


def calibrate_rank(m, rank: int, batches: int = 2) -> ActivationStats:
    """Rank r's own seeds and token counts (so row counts differ), metadata as the Calibrate node writes."""
    names = ltx2.select(n for n, _ in m.named_modules())
    with StatsCollector(m, names, holdout_rows=8, holdout_every=4) as col, torch.no_grad():  # held-out rows too
        for i in range(batches):
            seed = 1000 * (rank + 1) + i
            m(m.video_acts.sample(48 + 16 * rank, seed), m.audio_acts.sample(12 + 4 * rank, seed))
    fp = compressed_file.fingerprint((n, m.get_submodule(n).weight) for n in names)
    col.stats.meta.update(model_family=ltx2.FAMILY, fingerprint=fp, runs=1)
    return col.stats


def stats_worker(rank, world, device, tmp, budget):
    """Per-rank file, then both reductions into one file each; then the errors every rank must agree on."""
    m = model()
    stats = calibrate_rank(m, rank)
    own = os.path.join(tmp, f"rank{rank}.safetensors")
    stats.save(own)
    widths = {n: stats[n].width for n in stats.names()}
    for method in ("ordered", "all_reduce"):
        s = ActivationStats.load(own)
        out = reduce_and_save(s, os.path.join(tmp, f"{method}.safetensors"), budget, method)
        assert (out is None) == (method == "ordered" and rank != 0)
    errors = {}
    s = ActivationStats.load(own)
    if rank == world - 1:
        del s.layers[s.names()[-1]]
    try:
        reduce_stats(s, budget)
    except AgreedError as e:
        errors["missing_layer"] = str(e)
    return {"groups": len(plan_groups(widths, budget)), "errors": errors}


# ------------------------------------------------------------------ sequence parallel
DIM, HEADS = 32, 4


def compressed_linear(n, k, seed, fmt="fp8", rank=8):
    """A compressed linear with its calibrated input range, from a structured random weight."""
    lin = torch.nn.Linear(k, n)
    acts = SyntheticActivations(k, seed)
    x = acts.sample(256, seed)
    with StatsCollector.for_widths({"l": k}) as col:
        col.update("l", x)
    layer = compress_linear(lin.weight.detach(), lin.bias.detach(), col.stats["l"], rank, fmt)
    return CompressedLinear(fmt, k, n, layer.tensors)


def compressed_ffn(dim, seed, fmt="fp8", rank=8):
    ffn = SyntheticFFN(dim, seed=seed)
    acts = SyntheticActivations(dim, seed)
    up, down = ffn.net[0].proj, ffn.net[2]
    with StatsCollector(ffn, ["net.0.proj", "net.2"]) as col, torch.no_grad():
        ffn(acts.sample(256, seed))
    layers = [compress_linear(lin.weight.detach(), lin.bias.detach(), col.stats[n], rank, fmt, name=n)
              for n, lin in (("net.0.proj", up), ("net.2", down))]
    mods = [CompressedLinear(fmt, c.info["in_features"], c.info["out_features"], c.tensors) for c in layers]
    return CompressedFFN(*mods)


class TinyBlock(torch.nn.Module):
    """A DiT block's shape: norm, q/k/v, attention, out projection, norm, FFN, residual adds; every
    linear and the FFN compressed. forward(x, attn) with x [B, S, DIM]: the same code runs on
    the whole sequence (attn = attention) or on a token shard (attn = Ulysses)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.q, self.k, self.v, self.o = (compressed_linear(DIM, DIM, seed + i) for i in range(4))
        self.ff = compressed_ffn(DIM, seed + 10)

    def forward(self, x, attn=sp.attention):
        b, s, _ = x.shape
        h = Fn.layer_norm(x, (DIM,))
        q, k, v = (lin(h).view(b, s, HEADS, DIM // HEADS) for lin in (self.q, self.k, self.v))
        x = x + self.o(attn(q, k, v).reshape(b, s, DIM))
        return x + self.ff(Fn.layer_norm(x, (DIM,)))


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def sp_worker(rank, world, device, tokens):
    """Sharded against whole, on each rank: the compressed FFN alone, the block with Ulysses
    attention, and the block with attention left on the shard (what must not match)."""
    torch.manual_seed(0)
    ffn, block = compressed_ffn(DIM, seed=3), TinyBlock(seed=5)
    g = generator("sp_test", 0)
    x = torch.randn(2, tokens, DIM, generator=g)
    with torch.no_grad():
        ffn_whole = ffn(x)
        ffn_sharded = sp.gather(ffn(sp.shard(x)))
        block_whole = block(x)
        ulysses = lambda q, k, v: sp.ulysses_attention(q, k, v)  # noqa: E731
        block_sharded = sp.gather(block(sp.shard(x), ulysses))
        block_local = sp.gather(block(sp.shard(x), sp.attention))
        # the head all-to-all alone, round trip and against the whole sequence's heads
        qs = torch.randn(2, tokens, HEADS, DIM // HEADS, generator=g)
        heads = sp.seq_to_heads(sp.shard(qs))
        back = sp.gather(sp.heads_to_seq(heads))
    uneven = []
    for fn in (lambda: sp.shard(torch.zeros(1, world + 1, 4)), lambda: sp.seq_to_heads(torch.zeros(1, 2, world + 1, 4))):
        try:
            fn()
        except ValueError as e:
            uneven.append(str(e))
    hp = HEADS // world
    return {
        "uneven": uneven,
        "ffn_equal": torch.equal(ffn_whole, ffn_sharded), "ffn_rel": rel(ffn_sharded, ffn_whole),
        "block_equal": torch.equal(block_whole, block_sharded), "block_rel": rel(block_sharded, block_whole),
        "local_rel": rel(block_local, block_whole),
        "heads_ok": torch.equal(heads, qs[:, :, rank * hp:(rank + 1) * hp]), "round_trip": torch.equal(back, qs),
    }

