"""The synthetic LTX-2-shaped stack (calibration/synthetic.py) with its attention projections, and
the demo's per-kind table (calibration/demo.py): error of each kind of linear, calibrated vs plain."""
import torch

from liteffn.calibration import ltx2
from liteffn.calibration.synthetic import SyntheticAttention, SyntheticLTX2

P = ltx2.CKPT_PREFIX


def _linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_attention_projections_under_ltx2_names_in_the_checkpoint():
    m = SyntheticLTX2(blocks=2, video_dim=64, audio_dim=32, attention=True)
    sd = m.checkpoint()
    names = [k[len(P):-len(".weight")] for k in sd if k.endswith(".weight")]
    attn = ltx2.select(names, "all", "attention")
    assert len(attn) == 2 * 2 * 4  # blocks x (attn1, audio_attn1) x (q, k, v, out.0)
    assert len(ltx2.select(names, "all", "ffn+attention")) == len(attn) + 2 * 4
    assert set(attn) == {f"transformer_blocks.{i}.{a}.{p}" for i in range(2) for a in ("attn1", "audio_attn1")
                         for p in ltx2.PROJECTIONS}
    assert ltx2.select(names, "video", "attention") == [n for n in attn if ".attn1." in n]
    for n in attn:  # dim -> dim with a bias, video 64 and audio 32 wide
        d = 64 if ".attn1." in n else 32
        assert sd[P + n + ".weight"].shape == (d, d) and sd[P + n + ".bias"].shape == (d,)
    # every linear of the stack is one the pack compresses, among the units it patches (LTX-2 has four
    # more attentions per block than the stack)
    assert sorted(_linears(m)) == sorted(ltx2.select(names, "all", "ffn+attention"))
    assert set(_linears(m)) < set(ltx2.linears(ltx2.units(2, layers="ffn+attention")))


def test_ffn_only_stack_is_unchanged_by_the_attention_option():
    plain, full = SyntheticLTX2(2, 64, 32, seed=3), SyntheticLTX2(2, 64, 32, seed=3, attention=True)
    sd0, sd1 = plain.checkpoint(), full.checkpoint()
    assert not any(".attn1." in k for k in sd0) and len(_linears(plain)) == 8
    assert all(torch.equal(v, sd1[k]) for k, v in sd0.items())  # FFN names and weights as before
    x = plain.video_acts.sample(16, 0)
    assert torch.equal(x, full.video_acts.sample(16, 0))


def test_attention_weights_have_a_decaying_spectrum():
    """Like the FFNs': the low-rank branch has something to hold (the top direction carries ~10% of the
    energy, a gaussian matrix's 3%; the top 16 of 128 ~47%, a gaussian's 37%), but not everything (a
    noise floor)."""
    att = SyntheticAttention(128, seed=1)
    for lin in (att.to_q, att.to_k, att.to_v, att.to_out[0]):
        s2 = torch.linalg.svdvals(lin.weight.detach()) ** 2
        top1, top16 = float(s2[0] / s2.sum()), float(s2[:16].sum() / s2.sum())
        assert top1 > 0.07 and 0.43 < top16 < 0.8, (top1, top16)
    assert len({float(lin.weight.detach().norm()) for lin in (att.to_q, att.to_k, att.to_v, att.to_out[0])}) == 4


def test_projections_see_the_stream_and_the_attention_output():
    m = SyntheticLTX2(blocks=1, video_dim=64, audio_dim=32, attention=True)
    seen = {}
    for n in ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_out.0",
              "transformer_blocks.0.audio_attn1.to_k", "transformer_blocks.0.ff.net.0.proj"):
        m.get_submodule(n).register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0]))
    v, a = m.video_acts.sample(256, 0), m.audio_acts.sample(64, 0)
    with torch.no_grad():
        m(v, a)
    assert torch.equal(seen["transformer_blocks.0.attn1.to_q"], v)  # the stream, outlier channels and all
    assert torch.equal(seen["transformer_blocks.0.audio_attn1.to_k"], a)
    amax = v.abs().amax(0).sort(descending=True).values
    assert float(amax[0] / amax.median()) > 5
    o = seen["transformer_blocks.0.attn1.to_out.0"]
    assert o.shape == v.shape and not torch.allclose(o, v)
    # the FFN runs after the attention, on the stream with the attention's residual added
    assert not torch.allclose(seen["transformer_blocks.0.ff.net.0.proj"], v)


def test_attention_is_a_real_attention_over_tokens():
    """softmax attention: a batch gives each sample's result; permuting the tokens permutes the output;
    each query weighs many tokens but not all alike."""
    torch.manual_seed(0)
    att = SyntheticAttention(64, seed=2)
    x = torch.randn(2, 128, 64) * torch.linspace(0.5, 3, 64)
    with torch.no_grad():
        y = att(x)
        assert torch.allclose(y[1], att(x[1]), atol=1e-5)
        perm = torch.randperm(128)
        assert torch.allclose(att(x[:, perm]), y[:, perm], atol=1e-5)
        # the token mixing: to_out's input is a convex combination of the rows of v
        v = att.to_v(x[0])
        captured = {}
        h = att.to_out[0].register_forward_pre_hook(lambda mod, a: captured.__setitem__("o", a[0]))
        att(x[0])
        h.remove()
    o = captured["o"]
    assert not torch.allclose(o, v, atol=1e-3)  # not the identity
    assert (o.amax(0) <= v.amax(0) + 1e-4).all() and (o.amin(0) >= v.amin(0) - 1e-4).all()


