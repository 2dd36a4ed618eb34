"""The three nodes on small LTX-2 models loaded by ComfyUI itself, sampled with ComfyUI's sampler."""
from __future__ import annotations

import os

import pytest
import torch

import ltx2_tiny

STEPS, SEED = 3, 7


def sample(model, seed=SEED, latent=None):
    import nodes

    pos, neg = ltx2_tiny.conditioning()
    out = nodes.common_ksampler(model, seed, STEPS, 3.0, "euler", "simple", pos, neg, latent or ltx2_tiny.latent())
    return torch.cat([t.flatten() for t in out[0]["samples"].unbind()])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def calibrate(node, model, filename="", append=True, seeds=2, streams="all", budget=1.0, layers="ffn"):
    pos, neg = ltx2_tiny.conditioning()
    return node("LiteFFNCalibrate").execute(
        model=model, positive=pos, negative=neg, latent_image=ltx2_tiny.latent(), seed=1, steps=STEPS, cfg=3.0,
        sampler_name="euler", scheduler="simple", seeds=seeds, streams=streams, blocks="all",
        memory_budget_gb=budget, storage="cpu", filename=filename, append=append, layers=layers)


def compress(node, model, stats=None, rank=16, residual="fp8", save_name="", energy=0.0, streams="all", layers="ffn"):
    return node("LiteFFNCompressModel").execute(model=model, stats=stats, rank=rank, energy=energy, residual=residual,
                                                streams=streams, blocks="all", save_name=save_name, layers=layers)


def folder():
    import folder_paths

    return folder_paths.get_folder_paths("liteffn")[0]


def test_schemas_list_three_nodes_in_category(pack, node):
    for nid, must in [("LiteFFNCalibrate", {"model", "positive", "negative", "latent_image", "seeds", "streams", "layers",
                                          "filename"}),
                      ("LiteFFNCompressModel", {"model", "stats", "rank", "residual", "streams", "layers", "save_name"}),
                      ("LowRankFFNLoader", {"model", "compressed_file"})]:
        info = node(nid).GET_NODE_INFO_V1()
        names = set(info["input"]["required"]) | set(info["input"].get("optional", {}))
        assert must <= names and info["category"] == "LiteFFN", (nid, names)


def test_calibrate_compress_sample_is_close_to_baseline(pack, node, ltx2):
    model = ltx2()
    stats, summary = calibrate(node, model).result
    names = stats.names()
    assert len(names) == 8 and all(stats[n].rows > 0 for n in names), summary  # 2 blocks x (ff, audio_ff) x 2
    assert stats["transformer_blocks.0.ff.net.2"].width == 256 and stats["transformer_blocks.1.audio_ff.net.0.proj"].width == 32
    base = sample(model)
    patched, report = compress(node, model, stats, rank=16).result
    assert "8 linears" in report and "8 calibrated" in report, report
    out = sample(patched)
    err = rel(out, base)
    print(f"r=16 fp8 calibrated: final latent relative difference {err:.4f}")
    assert 0 < err < 0.05  # FP8 residual + FP8 activations: changed, but close
    # rows held out of the statistics (issue 20): the report's output error is measured on them
    assert all(0 < stats[n].held_rows <= stats[n].held_seen for n in names) and "more held out" in summary, summary
    assert "output error on held-out rows" in report and "without statistics" in report, report
    assert "hold no held-out rows" not in report


def test_statistics_without_held_out_rows_still_compress_and_say_so(pack, node, ltx2):
    """Statistics files from before held-out rows: compressed as before, with a note instead of the output error."""
    LayerStats, ActivationStats = pack.calibration.stats.LayerStats, pack.calibration.stats.ActivationStats
    model = ltx2()
    stats, _ = calibrate(node, model, seeds=1).result
    old = ActivationStats({n: LayerStats(stats[n].xtx, stats[n].absmax, stats[n].rows) for n in stats.names()},
                          dict(stats.meta))
    _, report = compress(node, model, old, rank=16).result
    assert "8 calibrated" in report and "8 linears' statistics hold no held-out rows" in report, report
    assert "output error on held-out rows" not in report


