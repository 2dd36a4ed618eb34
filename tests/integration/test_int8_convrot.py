"""LTX-2.5 as its official ComfyUI weights ship: an int8-ConvRot transformer (ComfyUI's `int8_tensorwise`
layout with ConvRot; per layer {"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 256} in a
`comfy_quant` tensor beside the int8 `weight` and its per-row `weight_scale`). A small LTX-2.5 model saved in
that layout (quantized by comfy-kitchen, written by ComfyUI's own quantized Linear: ltx2_tiny.save
int8_convrot) is loaded by ComfyUI's diffusion-model loader; the pack calibrates and compresses it (nodes),
and `liteffn compress` reads the saved file. Both read the weights through ComfyUI's / comfy-kitchen's
dequantize. Skipped, with the reason, on a ComfyUI without the layout or without LTX-2.5 (0.22)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_ltx2_versions import calibrate, ffn_errors, ffn_io, sample
from test_nodes import compress, folder, rel

import ltx2_tiny

CONFIG = ltx2_tiny.CONFIG_25
LAYERS = "ffn+attention"


@pytest.fixture(scope="module")
def int8(pack, ltx2):
    """{model: the int8-ConvRot LTX-2.5 MODEL, bf16: the same weights unquantized, path: its file}."""
    why = ltx2_tiny.int8_convrot_unsupported() or ltx2_tiny.unsupported(CONFIG)
    if why:
        pytest.skip(why)
    return dict(model=ltx2(config=CONFIG, int8_convrot=True), bf16=ltx2(config=CONFIG), load=ltx2)


@pytest.fixture(scope="module")
def names(pack):
    return pack.calibration.ltx2.linears(pack.calibration.ltx2.units(2, layers=LAYERS))


def _layout_calls(monkeypatch):
    """Counts of comfy-kitchen's TensorWiseINT8Layout.dequantize calls (the layout's own code, run as is)."""
    from comfy_kitchen.tensor import TensorWiseINT8Layout

    calls, own = [0], TensorWiseINT8Layout.dequantize.__func__

    def counted(cls, qdata, params):
        calls[0] += 1
        return own(cls, qdata, params)
    monkeypatch.setattr(TensorWiseINT8Layout, "dequantize", classmethod(counted))
    return calls


def test_comfyui_loads_the_layout_and_the_pack_reads_it_through_comfy_kitchen(pack, int8, names, monkeypatch):
    M = pack.nodes.model
    dm, bf16 = int8["model"].model.diffusion_model, int8["bf16"].model.diffusion_model
    assert len(names) == 56  # 2 blocks x (2 FFNs x 2 + 6 attentions x 4)
    calls = _layout_calls(monkeypatch)
    for n in names:
        mod = dm.get_submodule(n)
        w = mod.weight
        assert type(w).__name__ == "QuantizedTensor" and w._layout_cls == "TensorWiseINT8Layout", n
        assert mod.quant_format == "int8_tensorwise" and w._params.convrot and w._qdata.dtype == torch.int8, n
        before = calls[0]
        got, scale, _ = M.source(int8["model"], n)
        assert calls[0] == before + 1 and scale is None, n  # comfy-kitchen's dequantize, once
        assert torch.equal(got, w.dequantize()), n
        # int8 per row after the rotation: the bf16 weights to within a percent or so
        d = rel(got.float(), bf16.get_submodule(n).weight.detach().float())
        assert 0 < d < 0.03, (n, d)
    # fingerprints are of the stored int8 codes (the same whichever kernel dequantizes), not the bf16 weights'
    fp, fp16 = M.model_fingerprint(int8["model"], names), M.model_fingerprint(int8["bf16"], names)
    assert calls[0] == len(names) * 2  # taken without dequantizing
    assert sorted(fp) == sorted(names) and all(fp[n][:2] == fp16[n][:2] and fp[n][2] != fp16[n][2] for n in names)
    digest = pack.calibration.fingerprint.weight_digest
    assert all(fp[n][2] == digest(dm.get_submodule(n).weight._qdata, 3) for n in names)  # version 3: the codes
    assert all(fp[n][2].startswith("3:") for n in names)


@pytest.fixture(scope="module")
def calibrated(node, int8, names):
    """Calibrate on the int8 model (saved as int8/stats): every linear, the fused down projections included."""
    stats, summary = calibrate(node, int8["model"], seeds=1, layers=LAYERS, filename="int8/stats")
    io, base = ffn_io(int8["model"])
    return dict(stats=stats, summary=summary, io=io, base=base)


def test_calibrate_sees_every_linear_of_the_int8_model(pack, int8, names, calibrated):
    """ComfyUI runs an int8 FFN's down linear as one kernel with the GELU folded in (comfy.ops.linear_input_act),
    never calling the module: its statistics come from the up linear's output, the same rows as the up linear's."""
    stats = calibrated["stats"]
    assert sorted(stats.names()) == sorted(names), calibrated["summary"]
    assert all(stats[n].rows > 0 for n in names), calibrated["summary"]
    for n in [n for n in names if n.endswith(".net.2")]:
        up = stats[n.replace(".net.2", ".net.0.proj")]
        assert stats[n].rows == up.rows and stats[n].width == 4 * up.width, n
        assert torch.isfinite(stats[n].xtx).all() and stats[n].absmax.max() > 0, n


def test_compress_of_the_int8_model_is_its_dequantized_weights_compressed(pack, node, int8, names, calibrated):
    """Full rank with a bf16 residual rebuilds comfy-kitchen's dequantized weights; r=16 FP8 calibrated runs close
    to the int8 model; the saved file loads back onto it (its fingerprints: the int8 codes)."""
    M, model = pack.nodes.model, int8["model"]
    dm = model.model.diffusion_model
    exact, report = compress(node, model, None, rank=8192, energy=1.0, residual="bf16", layers=LAYERS).result
    mods = M.compressed_modules(exact)
    for n in names:
        unit = pack.calibration.ltx2.unit_of(n)
        lin = M.compressed_linear(mods[unit], unit, n)
        d = rel(lin.dense_weight().detach().float(), dm.get_submodule(n).weight.dequantize().float())
        assert d < 1e-2, (n, d)
    # the same function as the dequantized weights computed densely; ComfyUI's int8 model itself also quantizes
    # each linear's input to int8 (W8A8), which the compressed linears do not
    dense = int8["load"](config=CONFIG)  # a fresh load, its weights replaced by comfy-kitchen's dequantized ones
    for n in names:
        dense.model.diffusion_model.get_submodule(n).weight = torch.nn.Parameter(
            dm.get_submodule(n).weight.dequantize().float(), requires_grad=False)
    out = sample(exact)
    err_exact, err_w8a8 = rel(out, sample(dense)), rel(out, calibrated["base"])
    print(f"int8-ConvRot LTX-2.5, {LAYERS} full rank bf16: {err_exact:.2e} from the dequantized weights, "
          f"{err_w8a8:.2e} from the int8 model")
    assert err_exact < (1e-3 if model.load_device.type == "cpu" else 2e-2) and err_w8a8 < 0.05

    patched, report = compress(node, model, calibrated["stats"], rank=16, layers=LAYERS,
                               save_name="int8/node_r16").result
    assert "56 linears" in report and "56 calibrated" in report, report
    err = rel(sample(patched), calibrated["base"])
    errs = ffn_errors(pack, patched, calibrated["io"])
    print(f"int8-ConvRot LTX-2.5, {LAYERS} r=16 fp8 calibrated: final latent {err:.4f}, FFN outputs at most "
          f"{max(errs.values()):.4f} from the int8 model")
    assert 0 < err < 0.05 and all(0 < e < 0.08 for e in errs.values()), errs
    assert all(type(dm.get_submodule(n).weight).__name__ == "QuantizedTensor" for n in names)  # model as loaded

    loaded, report = node("LowRankFFNLoader").execute(model=model, compressed_file="int8/node_r16.safetensors").result
    assert "loaded node_r16.safetensors" in report, report
    with pytest.raises(ValueError, match=r"56 layers hold different weights"):  # the bf16 checkpoint is another model
        node("LowRankFFNLoader").execute(model=int8["bf16"], compressed_file="int8/node_r16.safetensors")


def _layers(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_offline_compress_reads_the_file_through_comfyui(pack, node, int8, names, calibrated, tmp_path, monkeypatch):
    """`liteffn compress` on the saved int8-ConvRot file, with Calibrate's statistics: each layer loaded by ComfyUI's
    quantized Linear and dequantized by comfy-kitchen; on the CPU the same file as Compress Model's."""
    import importlib

    cli = importlib.import_module(pack.__name__ + ".calibration.cli")
    ckpt = ltx2_tiny.save(str(tmp_path / "ltx25_int8.safetensors"), config=CONFIG, int8_convrot=True)
    stats = os.path.join(folder(), "int8", "stats.safetensors")
    out = os.path.join(folder(), "int8", "offline_r16.safetensors")
    calls = _layout_calls(monkeypatch)
    assert cli.main(["compress", ckpt, "-o", out, "--stats", stats, "--rank", "16", "--layers", LAYERS,
                     "--device", "cpu"]) == 0
    assert calls[0] == len(names)  # each layer dequantized once, by comfy-kitchen
    model = int8["model"]
    loaded, report = node("LowRankFFNLoader").execute(model=model, compressed_file="int8/offline_r16.safetensors").result
    assert "loaded offline_r16.safetensors" in report and "56 linears" in report, report
    errs = ffn_errors(pack, loaded, calibrated["io"])
    print(f"int8-ConvRot LTX-2.5 offline r=16: FFN outputs at most {max(errs.values()):.4f} from the int8 model")
    assert all(0 < e < 0.08 for e in errs.values()), errs
    node_file = os.path.join(folder(), "int8", "node_r16.safetensors")
    if not os.path.exists(node_file):
        compress(node, model, calibrated["stats"], rank=16, layers=LAYERS, save_name="int8/node_r16")
    meta = pack.calibration.compressed_file.read_meta
    assert meta(out)["fingerprint"] == meta(node_file)["fingerprint"] == pack.nodes.model.model_fingerprint(model, names)
    if model.load_device.type == "cpu":  # the same weights, statistics and arithmetic
        a, b = _layers(out), _layers(node_file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_offline_compress_finds_comfyui_by_comfyui_path(int8, tmp_path):
    """A fresh `liteffn` process (not inside ComfyUI) imports ComfyUI from COMFYUI_PATH to read the layout; a
    made-up format in the file is refused naming it, with the layouts this ComfyUI reads."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt = ltx2_tiny.save(str(tmp_path / "ltx25_int8.safetensors"), config=CONFIG, int8_convrot=True)
    env = dict(os.environ)  # COMFYUI_PATH: the ComfyUI under test

    def run(path, out):
        return subprocess.run([sys.executable, "-m", "liteffn.calibration.cli", "compress", path, "-o", out,
                               "--rank", "4", "--streams", "audio", "--device", "cpu"], capture_output=True, text=True,
                              timeout=600, env=env, cwd=str(tmp_path))
    r = run(ckpt, str(tmp_path / "o.safetensors"))
    assert r.returncode == 0 and "4 layers" in r.stdout, r.stderr[-3000:]
    assert "Total VRAM" not in r.stderr  # ComfyUI's start-up log is not the command's output

    with safe_open(ckpt, "pt") as f:
        sd, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    key = "model.diffusion_model.transformer_blocks.1.audio_ff.net.2.comfy_quant"
    sd[key] = torch.tensor(list(json.dumps({"format": "made_up_int3", "convrot": True}).encode()), dtype=torch.uint8)
    save_file(sd, str(tmp_path / "made_up.safetensors"), metadata=meta)
    r = run(str(tmp_path / "made_up.safetensors"), str(tmp_path / "o2.safetensors"))
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("liteffn: error:")]
    assert r.returncode == 2 and len(line) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "transformer_blocks.1.audio_ff.net.2" in line[0] and "'made_up_int3'" in line[0], line
    assert "does not know" in line[0] and "int8_tensorwise" in line[0], line  # the layouts it reads
    assert not (tmp_path / "o2.safetensors").exists()


def test_weights_in_layouts_the_pack_cannot_read_are_named(pack, node, int8):
    """A quantized layout whose dequantize fails here, and bare int8 codes without a layout: Compress Model says
    which layer and which layout, and leaves no file."""
    from comfy.quant_ops import QuantizedTensor
    from comfy_kitchen.tensor import TensorWiseINT8Layout, register_layout_class

    class MadeUpLayout(TensorWiseINT8Layout):
        @classmethod
        def dequantize(cls, qdata, params):
            raise NotImplementedError("no kernel for this layout on this device")
    register_layout_class("MadeUpLayout", MadeUpLayout)

    model = int8["load"](config=CONFIG, int8_convrot=True)  # a fresh load: its modules are changed here
    dm = model.model.diffusion_model
    lin = dm.transformer_blocks[0].ff.net[2]
    w = lin.weight
    lin.weight = torch.nn.Parameter(QuantizedTensor(w._qdata, "MadeUpLayout", w._params), requires_grad=False)
    lin.quant_format = "made_up_int3"
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.ff\.net\.2 is stored in the made_up_int3 / "
                                         r"MadeUpLayout layout, which ComfyUI could not dequantize here \("
                                         r"NotImplementedError: no kernel"):
        compress(node, model, None, rank=4, save_name="int8/never")
    assert not os.path.exists(os.path.join(folder(), "int8", "never.safetensors"))

    att = dm.transformer_blocks[1].attn1.to_q
    att.weight = torch.nn.Parameter(att.weight._qdata.clone(), requires_grad=False)
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn1\.to_q holds torch\.int8 weights without a "
                                         r"quantized layout, which LiteFFN cannot read"):
        compress(node, model, None, rank=4, layers="attention")
