"""The random kernel-test data of calibration/synthetic.py: activations independent of the
layers at any seed."""
import pytest
import torch
import torch.nn.functional as Fn

from liteffn.calibration import synthetic as S
from liteffn.kernels import formats as F


def dense(t):
    return t["q"].float() * t["q_scale"][:, None]


def max_cos(x, W):
    """Largest |cosine| between a row of x and a row of W."""
    return float((Fn.normalize(x.float(), dim=1) @ Fn.normalize(W.float(), dim=1).T).abs().max())


@pytest.mark.parametrize("seed", [0, 1, 7, 1234])
def test_activations_are_independent_of_the_layer_at_the_same_seed(seed):
    """Seeding both generators with the same number once made x's rows equal W's (cosine 1): the
    worst case of Hopper's FP8 accumulation, misread as typical. Independent rows at k = 1024
    have |cosine| ~ 1/32; the largest of 64 x 128 pairs stays within a few times that."""
    m, n, k = 64, 128, 1024
    x = S.random_activations(m, k, seed)
    W = dense(S.random_fp8_layer(n, k, 16, seed))
    assert max_cos(x, W) < min(0.5, 6 / k**0.5)
    W4 = F.decode("mxfp4", S.random_fp4_layer("mxfp4", n, k, 16, seed))  # built on random_fp8_layer
    assert max_cos(x, W4) < min(0.5, 6 / k**0.5)
    # and the low-rank factor B, which multiplies x too
    assert max_cos(x, S.random_fp8_layer(n, k, 16, seed)["B"]) < min(0.5, 6 / k**0.5)


def test_generator_streams_differ_by_purpose_and_seed():
    a = torch.randn(8, generator=S.generator("a", 0))
    assert torch.equal(a, torch.randn(8, generator=S.generator("a", 0)))
    assert not torch.equal(a, torch.randn(8, generator=S.generator("b", 0)))
    assert not torch.equal(a, torch.randn(8, generator=S.generator("a", 1)))


def test_random_data_keeps_its_shapes_and_dtypes():
    x = S.random_activations(10, 64, 3)
    assert x.shape == (10, 64) and x.dtype == torch.bfloat16
    t = S.random_fp8_layer(32, 64, 8, 3)
    assert t["q"].dtype == torch.float8_e4m3fn and t["q_scale"].shape == (32,)
    assert t["A"].shape == (32, 8) and t["B"].shape == (8, 64) and t["bias"].shape == (32,)
