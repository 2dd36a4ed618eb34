"""Past one process, on CPU with gloo: statistics reduced across ranks (calibration/distributed.py).
Each test starts 2-4 processes."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist_workers as W  # noqa: E402

from liteffn.calibration import distributed as D  # noqa: E402
from liteffn.calibration.cli import main  # noqa: E402
from liteffn.calibration.stats import ActivationStats, layer_bytes  # noqa: E402


def _bytes(p):
    with open(p, "rb") as f:
        return f.read()


# ------------------------------------------------------------------ statistics
@pytest.mark.parametrize("world", [2, 3])
def test_reduced_statistics_equal_merged_per_rank_files(tmp_path, world):
    budget = 2 * layer_bytes(128)  # forces several groups: the widest layer (128) alone nearly fills it
    res = D.launch(W.stats_worker, ["cpu"] * world, str(tmp_path), budget)
    assert res[0]["groups"] > 1
    ranks = [str(tmp_path / f"rank{r}.safetensors") for r in range(world)]
    assert main(["merge-stats", *ranks, "-o", str(tmp_path / "merged.safetensors")]) == 0
    merged = _bytes(tmp_path / "merged.safetensors")
    # ordered: rank 0 adds the others' groups in rank order with LayerStats.merge_: the same file
    assert _bytes(tmp_path / "ordered.safetensors") == merged
    a, m = ActivationStats.load(str(tmp_path / "all_reduce.safetensors")), ActivationStats.load(str(tmp_path / "merged.safetensors"))
    assert a.meta == m.meta and a.meta["runs"] == world
    one = ActivationStats.load(ranks[0])
    for n in m.names():
        assert a[n].rows == m[n].rows > one[n].rows and torch.equal(a[n].absmax, m[n].absmax)
        torch.testing.assert_close(a[n].xtx, m[n].xtx, rtol=1e-6, atol=1e-6 * float(m[n].xtx.abs().max()))
    if world == 2:  # one fp32 addition per element, and it commutes: bit for bit
        assert _bytes(tmp_path / "all_reduce.safetensors") == merged
    for r in res:  # every rank raised the same clear error, none hung
        assert "rank 0 has transformer_blocks.1.audio_ff.net.2 and rank %d does not" % (world - 1) \
            in r["errors"]["missing_layer"]


def test_group_plan_respects_budget_and_refuses_a_layer_too_wide():
    widths = {"a": 16384, "b": 4096, "c": 16384, "d": 2048}
    groups = D.plan_groups(widths, 2 << 30)
    assert groups == [["a", "b", "d"], ["c"]]  # first fit, model order: two 1 GiB layers never share 2 GiB
    for g in groups:
        assert sum(layer_bytes(widths[n]) for n in g) <= 2 << 30
    with pytest.raises(ValueError, match="more than the whole budget"):
        D.plan_groups(widths, 1 << 30)
