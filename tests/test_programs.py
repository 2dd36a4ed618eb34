"""kernels/programs.py on the CPU: a recorded call becomes a Program whose replays allocate fresh
buffers and pass the C launchers the same arguments relative to them (fake raw launchers: the real
ones need a GPU, tests/test_gpu_fp8.py runs them), and the calls that must not become one."""
import pytest
import torch

from liteffn.kernels import gemm as G
from liteffn.kernels import programs as P

DESC = (128, 1, 0, [16, 16], False, 0)  # a descriptor parameter's kind as gemm._Raw makes it


class FakeRaw:
    """Stands for gemm._Raw: per-parameter kinds, maps made per (address, shape, strides) and expanded as
    Triton expands a descriptor (map, shape, strides), the C launcher's calls noted."""

    def __init__(self, kinds, tail=("C",)):
        self.kinds, self.tail, self.calls, self.maps = tuple(kinds), tail, [], []
        self.function, self.coop, self.pdl, self.packed = 7, False, False, (4, 1, 0)

    def map_of(self, kind, ptr, shape, strides):
        self.maps.append((ptr, tuple(shape), tuple(strides)))
        return (("map", ptr), *shape, *strides)

    launch_flat = G._Raw.launch_flat  # the real one: what it hands the C launcher is checked below

    def c_launch(self, *args):
        assert args[4:13] == (7, False, False, None, None, (4, 1, 0), None, None, None)
        self.calls.append((args[:3], list(args[13:])))


@pytest.fixture(autouse=True)
def no_cuda_stream(monkeypatch):
    monkeypatch.setattr(G, "_raw_stream", lambda dev: 0)


def record(x2, weight, raw1, raw2):
    """A call as fused.py makes one: buffers through gemm.new (one zeroed and viewed in two), two launches."""
    with G.recording() as rec:
        M, K = x2.shape
        sums = G.new((M * 4 + M,), torch.float32, x2.device, zero=True)
        u, amax = sums[:M * 4].view(M, 4), sums[M * 4:]
        xq = G.new((M, K), torch.float32, x2.device)
        G._rec.launch(raw1, (3,), (x2, amax, u, xq, M, K))
        y = G.new((M, weight.shape[0]), torch.float32, x2.device)
        G._rec.launch(raw2, (5, 1), (xq, weight, y, G.scratch(x2.device), M, 7))
    return rec, y


def kinds():
    return FakeRaw([0, 0, 0, 0, 1, 1]), FakeRaw([DESC, DESC, 0, 0, 1, 1])


def test_a_replay_passes_the_recorded_arguments_relative_to_fresh_buffers():
    x2, w = torch.randn(6, 8), torch.randn(5, 8)
    raw1, raw2 = kinds()
    rec, y = record(x2, w, raw1, raw2)
    prog = P.Program.build(rec, x2, y, [w])
    assert prog is not None and raw2.maps == [(w.data_ptr(), (5, 8), (8, 1))]  # the weight's map made once
    assert prog.zs == 256 and prog.ws == 256  # the zeroed sums (120 bytes) and xq (192), each 256-aligned
    x_new = torch.randn(6, 8)
    out = prog.run(x_new)
    assert out.shape == (6, 5) and out.dtype == torch.float32
    (g1, f1), (g2, f2) = raw1.calls[0], raw2.calls[0]
    assert g1 == (3, 1, 1) and g2 == (5, 1, 1)
    x_ptr, amax_ptr, u_ptr, xq_ptr = f1[:4]
    assert x_ptr == x_new.data_ptr() and amax_ptr == u_ptr + 6 * 4 * 4 and f1[4:] == [6, 8, "C"]
    assert len({u_ptr, xq_ptr, out.data_ptr(), x_ptr}) == 4
    assert f2[:5] == [("map", xq_ptr), 6, 8, 8, 1]  # the fresh xq's descriptor
    assert f2[5:10] == [("map", w.data_ptr()), 5, 8, 8, 1]  # the weight's, kept
    assert f2[10:] == [out.data_ptr(), G.scratch(x2.device).data_ptr(), 6, 7, "C"]
    out2 = prog.run(x_new)  # each run its own output
    assert out2.data_ptr() != out.data_ptr()


