"""The random kernel-test data of calibration/synthetic.py: activations independent of the
layers at any seed, and the deliberate stress inputs of kernel_inputs."""
import pytest
import torch
import torch.nn.functional as Fn

from liteffn.calibration import synthetic as S
from liteffn.kernels import formats as F


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
    W = S.dense_weight(S.random_fp8_layer(n, k, 16, seed))
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
    assert torch.equal(x, S.kernel_inputs("independent", 10, 64, seed=3))
    t = S.random_fp8_layer(32, 64, 8, 3)
    assert t["q"].dtype == torch.float8_e4m3fn and t["q_scale"].shape == (32,)
    assert t["A"].shape == (32, 8) and t["B"].shape == (8, 64) and t["bias"].shape == (32,)
    assert torch.equal(S.dense_weight(t), t["q"].float() * t["q_scale"][:, None])


@pytest.mark.parametrize("kind", S.INPUT_KINDS)
def test_kernel_inputs_shape_dtype_determinism(kind):
    m, k = 48, 256
    W = S.dense_weight(S.random_fp8_layer(96, k, 0, 0))
    x = S.kernel_inputs(kind, m, k, W, seed=5)
    assert x.shape == (m, k) and x.dtype == torch.bfloat16 and torch.isfinite(x.float()).all()
    assert torch.equal(x, S.kernel_inputs(kind, m, k, W, seed=5))
    assert not torch.equal(x, S.kernel_inputs(kind, m, k, W, seed=6))
    norms = x.float().norm(dim=1)
    assert float(norms.max() / norms.min()) > 3  # per-token magnitudes vary


def test_kernel_inputs_kinds_have_their_structure():
    m, n, k = 64, 80, 512
    W = S.dense_weight(S.random_fp8_layer(n, k, 0, 0))
    cos = lambda x: Fn.normalize(x.float(), dim=1) @ Fn.normalize(W, dim=1).T  # noqa: E731
    # coherent: each row is a row of W (bf16-rounded), the rows cycled through W
    c = cos(S.kernel_inputs("coherent", m, k, W)).abs().max(1).values
    assert float(c.min()) > 0.999
    assert max_cos(S.kernel_inputs("independent", m, k), W) < 0.3
    # partly coherent: cosine ~0.3 with one row of W
    c = cos(S.kernel_inputs("partly_coherent", m, k, W)).abs().max(1).values
    assert 0.2 < float(c.median()) < 0.4
    # gelu: positive mean, and nothing much below GELU's minimum (-0.17) times the largest scale
    g = S.kernel_inputs("gelu", m, k).float()
    assert float(g.mean()) > 0.2 and float(g.min()) > -0.17 * 4 - 0.01
    # mean: rows share a direction
    xm = Fn.normalize(S.kernel_inputs("mean", m, k).float(), dim=1)
    assert float((xm @ xm.T).mean()) > 0.3
    # outliers: a few channels far above the rest
    amax = S.kernel_inputs("outliers", m, k).float().abs().amax(0).sort(descending=True).values
    few = max(2, k // 512)
    assert float(amax[few - 1] / amax[few:].max()) > 5 and float(amax[few:].max()) < 20


def test_kernel_inputs_reject_unknown_kinds_and_missing_weights():
    with pytest.raises(ValueError, match="choose one of independent, gelu, coherent"):
        S.kernel_inputs("adversarial", 4, 64)
    with pytest.raises(ValueError, match="needs the layer's dense weight"):
        S.kernel_inputs("coherent", 4, 64)
    with pytest.raises(ValueError, match="needs the layer's dense weight"):
        S.kernel_inputs("partly_coherent", 4, 64, torch.zeros(8, 32))
