"""GPU tier: few-token calls through real CUDA graphs (kernels/graphs.py) compute what calls without
graphs compute, at the audio FFN's size (2048 -> 8192 -> 2048, r=64, M=126). Skips without a CUDA
GPU with FP8 tensor cores. tests/test_graphs.py tests the policy on the CPU with a fake backend.

Graph and eager outputs are compared with a tolerance, not bit for bit: the graph runs
act_quant_lowrank's two-launch variant (u summed over K splits with fp32 atomics) and the up
GEMM's u2 is an fp32 atomic sum, so a few FP8 codes of h may flip between any two calls."""
import copy
import weakref
from collections import Counter

import pytest
import torch

from liteffn.calibration.synthetic import random_activations, random_fp4_layer, random_fp8_layer
from liteffn.kernels import dispatch, gemm, graphs, ops
from liteffn.kernels.modules import CompressedFFN, CompressedLinear

HAS_FP8_GPU = torch.cuda.is_available() and dispatch.fp8_tensor_cores(torch.device("cuda"))
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a CUDA GPU with FP8 (sm_89+)")]

DIM, HID, R, M = 2048, 8192, 64, 126
TOL = 1e-2  # graph vs eager (see above); outputs of different inputs are ~1 apart


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture
def G(monkeypatch):
    g = graphs.GRAPHS
    monkeypatch.setattr(g, "states", weakref.WeakKeyDictionary())
    monkeypatch.setattr(g, "stats", Counter())
    monkeypatch.setattr(g, "disabled", None)
    monkeypatch.setattr(g, "enabled", True)
    dispatch.set_mode(None)
    yield g


def off(g, fn):
    """fn() without graphs: the eager path as before (one-launch act quant)."""
    g.enabled = False
    try:
        return fn()
    finally:
        g.enabled = True


def ffn_module(fmt="fp8", device="cuda"):
    mk = (lambda n, k, s: random_fp8_layer(n, k, R, s, device)) if fmt == "fp8" else (
        lambda n, k, s: random_fp4_layer(fmt, n, k, R, s, device))
    up, dn = mk(HID, DIM, 1), mk(DIM, HID, 2)
    dn["input_amax"] = torch.tensor([8.0], device=device)  # calibrated: the three-launch path
    return CompressedFFN(CompressedLinear(fmt, DIM, HID, up), CompressedLinear(fmt, HID, DIM, dn))


def inputs(n, m=M, k=DIM):
    return [random_activations(m, k, seed=10 + i, device="cuda").reshape(1, m, k) for i in range(n)]


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_ffn_eager_capture_replay_follow_the_input(G, fmt):
    ffn = ffn_module(fmt)
    xs = inputs(5)
    ys = [ffn(x) for x in xs]  # 1: eager, 2: capture, 3..5: replay
    torch.cuda.synchronize()
    assert G.disabled is None, G.disabled
    assert G.stats == {"eager": 1, "capture": 1, "replay": 3}
    kept = [y.clone() for y in ys]
    zs = [off(G, lambda x=x: ffn(x)) for x in xs]
    fn = ops.ffn_rows(ffn.up.tensors(), ffn.down.tensors(), ffn.h_scale, ffn.up.block, ffn.down.block, single=False)
    ws = [fn(x.reshape(-1, DIM)).reshape(x.shape) for x in xs]  # the captured function, run eagerly
    for i, (y, z, w) in enumerate(zip(ys, zs, ws)):
        assert y.shape == xs[i].shape and y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
        assert rel(y, z) < TOL and rel(y, w) < TOL, (i, rel(y, z), rel(y, w))
        assert all(rel(y, zj) > 0.3 for j, zj in enumerate(zs) if j != i), i  # its own input's output
    for x in xs[:2]:
        ffn(x)  # more replays
    torch.cuda.synchronize()
    assert all(torch.equal(y, k) for y, k in zip(ys, kept))  # outputs handed out are never the static buffer
    assert G.stats["replay"] == 5


def test_fp32_input_gives_fp32_output(G):
    ffn = ffn_module()
    xs = [x.float() for x in inputs(3)]
    ys = [ffn(x) for x in xs]
    assert G.stats == {"eager": 1, "capture": 1, "replay": 1}
    for x, y in zip(xs, ys):
        assert y.dtype == torch.float32 and rel(y, off(G, lambda x=x: ffn(x))) < TOL


