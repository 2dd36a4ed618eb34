"""LiteFFN Calibrate saving to a file streams each pass to disk as it ends (calibration/stats.py:
stream_passes, save_stream): host memory holds one group of statistics, not the run; the file is the
same as the in-memory path's, appears whole or not at all, and the node's output stays in the file
(FileStats), read one layer at a time by Compress Model and by a chained Calibrate."""
from __future__ import annotations

import os
import shutil
import weakref

import pytest
import torch

import ltx2_tiny
from test_nodes import STEPS, folder, sample

SMALL = 0.0055  # GiB: several passes on the tiny model (4 MiB of it row-chunk scratch, up to 2 MiB held-out rows)


def run(node, model, filename="", append=False, stats=None, budget=SMALL, prompt=0):
    pos, neg = ltx2_tiny.conditioning(seed=prompt)
    return node("LiteFFNCalibrate").execute(
        model=model, positive=pos, negative=neg, latent_image=ltx2_tiny.latent(), seed=1, steps=STEPS, cfg=3.0,
        sampler_name="euler", scheduler="simple", seeds=1, streams="all", blocks="all", memory_budget_gb=budget,
        storage="cpu", filename=filename, append=append, stats=stats).result


def _litter(d):
    return [n for n in os.listdir(d) if "liteffn-tmp" in n or n.endswith(".tmp")]


def _passes(summary):
    return int(summary.split(" pass(es)")[0].rsplit(" ", 1)[1])


def test_a_saved_run_holds_one_pass_of_statistics_and_saves_what_memory_would(pack, node, ltx2, monkeypatch):
    S, calib = pack.calibration.stats, pack.nodes.calibrate
    model = ltx2()
    mem, _ = run(node, model)  # filename empty: in memory, as before
    refs = []

    class Watched(S.LayerStats):  # every LayerStats the collector and the node make
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            refs.append(weakref.ref(self))

    def holding():
        return sum(1 for r in refs if r() is not None and r().xtx is not None)

    at_pass_start, real = [], calib._sample

    def watched_sample(*a, **k):
        at_pass_start.append(holding())
        return real(*a, **k)

    monkeypatch.setattr(S, "LayerStats", Watched)
    monkeypatch.setattr(calib, "_sample", watched_sample)
    saved, summary = run(node, model, filename="streamed")
    monkeypatch.undo()
    passes = _passes(summary)
    assert passes >= 2 and len(at_pass_start) == passes, summary
    assert at_pass_start == [0] * passes, at_pass_start  # before: every earlier pass was still held here
    assert isinstance(saved, S.FileStats) and saved.names() == mem.names()
    for n in mem.names():
        assert torch.equal(saved[n].xtx, mem[n].xtx) and saved[n].rows == mem[n].rows
    mem.save(os.path.join(folder(), "from_memory.safetensors"))
    assert open(os.path.join(folder(), "streamed.safetensors"), "rb").read() == \
        open(os.path.join(folder(), "from_memory.safetensors"), "rb").read()
    a, _ = node("LiteFFNCompressModel").execute(model=model, stats=saved, rank=8, energy=0.0, residual="fp8",
                                                streams="all", blocks="all", save_name="").result
    b, _ = node("LiteFFNCompressModel").execute(model=model, stats=mem, rank=8, energy=0.0, residual="fp8",
                                                streams="all", blocks="all", save_name="").result
    assert torch.equal(sample(a), sample(b))
    assert not _litter(folder())


def test_append_with_a_chained_input_writes_the_totals_of_the_in_memory_path(pack, node, ltx2):
    S = pack.calibration.stats
    model = ltx2()
    earlier, _ = run(node, model, prompt=5)  # an earlier node's output, in memory
    run(node, model, filename="app", append=False)
    path, ref = os.path.join(folder(), "app.safetensors"), os.path.join(folder(), "app_ref.safetensors")
    shutil.copyfile(path, ref)
    total, summary = run(node, model, filename="app", append=True, stats=earlier, prompt=3)
    # what the node did before: this run plus the input in memory, then added to the file
    old, _ = run(node, model, stats=earlier, prompt=3)
    S.append_to_file(old, ref)
    assert open(path, "rb").read() == open(ref, "rb").read(), summary
    assert isinstance(total, S.FileStats) and total.meta["runs"] == 3 and "added to app.safetensors (3 runs)" in summary
    n = "transformer_blocks.0.ff.net.2"
    assert total[n].rows == old[n].rows and torch.equal(total[n].xtx, old[n].xtx)
    assert not _litter(folder())


