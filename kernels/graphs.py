"""CUDA-graph replay of few-token compressed calls (CompressedFFN / CompressedLinear at M <= 256).

Why: ComfyUI calls each FFN from Python, without CUDA graphs. At M=126 (LTX-2's audio FFN,
2048->8192->2048, 48 calls per step) the dense bf16 FFN costs 43 us of host time per call and
CompressedFFN.forward 268 us (fused.ffn alone 197 us: each Triton launch is 30-45 us of Python
even through gemm.py's cached fast path), for about 40 us of device work; H200,
bench/host_overhead.py. Replaying a captured graph of the whole fused call costs one copy in,
one graph launch and one copy out.

How: per module (its identity; weakly held, so a dropped module drops its graph) at most one
graph, for one key:

    key = (x.shape (so M), x.dtype, x's device, then per kernel operand tensor of the module
           (weights, scales, factors incl. a runtime LoRA's, bias, h_scale, in a fixed order,
           None where absent): data_ptr, shape, dtype)

The graph reads the operands by address, so a key that matches means the module's current
tensors are where the graph reads them, whatever happened in between (values changed in place
are read as they are now). Calls:
  - first call with a key: eager, through the same function that will be captured (Triton
    compiles and autotunes there; autotuning must never run inside a capture);
  - second consecutive call with the same key: warm-up on a side stream (lazy initializations,
    a new specialization of a kernel for the static buffer's alignment), then capture into a
    torch.cuda.CUDAGraph (thread-local capture mode: other threads may keep using CUDA), replay;
  - later calls with that key: static_x.copy_(x), replay, a copy of the static output (callers
    keep outputs; the static buffer is never handed out).
A capture costs a device synchronize and an emptied allocator cache (torch.cuda.graph's entry)
once per module and key: in a ComfyUI run, during its second sampling step.
Invalidation: a call whose key differs from the graph's frees the graph (ComfyUI reloaded the
weights to new addresses, a LoRA was set or cleared, another token count) and starts over with
the new key; moving or casting the module (nn.Module._apply: ComfyUI loading or offloading it)
frees it at once. The tensors are not referenced by the graph's entry: an offloaded module's GPU
weights are freed as usual. Buffers that the kernels keep between calls (w4a8's split-K
workspace, which can be replaced by a larger one) are kept alive by the graph that captured
them (keep_alive).
No graph (eager call, as without graphs; programs.py then repeats the call's recorded launches):
LITEFFN_CUDA_GRAPHS=0; more than MAX_M tokens; under
torch.compile tracing (the custom ops run there); an input on the CPU, on another GPU than the
current one, needing grad, or a stream already capturing (someone else's graph); a module whose
tensors are not all on x's device (partially loaded model: modules.py copies them per call, new
addresses every call). A key seen on two calls in a row is needed to capture, so operands at new
addresses on every call never capture either. Any exception in a capture or replay is logged once,
turns graphs off for the process, and the call runs eagerly: a workflow never fails for a graph.

Device work in a graph: the kernels' default launches (act_quant_lowrank picks its variant by device
time: at M=126 on the H200 one launch per row without a low rank, two launches with one).

Memory per module with a graph (M <= 256 tokens; FFN dim -> hidden -> dim, a linear K -> N): the
static input, M x dim in x's dtype, outside the graph; the graph's private pool, holding the static
output (M x dim, bf16/fp16) and the intermediates (FP8 codes of x, M x dim, and of h, M x hidden;
fp32 scales and low-rank sums, M x (r + r2 + 2); without a calibrated hidden scale also h in bf16,
M x hidden x 2), in the caching allocator's 2 MiB segments. Audio FFN (2048 -> 8192, r=64) at
M=256, bf16: input 1 MiB + pool about 4 MiB (output 1, codes 0.5 + 2, sums 0.1). Video FFN
(4096 -> 16384) at M=256: 2 MiB + about 8 MiB. Over LTX-2's 48 blocks at most about 250 MiB
(audio) or 500 MiB (video, only if it ever runs at <= 256 tokens); about half at M=126.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import Counter

import torch

log = logging.getLogger("liteffn")

ENV = "LITEFFN_CUDA_GRAPHS"
MAX_M = 256  # tokens; larger calls launch eagerly (device time covers more of the host time, buffers grow with M)

_capturing = threading.local()  # .keep: the list of buffers the capture underway must keep alive


def keep_alive(*tensors) -> None:
    """For kernels' buffers that outlive a call and may be replaced later (w4a8's split-K workspace):
    the graph being captured, if any (this thread), keeps them alive so its replays never write to
    freed memory."""
    keep = getattr(_capturing, "keep", None)
    if keep is not None:
        keep.extend(t for t in tensors if t is not None)


def operand_key(x: torch.Tensor, operands, dev: int) -> tuple | None:
    """(x.shape, x.dtype, dev, then per operand tensor data_ptr, shape, dtype; None where absent), or
    None if an operand is not on device dev (offloaded: copied to x's device per call, at new addresses)."""
    key = [x.shape, x.dtype, dev]
    add = key.append
    for t in operands:
        if t is None:
            add(None)
        elif t.get_device() != dev:
            return None
        else:
            add(t.data_ptr())
            add(t.shape)
            add(t.dtype)
    return tuple(key)


class CudaBackend:
    """What Graphs needs from CUDA; tests replace it with a fake."""

    @staticmethod
    def device(x: torch.Tensor) -> int | None:
        """x's device index if a graph may serve x now, else None."""
        if not x.is_cuda:
            return None
        d = x.get_device()
        # replay launches on the current device's stream; inside someone else's capture, graph
        # capture (and its synchronize) would break theirs: run eagerly, which they can capture
        if d != torch.cuda.current_device() or torch.cuda.is_current_stream_capturing():
            return None
        return d

    @staticmethod
    def capture(fn, static_x: torch.Tensor):
        """(graph with .replay(), static output) of fn(static_x), as torch.cuda.graphs documents:
        warm-up on a side stream, then capture."""
        prev = torch.cuda.current_stream(static_x.device)
        try:
            s = torch.cuda.Stream(static_x.device)
            s.wait_stream(prev)
            with torch.cuda.stream(s):
                fn(static_x)
            prev.wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, capture_error_mode="thread_local"):
                out = fn(static_x)
        finally:
            # torch.cuda.graph's __exit__ leaves its capture stream current if capture_end raises
            torch.cuda.set_stream(prev)
        return g, out


