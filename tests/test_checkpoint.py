"""The offline command on a tiny checkpoint in ComfyUI's LTX-2 key layout."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from liteffn.calibration import compressed_file as cf
from liteffn.calibration.checkpoint import compress_checkpoint
from liteffn.calibration.cli import main
from liteffn.calibration.demo import calibrate
from liteffn.calibration.synthetic import SyntheticLTX2

P = "model.diffusion_model."


def _checkpoint(tmp_path, fp8=False):
    m = SyntheticLTX2(blocks=2, video_dim=32, audio_dim=16)
    sd = m.checkpoint()
    sd[P + "transformer_blocks.0.attn1.to_q.weight"] = torch.randn(32, 32)  # not an FFN: left alone
    if fp8:
        for k in [k for k in sd if k.endswith("net.2.weight")]:
            scale = sd[k].abs().amax() / 448
            sd[k] = (sd[k] / scale).to(torch.float8_e4m3fn)
            sd[k[: -len("weight")] + "weight_scale"] = scale.reshape(())
    path = tmp_path / "ltx2.safetensors"
    save_file(sd, str(path))
    stats = calibrate(m, 2, 64)
    stats.save(str(tmp_path / "stats.safetensors"))
    return m, sd, path


@pytest.mark.parametrize("fp8", [False, True])
def test_compress_checkpoint_with_stats(tmp_path, fp8):
    m, sd, path = _checkpoint(tmp_path, fp8)
    out = tmp_path / "out.safetensors"
    infos = compress_checkpoint(str(path), str(out), str(tmp_path / "stats.safetensors"), 8, "fp8",
                                device="cpu", progress=False)
    assert len(infos) == 8 and all(i["calibrated"] for i in infos.values())
    assert all(i["rel_err"] < 0.05 for i in infos.values()), infos
    fp = cf.fingerprint((k[len(P):-len(".weight")], v) for k, v in sd.items()
                        if k.endswith(".weight") and ".net." in k)
    layers, meta = cf.load(str(out), fp, "ltx2")
    assert set(layers) == set(infos) and meta["residual_format"] == "fp8"


def test_video_only_selection_and_cli(tmp_path, capsys):
    _, _, path = _checkpoint(tmp_path)
    out = tmp_path / "v.safetensors"
    rc = main(["compress", str(path), "-o", str(out), "--layers", "video", "--rank", "4", "--format", "nvfp4",
               "--device", "cpu"])
    assert rc == 0 and "4 layers" in capsys.readouterr().out
    layers, _ = cf.load(str(out))
    assert all(".ff." in n for n in layers)


def test_attention_projections_by_layers(tmp_path, capsys):
    # --layers ffn+attention takes the projection the FFN-only runs leave alone; --streams narrows it
    _, sd, path = _checkpoint(tmp_path)
    out = tmp_path / "a.safetensors"
    rc = main(["compress", str(path), "-o", str(out), "--layers", "ffn+attention", "--rank", "4", "--device", "cpu"])
    assert rc == 0 and "9 layers" in capsys.readouterr().out
    layers, _ = cf.load(str(out))
    q = layers["transformer_blocks.0.attn1.to_q"]
    w = sd[P + "transformer_blocks.0.attn1.to_q.weight"]
    assert q.info["in_features"] == w.shape[1] and q.info["rel_err"] < 0.05
    out2 = tmp_path / "b.safetensors"
    assert main(["compress", str(path), "-o", str(out2), "--layers", "attention", "--streams", "audio",
                 "--rank", "4", "--device", "cpu"]) == 2  # no audio attention in this checkpoint
    assert "none of the selected layers" in capsys.readouterr().err and not out2.exists()


def test_not_ltx2_and_bad_rank_fail_cleanly(tmp_path, capsys):
    save_file({"model.diffusion_model.double_blocks.0.img_mlp.0.weight": torch.zeros(4, 4)},
              str(tmp_path / "flux.safetensors"))
    rc = main(["compress", str(tmp_path / "flux.safetensors"), "-o", str(tmp_path / "o.safetensors"), "--device", "cpu"])
    assert rc == 2 and "not an LTX-2 checkpoint" in capsys.readouterr().err
    _, _, path = _checkpoint(tmp_path)
    rc = main(["compress", str(path), "-o", str(tmp_path / "o.safetensors"), "--rank", "999", "--device", "cpu"])
    assert rc == 2 and "rank 999 is larger than layer" in capsys.readouterr().err
    assert not list(tmp_path.glob("o.safetensors*")) and not list(tmp_path.glob(".o.safetensors*"))


def test_merge_stats_cli(tmp_path):
    _, _, _ = _checkpoint(tmp_path)
    s = str(tmp_path / "stats.safetensors")
    assert main(["merge-stats", s, s, "-o", str(tmp_path / "sum.safetensors")]) == 0
    from liteffn.calibration.stats import ActivationStats

    a, b = ActivationStats.load(s), ActivationStats.load(str(tmp_path / "sum.safetensors"))
    n = a.names()[0]
    assert b[n].rows == 2 * a[n].rows and torch.allclose(b[n].xtx, 2 * a[n].xtx)


def test_demo_runs_and_prints_table():
    r = subprocess.run([sys.executable, "-m", "liteffn.calibration.cli", "demo", "--blocks", "1", "--video-dim", "64",
                        "--audio-dim", "32", "--ranks", "0", "8", "--formats", "fp8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "calibrated" in r.stdout and "fp8" in r.stdout and "vs bf16" in r.stdout
    # the error per kind of linear: FFN linears and attention projections, each at every rank
    kinds = r.stdout[r.stdout.index("Error per kind of linear"):].splitlines()[2:]
    assert [ln.split()[:3] for ln in kinds] == [[k, "fp8", rank] for k in ("ffn", "attention") for rank in ("0", "8")]


# ComfyUI's quantized layouts: each layer's config ({"format": ...}) in the `_quantization_metadata` header or
# in a `<layer>.comfy_quant` tensor (as ComfyUI saves layers). Scaled FP8 is read here; any other layout only
# through ComfyUI's own loader (tests/integration/test_int8_convrot.py reads LTX-2.5's int8-ConvRot through it).
DOWN = P + "transformer_blocks.0.ff.net.2"


def _quantized_checkpoint(tmp_path, conf, where="header"):
    """The tiny checkpoint with one FFN linear stored as int8 codes + per-row weight_scale, marked conf."""
    import json

    _, sd, _ = _checkpoint(tmp_path)
    w = sd[DOWN + ".weight"]
    sd[DOWN + ".weight"] = torch.randint(-127, 128, w.shape, dtype=torch.int8)
    sd[DOWN + ".weight_scale"] = torch.full((w.shape[0], 1), 0.01)
    meta = {}
    if where == "header":
        meta["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": {DOWN: conf}})
    else:
        sd[DOWN + ".comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    path = tmp_path / f"q_{where}.safetensors"
    save_file(sd, str(path), metadata=meta)
    return path


def _compress_error(tmp_path, capsys, path) -> str:
    out = tmp_path / "o.safetensors"
    rc = main(["compress", str(path), "-o", str(out), "--rank", "4", "--device", "cpu",
               "--stats", str(tmp_path / "stats.safetensors")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert not list(tmp_path.glob("o.safetensors*")) and not list(tmp_path.glob(".o.safetensors*"))
    return lines[0]


def _no_comfyui(monkeypatch):
    from liteffn.calibration import comfy_layouts

    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    try:
        comfy_layouts.comfyui()
    except LookupError:
        return
    pytest.skip("ComfyUI's layouts are importable in this Python: the integration tier reads them "
                "(tests/integration/test_int8_convrot.py)")


@pytest.mark.parametrize("where", ["header", "tensor"])
def test_unknown_quantized_layout_is_named(tmp_path, capsys, monkeypatch, where):
    _no_comfyui(monkeypatch)
    path = _quantized_checkpoint(tmp_path, {"format": "made_up_fp3", "group_size": 7}, where)
    line = _compress_error(tmp_path, capsys, path)
    assert "layer transformer_blocks.0.ff.net.2" in line and "'made_up_fp3'" in line, line


def test_int8_convrot_without_comfyui_names_the_layout_and_the_fix(tmp_path, capsys, monkeypatch):
    _no_comfyui(monkeypatch)
    path = _quantized_checkpoint(tmp_path, {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64},
                                 "tensor")
    line = _compress_error(tmp_path, capsys, path)
    assert "'int8_tensorwise' (int8-ConvRot" in line and "transformer_blocks.0.ff.net.2" in line, line
    assert "comfy-kitchen" in line and "COMFYUI_PATH" in line and "custom_nodes" in line, line
    # a COMFYUI_PATH that is no ComfyUI says so (where comfy-kitchen is installed; else that is the reason)
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    line = _compress_error(tmp_path, capsys, path)
    assert ("not a ComfyUI folder" in line or "comfy-kitchen is not installed" in line) and "'int8_tensorwise'" in line


def test_quantization_config_without_format_or_damaged_header(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    line = _compress_error(tmp_path, capsys, _quantized_checkpoint(tmp_path, {"convrot": True}, "tensor"))
    assert "without a format" in line and "transformer_blocks.0.ff.net.2" in line, line
    _, sd, _ = _checkpoint(tmp_path)
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata={"_quantization_metadata": "{not json"})
    line = _compress_error(tmp_path, capsys, tmp_path / "bad.safetensors")
    assert "_quantization_metadata" in line and "damaged" in line, line


def test_fp8_marked_in_comfy_quant_tensors_is_read_as_before(tmp_path):
    """Scaled FP8 is read by LiteFFN itself, however ComfyUI marks it (header or per-layer tensor)."""
    import json

    m, sd, _ = _checkpoint(tmp_path, fp8=True)
    for k in [k for k in sd if k.endswith("net.2.weight")]:
        sd[k[: -len("weight")] + "comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                               dtype=torch.uint8)
    save_file(sd, str(tmp_path / "fp8q.safetensors"))
    infos = compress_checkpoint(str(tmp_path / "fp8q.safetensors"), str(tmp_path / "o.safetensors"),
                                str(tmp_path / "stats.safetensors"), 8, "fp8", device="cpu", progress=False)
    assert len(infos) == 8 and all(i["rel_err"] < 0.05 for i in infos.values()), infos
