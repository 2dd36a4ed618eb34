import os

import pytest
import torch
from safetensors import safe_open

from liteffn.calibration import compressed_file as cf
from liteffn.calibration.compress import compress_linear
from liteffn.calibration.st_writer import StreamingSafetensorsWriter
from liteffn.calibration.stats import LayerStats
from liteffn.calibration.synthetic import SyntheticActivations, synthetic_weight
from liteffn.kernels.modules import CompressedFFN, CompressedLinear

NAMES = ["transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"]


@pytest.fixture(scope="module")
def compressed():
    dims = {NAMES[0]: (128, 32), NAMES[1]: (32, 128)}
    weights, layers = {}, {}
    for i, (name, (n, k)) in enumerate(dims.items()):
        W = synthetic_weight(n, k, seed=i)
        X = SyntheticActivations(k, i).sample(512, 0)
        weights[name] = W
        layers[name] = compress_linear(W, torch.randn(n), LayerStats(X.T @ X, X.abs().amax(0), 512), 8, "nvfp4")
    return weights, layers


def test_round_trip_same_tensors_and_outputs(tmp_path, compressed):
    weights, layers = compressed
    p = str(tmp_path / "c.safetensors")
    cf.save(p, layers, weights, "ltx2")
    back, meta = cf.load(p, cf.fingerprint(weights.items()), "ltx2")
    assert meta["version"] == cf.FILE_VERSION and meta["model_family"] == "ltx2"
    for n in NAMES:
        for k, v in layers[n].tensors.items():
            assert torch.equal(back[n].tensors[k].view(torch.uint8), v.view(torch.uint8)), (n, k)
        assert back[n].info["rank"] == 8 and back[n].info["format"] == "nvfp4" and "rel_err" in back[n].info
    mods = [CompressedLinear(l.info["format"], l.info["in_features"], l.info["out_features"], l.tensors)
            for l in (back[NAMES[0]], back[NAMES[1]])]
    x = torch.randn(4, 32)
    y = CompressedFFN(*mods)(x)
    assert y.shape == (4, 32) and torch.isfinite(y).all()


def test_mismatches_are_named(tmp_path, compressed):
    weights, layers = compressed
    p = str(tmp_path / "c.safetensors")
    cf.save(p, layers, weights, "ltx2")
    other = dict(weights)
    other[NAMES[1]] = weights[NAMES[1]] + 1.0
    with pytest.raises(cf.MismatchError, match=r"1 layers hold different weights \(e.g. transformer_blocks.0.ff.net.2\)"):
        cf.load(p, cf.fingerprint(other.items()))
    shaped = {NAMES[0]: torch.zeros(64, 32), NAMES[1]: weights[NAMES[1]]}
    with pytest.raises(cf.MismatchError, match="differ in shape .*file 128x32, model 64x32"):
        cf.load(p, cf.fingerprint(shaped.items()))
    with pytest.raises(cf.MismatchError, match="not in the model"):
        cf.load(p, cf.fingerprint([(NAMES[0], weights[NAMES[0]])]))
    with pytest.raises(cf.MismatchError, match="made for a 'ltx2' model, not 'flux'"):
        cf.load(p, family="flux")


def test_fingerprint_ignores_float_precision_of_same_weights(compressed):
    weights, _ = compressed
    w = weights[NAMES[0]].bfloat16()
    assert cf.weight_digest(w) == cf.weight_digest(w.float()) == cf.weight_digest(w.half())


def test_corrupt_file_is_a_clear_error(tmp_path, compressed):
    weights, layers = compressed
    p = tmp_path / "c.safetensors"
    cf.save(str(p), layers, weights, "ltx2")
    data = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError):
        cf.load(str(tmp_path / "cut.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        cf.load(str(tmp_path / "junk.safetensors"))


def test_failed_write_leaves_nothing(tmp_path, compressed):
    weights, layers = compressed
    p = tmp_path / "c.safetensors"
    with pytest.raises(RuntimeError):
        with cf.Writer(str(p), "ltx2") as w:
            w.add(NAMES[0], layers[NAMES[0]], weights[NAMES[0]])
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_streaming_writer_is_read_by_safetensors(tmp_path):
    t = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.uint8), "c": torch.randn(2).bfloat16(),
         "d": torch.randn(4).to(torch.float8_e4m3fn), "e": torch.zeros(0, 3)}
    w = StreamingSafetensorsWriter(str(tmp_path / "x.safetensors"))
    for k, v in t.items():
        w.add(k, v)
    w.close({"k": "v"})
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"k": "v"}
        for k, v in t.items():
            assert torch.equal(f.get_tensor(k).view(torch.uint8), v.view(torch.uint8))
    assert os.listdir(tmp_path) == ["x.safetensors"]
