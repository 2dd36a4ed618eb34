"""The GEMM machinery of kernels/gemm.py on CPU: the promotion interval (LITEFFN_PROMOTE_K) as
configs see it."""
import pytest

from liteffn.kernels import fp8_ffn, gemm

pytestmark = pytest.mark.skipif(not fp8_ffn.available(), reason="triton is not installed")


def test_promotion_interval():
    assert gemm.parse_promote_k(None) == 512 and gemm.parse_promote_k("") == 512
    assert gemm.parse_promote_k("0") == 0 and gemm.parse_promote_k("128") == 128
    for bad in ("100", "-128", "fast", "64"):
        with pytest.raises(ValueError, match="LITEFFN_PROMOTE_K"):
            gemm.parse_promote_k(bad)
    assert gemm.promote_tiles(512, 128) == 4 and gemm.promote_tiles(512, 256) == 2
    assert gemm.promote_tiles(0, 256) == 0 and gemm.promote_tiles(128, 256) is None
    assert gemm.promote_tiles(384, 256) is None
    for interval in (128, 512, 0):
        cfgs = fp8_ffn.gemm_configs(interval)
        assert cfgs and all(c.kwargs["PROMOTE"] * c.kwargs["BK"] == interval for c in cfgs)
        # both the few-row and the many-row candidates remain
        assert {c.kwargs["BM"] for c in cfgs} == {64, 128}
    assert all(c.kwargs["BK"] == 128 for c in fp8_ffn.gemm_configs(128))
    assert fp8_ffn.DEFAULT_CONFIGS[1]["PROMOTE"] * fp8_ffn.DEFAULT_CONFIGS[1]["BK"] == gemm.PROMOTE_K

