"""Adding a residual format is one register() call as far as calibration, the codec and the
reference path go: toy formats (an FP8 copy under another name, an MXFP4 with 16-value
blocks) go through quantization, GPTQ, compress_linear and the modules unchanged, and the
kernel dispatch and the W4A8 conversion take them too: they ask the format object
(fp8_kernel, w4a8, pow2_scales, decode_scales), never its name."""
import dataclasses
from typing import ClassVar

import pytest
import torch

from liteffn.calibration.compress import compress_linear
from liteffn.calibration.residual import quantize_residual
from liteffn.calibration.stats import LayerStats
from liteffn.kernels import dispatch, fp8_ffn, gptq
from liteffn.kernels import formats as F
from liteffn.kernels.modules import CompressedLinear


@pytest.fixture
def toys():
    made = [F.register(dataclasses.replace(F.get("fp8"), name="toy8")),
            F.register(dataclasses.replace(F.get("mxfp4"), name="toy4", block=16))]
    yield {f.name: f for f in made}
    for f in made:
        F.unregister(f.name)
    assert "toy8" not in F.FORMATS and "toy4" not in F.FORMATS


def _problem(n=32, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    X = torch.randn(512, k, generator=g) @ (torch.randn(k, k, generator=g) / k**0.5)
    Hinv = torch.linalg.inv(X.T @ X / 512 + 0.01 * torch.eye(k))
    return E, X, Hinv


def _same(a: dict, b: dict) -> bool:
    u8 = lambda v: v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v  # noqa: E731
    return a.keys() == b.keys() and all(torch.equal(u8(a[k]), u8(b[k])) for k in a)


def test_registry_takes_and_drops_a_format(toys):
    assert list(F.FORMATS)[-2:] == ["toy8", "toy4"] and F.BLOCK["toy4"] == 16 and F.ACT_QUANT["toy8"]
    assert F.check_format("toy8") == "toy8"
    with pytest.raises(ValueError, match="already registered"):
        F.register(toys["toy8"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_copy_of_fp8_quantizes_exactly_as_fp8(toys, backend):
    if backend == "triton" and not gptq.available():
        pytest.skip("triton is not installed")
    E, _, Hinv = _problem()
    for h in (None, Hinv):
        (q8, d8), (qt, dt) = (quantize_residual(E, f, h, backend=backend) for f in ("fp8", "toy8"))
        assert _same(q8, qt) and torch.equal(d8, dt)
        assert F.stored_bytes(qt) == F.stored_bytes(q8)
        assert torch.equal(F.decode("toy8", qt), dt)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mxfp4_with_16_blocks(toys, backend):
    if backend == "triton" and not gptq.available():
        pytest.skip("triton is not installed")
    E, _, Hinv = _problem()
    n, k = E.shape
    q, d = quantize_residual(E, "toy4", Hinv, backend=backend)
    assert q["q"].shape == (n, k // 2) and q["q_scale"].shape == (n, k // 16)
    assert F.stored_bytes(q) == n * k // 2 + n * k // 16
    assert torch.equal(F.decode("toy4", q), d)
    # Twice the scales of 32-blocks: never a worse round-to-nearest error.
    err = lambda f: float((quantize_residual(E, f)[1] - E).norm())  # noqa: E731
    assert err("toy4") < err("mxfp4")


def test_compress_linear_and_module_accept_a_new_format(toys):
    _, X, _ = _problem(k=128)
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    st = LayerStats(X.T @ X, X.abs().amax(0), X.shape[0])
    bias = torch.randn(48)
    c8, ct = (compress_linear(W, bias, st, 8, f) for f in ("fp8", "toy8"))
    assert ct.info["format"] == "toy8" and ct.info["bytes"] == c8.info["bytes"] and ct.info["gptq"]
    assert _same(c8.tensors, ct.tensors)
    m8, mt = (CompressedLinear(c.info["format"], 128, 48, c.tensors) for c in (c8, ct))
    x = torch.randn(5, 128)
    assert torch.equal(m8(x), mt(x)) and torch.equal(m8.dense_weight(), mt.dense_weight())
    c4 = compress_linear(W, None, st, 8, "toy4")
    y = CompressedLinear("toy4", 128, 48, c4.tensors)(x)
    assert y.shape == (5, 48) and torch.isfinite(y).all()


def test_module_refuses_a_format_storing_other_tensors():
    """Modules hold the tensor names known at import (modules.TENSOR_NAMES): a format registered
    later that stores another one is refused, not silently dropped."""
    @dataclasses.dataclass(frozen=True)
    class Zeroed(type(F.get("fp8"))):
        tensor_names: ClassVar[tuple[str, ...]] = ("q", "q_scale", "q_zero")

    F.register(Zeroed("zeroed8", block=None, act_quant=True, bits=8))
    try:
        with pytest.raises(ValueError, match="q_zero"):
            CompressedLinear("zeroed8", 128, 48, compress_linear(torch.randn(48, 128), None, None, 8, "fp8").tensors)
    finally:
        F.unregister("zeroed8")


needs_kernels = pytest.mark.skipif(not fp8_ffn.available(), reason="triton is not installed")


@pytest.fixture
def triton_mode():
    dispatch.set_mode("triton")
    yield
    dispatch.set_mode(None)


@needs_kernels
def test_dispatch_runs_a_new_fp8_kind_on_the_kernels(toys, triton_mode):
    c = compress_linear(torch.randn(48, 128), None, None, 8, "toy8")
    x = torch.randn(4, 128)
    assert dispatch.choose(x, [("fp8", True, c.tensors)]) == "triton"
    assert dispatch.choose(x, [("toy8", True, c.tensors)]) == "triton"


@needs_kernels
def test_w4a8_takes_a_new_fp4_kind(toys, triton_mode):
    from liteffn.calibration.synthetic import random_fp4_layer
    from liteffn.kernels import w4a8

    assert dispatch.w4a8_possible("mxfp4", 128)
    assert dispatch.w4a8_possible("toy4", 128)
    t = random_fp4_layer("toy4", 32, 256, 0)
    assert torch.equal(w4a8.dequant(w4a8.prepare("toy4", t)), F.decode("toy4", t))  # exact, as MXFP4's


def test_w4a8_refuses_32_blocks_without_pow2_scales():
    """The kernel reads 32-value blocks as MXFP4's (block mantissa 0): an NVFP4 kind with 32-value
    blocks is refused rather than computed wrong."""
    from liteffn.kernels import w4a8

    F.register(dataclasses.replace(F.get("nvfp4"), name="nv32", block=32))
    try:
        with pytest.raises(ValueError, match="power-of-two scales only"):
            w4a8.prepare("nv32", {"q": torch.zeros(16, 64, dtype=torch.uint8)})
    finally:
        F.unregister("nv32")
