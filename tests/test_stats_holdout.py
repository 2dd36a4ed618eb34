"""Held-out rows (issue 20): Calibrate sets every n-th input row of a layer aside from X^T X and keeps a uniform
sample of them, so that compression can measure the output error on rows its statistics never saw."""
import json
import struct

import pytest
import torch

from liteffn.calibration.stats import (ActivationStats, FileStats, LayerStats, StatsCollector, merge_files,
                                       merge_held)
from liteffn.calibration.validate import FileError


def _feed(col, name, xs):
    for x in xs:
        col.update(name, x)
    return col.stats[name]


def _split(x, every, start=0):
    idx = torch.arange(start, start + x.shape[0])
    aside = idx % every == every - 1
    return x[~aside], x[aside]


def test_rows_set_aside_leave_the_statistics_and_all_are_kept_below_the_cap():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 16, generator=g) for n in (37, 5, 64)]  # chunks of 8 rows: boundaries everywhere
    col = StatsCollector.for_widths({"l": 16}, holdout_rows=1000, holdout_every=4, chunk_rows=8)
    before = [x.clone() for x in xs]
    s = _feed(col, "l", xs)
    assert all(torch.equal(a, b) for a, b in zip(xs, before))  # fp32 inputs are the model's own: never zeroed
    fit, aside = _split(torch.cat(xs), 4)
    assert s.rows == fit.shape[0] and s.held_seen == aside.shape[0] == s.held_rows == 26
    torch.testing.assert_close(s.xtx, fit.T @ fit, rtol=1e-5, atol=1e-4)
    assert torch.equal(s.absmax, fit.abs().amax(0))
    assert torch.equal(s.held, aside.bfloat16())  # all of them, in order
    # without holdout_rows nothing is set aside (the library's default)
    plain = _feed(StatsCollector.for_widths({"l": 16}), "l", xs)
    assert plain.rows == 106 and plain.held is None and plain.held_seen == 0


