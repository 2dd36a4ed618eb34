"""Which FFNs a node works on (block and stream selection) and the compression report."""
import pytest

from liteffn.calibration import ltx2
from liteffn.calibration.report import format_report


def test_block_selection_as_users_type_it():
    assert ltx2.parse_blocks("all", 4) == [0, 1, 2, 3] and ltx2.parse_blocks("", 2) == [0, 1]
    assert ltx2.parse_blocks("0-2, 5", 8) == [0, 1, 2, 5]
    assert ltx2.parse_blocks("3,1,1", 8) == [1, 3]
    with pytest.raises(ValueError, match="outside this model's blocks 0-47"):
        ltx2.parse_blocks("40-48", 48)
    with pytest.raises(ValueError, match="ranges like"):
        ltx2.parse_blocks("first", 48)


def test_ffn_modules_by_stream():
    assert ltx2.ffn_modules(2, "audio") == ["transformer_blocks.0.audio_ff", "transformer_blocks.1.audio_ff"]
    assert len(ltx2.ffn_modules(48)) == 96
    with pytest.raises(ValueError, match="all, video, audio"):
        ltx2.ffn_modules(2, "text")


def test_report_totals_and_rows():
    infos = {"transformer_blocks.0.ff.net.2": dict(rank=64, energy=0.5, rel_err=0.02, bytes=2**20, format="fp8",
                                                   calibrated=True),
             "transformer_blocks.0.ff.net.0.proj": dict(rank=32, energy=0.4, rel_err=0.04, bytes=2**20, format="fp8",
                                                        calibrated=False)}
    r = format_report(infos, 4 * 2**20, "hdr", ["a note"])
    assert r.splitlines()[0] == "hdr" and "2 linears, residual fp8, rank 32-64 (mean 48), 1 calibrated" in r
    assert "(0.50x)" in r and "mean 3.00%, max 4.00%" in r and "a note" in r
    assert "transformer_blocks.0.ff.net.2" in r and format_report({}, 0) == "no layers compressed"
    assert "WARNING" not in r
    big = format_report(infos, 2**20, "hdr")  # 2 MiB of compressed layers for 1 MiB of dense weights
    assert "(2.00x)" in big and "WARNING: the compressed linears take 2.00x the memory" in big


def test_units_by_layers_and_streams():
    # ffn: today's units; ffn+attention: 6 attentions x 4 projections per block, before the FFNs
    assert ltx2.units(2) == ltx2.ffn_modules(2)
    u = ltx2.units(1, layers="ffn+attention")
    assert len(u) == 26 and u[0] == "transformer_blocks.0.attn1.to_q" and u[-2:] == ltx2.ffn_modules(1)
    assert "transformer_blocks.0.audio_to_video_attn.to_out.0" in u
    assert len(ltx2.linears(u)) == 28 and len(ltx2.units(48, layers="ffn+attention")) == 48 * 26
    # audio_to_video_attn writes to the video stream, video_to_audio_attn to the audio stream
    audio = ltx2.units(1, "audio", layers="attention")
    assert {n.split(".")[2] for n in audio} == {"audio_attn1", "audio_attn2", "video_to_audio_attn"}
    assert ltx2.units(1, "video", "0", "ffn") == ["transformer_blocks.0.ff"]
    with pytest.raises(ValueError, match="ffn, ffn\\+attention, attention"):
        ltx2.units(1, layers="all")


def test_linear_kinds_and_units():
    assert ltx2.unit_of("transformer_blocks.3.ff.net.2") == "transformer_blocks.3.ff"
    assert ltx2.unit_of("transformer_blocks.3.attn2.to_k") == "transformer_blocks.3.attn2.to_k"
    assert ltx2.linears_of("transformer_blocks.3.audio_ff") == ["transformer_blocks.3.audio_ff.net.0.proj",
                                                                "transformer_blocks.3.audio_ff.net.2"]
    assert ltx2.kind_of("transformer_blocks.0.attn1.to_out.0") == "attention"
    # left dense: LTX-2.3's per-head gates, and everything outside the blocks
    for name in ("transformer_blocks.0.attn1.to_gate_logits", "proj_out", "transformer_blocks.0.attn1.q_norm"):
        assert ltx2.kind_of(name) is None
        with pytest.raises(ValueError, match="not a linear LiteFFN compresses"):
            ltx2.unit_of(name)


def test_selection_by_streams_and_layers():
    names = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.ff.net.2", "transformer_blocks.0.audio_ff.net.2",
             "transformer_blocks.0.video_to_audio_attn.to_v", "proj_out"]
    assert ltx2.select(names) == names[1:3]  # a stream alone: FFNs, as before `layers` existed
    assert ltx2.select(names, "video") == names[1:2]
    assert ltx2.select(names, "all", "ffn+attention") == names[:4]
    assert ltx2.select(names, "audio", "attention") == names[3:4]
    assert ltx2.select(names, "all", "attention") == [names[0], names[3]]
