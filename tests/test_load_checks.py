"""What is written and loaded is validated (issue 19, part B): the compressed-file loader checks
every stored tensor and the fingerprint; compression refuses bad inputs before writing; statistics
of other models are refused when merged or used; merge-stats and Calibrate's append stream layer by
layer. Each case asserts the message and that nothing is left behind or lost."""
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from liteffn.calibration import compressed_file as cf
from liteffn.calibration.checkpoint import compress_checkpoint
from liteffn.calibration.cli import main
from liteffn.calibration.compress import compress_linear
from liteffn.calibration.fingerprint import weight_digest
from liteffn.calibration.stats import ActivationStats, LayerStats, append_to_file, merge_files
from liteffn.calibration.synthetic import SyntheticLTX2
from liteffn.calibration.validate import FileError, LayerError

UP, DOWN = "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"
P = "model.diffusion_model."


# ------------------------------------------------------------------ helpers
def _weights(seed=0, n=64, k=32):
    g = torch.Generator().manual_seed(seed)
    return {UP: (torch.randn(n, k, generator=g) * 0.05).bfloat16(),
            DOWN: (torch.randn(k, n, generator=g) * 0.05).bfloat16()}


def _stats_for(w: dict, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    out = {}
    for name, wt in w.items():
        x = torch.randn(256, wt.shape[1], generator=g)
        out[name] = LayerStats(x.T @ x, x.abs().amax(0), 256)
    return out


_BUILT: dict = {}


def _compressed(tmp_path, fmt="fp8", rank=4, seed=0, name="c.safetensors"):
    """A compressed file of two layers (with statistics and bias) at tmp_path/name, and its source
    weights. Compressed once per format and copied (the tests corrupt their copy)."""
    w = _weights(seed)
    key = (fmt, rank, seed)
    if key not in _BUILT:
        st = _stats_for(w)
        g = torch.Generator().manual_seed(seed)
        layers = {n: compress_linear(wt, torch.randn(wt.shape[0], generator=g), st[n], rank, fmt, device="cpu",
                                     name=n, refit=0) for n, wt in w.items()}
        path = str(tmp_path / ".build.safetensors")
        cf.save(path, layers, w, "ltx2")
        with open(path, "rb") as f:
            _BUILT[key] = f.read()
        os.remove(path)
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(_BUILT[key])
    return path, w


def _rewrite(path, change_tensors=None, change_meta=None):
    """Rewrite a safetensors file with some tensors or the LiteFFN metadata changed."""
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["liteffn"])
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        change_meta(meta)
    save_file(tensors, path, metadata={"liteffn": json.dumps(meta)})