def test_the_sample_is_capped_uniform_and_the_same_on_every_run():
    idx = torch.arange(2000)
    rows = torch.stack([idx // 64, idx % 64, idx // 64, idx % 64], 1).float()  # exact in bf16: row i says i
    xs = list(rows.split(40))

    def run(name):
        col = StatsCollector.for_widths({name: 4}, holdout_rows=20, holdout_every=2)
        return _feed(col, name, xs)

    s = run("a")
    assert s.held_rows == 20 and s.held_seen == 1000
    assert torch.equal(s.held, run("a").held)  # seeded by the layer's name
    assert not torch.equal(s.held, run("b").held)
    # each of the 1000 candidates kept with probability 20/1000: over many names, as often early as late
    picks = torch.cat([(lambda h: h[:, 0] * 64 + h[:, 1])(run(f"l{i}").held.float()) for i in range(150)])
    assert torch.isin(picks, torch.arange(1, 2000, 2).float()).all()  # only rows set aside (odd positions)
    early, late = (picks < 1000).float().mean(), (picks >= 1000).float().mean()
    assert abs(float(early - late)) < 0.08, (early, late)  # Algorithm R: not the first rows only


def test_merging_samples_keeps_both_whole_under_the_cap_else_in_proportion():
    a, b = torch.zeros(6, 3).bfloat16(), torch.ones(4, 3).bfloat16()
    rows, seen = merge_held(a, 60, b, 20)
    assert seen == 80 and rows.shape[0] == 10
    rows, seen = merge_held(a, 60, b, 20, cap=4)
    assert rows.shape[0] == 4 and int((rows[:, 0] == 0).sum()) == 3  # 3/4 of the rows set aside came from a
    assert torch.equal(rows, merge_held(a, 60, b, 20, cap=4)[0])
    # commutative to the byte, with and without subsampling (an append writes what the merge would)
    c = torch.randn(5, 3).bfloat16()
    for cap in (4, 100):
        for (x, xs), (y, ys) in (((a, 60), (b, 20)), ((a, 6), (c, 6)), ((b, 9), (c, 9))):
            assert torch.equal(merge_held(x, xs, y, ys, cap=cap)[0], merge_held(y, ys, x, xs, cap=cap)[0])
    assert merge_held(None, 0, b, 20)[0].shape[0] == 4 and merge_held(a, 60, None, 0)[1] == 60
    s = LayerStats(torch.zeros(3, 3), torch.zeros(3), 5, a.clone(), 60)
    s.merge_(LayerStats(torch.zeros(3, 3), torch.zeros(3), 7, b, 20))
    assert s.rows == 12 and s.held_seen == 80 and s.held_rows == 10


def _stats(seed, held=True):
    g = torch.Generator().manual_seed(seed)
    col = StatsCollector.for_widths({"a": 8, "b": 4}, holdout_rows=16 if held else 0, holdout_every=3)
    for _ in range(3):
        col.update("a", torch.randn(20, 8, generator=g))
        col.update("b", torch.randn(11, 4, generator=g))
    col.stats.meta.update(model_family="test", runs=1)
    return col.stats


def test_files_carry_the_rows_and_merges_merge_them(tmp_path):
    s1, s2 = _stats(1), _stats(2)
    p1, p2 = str(tmp_path / "s1.safetensors"), str(tmp_path / "s2.safetensors")
    s1.save(p1)
    s2.save(p2)
    back = ActivationStats.load(p1)
    for n in ("a", "b"):
        assert torch.equal(back[n].held, s1[n].held) and back[n].held_seen == s1[n].held_seen > 0
    lazy = FileStats(p1)
    assert lazy.infos["a"]["held"] == s1["a"].held_rows and torch.equal(lazy["a"].held, s1["a"].held)
    assert lazy.held_of("a") == s1.held_of("a") == (s1["a"].held_rows, s1["a"].held_seen)  # header vs memory
    merged = merge_files([p1, p2], str(tmp_path / "m.safetensors"))
    m = ActivationStats.load(str(tmp_path / "m.safetensors"))
    want = ActivationStats(meta=dict(s1.meta)).merge_(ActivationStats.load(p1)).merge_(ActivationStats.load(p2))
    for n in ("a", "b"):
        assert merged["layers"][n]["held_seen"] == m[n].held_seen == s1[n].held_seen + s2[n].held_seen
        assert torch.equal(m[n].held, want[n].held)  # the file merge and the in-memory merge agree


def test_files_without_held_rows_load_and_write_as_before(tmp_path):
    old = _stats(1, held=False)
    p = str(tmp_path / "old.safetensors")
    old.save(p)
    with open(p, "rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    assert not any(k.endswith(".held") for k in header)
    assert "held" not in json.loads(header["__metadata__"]["liteffn"])["layers"]["a"]
    assert ActivationStats.load(p)["a"].held is None
    # merged with a file that has them: the rows of the one that has them
    new = str(tmp_path / "new.safetensors")
    _stats(2).save(new)
    m = merge_files([p, new], str(tmp_path / "m.safetensors"))
    assert m["layers"]["a"]["held"] == ActivationStats.load(new)["a"].held_rows


def _rewrite_meta(path, fn):
    """Rewrite the LiteFFN metadata of a safetensors file in place (the header keeps its length)."""
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
        rest = fh.read()
    meta = json.loads(header["__metadata__"]["liteffn"])
    fn(meta)
    header["__metadata__"]["liteffn"] = json.dumps(meta)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)) + hb + rest)


@pytest.mark.parametrize("damage, says", [
    (lambda m: m["layers"]["a"].update(held=999), "held"),  # more rows than the tensor has
    (lambda m: m["layers"]["a"].update(held=5, held_seen=2), "held <= held_seen"),
    (lambda m: m["layers"]["a"].update(held="x"), "held <= held_seen"),
])
def test_damaged_held_rows_are_refused_with_the_layer_named(tmp_path, damage, says):
    p = str(tmp_path / "s.safetensors")
    _stats(1).save(p)
    _rewrite_meta(p, damage)
    with pytest.raises(FileError, match=says) as e:
        ActivationStats.load(p)
    assert "layer a" in str(e.value) and "calibrate again" in str(e.value)


def test_non_finite_held_rows_are_refused(tmp_path):
    s = _stats(1)
    s["a"].held[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        s.save(str(tmp_path / "s.safetensors"))