def test_match_fp8_chooses_each_linears_rank_from_its_held_out_error(pack, node, ltx2):
    """Issue 20, item 2: with match_fp8, a 4-bit residual's rank per linear is searched against FP8's error."""
    model = ltx2()
    stats, _ = calibrate(node, model, seeds=1).result
    kw = dict(model=model, rank=8, energy=0.0, residual="nvfp4", streams="all", blocks="all", save_name="")
    patched, report = node("LiteFFNCompressModel").execute(stats=stats, match_fp8=1.5, **kw).result
    assert "within 1.5x FP8's error at r=8" in report and "1.5x the FP8 residual's held-out error at rank 8" in report
    ranks = {m.up.rank for m in pack.nodes.model.compressed_modules(patched).values()}
    assert ranks <= {0, 8, 16, 24} and rel(sample(patched), sample(model)) < 0.2, (ranks, report)
    with pytest.raises(Exception, match="match_fp8 measures each linear's error on held-out rows"):
        node("LiteFFNCompressModel").execute(match_fp8=1.5, **kw)
    with pytest.raises(Exception, match="energy and match_fp8 both choose"):
        node("LiteFFNCompressModel").execute(stats=stats, match_fp8=1.5, **dict(kw, energy=0.5))


def test_full_rank_without_quantization_matches_baseline(pack, node, ltx2):
    model = ltx2()
    patched, report = compress(node, model, None, rank=8192, energy=1.0, residual="bf16").result
    mods = list(pack.nodes.model.compressed_modules(patched).values())
    assert len(mods) == 4 and all(m.up.rank == min(m.up.in_features, m.up.out_features) for m in mods)
    err = rel(sample(patched), sample(model))
    print(f"full rank, bf16 residual on {patched.load_device}: relative difference {err:.2e}")
    # CPU computes in fp32: only the bf16 rounding of the factors and residual remains (measured
    # 9e-7). GPUs compute in bf16, where A B x + R x rounds three products instead of one W x
    # (measured 9e-3 on H100 after 3 steps at cfg 3).
    assert err < (1e-3 if patched.load_device.type == "cpu" else 2e-2)


def test_baseline_branch_is_untouched(pack, node, ltx2):
    model = ltx2()
    before = sample(model)
    patched, _ = compress(node, model, None, rank=8).result
    assert not model.object_patches  # the input MODEL itself carries no patch
    sample(patched)
    after = sample(model)
    assert torch.equal(before, after)
    assert type(model.model.diffusion_model.transformer_blocks[0].ff).__name__ == "FeedForward"
    assert patched.model_size() < model.model_size()  # ComfyUI plans VRAM with the compressed size


def test_loader_round_trip_equals_compress_output(pack, node, ltx2):
    model = ltx2()
    stats, _ = calibrate(node, model, seeds=1).result
    patched, _ = compress(node, model, stats, rank=8, save_name="rt/ltx2_r8").result
    path = os.path.join(folder(), "rt", "ltx2_r8.safetensors")
    assert os.path.isfile(path)
    loaded, report = node("LowRankFFNLoader").execute(model=model, compressed_file="rt/ltx2_r8.safetensors").result
    assert "loaded ltx2_r8.safetensors" in report
    ours = pack.nodes.model.compressed_modules
    assert len(ours(patched)) == 4 and ours(patched).keys() == ours(loaded).keys()
    for k, m in ours(patched).items():
        other = dict(ours(loaded)[k].named_parameters())
        for n, p in m.named_parameters():
            assert torch.equal(p.view(torch.uint8), other[n].view(torch.uint8)), (k, n)
    assert torch.equal(sample(patched), sample(loaded))


def test_file_inputs_fingerprint_the_file_so_a_rewritten_one_is_read_again(pack, node, ltx2):
    """ComfyUI reuses a node's cached result while its inputs and fingerprint_inputs stay the same: the Loader
    and Compress' stats_file fingerprint the file itself, so one rewritten under the same name is read again."""
    model = ltx2()
    stats, _ = calibrate(node, model, seeds=1, filename="fp/stats").result
    compress(node, model, stats, rank=4, save_name="fp/model")
    loader, comp = node("LowRankFFNLoader"), node("LiteFFNCompressModel")
    f_model = loader.fingerprint_inputs(compressed_file="fp/model.safetensors")
    f_stats = comp.fingerprint_inputs(stats_file="fp/stats.safetensors", rank=4)
    assert f_model == loader.fingerprint_inputs(compressed_file="fp/model.safetensors")  # unchanged: cache kept
    assert comp.fingerprint_inputs(stats_file="(none)") == comp.fingerprint_inputs(rank=8)  # no file: constant
    t = os.path.getmtime(os.path.join(folder(), "fp", "model.safetensors"))
    compress(node, model, stats, rank=2, save_name="fp/model")  # the same name, other content
    calibrate(node, model, seeds=1, filename="fp/stats", append=True)  # the statistics file grows
    p = os.path.join(folder(), "fp", "model.safetensors")
    os.utime(p, (t, t))  # even with its old modification time: the size differs
    assert loader.fingerprint_inputs(compressed_file="fp/model.safetensors") != f_model
    assert comp.fingerprint_inputs(stats_file="fp/stats.safetensors") != f_stats
    assert "unavailable" in loader.fingerprint_inputs(compressed_file="fp/gone.safetensors")  # execute explains


