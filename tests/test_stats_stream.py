"""Calibrate's streamed save (calibration/stats.py: stream_passes, save_stream) and statistics kept
in their file (FileStats): one group of layers in memory at a time, the same bytes as the
in-memory path, and the file whole or untouched."""
import os
import weakref

import pytest
import torch

from liteffn.calibration import ltx2
from liteffn.calibration.stats import (ActivationStats, FileStats, LayerStats, StatsCollector, append_to_file,
                                       layer_bytes, merged_meta, plan_passes, save_stream, stream_passes)
from liteffn.calibration.synthetic import SyntheticLTX2
from liteffn.calibration.validate import FileError


def _model():
    return SyntheticLTX2(blocks=2, video_dim=32, audio_dim=16, seed=0)


def _names(m):
    return ltx2.select(n for n, _ in m.named_modules())


def _groups(m, per_group=1):
    names = _names(m)
    widths = {n: m.get_submodule(n).in_features for n in names}
    budget = per_group * max(layer_bytes(k) for k in widths.values()) + max(widths.values()) * 4
    return widths, plan_passes(widths, budget, chunk_rows=1)


class _Runner:
    """run_group for stream_passes: the synthetic model calibrated with one group hooked; every
    LayerStats' tensors it hands out are watched (weakrefs), and at the start of each pass it
    notes how many from earlier passes are still alive."""

    def __init__(self, model, batches=3, seed0=0):
        self.model, self.batches, self.seed0 = model, batches, seed0
        self.watched = []
        self.alive_at_start = []

    def alive(self):
        return sum(r() is not None for r in self.watched)

    def __call__(self, group):
        self.alive_at_start.append(self.alive())
        with StatsCollector(self.model, group) as col, torch.no_grad():
            for i in range(self.batches):
                self.model(self.model.video_acts.sample(64, self.seed0 + i),
                           self.model.audio_acts.sample(16, self.seed0 + i))
        for s in col.stats.layers.values():
            self.watched.append(weakref.ref(s.xtx))
        return col.stats.layers


def _meta():
    return {"model_family": ltx2.FAMILY, "runs": 1}


def _old_way(model, groups, seed0=0):
    """What Calibrate did before: every group's statistics kept until the end."""
    stats = ActivationStats(meta=_meta())
    run = _Runner(model, seed0=seed0)
    for g in groups:
        for n, st in run(g).items():
            stats.layers[n] = type(st)(st.xtx.cpu(), st.absmax.cpu(), st.rows)
    return stats, run


def _files(d):
    return sorted(os.listdir(d))


def test_streamed_save_holds_one_group_and_writes_the_same_bytes(tmp_path):
    m = _model()
    widths, groups = _groups(m)
    assert len(groups) >= 3 and max(map(len, groups)) < len(widths)
    run = _Runner(m)
    out = save_stream(str(tmp_path / "new.safetensors"), stream_passes(groups, run, release=True), _meta(), widths)
    assert run.alive_at_start[0] == 0 and max(run.alive_at_start) == 0, run.alive_at_start  # nothing of earlier passes
    assert run.alive() == 0
    old, old_run = _old_way(m, groups)
    # the old way keeps every earlier pass: the watch would have failed it
    assert old_run.alive_at_start == [sum(map(len, groups[:i])) for i in range(len(groups))]
    old.save(str(tmp_path / "old.safetensors"))
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "old.safetensors").read_bytes()
    assert isinstance(out, FileStats) and out.names() == old.names()
    assert _files(tmp_path) == ["new.safetensors", "old.safetensors"]


def test_streamed_save_with_earlier_statistics_and_append_equals_in_memory_merge(tmp_path):
    m = _model()
    widths, groups = _groups(m)
    names = _names(m)
    earlier, _ = _old_way(m, groups, seed0=10)
    earlier.layers.pop(names[0])  # a layer this run adds
    earlier.layers["extra.layer"] = LayerStats(torch.eye(8), torch.ones(8), 5)  # one only the earlier has
    earlier.meta["runs"] = 3
    before = {n: earlier[n].xtx.clone() for n in earlier.names()}
    base, _ = _old_way(m, groups, seed0=20)  # the file appended to
    for p in ("new", "old"):
        base.save(str(tmp_path / f"{p}.safetensors"))
    earlier.save(str(tmp_path / "earlier.safetensors"))
    on_disk = FileStats(str(tmp_path / "earlier.safetensors"))
    for src in (earlier, on_disk):  # the stats input in memory, or kept in its file
        run = _Runner(m)
        new = save_stream(str(tmp_path / "new.safetensors"), stream_passes(groups, run, src, release=True),
                          merged_meta(_meta(), src.meta), {**widths, "extra.layer": 8}, append=True)
        assert max(run.alive_at_start) <= 1, run.alive_at_start  # at most a layer of the stats input
        old, _ = _old_way(m, groups)
        old.merge_(src)
        append_to_file(old, str(tmp_path / "old.safetensors"))
        assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "old.safetensors").read_bytes()
        assert new.meta["runs"] == old.meta["runs"] and new.names() == old.names()
        assert all(torch.equal(earlier[n].xtx, v) for n, v in before.items())  # the input is left as it was
    assert new.meta["runs"] == 1 + 2 * (1 + 3) and new.rows_of("extra.layer") == 10
    assert _files(tmp_path) == ["earlier.safetensors", "new.safetensors", "old.safetensors"]  # no scratch left