def _left(tmp_path, keep):
    """Files in tmp_path other than keep (temp files, partial outputs)."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in keep)


# ------------------------------------------------------------------ the compressed file
def test_valid_file_loads_in_every_format(tmp_path):
    for fmt in ("fp8", "nvfp4", "mxfp4", "bf16"):
        path, w = _compressed(tmp_path, fmt, name=f"{fmt}.safetensors")
        layers, meta = cf.load(path, cf.fingerprint(w.items()), "ltx2")
        assert set(layers) == {UP, DOWN} and meta["fingerprint"][UP][2].startswith("2:")


def _corrupt_cases(raw: bytes):
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    key = next(k for k in header if k != "__metadata__")

    def hostile(change):
        h = json.loads(raw[8:8 + n])
        change(h[key])
        hb = json.dumps(h).encode()
        hb += b" " * (-len(hb) % 8)
        return struct.pack("<Q", len(hb)) + hb + raw[8 + n:]

    return {
        "truncated": raw[:-100],
        "header only": raw[:8 + n],
        "empty": b"",
        "not safetensors": b"PK\x03\x04 this is a zip file, not a safetensors file" * 4,
        "huge header length": struct.pack("<Q", 2**62) + raw[8:],
        "huge offsets": hostile(lambda t: t.__setitem__("data_offsets", [0, 2**60])),
        "huge shape": hostile(lambda t: t.__setitem__("shape", [2**31, 2**31])),
        "bad metadata json": raw.replace(b'"liteffn":"{', b'"liteffn":"[', 1),
    }


def test_corrupt_and_hostile_files_are_refused_by_name(tmp_path):
    path, w = _compressed(tmp_path)
    raw = open(path, "rb").read()
    for case, data in _corrupt_cases(raw).items():
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(data)
        with pytest.raises((FileError, cf.MismatchError)) as e:
            cf.load(str(bad), cf.fingerprint(w.items()), "ltx2")
        assert str(bad) in str(e.value), (case, e.value)
        assert "Traceback" not in str(e.value)
    assert open(path, "rb").read() == raw  # the good file untouched


@pytest.mark.parametrize("fmt,tensor", [("fp8", "q_scale"), ("fp8", "A"), ("fp8", "B"), ("fp8", "bias"),
                                        ("fp8", "input_amax"), ("nvfp4", "q_scale2"), ("bf16", "q")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_tensors_are_refused(tmp_path, fmt, tensor, value):
    path, w = _compressed(tmp_path, fmt)

    def poison(t):
        x = t[f"{DOWN}.{tensor}"]
        x.view(-1)[0] = value
    _rewrite(path, poison)
    with pytest.raises(FileError, match=rf"layer {DOWN}, tensor {tensor} contains NaN or Inf.*re-run Compress Model"):
        cf.load(path, cf.fingerprint(w.items()), "ltx2")


def test_nan_codes_in_fp8_residual_and_block_scales_are_refused(tmp_path):
    path, w = _compressed(tmp_path, "fp8")
    _rewrite(path, lambda t: t[f"{UP}.q"].view(torch.uint8).view(-1).__setitem__(5, 0x7F))  # E4M3 NaN
    with pytest.raises(FileError, match=rf"layer {UP}, tensor q contains NaN"):
        cf.load(path)
    path, w = _compressed(tmp_path, "mxfp4", name="mx.safetensors")
    _rewrite(path, lambda t: t[f"{UP}.q_scale"].view(-1).__setitem__(0, 255))  # E8M0 255: 2^128
    with pytest.raises(FileError, match=rf"layer {UP}, tensor q_scale decodes to Inf or NaN"):
        cf.load(path)


@pytest.mark.parametrize("case,change,match", [
    ("q [N, K+1]", lambda t: t.__setitem__(f"{UP}.q", torch.zeros(64, 33, dtype=torch.float8_e4m3fn)),
     r"tensor q has shape \[64, 33\], expected \[64, 32\]"),
    ("q_scale [1]", lambda t: t.__setitem__(f"{UP}.q_scale", torch.ones(1)),
     r"tensor q_scale has shape \[1\], expected \[64\].*would broadcast"),
    ("A [N, r+1]", lambda t: t.__setitem__(f"{UP}.A", torch.zeros(64, 5, dtype=torch.bfloat16)),
     r"tensor A has shape \[64, 5\], expected \[64, 4\]"),
    ("B [r, K+2]", lambda t: t.__setitem__(f"{UP}.B", torch.zeros(4, 34, dtype=torch.bfloat16)),
     r"tensor B has shape \[4, 34\], expected \[4, 32\]"),
    ("bias [N-1]", lambda t: t.__setitem__(f"{UP}.bias", torch.zeros(63, dtype=torch.bfloat16)),
     r"tensor bias has shape \[63\], expected \[64\]"),
    ("A fp32", lambda t: t.__setitem__(f"{UP}.A", t[f"{UP}.A"].float()), r"tensor A is F32, expected BF16"),
    ("no q", lambda t: t.pop(f"{UP}.q"), rf"layer {UP} has no tensor q"),
    ("stray tensor", lambda t: t.__setitem__(f"{UP}.extra", torch.zeros(1)), "holds a tensor extra"),
    ("tensor of no layer", lambda t: t.__setitem__("transformer_blocks.9.ff.net.2.q", torch.zeros(1)),
     "belongs to no layer"),
])
def test_wrong_shapes_dtypes_and_sets_are_refused(tmp_path, case, change, match):
    path, w = _compressed(tmp_path)
    _rewrite(path, change)
    with pytest.raises(FileError, match=match) as e:
        cf.load(path, cf.fingerprint(w.items()), "ltx2")
    assert path in str(e.value) and "re-run Compress Model" in str(e.value), case


def test_nvfp4_q_scale2_of_wrong_shape_and_bad_metadata_are_refused(tmp_path):
    path, w = _compressed(tmp_path, "nvfp4")
    _rewrite(path, lambda t: t.__setitem__(f"{DOWN}.q_scale2", torch.ones(2)))
    with pytest.raises(FileError, match=r"tensor q_scale2 has shape \[2\], expected \[1\]"):
        cf.load(path)
    for change, match in [(lambda m: m["layers"][UP].__setitem__("rank", -5), "rank = -5"),
                          (lambda m: m["layers"][UP].__setitem__("rank", 99), "rank 99, larger than the layer"),
                          (lambda m: m["layers"][UP].__setitem__("format", "int3"), "unknown residual format"),
                          (lambda m: m.__setitem__("layers", {}), "describes no compressed layers"),
                          (lambda m: m.__setitem__("version", "x"), "format version is 'x'")]:
        path, w = _compressed(tmp_path, "nvfp4")
        _rewrite(path, change_meta=change)
        with pytest.raises(FileError, match=match):
            cf.load(path)


def test_empty_or_missing_fingerprint_never_skips_the_model_check(tmp_path):
    for change, what in [(lambda m: m.__setitem__("fingerprint", {}), "empty"),
                         (lambda m: m.pop("fingerprint"), "missing"),
                         (lambda m: m["fingerprint"].pop(UP), "has no fingerprint entry"),
                         (lambda m: m["fingerprint"].__setitem__(UP, [64, 32]), "not \\[out, in, digest\\]")]:
        path, w = _compressed(tmp_path)
        _rewrite(path, change_meta=change)
        for fp in (cf.fingerprint(w.items()), None):
            with pytest.raises(FileError, match=what) as e:
                cf.load(path, fp, "ltx2")
            assert "re-run Compress Model" in str(e.value)
        with pytest.raises(FileError, match=what):
            cf.read_meta(path)  # what the Loader node reads first


def test_file_of_another_model_is_named(tmp_path):
    path, _ = _compressed(tmp_path)
    other = _weights(seed=1)
    with pytest.raises(cf.MismatchError, match=r"2 layers hold different weights.*made for another model"):
        cf.load(path, cf.fingerprint(other.items()), "ltx2")


# ------------------------------------------------------------------ fingerprints
def test_fingerprint_agrees_across_bf16_fp16_fp32_copies():
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 0.02, 1e-3, 1e-4):  # small weights: fp16 loses bits below 2^-14
        w = (torch.randn(256, 512, generator=g) * scale).bfloat16()
        assert weight_digest(w) == weight_digest(w.half()) == weight_digest(w.float()), scale
        assert cf.fingerprint([("l", w)]) == cf.fingerprint([("l", w.half())])
    w = torch.randn(64, 64, generator=g).bfloat16()
    w[0, 0] = 1e5  # beyond fp16: inf in the fp16 copy
    assert weight_digest(w) == weight_digest(w.half())
    v = w.clone()
    v[0, 1] += 0.5
    assert weight_digest(v) != weight_digest(w)  # other weights still differ
    # the old digest disagreed for small weights: what the issue found
    small = (torch.randn(256, 512, generator=g) * 1e-3).bfloat16()
    assert weight_digest(small, 1) != weight_digest(small.half(), 1)


class _Quantized:
    """Stands for a comfy-kitchen QuantizedTensor: stored codes (_qdata), the weight's shape, dequantize()."""

    def __init__(self, codes, scale):
        self._qdata, self.scale, self.shape = codes, scale, codes.shape

    def dequantize(self):
        return (self._qdata.float() * self.scale[:, None]).bfloat16()


