"""The pack's main path (Calibrate -> Compress Model -> saved file -> Low-Rank FFN Loader) on small
LTX-2.3 and LTX-2.5 models built by ComfyUI's own LTXAVModel from the flags of their checkpoints'
`config` (ltx2_tiny.VARIANTS) and loaded by ComfyUI's diffusion-model loader, as test_nodes does for
LTX-2. LTX-2.3: gated attention (a per-head `to_gate_logits` beside the projections), cross-attention
AdaLN, the text projection in the text encoder. LTX-2.5: LTX-2.3 with bias-less video FFNs
(`ff_bias` = False; the audio FFNs keep theirs) and the keyframes' position embedding; its
`no-ffn-bias` form has no FFN bias in either stream. A variant this ComfyUI cannot build is skipped
with the reason (LTX-2.5 needs a ComfyUI with upstream 57ce8e1, 0.33 here)."""
from __future__ import annotations

import os

import pytest
import torch
from test_nodes import STEPS, SEED, compress, folder, rel

import ltx2_tiny


@pytest.fixture(scope="module", params=sorted(ltx2_tiny.VARIANTS))
def variant(request, pack, ltx2):
    """(name, config, loader of the variant's checkpoint: ltx2 with its config)."""
    name = request.param
    config = ltx2_tiny.VARIANTS[name]
    why = ltx2_tiny.unsupported(config)
    if why:
        pytest.skip(why)
    return name, config, lambda **kw: ltx2(config=config, **kw)


def tol(model):
    return 1e-3 if model.load_device.type == "cpu" else 2e-2  # bf16 compute on a GPU (test_nodes says why)


def conditioning():
    # the dual_linear text encoder's output: the model's gated text connectors run on it
    return ltx2_tiny.conditioning(unprocessed=True)


def sample(model):
    import nodes

    pos, neg = conditioning()
    out = nodes.common_ksampler(model, SEED, STEPS, 3.0, "euler", "simple", pos, neg, ltx2_tiny.latent())
    return torch.cat([t.flatten() for t in out[0]["samples"].unbind()])


def calibrate(node, model, seeds=2, layers="ffn", filename=""):
    pos, neg = conditioning()
    return node("LiteFFNCalibrate").execute(
        model=model, positive=pos, negative=neg, latent_image=ltx2_tiny.latent(), seed=1, steps=STEPS, cfg=3.0,
        sampler_name="euler", scheduler="simple", seeds=seeds, streams="all", blocks="all", memory_budget_gb=1.0,
        storage="cpu", filename=filename, append=False, layers=layers).result


FFNS = [f"transformer_blocks.{i}.{s}" for i in range(2) for s in ("ff", "audio_ff")]


def ffn_io(model):
    """Sample the dense model -> ({FFN unit: (input, output) in its first model call}, final latent)."""
    dm = model.model.diffusion_model
    seen, handles = {}, []
    for u in FFNS:
        def hook(mod, args, out, u=u):
            if u not in seen:
                seen[u] = (args[0].detach().clone(), out.detach().float().clone())
        handles.append(dm.get_submodule(u).register_forward_hook(hook))
    try:
        out = sample(model)
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen) == sorted(FFNS)
    return seen, out


def ffn_errors(pack, patched, io) -> dict:
    """{FFN unit: relative difference of the compressed FFN's output from the dense one's}, on the dense inputs."""
    mods = pack.nodes.model.compressed_modules(patched)
    with torch.no_grad():
        return {u: rel(mods[u](x).float().to(y.device), y) for u, (x, y) in io.items()}


def dense_bias(model, linear):
    return model.model.diffusion_model.get_submodule(linear).bias


@pytest.fixture(scope="module")
def dense(variant, node):
    """The variant's MODEL calibrated (2 seeds, saved as versions/<name>_stats) and sampled once:
    {model, stats, summary, io (ffn_io), base (final latent)}."""
    name, config, load = variant
    model = load()
    stats, summary = calibrate(node, model, filename=f"versions/{name}_stats")
    io, base = ffn_io(model)
    return dict(model=model, stats=stats, summary=summary, io=io, base=base)


