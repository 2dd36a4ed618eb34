"""The CUDA-graph policy of few-token calls (kernels/graphs.py) with a fake graph backend: when a
call runs eagerly, captures or replays, what invalidates a graph, and the fallbacks. The fake
"captures" fn by keeping it, and its replay runs fn on the static input into the static output:
what a real graph does, reading the operands it was captured with. tests/test_gpu_graphs.py runs
real graphs on a GPU."""
import gc
import logging
import weakref

import pytest
import torch

from liteffn.calibration.compress import compress_linear
from liteffn.kernels import dispatch, fp8_ffn, graphs
from liteffn.kernels.modules import CompressedFFN, CompressedLinear


class FakeGraph:
    def __init__(self, backend, fn, static_x, out):
        self.backend, self.fn, self.static_x, self.out = backend, fn, static_x, out

    def replay(self):
        if self.backend.fail_replay:
            raise RuntimeError("replay failed")
        self.out.copy_(self.fn(self.static_x))


class FakeBackend:
    def __init__(self, dev=-1):
        self.dev = dev  # what device(x) says: -1 is the CPU's get_device()
        self.fail_capture = self.fail_replay = False
        self.graphs = []  # weakrefs of every graph made

    def device(self, x):
        return self.dev

    def capture(self, fn, static_x):
        if self.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        fn(static_x)  # warm-up
        out = fn(static_x)
        g = FakeGraph(self, fn, static_x, out)
        self.graphs.append(weakref.ref(g))
        return g, out


@pytest.fixture
def G():
    return graphs.Graphs(FakeBackend())


class Owner(torch.nn.Module):
    pass


def call(G, owner, x, w, log=None):
    """What modules.py does: replay, else run (eager or capture) with fn on the operands."""
    def fn(x2):
        if log is not None:
            log.append(x2.shape[0])
        return (x2.float() @ w.float().T).to(torch.bfloat16)

    key = G.key(x, [w, None])
    if key is None:
        return fn(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)
    y = G.replay(owner, key, x)
    return y if y is not None else G.run(owner, key, x, fn)


def want(x, w):
    return (x.float() @ w.float().T).to(torch.bfloat16).to(x.dtype)


