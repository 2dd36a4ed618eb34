"""The error users get (issue 20, item 3): compression measures each layer's relative output error on the
statistics' held-out rows, with the input quantized to FP8 as the kernels quantize it, for its result and for a
plain compression of the same rank; the reports, the CLI and the file carry it."""
import json

import pytest
import torch
import torch.nn.functional as Fn

from liteffn.calibration import ltx2
from liteffn.calibration.compress import compress_linear
from liteffn.calibration.compressed_file import load, read_meta, save
from liteffn.calibration.report import format_report, heldout_totals
from liteffn.calibration.stats import StatsCollector
from liteffn.calibration.synthetic import SyntheticActivations, synthetic_weight
from liteffn.kernels.modules import ffn_from_layers, linear_from_layer
from liteffn.kernels.reference import compressed_linear_ref

DIM, HID = 64, 256
UP, DOWN = f"transformer_blocks.0.ff.{ltx2.UP}", f"transformer_blocks.0.ff.{ltx2.DOWN}"


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def ffn():
    """An FFN with outlier input channels, calibrated by a collector that holds rows out, as Calibrate does."""
    W1, W2 = synthetic_weight(HID, DIM, seed=1), synthetic_weight(DIM, HID, seed=2)
    b1, b2 = torch.randn(HID) * 0.1, torch.randn(DIM) * 0.1
    acts = SyntheticActivations(DIM, structure_seed=3)
    col = StatsCollector.for_widths({UP: DIM, DOWN: HID}, holdout_rows=256, holdout_every=8)
    for i in range(24):
        x = acts.sample(128, i)
        col.update(UP, x)
        col.update(DOWN, Fn.gelu(Fn.linear(x, W1, b1), approximate="tanh"))
    return dict(W1=W1, b1=b1, W2=W2, b2=b2, stats=col.stats)


def test_the_error_is_the_modules_on_rows_the_statistics_never_saw(ffn):
    s = ffn["stats"][UP]
    assert s.held_rows == 256 and s.rows == 24 * 128 - s.held_seen
    c = compress_linear(ffn["W1"], ffn["b1"], s, 16, "fp8", name=UP)
    i = c.info
    assert i["heldout_rows"] == 256 and i["heldout_act"] == "per-token"
    x = s.held.float()
    dense = Fn.linear(x, ffn["W1"], ffn["b1"])
    # what the pack's module computes on those rows (its reference path quantizes the input per token, as the kernels)
    assert i["heldout_err"] == pytest.approx(rel(linear_from_layer(c)(x), dense), rel=1e-4)
    assert i["heldout_err"] > 1.2 * i["rel_err"]  # activation quantization is in it; the weight-only error is not
    # calibration pays off where users see it, and the plain number is a plain compression's of the same rank
    plain = compress_linear(ffn["W1"], ffn["b1"], None, 16, "fp8", name=UP)
    assert "heldout_err" not in plain.info  # no statistics, no held-out rows: nothing claimed
    assert i["heldout_err_plain"] == pytest.approx(rel(linear_from_layer(plain)(x), dense), rel=1e-4)
    assert i["heldout_err"] < 0.9 * i["heldout_err_plain"]


def test_an_ffn_down_linear_is_measured_at_the_static_scale_the_fused_ffn_uses(ffn):
    st = ffn["stats"]
    up = compress_linear(ffn["W1"], ffn["b1"], st[UP], 16, "fp8", name=UP, compare_plain=False)
    down = compress_linear(ffn["W2"], ffn["b2"], st[DOWN], 16, "fp8", name=DOWN, compare_plain=False)
    assert down.info["heldout_act"] == "static" and "heldout_err_plain" not in down.info
    h = st[DOWN].held.float()
    module = ffn_from_layers(up, down)
    assert module.h_scale is not None  # the fused FFN quantizes its hidden activation at this one scale
    got = compressed_linear_ref(h, "fp8", {k: v for k, v in down.tensors.items() if k != "input_amax"},
                                act_scale=module.h_scale, dtype=torch.float32)
    assert down.info["heldout_err"] == pytest.approx(rel(got, Fn.linear(h, ffn["W2"], ffn["b2"])), rel=1e-4)
    # the same layer under another name (a standalone linear) is measured per token: another number
    other = compress_linear(ffn["W2"], ffn["b2"], st[DOWN], 16, "fp8", name="proj", compare_plain=False)
    assert other.info["heldout_act"] == "per-token" and other.info["heldout_err"] != down.info["heldout_err"]


def test_bf16_residuals_quantize_no_activations(ffn):
    c = compress_linear(ffn["W1"], ffn["b1"], ffn["stats"][UP], 8, "bf16", name=UP, compare_plain=False)
    assert c.info["heldout_act"] == "none" and c.info["heldout_err"] < 1e-2


def test_reports_and_the_file_carry_it(ffn, tmp_path):
    st = ffn["stats"]
    layers = {UP: compress_linear(ffn["W1"], ffn["b1"], st[UP], 16, "fp8", name=UP),
              DOWN: compress_linear(ffn["W2"], ffn["b2"], st[DOWN], 16, "fp8", name=DOWN)}
    infos = {n: c.info for n, c in layers.items()}
    t = heldout_totals(infos)
    errs = [i["heldout_err"] for i in infos.values()]
    assert t["layers"] == 2 and t["mean"] == pytest.approx(sum(errs) / 2) and t["max"] == max(errs)
    assert min(errs) <= t["total"] <= max(errs) and t["plain_total"] > t["total"]
    text = format_report(infos, 1)
    assert "output error on held-out rows" in text and "without statistics" in text
    assert f"{100 * infos[DOWN]['heldout_err']:.2f}%" in text.splitlines()[-1]  # per layer, its column
    # without held-out rows (older statistics files): no line, the column says "-"
    bare = {n: {k: v for k, v in i.items() if not k.startswith("heldout")} for n, i in infos.items()}
    assert heldout_totals(bare) is None and "held-out rows" not in format_report(bare, 1).split("\n\n")[0]
    # the file: per layer in "layers", the totals in "heldout"
    path = str(tmp_path / "c.safetensors")
    save(path, layers, {UP: ffn["W1"], DOWN: ffn["W2"]}, ltx2.FAMILY)
    meta = read_meta(path)
    assert meta["heldout"]["total"] == pytest.approx(t["total"])
    assert meta["layers"][DOWN]["heldout_act"] == "static"
    assert load(path)  # the loader's checks take the new keys
