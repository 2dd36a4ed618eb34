"""What each process runs in tests/test_distributed.py (and bench/multi_gpu.py --cpu-smoke).

Spawned processes import their function by module name, which a pytest test module (imported
by path) does not have; this module is imported through sys.path instead.
"""
from __future__ import annotations

import os

import torch

from liteffn.calibration import compressed_file, ltx2
from liteffn.calibration.distributed import AgreedError, plan_groups, reduce_and_save, reduce_stats
from liteffn.calibration.stats import ActivationStats, StatsCollector
from liteffn.calibration.synthetic import SyntheticLTX2

# ------------------------------------------------------------------ statistics


def model():
    return SyntheticLTX2(blocks=2, video_dim=32, audio_dim=16, seed=0)


def calibrate_rank(m, rank: int, batches: int = 2) -> ActivationStats:
    """Rank r's own seeds and token counts (so row counts differ), metadata as the Calibrate node writes."""
    names = ltx2.select(n for n, _ in m.named_modules())
    with StatsCollector(m, names) as col, torch.no_grad():
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
