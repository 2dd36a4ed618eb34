"""Linears that read one input (an attention's q, k, v) run as one input pass and a GEMM each
(kernels/modules.SharedInput, fused.shared_linear): same outputs as each linear alone, and alone
whenever the members do not get the same tensor. On CPU the kernels run in Triton's interpreter."""
import logging

import pytest
import torch

from liteffn.calibration import ltx2
from liteffn.calibration.compress import compress_linear
from liteffn.kernels import dispatch, fp8_ffn, fused
from liteffn.kernels.modules import CompressedLinear, SharedInput, share_inputs

pytestmark = pytest.mark.skipif(not fp8_ffn.available(), reason="triton is not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _linear(n, k, rank, seed, fmt="fp8"):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) / 4
    t = compress_linear(W, b, None, rank, fmt).tensors
    return CompressedLinear(fmt, k, n, t).to(DEV)


def _x(m, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, m, k, generator=g) * 3).bfloat16().to(DEV)


@pytest.fixture(autouse=True)
def _kernels():
    logging.disable(logging.WARNING)
    dispatch.set_mode("triton")
    dispatch.counts.clear()
    yield
    dispatch.set_mode(None)
    logging.disable(logging.NOTSET)


def _alone(mods, x):
    for m in mods:
        m._shared = None
    return [m(x) for m in mods]


@pytest.mark.parametrize("ns,rank", [((64, 64, 64), 16), ((48, 80), 8), ((64, 32, 64), 0)])
def test_members_get_what_each_computes_alone(ns, rank):
    k, m = 96, 40
    mods = [_linear(n, k, rank, seed=i) for i, n in enumerate(ns)]
    x = _x(m, k)
    ref = _alone(mods, x)
    dispatch.counts.clear()
    SharedInput(mods)
    ys = [mod(x) for mod in mods]
    # one fused call (one input pass for all), no linear alone
    assert dispatch.counts["shared:triton"] == 1 and dispatch.counts["linear:triton"] == 0
    for y, r in zip(ys, ref):
        assert y.shape == r.shape and y.is_contiguous() and y.dtype == x.dtype
        # the interpreter sums in the same order either way: the same bits
        assert torch.equal(y, r) if DEV == "cpu" else torch.allclose(y.float(), r.float(), rtol=1e-2, atol=1e-2)
    assert mods[0]._shared[0]._kept is None  # every kept output was taken


def test_another_tensor_computes_alone_and_drops_what_was_kept():
    k = 64
    q, kk, v = mods = [_linear(32, k, 8, seed=i) for i in range(3)]
    x, ctx = _x(24, k, 1), _x(24, k, 2)
    ref_q, ref_k, ref_v = q(x), kk(ctx), v(ctx)
    SharedInput(mods)
    dispatch.counts.clear()
    # a cross-attention's pattern: q from x, k and v from another tensor of the same shape
    assert torch.equal(q(x), ref_q) and torch.equal(kk(ctx), ref_k) and torch.equal(v(ctx), ref_v)
    assert mods[0]._shared[0]._kept is None
    assert dispatch.counts["shared:triton"] == 1 and dispatch.counts["linear:triton"] == 2
    # an equal copy is another tensor: it drops what was kept, and the next member computes alone too
    ref = _alone([_linear(32, k, 8, seed=i) for i in range(3)], x)
    dispatch.counts.clear()
    y = q(x)
    assert torch.equal(kk(x.clone()), ref[1]) and torch.equal(v(x), ref[2]) and torch.equal(y, ref[0])
    assert dispatch.counts["shared:triton"] == 1 and dispatch.counts["linear:triton"] == 2


def test_version_change_is_seen_outside_inference_mode():
    mods = [_linear(32, 64, 8, seed=i) for i in range(2)]
    x = _x(16, 64)
    SharedInput(mods)
    mods[0](x)
    x.mul_(2)  # the first member's input changed in place before the second member's call
    dispatch.counts.clear()
    y = mods[1](x)
    assert dispatch.counts["linear:triton"] == 1
    assert torch.equal(y, _alone(mods, x)[1])


def test_unequal_ranks_and_reference_mode_run_alone():
    mods = [_linear(32, 64, 8, seed=i) for i in range(3)]
    x = _x(16, 64)
    SharedInput(mods)
    # a runtime LoRA on one member: ranks 8 + 4 against 8
    g = torch.Generator().manual_seed(5)
    mods[1].set_lora(torch.randn(32, 4, generator=g).to(DEV) / 10, torch.randn(4, 64, generator=g).to(DEV) / 10)
    ys = [m(x) for m in mods]
    assert dispatch.counts["shared:triton"] == 0 and dispatch.counts["linear:triton"] == 3
    assert all(torch.equal(a, b) for a, b in zip(ys, _alone(mods, x)))
    SharedInput(mods)
    dispatch.set_mode("reference")
    dispatch.counts.clear()
    [m(x) for m in mods]
    assert dispatch.counts["shared:triton"] == 0 and dispatch.counts["linear:reference"] == 3


def test_split_shared_layout():
    y = torch.arange(2 * 3 * 10.0).reshape(1, 6, 10)  # 6 rows: blocks of [6, 4] then [6, 6]
    a, b = fused.split_shared(y, [4, 6])
    assert a.shape == (1, 6, 4) and b.shape == (1, 6, 6) and a.is_contiguous() and b.is_contiguous()
    assert torch.equal(a.reshape(-1), y.reshape(-1)[:24]) and torch.equal(b.reshape(-1), y.reshape(-1)[24:])


def test_groups_link_what_ltx2_says_reads_one_input():
    units = ltx2.units(1, layers="ffn+attention")
    groups = ltx2.shared_inputs(units)
    # q/k/v of the two self-attentions, k/v of the four cross-attentions; never an output projection
    assert sorted(len(g) for g in groups) == [2, 2, 2, 2, 3, 3]
    assert all(not u.endswith("to_out.0") for g in groups for u in g)
    assert ["transformer_blocks.0.attn2.to_k", "transformer_blocks.0.attn2.to_v"] in groups
    mods = {u: _linear(32, 64, 4, seed=i) for i, u in enumerate(groups[0])}
    linked = share_inputs(mods, groups)
    assert len(linked) == 1 and [m._shared[1] for m in mods.values()] == [0, 1, 2]
    # relinking a member dissolves its old group
    SharedInput(list(mods.values())[1:])
    assert list(mods.values())[0]._shared is None and linked[0].members == []


@pytest.mark.parametrize("fmt,m", [("fp8", 24), ("fp8", 126), ("fp8", 300), ("mxfp4", 40)])
def test_repeated_calls_stay_equal(fmt, m):
    """Calls repeated as a sampler does (on a GPU: eager, then a CUDA graph captured and replayed at few
    tokens, a recorded launch program at many), FP8 and FP4 (W4A8) residuals."""
    k = 128
    mods = [_linear(64, k, 16, seed=i, fmt=fmt) for i in range(3)]
    x = _x(m, k, seed=m)
    ref = _alone(mods, x)
    SharedInput(mods)
    for _ in range(4):
        ys = [mod(x) for mod in mods]
        for y, r in zip(ys, ref):
            if DEV == "cpu":
                assert torch.equal(y, r)
            else:  # fp32 atomics in another order: last-bit differences of u
                assert float((y.float() - r.float()).norm() / r.float().norm()) < 1e-2
    assert dispatch.counts["shared:triton"] == 4