def test_quantized_weights_are_fingerprinted_by_their_codes_and_old_files_by_their_values():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-127, 128, (64, 128), generator=g, dtype=torch.int8)
    q = _Quantized(codes, torch.rand(64, generator=g) * 0.01 + 0.001)
    d = weight_digest(q)
    assert d.startswith("3:") and d == weight_digest(_Quantized(codes, q.scale * 1.0001))  # the codes, not the scale
    assert d != weight_digest(_Quantized(codes.flip(0), q.scale))
    # a file made before version 3 holds the digest of the dequantized weight: the model's is taken the same way
    old = {"l": [64, 128, weight_digest(q.dequantize())]}
    assert old["l"][2].startswith("2:") and cf.fingerprint([("l", q)], like=old) == old
    assert cf.fingerprint([("l", q)])["l"][2] == d
    # FP8 codes (scaled FP8 checkpoints) keep version 2, as they always were hashed by their codes
    f8 = torch.randn(64, 128, generator=g).to(torch.float8_e4m3fn)
    assert weight_digest(_Quantized(f8, q.scale)) == weight_digest(f8) and weight_digest(f8).startswith("2:")
    with pytest.raises(ValueError, match="unknown fingerprint version"):
        weight_digest(f8, cf.FINGERPRINT_VERSION + 1)