def test_variant_is_the_layout_comfyui_builds_from_the_config(pack, variant, dense):
    name, config, load = variant
    dm = dense["model"].model.diffusion_model
    assert type(dm).__name__ == "LTXAVModel" and dm.cross_attention_adaln and dm.caption_proj_before_connector
    b = dm.transformer_blocks[0]
    for a in ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn"):
        assert getattr(b, a).to_gate_logits is not None, a  # gated attention, every kind
    assert dm.video_embeddings_connector.transformer_1d_blocks[0].attn1.to_gate_logits is not None
    assert dm.prompt_adaln_single is not None and b.prompt_scale_shift_table is not None
    ff_bias, audio_ff_bias = config.get("ff_bias", True), config.get("audio_ff_bias", True)
    for lin in ("net.0.proj", "net.2"):
        assert (b.get_submodule(f"ff.{lin}").bias is not None) == ff_bias, lin
        assert (b.get_submodule(f"audio_ff.{lin}").bias is not None) == audio_ff_bias, lin
    assert (getattr(dm, "keyframes_abs_pos_embedding", None) is not None) == name.startswith("ltx2.5")
    assert torch.isfinite(dense["base"]).all()


def test_calibrate_compress_save_load_runs_close_to_the_dense_model(pack, node, variant, dense):
    """The main path: Calibrate -> Compress Model (saved) -> Low-Rank FFN Loader. The file stores a
    bias for exactly the linears that have one (none for LTX-2.5's video FFNs), and loads back bit for bit."""
    from safetensors import safe_open

    name, config, load = variant
    M = pack.nodes.model
    model, stats = dense["model"], dense["stats"]
    assert len(stats.names()) == 8 and all(stats[n].rows > 0 for n in stats.names()), dense["summary"]
    assert stats["transformer_blocks.0.ff.net.2"].width == 256 and stats["transformer_blocks.1.audio_ff.net.0.proj"].width == 32
    patched, report = compress(node, model, stats, rank=16, save_name=f"versions/{name}_r16").result
    assert "8 linears" in report and "8 calibrated" in report, report
    out = sample(patched)
    err = rel(out, dense["base"])
    errs = ffn_errors(pack, patched, dense["io"])
    print(f"{name} r=16 fp8 calibrated: final latent {err:.4f}, FFN outputs "
          + ", ".join(f"{u.split('.', 1)[1]} {e:.4f}" for u, e in errs.items()))
    assert 0 < err < 0.05  # FP8 residual + FP8 activations: changed, but close
    assert all(0 < e < 0.08 for e in errs.values()), errs  # measured 0.027-0.042 (CPU)
    assert not model.object_patches  # the input MODEL carries no patch

    path = os.path.join(folder(), "versions", f"{name}_r16.safetensors")
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    meta = pack.calibration.compressed_file.read_meta(path)
    assert len(meta["layers"]) == 8
    for lin in meta["layers"]:
        assert (f"{lin}.bias" in keys) == (dense_bias(model, lin) is not None), lin
    assert any(f"{lin}.bias" not in keys for lin in meta["layers"]) == name.startswith("ltx2.5")

    loaded, report = node("LowRankFFNLoader").execute(model=model, compressed_file=f"versions/{name}_r16.safetensors").result
    assert f"loaded {name}_r16.safetensors" in report, report
    a, b = M.compressed_modules(patched), M.compressed_modules(loaded)
    assert sorted(a) == sorted(b) == sorted(FFNS)
    for k, m in a.items():
        other = dict(b[k].named_parameters())
        assert other.keys() == dict(m.named_parameters()).keys(), k  # a bias in both or in neither
        for n, p in m.named_parameters():
            assert torch.equal(p.view(torch.uint8), other[n].view(torch.uint8)), (k, n)
    assert torch.equal(sample(loaded), out)