def test_loader_lists_compressed_files_and_stats_file_lists_statistics(pack, node, ltx2):
    model = ltx2()
    stats, _ = calibrate(node, model, seeds=1, filename="kinds/stats").result
    compress(node, model, stats, rank=4, save_name="kinds/model")
    with open(os.path.join(folder(), "kinds", "other.safetensors"), "wb") as f:  # not LiteFFN's: left in both
        f.write(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")

    def options(nid, name):
        info = node(nid).GET_NODE_INFO_V1()["input"]
        return set((info["required"].get(name) or info["optional"][name])[1]["options"])
    loader = options("LowRankFFNLoader", "compressed_file")
    stats_files = options("LiteFFNCompressModel", "stats_file")
    assert "kinds/model.safetensors" in loader and "kinds/stats.safetensors" not in loader
    assert "kinds/stats.safetensors" in stats_files and "kinds/model.safetensors" not in stats_files
    assert "kinds/other.safetensors" in loader and "kinds/other.safetensors" in stats_files


def test_compress_refuses_a_no_op_and_flags_a_file_larger_than_dense(pack, node, ltx2):
    model = ltx2()
    with pytest.raises(ValueError, match="rank 0 with a bf16 residual keeps every weight exactly as it is") as e:
        compress(node, model, None, rank=0, residual="bf16", save_name="noop")
    assert type(e.value) is ValueError and not os.path.exists(os.path.join(folder(), "noop.safetensors"))
    _, report = compress(node, model, None, rank=0, residual="fp8").result
    assert "no statistics: round-to-nearest (" in report and "SVD" not in report and "WARNING" not in report
    _, report = compress(node, model, None, rank=8, residual="bf16").result  # factors on top of bf16 weights
    assert "WARNING: the compressed linears take" in report and "no memory is saved" in report
    assert "no statistics: plain SVD (" in report


def test_loader_explains_mismatched_files(pack, node, ltx2):
    model = ltx2()
    compress(node, model, None, rank=4, save_name="mm")
    load = lambda m: node("LowRankFFNLoader").execute(model=m, compressed_file="mm.safetensors")  # noqa: E731
    with pytest.raises(ValueError, match="hold different weights.*another checkpoint") as e:
        load(ltx2(seed=1))
    # ComfyUI names an exception by its type's module, here the pack folder's path: a plain ValueError
    assert type(e.value) is ValueError and isinstance(e.value.__cause__, pack.calibration.fingerprint.MismatchError)
    wider = dict(ltx2_tiny.CONFIG, audio_attention_head_dim=16, audio_cross_attention_dim=64)
    with pytest.raises(ValueError, match="differ in shape"):
        load(ltx2(config=wider))
    with pytest.raises(ValueError, match=r"LTX-2 models only \(LTX-AV: LTX-2 19B, LTX-2.3 22B, LTX-2.5\)"):
        load(ltx2(video_only=True))  # LTX-Video 0.9: not LTX-2
    stats, _ = calibrate(node, model, filename="not_a_model_file", seeds=1).result
    with pytest.raises(ValueError, match="liteffn.stats.*expected 'liteffn.compressed'"):
        node("LowRankFFNLoader").execute(model=model, compressed_file="not_a_model_file.safetensors")
    with open(os.path.join(folder(), "broken.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        node("LowRankFFNLoader").execute(model=model, compressed_file="broken.safetensors")


def test_compress_rejects_bad_requests_clearly(pack, node, ltx2):
    model = ltx2()
    with pytest.raises(ValueError, match="rank 100 is larger than layer"):
        compress(node, model, None, rank=100, streams="audio")
    with pytest.raises(ValueError, match="LTX-2 models only"):
        compress(node, ltx2(video_only=True), None)
    patched, _ = compress(node, model, None, rank=4).result
    with pytest.raises(ValueError, match="already compressed by LiteFFN"):
        compress(node, patched, None)


def _interrupt_after(n):
    import comfy.model_management
    import comfy.utils

    calls = [0]

    def hook(value, total, preview, node_id=None):
        calls[0] += 1
        if calls[0] == n:
            comfy.model_management.interrupt_current_processing(True)
    comfy.utils.set_progress_bar_global_hook(hook)


def test_interrupting_leaves_no_partial_file(pack, node, ltx2):
    import comfy.model_management
    import comfy.utils

    model = ltx2()
    files_before = set(os.listdir(folder()))
    try:
        _interrupt_after(1)  # ComfyUI sends the first update at once, later ones throttled
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            calibrate(node, model, filename="interrupted_stats")
        comfy.model_management.interrupt_current_processing(False)
        _interrupt_after(1)  # after the first layer, while the file is being written
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            compress(node, model, None, rank=4, save_name="interrupted_model")
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)
    assert set(os.listdir(folder())) == files_before  # no file, no temp file
    # and the model still samples, with no calibration hook left behind
    assert torch.isfinite(sample(model)).all()
    assert not any(m._forward_pre_hooks for m in model.model.modules())


def test_statistics_accumulate_over_runs_of_one_model(pack, node, ltx2):
    ActivationStats = pack.calibration.stats.ActivationStats
    model = ltx2()
    path = os.path.join(folder(), "acc.safetensors")
    first, _ = calibrate(node, model, filename="acc", append=False, seeds=1).result
    n = "transformer_blocks.1.ff.net.2"
    one = first[n]  # the output is kept in the file: read now, while the file is this run's
    calibrate(node, model, filename="acc", append=True, seeds=1)
    saved = ActivationStats.load(path)
    assert saved.meta["runs"] == 2 and saved[n].rows == 2 * one.rows
    torch.testing.assert_close(saved[n].xtx, 2 * one.xtx, rtol=1e-5, atol=1e-5)  # same seed: same activations
    with pytest.raises(pack.calibration.validate.FileError, match="was replaced after"):
        first[n]  # the file now holds both runs: the first node's output refuses rather than read them
    with pytest.raises(ValueError, match="statistics of another model") as e:
        calibrate(node, ltx2(seed=3), filename="acc", append=True, seeds=1)
    assert "turn append off" in str(e.value) and "Compress Model" not in str(e.value)  # its advice, not the Loader's
    assert ActivationStats.load(path).meta["runs"] == 2  # the file is as it was
    # compress from the saved file (read one layer at a time) equals compress from the node output
    a, _ = node("LiteFFNCompressModel").execute(model=model, stats=saved, rank=8, energy=0.0, residual="fp8",
                                                streams="all", blocks="all", save_name="").result
    b, _ = node("LiteFFNCompressModel").execute(model=model, stats_file="acc.safetensors", rank=8, energy=0.0,
                                                residual="fp8", streams="all", blocks="all", save_name="").result
    assert torch.equal(sample(a), sample(b))


def test_chained_calibrate_nodes_add_up_without_touching_the_earlier_output(pack, node, ltx2):
    model = ltx2()
    first, _ = calibrate(node, model, seeds=1).result
    before = {n: first[n].xtx.clone() for n in first.names()}
    pos, neg = ltx2_tiny.conditioning(seed=5)  # a second prompt
    both, summary = node("LiteFFNCalibrate").execute(
        model=model, positive=pos, negative=neg, latent_image=ltx2_tiny.latent(), seed=1, steps=STEPS, cfg=3.0,
        sampler_name="euler", scheduler="simple", seeds=1, streams="all", blocks="all", memory_budget_gb=1.0,
        storage="cpu", filename="", append=False, stats=first).result
    second, _ = node("LiteFFNCalibrate").execute(
        model=model, positive=pos, negative=neg, latent_image=ltx2_tiny.latent(), seed=1, steps=STEPS, cfg=3.0,
        sampler_name="euler", scheduler="simple", seeds=1, streams="all", blocks="all", memory_budget_gb=1.0,
        storage="cpu", filename="", append=False).result
    n = "transformer_blocks.0.audio_ff.net.0.proj"
    assert both.meta["runs"] == 2 and both[n].rows == first[n].rows + second[n].rows, summary
    torch.testing.assert_close(both[n].xtx, first[n].xtx + second[n].xtx)
    assert all(torch.equal(first[k].xtx, v) for k, v in before.items())  # ComfyUI's cached output unchanged
    with pytest.raises(ValueError, match="statistics of another model"):
        calibrate_other = node("LiteFFNCalibrate").execute
        calibrate_other(model=ltx2(seed=3), positive=pos, negative=neg, latent_image=ltx2_tiny.latent(), seed=1,
                        steps=1, cfg=3.0, sampler_name="euler", scheduler="simple", seeds=1, streams="all",
                        blocks="all", memory_budget_gb=1.0, storage="cpu", filename="", append=False, stats=first)


def test_small_budget_calibrates_in_passes_with_the_same_result(pack, node, ltx2):
    model = ltx2()
    whole, _ = calibrate(node, model, seeds=1).result
    split, summary = calibrate(node, model, seeds=1, budget=0.0055).result  # 5.6 MiB: 4 of scratch, 2 MiB held rows
    assert "1 pass" not in summary, summary
    for n in whole.names():
        torch.testing.assert_close(split[n].xtx, whole[n].xtx)
        assert torch.equal(split[n].held, whole[n].held)  # the same rows held out in every pass


def test_fp8_checkpoint_as_source(pack, node, ltx2):
    pytest.importorskip("comfy_kitchen", reason="ComfyUI reads FP8 checkpoints through comfy-kitchen")
    fp8 = ltx2(fp8_ffn=True)
    w = fp8.model.diffusion_model.transformer_blocks[0].ff.net[0].proj.weight
    assert type(w).__name__ == "QuantizedTensor"  # ComfyUI loaded it as its FP8 layout
    stats, _ = calibrate(node, fp8, seeds=1).result
    patched, report = compress(node, fp8, stats, rank=16).result
    err = rel(sample(patched), sample(fp8))
    print(f"FP8 source, r=16 fp8: relative difference {err:.4f}")
    assert 0 < err < 0.05
    compress(node, fp8, None, rank=4, save_name="from_fp8")
    node("LowRankFFNLoader").execute(model=fp8, compressed_file="from_fp8.safetensors")  # fingerprint matches


def test_other_packs_ffn_forward_patch_is_dropped_with_a_warning(pack, node, ltx2, caplog):
    model = ltx2().clone()
    calls = []
    ff = model.model.diffusion_model.transformer_blocks[0].ff
    model.add_object_patch("diffusion_model.transformer_blocks.0.ff.forward", lambda x: calls.append(1) or ff.net(x))
    patched, _ = compress(node, model, None, rank=4).result
    assert "dropping another node's patch diffusion_model.transformer_blocks.0.ff.forward" in caplog.text
    sample(patched)
    assert not calls  # the compressed FFN ran, not the other pack's forward over the dense weights


def test_compressed_path_reports_which_kernel_ran(pack, node, ltx2):
    dispatch = pack.kernels.dispatch
    patched, _ = compress(node, ltx2(), None, rank=4).result
    dispatch.counts.clear()
    sample(patched)
    path = "triton" if dispatch.fp8_tensor_cores(torch.device(patched.load_device)) else "reference"
    print(f"device {patched.load_device}: {dict(dispatch.counts)}")
    assert dispatch.counts[f"ffn:{path}"] > 0 and sum(dispatch.counts.values()) == dispatch.counts[f"ffn:{path}"]


def test_compare_node_on_known_frames(pack, node):
    import math

    g = torch.Generator().manual_seed(0)
    ref = 0.2 + 0.6 * torch.rand(3, 64, 64, 3, generator=g)
    psnr, ssim, report, plot = node("LiteFFNCompare").execute(reference=ref, test=ref.clone(), label="same").result
    assert math.isinf(psnr) and ssim == pytest.approx(1.0) and "inf (identical)" in report
    noisy = ref + 0.01 * torch.randn(ref.shape, generator=g)
    psnr, ssim, report, plot = node("LiteFFNCompare").execute(reference=ref, test=noisy, label="r=64").result
    assert psnr == pytest.approx(40.0, abs=0.1) and 0 < ssim < 1 and len(report.splitlines()) == 5
    assert plot.shape[0] == 1 and plot.shape[-1] == 3
    shown = node("LiteFFNCompare").execute(reference=ref, test=noisy, label="r=64").ui
    assert shown.as_dict() == {"text": (report,)}  # the report is displayed on the node
