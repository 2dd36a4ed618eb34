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