def test_lora_set_between_calls_changes_the_output_as_eager(G):
    ffn = ffn_module()
    x = inputs(1)[0]
    before = [ffn(x) for _ in range(3)]
    assert G.stats == {"eager": 1, "capture": 1, "replay": 1}
    g = torch.Generator(device="cuda").manual_seed(7)
    for m in (ffn.up, ffn.down):
        m.set_lora(torch.randn(m.out_features, 8, generator=g, device="cuda") / 4,
                   torch.randn(8, m.in_features, generator=g, device="cuda") / m.in_features**0.5)
    want = off(G, lambda: ffn(x))
    after = [ffn(x) for _ in range(3)]  # new operands: eager, capture, replay
    assert G.stats == {"eager": 2, "capture": 2, "replay": 2} and G.disabled is None
    assert rel(want, before[0]) > 0.05
    assert all(rel(y, want) < TOL for y in after), [rel(y, want) for y in after]
    for m in (ffn.up, ffn.down):
        m.set_lora(None)
    cleared = [ffn(x) for _ in range(3)]
    assert all(rel(y, before[0]) < TOL for y in cleared)


def test_linear_replays_follow_the_input(G):
    lin = CompressedLinear("fp8", DIM, HID, random_fp8_layer(HID, DIM, R, 3, "cuda"))
    xs = inputs(4)
    ys = [lin(x) for x in xs]
    assert G.stats == {"eager": 1, "capture": 1, "replay": 2} and G.disabled is None
    zs = [off(G, lambda x=x: lin(x)) for x in xs]
    for i, (y, z) in enumerate(zip(ys, zs)):
        assert y.shape == (1, M, HID) and rel(y, z) < 5e-3, i
        assert all(rel(y, zj) > 0.3 for j, zj in enumerate(zs) if j != i)


def test_offloaded_module_never_captures(G):
    """Weights on the CPU, input on the GPU (a partially loaded model): copied per call, no graph."""
    ffn_cpu = ffn_module(device="cpu")
    ffn_gpu = copy.deepcopy(ffn_cpu).to("cuda")
    xs = inputs(4)
    for x in xs:
        assert rel(ffn_cpu(x), off(G, lambda x=x: ffn_gpu(x))) < TOL
    assert G.stats["capture"] == 0 and ffn_cpu not in G.states


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_a_replaced_split_k_workspace_stays_alive_for_the_graph(G, monkeypatch, fmt):
    """The down-projection at M=126 splits K into the GEMMs' shared workspace (gemm.split_workspace). A larger call replaces
    that workspace; the graph captured with the old one keeps it (graphs.keep_alive), so its replays
    neither read freed memory (refilled here with NaN) nor write into it."""
    monkeypatch.setattr(gemm, "_WORKSPACES", {})  # sized by this test's calls
    ffn = ffn_module(fmt)
    xs = inputs(3)
    for x in xs:
        ffn(x)
    if not gemm._WORKSPACES:
        pytest.skip("no split-K launch at M=126 on this GPU")
    ws0 = next(iter(gemm._WORKSPACES.values()))
    off(G, lambda: ffn(inputs(1, m=250)[0]))  # M*N grows: a new workspace
    ws1 = next(iter(gemm._WORKSPACES.values()))
    assert ws1[0].data_ptr() != ws0[0].data_ptr()
    del ws0
    junk = [torch.full((M * DIM,), float("nan"), device="cuda") for _ in range(8)]  # would take freed blocks
    for x in xs:
        assert rel(ffn(x), off(G, lambda x=x: ffn(x))) < TOL
    assert G.stats["replay"] >= 4 and G.disabled is None
    del junk


def test_inside_another_capture_runs_eagerly(G):
    """A caller capturing its own CUDA graph around the module: no graph of ours inside theirs (its
    synchronize would break their capture); the eager path is captured into theirs."""
    ffn = ffn_module()
    x = inputs(1)[0]
    want = off(G, lambda: ffn(x))  # compiles the eager path's kernels outside any capture
    static = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        off(G, lambda: ffn(static))
    torch.cuda.current_stream().wait_stream(s)
    theirs = torch.cuda.CUDAGraph()
    with torch.cuda.graph(theirs):
        y = ffn(static)
    theirs.replay()
    torch.cuda.synchronize()
    assert G.stats == {} and G.disabled is None
    assert rel(y, want) < TOL
