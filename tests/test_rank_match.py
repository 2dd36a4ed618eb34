"""Rank per layer from the measured FP4-vs-FP8 gap (issue 20, item 2): RankPolicy(match=...) makes compression
choose, per linear, the smallest rank in steps of 16 whose held-out output error is within `match` x an FP8
residual's at the reference rank."""
import pytest
import torch
import torch.nn.functional as Fn

from liteffn.calibration import ltx2
from liteffn.calibration.compress import compress_linear
from liteffn.calibration.lowrank import MATCH_STEP, RankPolicy
from liteffn.calibration.report import format_report
from liteffn.calibration.stats import StatsCollector
from liteffn.calibration.synthetic import SyntheticActivations, synthetic_weight

DIM, HID = 64, 256
UP = f"transformer_blocks.0.ff.{ltx2.UP}"


@pytest.fixture(scope="module")
def layer():
    W, b = synthetic_weight(HID, DIM, seed=1), torch.randn(HID) * 0.1
    acts = SyntheticActivations(DIM, structure_seed=3)
    col = StatsCollector.for_widths({UP: DIM}, holdout_rows=256, holdout_every=8)
    for i in range(24):
        col.update(UP, acts.sample(128, i))
    return dict(W=W, b=b, stats=col.stats[UP])


def held_err(layer, rank, fmt):
    return compress_linear(layer["W"], layer["b"], layer["stats"], rank, fmt, name=UP,
                           compare_plain=False).info["heldout_err"]


def test_the_chosen_rank_is_the_smallest_on_the_grid_within_the_target(layer):
    ref = held_err(layer, 16, "fp8")
    errs = {r: held_err(layer, r, "nvfp4") for r in (0, 16, 32, 48)}
    assert errs[0] > errs[16] > errs[32] > errs[48]  # what the search relies on: more rank, less error
    for target in (errs[32] / ref * 1.001, errs[16] / ref * 1.001, errs[48] / ref * 1.001):
        c = compress_linear(layer["W"], layer["b"], layer["stats"], RankPolicy(rank=16, match=target, max_rank=48),
                            "nvfp4", name=UP)
        want = min(r for r, e in errs.items() if e <= target * ref)
        m = c.info["match"]
        assert c.info["rank"] == want and m["met"] and m["ratio"] <= target
        assert m["ref_err"] == pytest.approx(ref) and c.info["heldout_err"] == pytest.approx(errs[want])
        assert c.tensors["A"].shape[1] == want
        # the search stepped from the reference rank and no further than it had to
        assert m["tried"] == list(range(min(want, 16), max(want, 16) + 1, MATCH_STEP)) or want == 16
        assert c.info["heldout_err_plain"] > c.info["heldout_err"]  # the plain comparison is at the chosen rank


def test_a_target_out_of_reach_stops_at_the_largest_rank_and_says_so(layer):
    c = compress_linear(layer["W"], layer["b"], layer["stats"], RankPolicy(rank=16, match=0.01, max_rank=40),
                        "mxfp4", name=UP, compare_plain=False)
    assert c.info["rank"] == 40 and c.info["match"]["met"] is False and c.info["match"]["tried"] == [16, 32, 40]
    report = format_report({UP: c.info}, 2 * HID * DIM)
    assert "0 of 1 linears within it" in report and "stopped at the largest rank allowed" in report


def test_fp8_against_itself_keeps_at_most_the_reference_rank(layer):
    c = compress_linear(layer["W"], layer["b"], layer["stats"], RankPolicy(rank=32, match=1.0), "fp8", name=UP,
                        compare_plain=False)
    assert c.info["rank"] <= 32 and c.info["match"]["met"]


def test_it_needs_held_out_rows_and_a_fixed_rank(layer):
    with pytest.raises(ValueError, match="needs statistics with held-out rows"):
        compress_linear(layer["W"], layer["b"], None, RankPolicy(rank=16, match=1.8), "nvfp4", name=UP)
    with pytest.raises(ValueError, match="starts from a fixed rank"):
        RankPolicy(rank=None, energy=0.5, match=1.8)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1.8"):
        with pytest.raises(ValueError, match="must be a number > 0"):
            RankPolicy(rank=16, match=bad)
    with pytest.raises(ValueError, match="larger than layer"):
        compress_linear(layer["W"], layer["b"], layer["stats"], RankPolicy(rank=DIM + 16, match=1.8), "nvfp4", name=UP)


def test_describe_and_the_rank_file_size_checks_count_on():
    p = RankPolicy(rank=64, match=1.8, max_rank=128)
    assert p.fixed_rank == 0 and "1.8x FP8" in p.describe() and "r=64" in p.describe()  # ranks may go down to 0
    assert RankPolicy(rank=64).fixed_rank == 64 and RankPolicy(rank=None, energy=0.5, max_rank=96).fixed_rank == 0


def test_the_matched_layer_runs_as_any_other(layer):
    from liteffn.kernels.modules import linear_from_layer

    c = compress_linear(layer["W"], layer["b"], layer["stats"], RankPolicy(rank=16, match=1.5, max_rank=48),
                        "nvfp4", name=UP, compare_plain=False)
    x = layer["stats"].held.float()
    got = linear_from_layer(c)(x)
    dense = Fn.linear(x, layer["W"], layer["b"])
    assert float((got - dense).norm() / dense.norm()) == pytest.approx(c.info["heldout_err"], rel=1e-3)