def test_calls_that_cannot_become_a_program():
    x2, w = torch.randn(6, 8), torch.randn(5, 8)
    raw1, raw2 = kinds()
    rec, y = record(x2, w, raw1, raw2)
    assert P.Program.build(rec, x2, y, []) is None  # the weight is nobody's: its address may not stay valid
    assert P.Program.build(rec, x2, torch.zeros(6, 5), [w]) is None  # output not one of the call's buffers
    rec.launches.append((None, None, None))  # a launch through Triton's own path (a first call compiles)
    assert P.Program.build(rec, x2, y, [w]) is None
    rec, y = record(x2, w, raw1, raw2)
    keep = rec.allocs[1][0]
    rec.allocs.append((keep[:2], False))  # two buffers over the same memory: ambiguous slots
    assert P.Program.build(rec, x2, y, [w]) is None


def test_a_recording_notes_only_its_own_thread_and_never_nests():
    import threading

    with G.recording() as rec:
        t = threading.Thread(target=lambda: G.new((2,), torch.float32, "cpu"))
        t.start()
        t.join()
        with pytest.raises(RuntimeError):
            with G.recording():
                pass
    assert rec.allocs == [] and G._rec is None
    G.new((2,), torch.float32, "cpu")  # no recording: nothing noted, nothing fails


class _Owner:
    pass


def test_programs_record_then_replay_and_give_up_on_calls_that_cannot_repeat(monkeypatch):
    progs = P.Programs()
    owner, key = _Owner(), ("k",)
    w = torch.randn(5, 8)
    raw1, raw2 = kinds()
    calls = []

    def fn(x2):
        calls.append(1)
        M, K = x2.shape
        sums = G.new((M * 4 + M,), torch.float32, x2.device, zero=True)
        xq = G.new((M, K), torch.float32, x2.device)
        G._rec.launch(raw1, (3,), (x2, sums[M * 4:], sums[:M * 4].view(M, 4), xq, M, K)) if G._rec else None
        y = G.new((M, 5), torch.float32, x2.device)
        G._rec.launch(raw2, (5, 1), (xq, w, y, G.scratch(x2.device), M, 7)) if G._rec else None
        return y

    x = torch.randn(2, 3, 8)
    assert progs.replay(owner, key, x) is None
    y = progs.run(owner, key, x, fn, [w])
    assert y.shape == (2, 3, 5) and progs.stats["record"] == 1 and len(calls) == 1
    y2 = progs.replay(owner, key, x)
    assert y2 is not None and y2.shape == (2, 3, 5) and len(calls) == 1 and progs.stats["replay"] == 1
    assert raw2.calls[-1][1][10] == y2.data_ptr()
    progs.drop(owner)  # the module moved
    assert progs.replay(owner, key, x) is None
    # a call that launches another way: recorded a few times (first calls compile), then left eager
    bad = lambda x2: (G.unrepeatable(), fn(x2))[1]  # noqa: E731
    for _ in range(P.TRIES + 2):
        progs.run(owner, ("other",), x, bad, [w])
    assert progs.stats["unrepeatable"] == P.TRIES and progs.replay(owner, ("other",), x) is None


def test_a_failing_replay_turns_programs_off(monkeypatch, caplog):
    progs = P.Programs()
    owner = _Owner()

    class Broken:
        def run(self, x2):
            raise RuntimeError("launcher changed")

    monkeypatch.setattr(P, "Program", Broken)
    progs.states[owner] = {("k",): Broken()}
    assert progs.replay(owner, ("k",), torch.zeros(2, 8)) is None
    assert progs.disabled and not progs.on() and "failed" in caplog.text


def test_split_k_workspace_is_a_constant_of_a_program_and_outlives_its_replacement(monkeypatch):
    """Split K's workspace (zeroed by the kernels after use) is kept for the process: a call that uses it
    becomes a program with its address as a constant, and a larger one that replaces it leaves it allocated
    (a program may still hold that address)."""
    monkeypatch.setattr(G, "_WORKSPACES", {})
    monkeypatch.setattr(G, "_RETIRED", [])
    x2, w = torch.randn(6, 8), torch.randn(5, 8)
    raw = FakeRaw([0, 0, 0, 0, 0, 1])
    with G.recording() as rec:
        ws, cnt = G.split_workspace(x2.device, 6, 5)
        y = G.new((6, 5), torch.float32, x2.device)
        G._rec.launch(raw, (2,), (x2, w, ws, cnt, y, 6))
    prog = P.Program.build(rec, x2, y, [w])
    assert prog is not None
    (_, _, template, patches), = prog.launches
    assert template[2:4] == [ws.data_ptr(), cnt.data_ptr()]  # constants: no patch for them
    assert {p[0] for p in patches} == {0, 4}  # x and the output are the call's own
    old = ws.data_ptr()
    ws2, _ = G.split_workspace(x2.device, 64, 64)  # larger: replaced
    assert ws2.data_ptr() != old and G._RETIRED[0][0].data_ptr() == old and old in G.PERSISTENT