def test_files_with_old_fingerprints_still_load(tmp_path):
    path, w = _compressed(tmp_path)
    old = {n: [int(t.shape[0]), int(t.shape[1]), weight_digest(t, 1)] for n, t in w.items()}
    _rewrite(path, change_meta=lambda m: m.__setitem__("fingerprint", old))
    saved = cf.read_meta(path)["fingerprint"]
    layers, _ = cf.load(path, cf.fingerprint(w.items(), like=saved), "ltx2")  # as the Loader node computes it
    assert set(layers) == {UP, DOWN}
    with pytest.raises(cf.MismatchError, match="another version of LiteFFN.*make the file again"):
        cf.load(path, cf.fingerprint(w.items()), "ltx2")  # a current fingerprint cannot be compared with it
    with pytest.raises(cf.MismatchError, match="hold different weights"):
        cf.load(path, cf.fingerprint(_weights(seed=1).items(), like=saved), "ltx2")


# ------------------------------------------------------------------ compression inputs
def _checkpoint(tmp_path, drop=(), change=None, name="ck.safetensors", dtype=None, seed=0):
    """A tiny LTX-2 checkpoint; dtype: its weights rounded to bf16, then stored in dtype."""
    m = SyntheticLTX2(blocks=2, video_dim=32, audio_dim=16, seed=seed)
    sd = m.checkpoint()
    for k in drop:
        sd.pop(P + k)
    if dtype is not None:
        sd = {k: v.bfloat16().to(dtype) for k, v in sd.items()}
    if change:
        change(sd)
    path = tmp_path / name
    save_file(sd, str(path))
    return m, sd, str(path)


def _refused(tmp_path, argv, match, capsys, keep):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and match in err, err
    assert _left(tmp_path, keep) == []  # no output, no temp file


def test_bad_ranks_and_damp_are_refused_before_writing(tmp_path, capsys):
    from liteffn.calibration.lowrank import RankPolicy

    _, _, ck = _checkpoint(tmp_path)
    out = str(tmp_path / "o.safetensors")
    keep = {"ck.safetensors"}
    # the command line (its options are checked by argparse too) and the core below it
    _refused(tmp_path, ["compress", ck, "-o", out, "--energy", "0.9", "--max-rank", "-5", "--device", "cpu"],
             "-5", capsys, keep)
    _refused(tmp_path, ["compress", ck, "-o", out, "--rank", "100", "--device", "cpu"],
             "rank 100 is larger than layer transformer_blocks.0.audio_ff.net.0.proj", capsys, keep)
    _refused(tmp_path, ["compress", ck, "-o", out, "--damp", "0", "--device", "cpu"], "damp", capsys, keep)
    for policy, match in [(lambda: RankPolicy(rank=None, energy=0.9, max_rank=-5),
                           "max_rank must be a whole number >= 0"),
                          (lambda: RankPolicy(rank=-3), "rank must be >= 0"),
                          (lambda: 100, "rank 100 is larger than layer")]:
        with pytest.raises(ValueError, match=match):
            compress_checkpoint(ck, out, None, policy(), device="cpu", progress=False)
        assert _left(tmp_path, keep) == []
    for damp in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="damping must be a number > 0"):
            compress_checkpoint(ck, out, None, 4, device="cpu", progress=False, damp=damp)
        with pytest.raises(ValueError, match="damping"):
            compress_linear(torch.randn(8, 8), damp=damp, policy=2)
    assert _left(tmp_path, keep) == []