def test_chaining_from_a_saved_output(pack, node, ltx2, monkeypatch):
    S, FileError = pack.calibration.stats, pack.calibration.validate.FileError
    model = ltx2()
    first, _ = run(node, model, filename="chain_a")
    assert isinstance(first, S.FileStats)
    n = "transformer_blocks.1.audio_ff.net.0.proj"
    one = first[n]
    second, _ = run(node, model, prompt=5)
    both, summary = run(node, model, stats=first, prompt=5)  # in memory: read from first's file layer by layer
    assert both.meta["runs"] == 2 and both[n].rows == one.rows + second[n].rows, summary
    torch.testing.assert_close(both[n].xtx, one.xtx + second[n].xtx)
    to_b, _ = run(node, model, filename="chain_b", stats=first, prompt=5)  # saved: the same sums
    assert all(torch.equal(to_b[k].xtx, both[k].xtx) for k in both.names()) and to_b.meta["runs"] == 2
    # appending a node's own file to itself: already in the file, counted once
    again, summary = run(node, model, filename="chain_a", append=True, stats=first)
    assert "counted once" in summary and again.meta["runs"] == 2 and again[n].rows == 2 * one.rows, summary
    torch.testing.assert_close(again[n].xtx, 2 * one.xtx, rtol=1e-5, atol=1e-5)
    # first's file was replaced since: refused before sampling, with what to do
    monkeypatch.setattr(pack.nodes.calibrate, "_sample", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(ValueError, match="was replaced after these statistics were saved.*stats_file") as e:
        run(node, model, filename="chain_c", stats=first)
    assert isinstance(e.value.__cause__, FileError)  # (shown to ComfyUI as a plain ValueError: nodes/errors.py)
    assert not os.path.exists(os.path.join(folder(), "chain_c.safetensors")) and not _litter(folder())


@pytest.mark.parametrize("fault", ["interrupt", "never ran"])
def test_a_fault_in_a_later_pass_leaves_the_file_as_it_was(pack, node, ltx2, monkeypatch, fault):
    import comfy.model_management

    calib = pack.nodes.calibrate
    model = ltx2()
    run(node, model, filename="keep", budget=1.0)
    path = os.path.join(folder(), "keep.safetensors")
    before = open(path, "rb").read()
    calls, real = [0], calib._sample

    def faulty(*a, **k):
        calls[0] += 1
        if calls[0] == 2:  # the second pass, after the first went to disk
            if fault == "never ran":
                return None  # no sampling: the group's linears never run
            comfy.model_management.interrupt_current_processing(True)
        return real(*a, **k)

    monkeypatch.setattr(calib, "_sample", faulty)
    err = (comfy.model_management.InterruptProcessingException, None) if fault == "interrupt" else \
        (RuntimeError, "linears never ran.*is this latent empty")
    try:
        for append in (False, True):
            calls[0] = 0
            with pytest.raises(err[0], match=err[1]):
                run(node, model, filename="keep", append=append)
            comfy.model_management.interrupt_current_processing(False)
            assert calls[0] == 2 and open(path, "rb").read() == before and not _litter(folder())
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not any(m._forward_pre_hooks for m in model.model.modules())


def test_append_needs_room_for_its_scratch_file_and_is_refused_before_sampling(pack, node, ltx2, monkeypatch):
    S, safe_io = pack.calibration.stats, pack.calibration.safe_io
    model = ltx2()
    saved, _ = run(node, model, filename="roomy")
    path = os.path.join(folder(), "roomy.safetensors")
    before = open(path, "rb").read()
    size = S.stats_file_bytes({n: saved.width_of(n) for n in saved.names()})

    class Half:  # room for the new file, not for it and this run's scratch file together
        f_bavail, f_frsize = int(size * 1.3) // 4096, 4096

    monkeypatch.setattr(safe_io.os, "statvfs", lambda d: Half)
    with monkeypatch.context() as m:
        m.setattr(pack.nodes.calibrate, "_sample", lambda *a, **k: pytest.fail("sampled"))
        with pytest.raises(ValueError, match=f"not enough free space for {path}"):
            run(node, model, filename="roomy", append=True)
    assert open(path, "rb").read() == before and not _litter(folder())
    _, summary = run(node, model, filename="roomy", append=False)  # replacing it needs the new file only
    assert "saved roomy.safetensors" in summary