def test_full_rank_bf16_computes_the_dense_ffns_biases_included(pack, node, variant, dense):
    """A compressed FFN carries a bias exactly where the model's FFN has one: a dropped bias (or one
    made up for a bias-less LTX-2.5 FFN) would show as a difference here."""
    name, config, load = variant
    model = dense["model"]
    patched, report = compress(node, model, None, rank=8192, energy=1.0, residual="bf16").result
    mods = pack.nodes.model.compressed_modules(patched)
    assert sorted(mods) == sorted(FFNS), report
    for u, m in mods.items():
        for part, lin in (("up", "net.0.proj"), ("down", "net.2")):
            assert (getattr(m, part).bias is None) == (dense_bias(model, f"{u}.{lin}") is None), (u, lin)
    errs = ffn_errors(pack, patched, dense["io"])
    err = rel(sample(patched), dense["base"])
    print(f"{name} full rank bf16: final latent {err:.2e}, FFN outputs at most {max(errs.values()):.2e}")
    assert err < tol(model) and all(e < tol(model) for e in errs.values()), errs


def test_offline_compress_of_the_checkpoint_loads_as_the_node_compresses(pack, node, variant, dense, tmp_path):
    """`liteffn compress` reads the variant's checkpoint file (bias-less linears included) with the
    statistics Calibrate saved; the Loader takes its file onto ComfyUI's MODEL of that checkpoint."""
    import importlib

    name, config, load = variant
    cli = importlib.import_module(pack.__name__ + ".calibration.cli")
    ckpt = ltx2_tiny.save(str(tmp_path / f"{name}.safetensors"), config=config)  # the fixture's weights (seed 0)
    stats = os.path.join(folder(), "versions", f"{name}_stats.safetensors")
    out = os.path.join(folder(), "versions", f"{name}_offline.safetensors")
    assert cli.main(["compress", ckpt, "-o", out, "--stats", stats, "--rank", "16", "--device", "cpu"]) == 0
    model = dense["model"]
    loaded, report = node("LowRankFFNLoader").execute(model=model, compressed_file=f"versions/{name}_offline.safetensors").result
    assert f"loaded {name}_offline.safetensors" in report, report
    mods = pack.nodes.model.compressed_modules(loaded)
    for u, m in mods.items():
        for part, lin in (("up", "net.0.proj"), ("down", "net.2")):
            assert (getattr(m, part).bias is None) == (dense_bias(model, f"{u}.{lin}") is None), (u, lin)
    node_made, _ = node("LiteFFNCompressModel").execute(
        model=model, stats_file=f"versions/{name}_stats.safetensors", rank=16, energy=0.0, residual="fp8",
        streams="all", blocks="all", save_name="").result
    errs, node_errs = ffn_errors(pack, loaded, dense["io"]), ffn_errors(pack, node_made, dense["io"])
    print(f"{name} offline r=16: FFN outputs {max(errs.values()):.4f} (the node's {max(node_errs.values()):.4f})")
    assert all(0 < e < 0.08 for e in errs.values()), errs
    assert max(errs.values()) < max(node_errs.values()) + 0.01  # equal on CPU


def test_ffn_attention_leaves_the_attention_gates_dense(pack, node, variant, dense):
    """layers = ffn+attention compresses q, k, v and out of every attention; the per-head gate
    (`to_gate_logits`, dim -> heads) of LTX-2.3's gated attention stays the model's own Linear."""
    name, config, load = variant
    M = pack.nodes.model
    model = dense["model"]
    patched, report = compress(node, model, None, rank=8192, energy=1.0, residual="bf16", layers="ffn+attention").result
    assert "56 linears" in report, report  # 2 blocks x (2 FFNs x 2 + 6 attentions x 4)
    assert len(M.compressed_modules(patched)) == 2 * (2 + 6 * 4)
    assert not any("to_gate_logits" in k for k in patched.object_patches), list(patched.object_patches)
    err = rel(sample(patched), dense["base"])
    print(f"{name} ffn+attention full rank bf16: {err:.2e}")
    assert err < tol(model)