@pytest.mark.parametrize("append", [False, True])
@pytest.mark.parametrize("fault", ["never ran", "nan", "interrupt"])
def test_a_failing_pass_leaves_the_file_as_it_was_and_no_temp(tmp_path, append, fault):
    m = _model()
    widths, groups = _groups(m)
    path = str(tmp_path / "stats.safetensors")
    ActivationStats({"a": LayerStats(torch.eye(4), torch.ones(4), 3)}, _meta()).save(path)
    before = open(path, "rb").read()
    run = _Runner(m)

    class Stop(Exception):
        pass

    def failing(group):
        layers = run(group)
        if len(run.alive_at_start) == 2:  # the second pass, after the first went to disk
            if fault == "never ran":
                layers.pop(group[-1])
            elif fault == "nan":
                layers[group[0]].xtx[0, 0] = float("nan")
            else:
                raise Stop()
        return layers

    err = {"never ran": (RuntimeError, "1 linears never ran"), "nan": (ValueError, "NaN or Inf"),
           "interrupt": (Stop, None)}[fault]
    with pytest.raises(err[0], match=err[1]):
        save_stream(path, stream_passes(groups, failing, release=True), _meta(), widths, append=append)
    assert open(path, "rb").read() == before and _files(tmp_path) == ["stats.safetensors"]


def test_an_error_while_merging_into_the_file_leaves_it_and_no_scratch(tmp_path, monkeypatch):
    import liteffn.calibration.stats as S

    m = _model()
    widths, groups = _groups(m)
    path = str(tmp_path / "stats.safetensors")
    base, _ = _old_way(m, groups)
    base.save(path)
    before = open(path, "rb").read()
    calls = []
    real = S._read_f32

    def failing(fh, span, dst, p, name, add=False):
        calls.append(p)
        if ".run.liteffn-tmp-" in p and len([c for c in calls if c == p]) == 3:  # the merge, part-way
            raise OSError("disk went away")
        return real(fh, span, dst, p, name, add)

    monkeypatch.setattr(S, "_read_f32", failing)
    with pytest.raises(OSError, match="disk went away"):
        save_stream(path, stream_passes(groups, _Runner(m), release=True), _meta(), widths, append=True)
    assert open(path, "rb").read() == before and _files(tmp_path) == ["stats.safetensors"]


def test_file_stats_reads_one_layer_at_a_time_and_refuses_a_replaced_file(tmp_path, monkeypatch):
    m = _model()
    widths, groups = _groups(m)
    mem, _ = _old_way(m, groups)
    path = str(tmp_path / "s.safetensors")
    mem.save(path)
    fs = FileStats(path)
    assert fs.names() == mem.names() and fs.meta == mem.meta and fs.nbytes() == 0
    n = mem.names()[1]
    assert n in fs and "nope" not in fs and n in fs.layers and len(fs.layers) == len(mem.names())
    assert fs.width_of(n) == mem[n].width and fs.rows_of(n) == mem[n].rows
    torch.testing.assert_close(fs[n].xtx, mem[n].xtx, rtol=0, atol=0)
    with pytest.raises(KeyError):
        fs["nope"]
    import liteffn.calibration.stats as S

    reads = []
    real = S.read_layer
    monkeypatch.setattr(S, "read_layer", lambda f, p, name, info, device="cpu": reads.append(name) or
                        real(f, p, name, info, device))
    total = ActivationStats(meta=_meta()).merge_(fs)  # a chained node's merge: layer by layer, once each
    assert reads == fs.names()
    assert all(torch.equal(total[k].xtx, mem[k].xtx) for k in mem.names()) and total.meta["runs"] == 2
    with pytest.raises(TypeError, match="read-only"):
        fs.merge_(mem)
    fs.save(str(tmp_path / "copy.safetensors"))  # a file-backed object saves layer by layer too
    assert (tmp_path / "copy.safetensors").read_bytes() == open(path, "rb").read()
    assert fs.is_file(path) and not fs.is_file(str(tmp_path / "copy.safetensors"))
    os.replace(str(tmp_path / "copy.safetensors"), path)  # another run wrote that filename
    assert not fs.is_file(path)
    with pytest.raises(FileError, match="was replaced after these statistics were saved"):
        fs[n]
    os.remove(path)
    with pytest.raises(FileError, match="was removed"):
        fs[n]