class _Entry:
    """A captured call: graph, static input viewed as x's shape, static output viewed as the
    call's output shape, buffers to keep alive."""
    __slots__ = ("key", "graph", "x_in", "out", "cast", "keep")

    def __init__(self, key, graph, x_in, out, cast, keep):
        self.key, self.graph, self.x_in, self.out, self.cast, self.keep = key, graph, x_in, out, cast, keep

    def run(self, x: torch.Tensor) -> torch.Tensor:
        self.x_in.copy_(x)
        self.graph.replay()
        return self.out.to(x.dtype) if self.cast else self.out.clone()


class _State:
    __slots__ = ("entry", "pending")

    def __init__(self):
        self.entry = None  # _Entry or None
        self.pending = None  # the key of the previous call, run eagerly


class Graphs:
    """Per-module graphs of few-token calls (the module docstring has the policy).

    modules.py: key = key(x, operands); if key is not None: replay(module, key, x), and when
    that gives None (no graph for this key yet) and the Triton path is chosen, run(module, key,
    x, fn) with fn(x2 [M, K]) -> [M, N] the fused call on the module's operands."""

    def __init__(self, backend=None, max_m: int = MAX_M):
        self.backend = CudaBackend() if backend is None else backend
        self.max_m = max_m
        self.enabled: bool | None = None  # None: LITEFFN_CUDA_GRAPHS decides (default on)
        self.disabled: str | None = None  # why graphs were turned off for this process
        self.states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> _State
        self.stats: Counter = Counter()  # eager, capture, replay

    def on(self) -> bool:
        if self.disabled is not None:
            return False
        return self.enabled if self.enabled is not None else os.environ.get(ENV, "1") != "0"

    def key(self, x: torch.Tensor, operands) -> tuple | None:
        """The graph key of a call on x with these operand tensors (None entries allowed), or None
        when the call must run eagerly."""
        # is_compiling first: under torch.compile, dynamo traces no more of this than that
        if torch.compiler.is_compiling() or not self.on() or x.dim() == 0 or x.requires_grad:
            return None
        k = x.shape[-1]
        if k == 0 or not 0 < x.numel() // k <= self.max_m:
            return None
        dev = self.backend.device(x)
        if dev is None:
            return None
        return operand_key(x, operands, dev)

    def replay(self, owner, key: tuple, x: torch.Tensor) -> torch.Tensor | None:
        """The output of owner's graph for key on x, or None when there is none (or it failed)."""
        st = self.states.get(owner)
        e = None if st is None else st.entry
        if e is None or e.key != key:
            return None
        try:
            y = e.run(x)
        except Exception as ex:  # noqa: BLE001
            self._disable("replay", ex)
            return None
        self.stats["replay"] += 1
        return y

    def run(self, owner, key: tuple, x: torch.Tensor, fn) -> torch.Tensor:
        """A call with no graph for its key: eagerly the first time in a row, else capture and replay.
        Returns fn's output in x's leading shape and x's dtype. fn's own failures propagate (the
        caller falls back to the reference); the graph's are handled here."""
        y = self.replay(owner, key, x)
        if y is not None:
            return y
        x2 = x.reshape(-1, x.shape[-1])
        if self.disabled is not None:  # (a replay just failed)
            self.stats["eager"] += 1
            return _shaped(fn(x2.contiguous()), x)
        st = self.states.get(owner)
        if st is None:
            st = self.states[owner] = _State()
        st.entry = None  # a stale graph: freed now, not when a new one is ready
        if st.pending != key:
            st.pending = key
            self.stats["eager"] += 1
            return _shaped(fn(x2.contiguous()), x)
        st.pending = None
        try:
            entry = self._capture(key, x, x2, fn)
            y = entry.run(x)
        except Exception as ex:  # noqa: BLE001
            self._disable("capture", ex)
            self.stats["eager"] += 1
            return _shaped(fn(x2.contiguous()), x)
        st.entry = entry
        self.stats["capture"] += 1
        return y

    def _capture(self, key, x, x2, fn) -> _Entry:
        with torch.inference_mode(False):  # a normal tensor: copy_ into it works in and out of inference mode
            static_x = torch.empty(x2.shape, device=x2.device, dtype=x2.dtype)
        static_x.copy_(x2)
        keep: list = []
        _capturing.keep = keep
        try:
            graph, out = self.backend.capture(fn, static_x)
        finally:
            _capturing.keep = None
        # .view, never .reshape: a copy would be an output that replays do not update
        out = out.view(*x.shape[:-1], out.shape[-1])
        return _Entry(key, graph, static_x.view(x.shape), out, out.dtype != x.dtype, keep)

    def drop(self, owner) -> None:
        """Free owner's graph now (its tensors are being moved or cast: modules' _apply), rather than
        at its next call, so that an offloaded module holds no graph memory."""
        self.states.pop(owner, None)

    def _disable(self, what: str, ex: Exception) -> None:
        if self.disabled is None:
            self.disabled = f"{what}: {type(ex).__name__}: {ex}"
            log.warning("LiteFFN: CUDA graph %s failed (%s); few-token calls run without graphs from now on "
                        "(same results, more host time per call)", what, self.disabled.splitlines()[0][:300])
        self.clear()

    def clear(self) -> None:
        """Free every graph (their keys start over)."""
        self.states = weakref.WeakKeyDictionary()


def _shaped(y2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    y = y2.reshape(*x.shape[:-1], y2.shape[-1])
    return y if y.dtype == x.dtype else y.to(x.dtype)


GRAPHS = Graphs()