# ------------------------------------------------------------------ the demo's per-kind table
def test_demo_calibrated_beats_plain_for_each_kind(capsys):
    """At the demo's size, rank 16: the statistics lower the error of both kinds of linear, by a good
    margin (measured: fp8 ~30-40%, nvfp4 ~65%), and the per-kind table shows both kinds."""
    from liteffn.calibration.demo import run

    rows = run(ranks=(16,), formats=("fp8", "nvfp4"), workers=1)
    out = capsys.readouterr().out
    for row in rows:
        for kind in ("ffn", "attention"):
            e = row["kinds"][kind]
            margin = 0.85 if row["format"] == "fp8" else 0.5
            assert e["err_cal"] < margin * e["err_plain"], (row["format"], kind, e)
            assert 0 < e["bytes_ratio"] < 1
        assert row["err_cal"] < row["err_plain"]  # the whole-FFN table, as before
    assert rows[0]["kinds"]["ffn"]["linears"] == 8 and rows[0]["kinds"]["attention"]["linears"] == 16
    assert "FFN output error on held-out activations" in out and "Error per kind of linear" in out
    table = out[out.index("Error per kind of linear"):].splitlines()[2:]
    assert [ln.split()[:3] for ln in table] == [[k, f, "16"] for k in ("ffn", "attention") for f in ("fp8", "nvfp4")]
    assert "calibrated 8 FFN linears and 16 attention projections" in out


def test_demo_kind_error_is_the_mean_of_each_linears_error_on_its_held_out_input():
    """The per-kind number, recomputed by hand: each linear compressed alone (compress_linear), run as the
    pack runs it (CompressedLinear) on the input it got in the held-out pass, ||y' - y|| / ||y||, averaged
    over the kind's linears."""
    from liteffn.calibration.demo import calibrate, compress_projection, held_out, run
    from liteffn.calibration.lowrank import RankPolicy

    kw = dict(blocks=1, video_dim=64, audio_dim=32, batches=2, tokens=256, seed=0)
    row = run(ranks=(8,), formats=("nvfp4",), workers=1, **kw)[0]
    torch.manual_seed(0)
    m = SyntheticLTX2(1, 64, 32, 0, attention=True)
    stats = calibrate(m, 2, 256, 0)
    held = held_out(m, 256, 1000)
    for cal in (False, True):
        errs = {"ffn": [], "attention": []}
        for n in stats.names():
            c = compress_projection(m.get_submodule(n), n, stats if cal else None, RankPolicy(rank=8), "nvfp4")
            x, y = held[n]
            with torch.no_grad():
                assert torch.equal(y, m.get_submodule(n)(x))
                errs[ltx2.kind_of(n)].append(float((c(x) - y).norm() / y.norm()))
        for k, e in errs.items():
            got = row["kinds"][k]["err_cal" if cal else "err_plain"]
            assert abs(got - sum(e) / len(e)) < 1e-6 * got, (k, cal, got, e)


def test_demo_on_worker_processes_matches_one_process(capsys):
    """Worker processes (one torch thread each) give the numbers of the in-process run, to rounding."""
    from liteffn.calibration.demo import run

    kw = dict(blocks=1, video_dim=64, audio_dim=32, ranks=(0, 8), formats=("fp8", "mxfp4"), batches=2, tokens=256)
    one, two = run(workers=1, **kw), run(workers=2, **kw)
    out = capsys.readouterr().out
    assert "(2 worker processes)" in out and "worker processes failed" not in out  # no fallback to this process
    for a, b in zip(one, two):
        assert abs(a["err_cal"] - b["err_cal"]) < 0.02 * a["err_cal"] and a["bytes"] == b["bytes"]
        for k in ("ffn", "attention"):
            for key in ("err_plain", "err_cal"):
                assert abs(a["kinds"][k][key] - b["kinds"][k][key]) < 0.02 * a["kinds"][k][key], (k, key)
            assert a["kinds"][k]["bytes"] == b["kinds"][k]["bytes"]


def test_demo_workers_option(capsys):
    from liteffn.calibration.cli import main

    assert main(["demo", "--workers", "0"]) == 2 and "--workers: 0: must be >= 1" in capsys.readouterr().err
    rc = main(["demo", "--blocks", "1", "--video-dim", "32", "--audio-dim", "32", "--ranks", "4", "--formats", "fp8",
               "--workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "(1 process)" in out and "attention  fp8" in out


def test_offline_command_compresses_the_stacks_attention_with_its_statistics(tmp_path, capsys):
    """The stack with attention as an LTX-2 checkpoint: `compress --layers ffn+attention` with the demo's
    statistics takes all 12 linears of a block, every one calibrated, attn1.to_out.0 included."""
    from safetensors.torch import save_file

    from liteffn.calibration import compressed_file as cf
    from liteffn.calibration.cli import main
    from liteffn.calibration.demo import calibrate

    m = SyntheticLTX2(blocks=1, video_dim=64, audio_dim=32, attention=True)
    save_file(m.checkpoint(), str(tmp_path / "ck.safetensors"))
    calibrate(m, 2, 128).save(str(tmp_path / "stats.safetensors"))
    out = tmp_path / "o.safetensors"
    rc = main(["compress", str(tmp_path / "ck.safetensors"), "-o", str(out), "--stats",
               str(tmp_path / "stats.safetensors"), "--layers", "ffn+attention", "--rank", "8", "--device", "cpu"])
    assert rc == 0 and "12 layers" in capsys.readouterr().out
    layers, _ = cf.load(str(out))
    assert len(ltx2.select(layers, "all", "attention")) == 8 and all(lay.info["calibrated"] for lay in layers.values())
    assert layers["transformer_blocks.0.attn1.to_out.0"].info["in_features"] == 64
