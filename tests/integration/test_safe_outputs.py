"""Outputs of the nodes go through calibration/safe_io.py: Compress Model's save_name naming an
existing statistics file, or Calibrate's filename naming a compressed file, is refused before
any work, with a message saying what to do; the file is left as it was, and no temp."""
from __future__ import annotations

import os

import pytest

from test_nodes import calibrate, compress, folder


def _litter(d):
    return [n for n in os.listdir(d) if "liteffn-tmp" in n or n.endswith(".tmp")]


def test_save_name_of_a_statistics_file_is_refused(pack, node, ltx2, monkeypatch):
    model = ltx2()
    calibrate(node, model, filename="keep_stats", append=False, seeds=1)
    path = os.path.join(folder(), "keep_stats.safetensors")
    before = open(path, "rb").read()
    compress_mod = pack.nodes.compress

    def no_work(*a, **k):
        raise AssertionError("compression started before save_name was checked")

    monkeypatch.setattr(compress_mod, "compress_linear", no_work)
    for kw in ({"stats_file": "keep_stats.safetensors"}, {}):  # the statistics input itself, or another file
        with pytest.raises(ValueError, match=f"save_name {path} (is the input|exists and is a LiteFFN statistics "
                                             "file).*give save_name another file name"):
            node("LiteFFNCompressModel").execute(model=model, rank=4, energy=0.0, residual="fp8", streams="all",
                                                 blocks="all", save_name="keep_stats", **kw)
    assert open(path, "rb").read() == before and not _litter(os.path.dirname(path))


def test_calibrate_filename_of_a_compressed_file_is_refused_before_sampling(pack, node, ltx2, monkeypatch):
    model = ltx2()
    compress(node, model, None, rank=4, save_name="keep_model")
    path = os.path.join(folder(), "keep_model.safetensors")
    before = open(path, "rb").read()
    calib_mod = pack.nodes.calibrate

    def no_sampling(*a, **k):
        raise AssertionError("sampling started before filename was checked")

    monkeypatch.setattr(calib_mod, "_sample", no_sampling)
    for append in (True, False):
        with pytest.raises(ValueError, match=f"filename {path} exists and is a LiteFFN compressed file, not a "
                                             "LiteFFN statistics file.*give filename another file name"):
            calibrate(node, model, filename="keep_model", append=append, seeds=1)
    assert open(path, "rb").read() == before and not _litter(os.path.dirname(path))