def test_lone_linear_is_refused(tmp_path, capsys):
    lone = "transformer_blocks.1.ff.net.2"
    _, _, ck = _checkpoint(tmp_path, drop=[lone + ".weight", lone + ".bias"])
    _refused(tmp_path, ["compress", ck, "-o", str(tmp_path / "o.safetensors"), "--rank", "4", "--device", "cpu"],
             "holds transformer_blocks.1.ff.net.0.proj but not transformer_blocks.1.ff.net.2", capsys,
             {"ck.safetensors"})


def test_huge_weight_is_refused_not_written_as_nan(tmp_path, capsys):
    def huge(sd):
        sd[P + "transformer_blocks.1.ff.net.2.weight"][3, 5] = 1e30
    _, _, ck = _checkpoint(tmp_path, change=huge, dtype=torch.bfloat16)
    _refused(tmp_path, ["compress", ck, "-o", str(tmp_path / "o.safetensors"), "--rank", "4", "--device", "cpu"],
             "weight of transformer_blocks.1.ff.net.2 holds a value of 1e+30", capsys, {"ck.safetensors"})
    with pytest.raises(LayerError, match=r"weight of big holds a value of 1e\+30, far outside"):
        compress_linear(torch.full((16, 16), 1e30).bfloat16(), policy=2, name="big")
    # below the limit, a result with NaN is still refused (the same checks as loading)
    from liteffn.calibration.compress import CompressedLayer, check_result

    good = compress_linear(torch.randn(16, 16), policy=2, name="l")
    good.tensors["A"][0, 0] = float("nan")
    with pytest.raises(LayerError, match="layer l, tensor A contains NaN or Inf.*nothing was written"):
        check_result(CompressedLayer(good.tensors, good.info), "l")


def test_int8_and_unsupported_weights_are_refused(tmp_path, capsys):
    def int8(sd):
        k = P + "transformer_blocks.0.ff.net.0.proj.weight"
        sd[k] = (sd[k] * 100).to(torch.int8)
    _, _, ck = _checkpoint(tmp_path, change=int8)
    _refused(tmp_path, ["compress", ck, "-o", str(tmp_path / "o.safetensors"), "--device", "cpu"],
             "layer transformer_blocks.0.ff.net.0.proj has I8 weights", capsys, {"ck.safetensors"})
    with pytest.raises(LayerError, match="unsupported weight dtype torch.int8"):
        compress_linear(torch.ones(8, 8, dtype=torch.int8), policy=2, name="x")


def _stats_file(tmp_path, model, name, fingerprint=True, family="ltx2"):
    from liteffn.calibration.demo import calibrate

    s = calibrate(model, 2, 64)
    names = s.names()
    if fingerprint:
        s.meta["fingerprint"] = cf.fingerprint((n, model.get_submodule(n).weight) for n in names)
    s.meta["model_family"] = family
    path = str(tmp_path / name)
    s.save(path)
    return path


def test_statistics_of_another_checkpoint_are_refused(tmp_path, capsys):
    m, _, ck = _checkpoint(tmp_path)
    foreign = _stats_file(tmp_path, SyntheticLTX2(blocks=2, video_dim=32, audio_dim=16, seed=7), "foreign.safetensors")
    keep = {"ck.safetensors", "foreign.safetensors"}
    _refused(tmp_path, ["compress", ck, "-o", str(tmp_path / "o.safetensors"), "--stats", foreign, "--rank", "4",
                        "--device", "cpu"], "hold different weights (e.g. transformer_blocks.0.audio_ff", capsys, keep)
    widef = _stats_file(tmp_path, SyntheticLTX2(blocks=2, video_dim=64, audio_dim=16), "wide.safetensors")
    keep.add("wide.safetensors")
    _refused(tmp_path, ["compress", ck, "-o", str(tmp_path / "o.safetensors"), "--stats", widef, "--rank", "4",
                        "--device", "cpu"], "made for another model", capsys, keep)
    # the right statistics pass, for the bf16 checkpoint and for its fp16 copy alike
    own = _stats_file(tmp_path, m, "own.safetensors")
    _, _, ck16 = _checkpoint(tmp_path, dtype=torch.float16, name="ck16.safetensors")
    _, _, ck_bf16 = _checkpoint(tmp_path, dtype=torch.bfloat16, name="ckbf16.safetensors")
    for c in (ck_bf16, ck16):
        infos = compress_checkpoint(c, str(tmp_path / "ok.safetensors"), own, 4, device="cpu", progress=False)
        assert len(infos) == 8 and all(i["calibrated"] for i in infos.values())