def xs(n, m=12, k=16, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(n)
    return [torch.randn(2, m // 2, k, generator=g).to(dtype) for _ in range(n)]


def test_first_call_eager_second_captures_later_ones_replay(G):
    owner, w = Owner(), torch.randn(8, 16).bfloat16()
    ys = []
    for i, x in enumerate(xs(5)):
        ys.append(call(G, owner, x, w))
        assert torch.equal(ys[-1], want(x, w)), i  # each output follows its own input
        assert G.stats == {"eager": 1, **({"capture": 1} if i else {}), **({"replay": i - 1} if i > 1 else {})}
    assert G.stats == {"eager": 1, "capture": 1, "replay": 3}
    assert len(G.backend.graphs) == 1
    for y, x in zip(ys, xs(5)):  # callers keep outputs: later replays never overwrite them
        assert torch.equal(y, want(x, w)) and y.shape == (2, 6, 8)
    entry = G.states[owner].entry
    assert all(y.data_ptr() != entry.out.data_ptr() for y in ys)


def test_output_dtype_follows_the_input(G):
    owner, w = Owner(), torch.randn(8, 16).bfloat16()
    for x in xs(4, dtype=torch.float32):
        y = call(G, owner, x, w)
        assert y.dtype == torch.float32 and torch.equal(y, want(x, w))
    assert G.stats["replay"] == 2


def test_a_pointer_change_frees_the_graph_and_recaptures(G):
    owner, w = Owner(), torch.randn(8, 16).bfloat16()
    x = xs(1)[0]
    for _ in range(3):
        call(G, owner, x, w)
    old = G.backend.graphs[0]
    w2 = torch.randn(8, 16).bfloat16()  # reloaded weights at another address
    assert torch.equal(call(G, owner, x, w2), want(x, w2))  # eager, and the stale graph is gone
    gc.collect()
    assert old() is None and G.states[owner].entry is None
    assert torch.equal(call(G, owner, x, w2), want(x, w2))  # captures again
    assert torch.equal(call(G, owner, x, w2), want(x, w2))  # replays the new graph
    assert G.stats == {"eager": 2, "capture": 2, "replay": 2}
    assert old() is None and G.backend.graphs[1]() is not None


def test_the_key_holds_shapes_and_dtypes_not_only_addresses(G):
    big = torch.randn(16, 16).bfloat16()
    x = xs(1)[0]
    k1 = G.key(x, [big[:8]])
    assert G.key(x, [big[:8]]) == k1
    assert G.key(x, [big[:4]]) != k1  # same address, other shape (e.g. a LoRA of another rank)
    assert G.key(x, [big[:8].view(torch.float16)]) != k1
    assert G.key(x.float(), [big[:8]]) != k1
    assert G.key(x.reshape(3, 4, 16), [big[:8]]) != k1


def test_operands_at_new_addresses_on_every_call_never_capture(G):
    owner, w = Owner(), torch.randn(8, 16).bfloat16()
    copies = []  # kept alive, so that every copy has its own address (as per-call GPU copies would)
    for x in xs(6):
        copies.append(w.clone())
        assert torch.equal(call(G, owner, x, copies[-1]), want(x, w))
    assert G.stats == {"eager": 6} and not G.backend.graphs


def test_alternating_keys_keep_at_most_one_graph_and_never_capture(G):
    owner, w = Owner(), torch.randn(8, 16).bfloat16()
    a, b = torch.randn(2, 6, 16).bfloat16(), torch.randn(3, 6, 16).bfloat16()
    for _ in range(3):
        call(G, owner, a, w)
        call(G, owner, b, w)
    assert G.stats == {"eager": 6}


def test_offloaded_operands_run_eagerly(G):
    """Operands on another device than x (a partially loaded model, copied per call): no key."""
    G.backend.dev = 0  # pretend x is on cuda:0; the operands are on the CPU
    w = torch.randn(8, 16).bfloat16()
    assert G.key(xs(1)[0], [w]) is None
    assert G.key(xs(1)[0], [None]) is not None


def test_graphs_are_per_module(G):
    a, b, w = Owner(), Owner(), torch.randn(8, 16).bfloat16()
    x = xs(1)[0]
    for _ in range(3):
        call(G, a, x, w)
        call(G, b, x, w)
    assert G.stats == {"eager": 2, "capture": 2, "replay": 2}
    del a
    gc.collect()
    assert len(G.states) == 1  # a dropped module drops its graph


def test_a_capture_failure_turns_graphs_off_and_the_call_runs_eagerly(G, caplog):
    owner, w = Owner(), torch.randn(8, 16).bfloat16()
    G.backend.fail_capture = True
    with caplog.at_level(logging.WARNING, logger="liteffn"):
        for x in xs(5):
            assert torch.equal(call(G, owner, x, w), want(x, w))
    assert G.disabled and "capture" in G.disabled
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1  # logged once
    assert "CUDA graph capture failed" in caplog.records[0].message
    assert G.key(xs(1)[0], [w]) is None and G.stats == {"eager": 2}


def test_a_replay_failure_turns_graphs_off_and_the_call_runs_eagerly(G, caplog):
    owner, w = Owner(), torch.randn(8, 16).bfloat16()
    x = xs(1)[0]
    call(G, owner, x, w)
    call(G, owner, x, w)
    G.backend.fail_replay = True
    with caplog.at_level(logging.WARNING, logger="liteffn"):
        assert torch.equal(call(G, owner, x, w), want(x, w))
    assert G.disabled and "replay" in G.disabled and len(caplog.records) == 1
    assert not G.states  # graphs freed


def test_env_turns_graphs_off(G, monkeypatch):
    x, w = xs(1)[0], torch.randn(8, 16)
    assert G.key(x, [w]) is not None
    monkeypatch.setenv("LITEFFN_CUDA_GRAPHS", "0")
    assert G.key(x, [w]) is None
    monkeypatch.setenv("LITEFFN_CUDA_GRAPHS", "1")
    G.enabled = False  # the override (benches)
    assert G.key(x, [w]) is None


def test_torch_compile_tracing_bypasses(G, monkeypatch):
    x, w = xs(1)[0], torch.randn(8, 16)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert G.key(x, [w]) is None


def test_only_few_tokens_and_no_grad(G):
    w = torch.randn(8, 16)
    assert G.key(torch.randn(256, 16), [w]) is not None
    assert G.key(torch.randn(2, 128, 16), [w]) is not None
    assert G.key(torch.randn(257, 16), [w]) is None
    assert G.key(torch.randn(0, 16), [w]) is None
    assert G.key(torch.randn(4, 16, requires_grad=True), [w]) is None


def test_the_cuda_backend_refuses_cpu_inputs():
    assert graphs.CudaBackend.device(torch.randn(4, 16)) is None
    assert graphs.Graphs().key(torch.randn(4, 16), [torch.randn(8, 16)]) is None


def test_buffers_kept_between_calls_live_as_long_as_the_graph(G):
    """A graph keeps what keep_alive names during its capture (w4a8's split-K workspace: replaced by a
    larger one later, the old one must not be freed under the graph)."""
    owner, w = Owner(), torch.randn(8, 16).bfloat16()
    bufs = []

    def fn(x2):
        bufs.append(torch.zeros(4))
        graphs.keep_alive(bufs[-1], None)
        return (x2.float() @ w.float().T).to(torch.bfloat16)

    x = xs(1)[0]
    for _ in range(2):
        G.run(owner, G.key(x, [w]), x, fn)  # eager, then warm-up, capture and a replay
    kept = G.states[owner].entry.keep
    assert [id(t) for t in kept] == [id(t) for t in bufs[1:3]]  # warm-up's and capture's, not the eager call's
    graphs.keep_alive(torch.zeros(1))  # outside a capture: nothing to do
    assert len(kept) == 2


# ---------------------------------------------------------------- through the modules (interpreter)
needs_triton = pytest.mark.skipif(not fp8_ffn.available(), reason="triton is not installed")


@pytest.fixture
def fake_graphs(monkeypatch):
    g = graphs.GRAPHS
    monkeypatch.setattr(g, "backend", FakeBackend())
    monkeypatch.setattr(g, "states", weakref.WeakKeyDictionary())
    monkeypatch.setattr(g, "stats", type(g.stats)())
    monkeypatch.setattr(g, "disabled", None)
    monkeypatch.setattr(g, "enabled", True)
    dispatch.set_mode("triton")
    yield g
    dispatch.set_mode(None)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _x(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g).pow(3) * 8).bfloat16()


def _layer(n, k, rank, seed, stats_amax=None):
    g = torch.Generator().manual_seed(seed)
    t = compress_linear(torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, generator=g) / 4, None, rank,
                        "fp8").tensors
    if stats_amax is not None:
        t["input_amax"] = torch.tensor([stats_amax])
    return t


def _ffn(d=64):
    up = CompressedLinear("fp8", d, 4 * d, _layer(4 * d, d, 16, seed=11))
    return CompressedFFN(up, CompressedLinear("fp8", 4 * d, d, _layer(d, 4 * d, 16, seed=12, stats_amax=1.5)))


def _inputs(n, m=26, d=64):
    return [_x(m, d, seed=20 + i).reshape(2, m // 2, d) for i in range(n)]


def _graphs_off(g, fn):
    g.enabled = False
    try:
        return fn()
    finally:
        g.enabled = True


@needs_triton
def test_ffn_module_eager_capture_replay_equals_graphs_off(fake_graphs):
    g = fake_graphs
    ffn = _ffn()
    ins = _inputs(5)
    dispatch.counts.clear()
    ys = [ffn(x) for x in ins]
    assert g.stats == {"eager": 1, "capture": 1, "replay": 3} and dispatch.counts["ffn:triton"] == 5
    zs = [_graphs_off(g, lambda x=x: ffn(x)) for x in ins]  # one-launch act quant, no graph
    for i, (y, z) in enumerate(zip(ys, zs)):
        assert y.shape == z.shape and y.dtype == z.dtype
        assert rel(y, z) < 2e-2, i
        assert all(rel(y, zj) > 0.3 for j, zj in enumerate(zs) if j != i)  # follows its own input


@needs_triton
def test_lora_between_calls_changes_the_output_as_eager(fake_graphs):
    g = fake_graphs
    ffn = _ffn()
    x = _inputs(1)[0]
    before = [ffn(x) for _ in range(3)]
    gen = torch.Generator().manual_seed(5)
    for m in (ffn.up, ffn.down):
        m.set_lora(torch.randn(m.out_features, 6, generator=gen) * 0.3,
                   torch.randn(6, m.in_features, generator=gen) / 8)
    want_lora = _graphs_off(g, lambda: ffn(x))
    after = [ffn(x) for _ in range(3)]  # the graph is stale: eager, capture, replay
    assert g.stats == {"eager": 2, "capture": 2, "replay": 2}
    assert all(rel(y, want_lora) < 2e-2 for y in after) and rel(want_lora, before[0]) > 0.05
    for m in (ffn.up, ffn.down):
        m.set_lora(None)
    assert rel(ffn(x), before[0]) < 1e-6


@needs_triton
def test_linear_module_uses_graphs_too(fake_graphs):
    lin = CompressedLinear("fp8", 64, 96, _layer(96, 64, 16, seed=3))
    ins = _inputs(4)
    ys = [lin(x) for x in ins]
    assert fake_graphs.stats == {"eager": 1, "capture": 1, "replay": 2}
    for x, y in zip(ins, ys):
        assert rel(y, _graphs_off(fake_graphs, lambda x=x: lin(x))) < 1e-2


@needs_triton
def test_reference_mode_never_replays(fake_graphs):
    ffn = _ffn()
    x = _inputs(1)[0]
    for _ in range(3):
        ffn(x)
    dispatch.set_mode("reference")
    dispatch.counts.clear()
    ffn(x)
    assert dispatch.counts == {"ffn:reference": 1} and fake_graphs.stats["replay"] == 1


@needs_triton
def test_moving_a_module_frees_its_graph(fake_graphs):
    """ComfyUI loads and offloads modules with .to(): their graphs go at once, not at the next call."""
    ffn = _ffn()
    x = _inputs(1)[0]
    for _ in range(3):
        ffn(x)
    assert fake_graphs.states[ffn].entry is not None
    ffn.to("cpu")
    assert ffn not in fake_graphs.states
    ffn(x)
    ffn.up(x[..., :64])
    ffn.up.to("cpu")
    assert ffn.up not in fake_graphs.states and fake_graphs.stats["eager"] == 3