# ------------------------------------------------------------------ statistics: merge and append
def _two_models():
    return (SyntheticLTX2(blocks=2, video_dim=32, audio_dim=16, seed=0),
            SyntheticLTX2(blocks=2, video_dim=32, audio_dim=16, seed=1))


def test_merge_refuses_statistics_of_other_models(tmp_path, capsys):
    a, b = _two_models()
    fa = _stats_file(tmp_path, a, "a.safetensors")
    fb = _stats_file(tmp_path, b, "b.safetensors")
    fc = _stats_file(tmp_path, a, "c.safetensors", family="flux")
    wide = _stats_file(tmp_path, SyntheticLTX2(blocks=2, video_dim=64, audio_dim=16), "w.safetensors",
                       fingerprint=False)
    keep = {"a.safetensors", "b.safetensors", "c.safetensors", "w.safetensors"}
    before = {n: open(tmp_path / n, "rb").read() for n in keep}
    out = str(tmp_path / "sum.safetensors")
    for other, match in [(fb, "were made on different models: 8 layers were calibrated on other weights"),
                         (fc, "holds statistics of a 'flux' model"),
                         (wide, "at widths 32 and 64")]:
        _refused(tmp_path, ["merge-stats", fa, other, "-o", out], match, capsys, keep)
        with pytest.raises(cf.MismatchError):
            merge_files([fa, other], out)
        assert _left(tmp_path, keep) == []
    assert {n: open(tmp_path / n, "rb").read() for n in keep} == before  # inputs untouched
    with pytest.raises(cf.MismatchError, match="different models"):  # in memory too (Calibrate's stats input)
        ActivationStats.load(fa).merge_(ActivationStats.load(fb))


def test_streamed_merge_equals_in_memory_merge_bit_for_bit(tmp_path):
    a, _ = _two_models()
    f1 = _stats_file(tmp_path, a, "1.safetensors")
    s2 = ActivationStats.load(f1)
    s2.layers.pop(s2.names()[0])  # a layer only in the first file
    for s in s2.layers.values():
        s.xtx *= 1.37
        s.rows += 5
    f2 = str(tmp_path / "2.safetensors")
    s2.save(f2)
    meta = merge_files([f1, f2, f1], str(tmp_path / "sum.safetensors"))
    ref = ActivationStats.load(f1).merge_(ActivationStats.load(f2)).merge_(ActivationStats.load(f1))
    got = ActivationStats.load(str(tmp_path / "sum.safetensors"))
    assert got.names() == ref.names() and len(meta["layers"]) == len(ref.names())
    for n in ref.names():
        assert torch.equal(got[n].xtx, ref[n].xtx) and torch.equal(got[n].absmax, ref[n].absmax)
        assert got[n].rows == ref[n].rows
    assert got.meta["runs"] == 3 and got.meta["fingerprint"] == ref.meta["fingerprint"]
    ref.save(str(tmp_path / "ref.safetensors"))  # the same bytes as saving the in-memory sum
    assert open(tmp_path / "ref.safetensors", "rb").read() == open(tmp_path / "sum.safetensors", "rb").read()


def test_append_streams_into_the_file_and_refuses_other_models(tmp_path):
    a, b = _two_models()
    f = _stats_file(tmp_path, a, "run.safetensors")
    first = ActivationStats.load(f)
    new = ActivationStats.load(f)
    only_file = new.names()[-1]
    new.layers.pop(only_file)  # this run saw fewer layers: the file keeps the others
    new.meta["runs"] = 1
    out = append_to_file(new, f)
    assert out is new and new.meta["runs"] == 2 and only_file not in new
    total = ActivationStats.load(f)
    assert set(total.names()) == set(first.names())
    assert torch.equal(total[only_file].xtx, first[only_file].xtx)
    for n in new.names():
        assert torch.equal(total[n].xtx, first[n].xtx + first[n].xtx) and torch.equal(new[n].xtx, total[n].xtx)
    before = open(f, "rb").read()
    fb = _stats_file(tmp_path, b, "b.safetensors")
    with pytest.raises(cf.MismatchError, match="different models"):
        append_to_file(ActivationStats.load(fb), f)
    assert open(f, "rb").read() == before and _left(tmp_path, {"run.safetensors", "b.safetensors"}) == []


def test_statistics_files_with_wrong_tensors_are_refused(tmp_path):
    a, _ = _two_models()
    f = _stats_file(tmp_path, a, "s.safetensors")
    n = ActivationStats.load_names(f)[0]
    _rewrite(f, lambda t: t.__setitem__(f"{n}.xtx", torch.zeros(3, 3)))
    with pytest.raises(FileError, match=rf"layer {n}, tensor xtx is F32 \[3, 3\], expected F32 \[32, 32\]"):
        ActivationStats.load(f)
    with pytest.raises(FileError, match="xtx is F32"):
        merge_files([f, f], str(tmp_path / "o.safetensors"))
    assert not (tmp_path / "o.safetensors").exists() and _left(tmp_path, {"s.safetensors"}) == []
    good = _stats_file(tmp_path, a, "good.safetensors")
    raw = open(good, "rb").read()
    for case, data in _corrupt_cases(raw).items():
        (tmp_path / "bad.safetensors").write_bytes(data)
        with pytest.raises(FileError, match="bad.safetensors"):
            merge_files([good, str(tmp_path / "bad.safetensors")], str(tmp_path / "o.safetensors"))
        assert _left(tmp_path, {"s.safetensors", "good.safetensors", "bad.safetensors"}) == [], case


_MERGE_RSS = r"""
import sys
from liteffn.calibration.stats import merge_files

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
merge_files([sys.argv[1]] * 2, sys.argv[-1] + ".warm")  # first use of the code paths, small
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak RSS (VmHWM) := RSS now
before = status("VmRSS")
merge_files(sys.argv[2:-1], sys.argv[-1])
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS is read from Linux's /proc")
def test_merge_memory_is_bounded_by_a_few_layers_not_the_files(tmp_path):
    # 64 MiB layers: above glibc's largest mmap threshold (32 MiB), so a freed layer goes back to the
    # system at once and the peak shows what is held, not what the allocator keeps for later.
    width = 4096
    layer = width * width * 4
    small = str(tmp_path / "small.safetensors")
    ActivationStats({"transformer_blocks.0.ff.net.2": LayerStats(torch.ones(8, 8), torch.ones(8), 1)}).save(small)
    paths = []
    for i in range(2):  # layers 0, 1 and 1, 2: one in both, one only in each
        s = ActivationStats({f"transformer_blocks.{j}.ff.net.2": LayerStats(torch.full((width, width), float(i + j)),
                                                                              torch.ones(width), 10)
                             for j in (i, i + 1)}, {"model_family": "ltx2"})
        paths.append(str(tmp_path / f"in{i}.safetensors"))
        s.save(paths[-1])
        del s
    total = sum(os.path.getsize(p) for p in paths)
    out = str(tmp_path / "sum.safetensors")
    res = subprocess.run([sys.executable, "-c", _MERGE_RSS, small, *paths, out], capture_output=True, text=True,
                         env=os.environ, timeout=120)
    assert res.returncode == 0, res.stderr
    growth = int(res.stdout.split()[-1])
    # Peak RSS of the merging process (VmHWM: ru_maxrss would count the parent's RSS, which a child
    # inherits at fork). Held: one layer's sum and a 4 MiB read buffer, measured 75-81 MiB; loading the
    # inputs and saving their sum (merge-stats before) took 335 MiB here.
    assert growth < 1.75 * layer, f"peak RSS grew {growth / 2**20:.0f} MiB merging {total / 2**20:.0f} MiB"
    got = ActivationStats.load(out)
    assert got.names() == [f"transformer_blocks.{j}.ff.net.2" for j in range(3)]
    assert [got[n].rows for n in got.names()] == [10, 20, 10]
    assert [float(got[n].xtx[5, 7]) for n in got.names()] == [0, 1 + 2, 3]
