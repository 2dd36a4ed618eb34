"""The launch machinery of kernels/gemm.py on CPU: the cache key of compiled kernels (what
Triton specializes on), the fast launch through a cached compiled kernel and the fallbacks to
Triton's normal path (mocked kernels: the interpreter has no compiled kernels), and the
promotion interval (LITEFFN_PROMOTE_K) as configs see it."""
import pytest
import torch

from liteffn.kernels import fp8_ffn, gemm

pytestmark = pytest.mark.skipif(not fp8_ffn.available(), reason="triton is not installed")


def test_spec_key_tells_apart_what_triton_specializes_on():
    t = torch.zeros(64, dtype=torch.float32)
    key = lambda *a: gemm.spec_key(a)  # noqa: E731
    assert key(t, 126) != key(t, 128)  # divisible by 16 or not
    assert key(t, 126) == key(t, 130)  # neither: same compiled kernel
    assert key(t, 1) != key(t, 17)  # 1 is a constant
    assert key(t, 2**31) != key(t, 2**31 - 2**4)  # 64-bit
    assert key(t[1:], 16) != key(t, 16)  # data 4 bytes off 16-byte alignment
    assert key(t[4:], 16) == key(t, 16)  # 16 bytes off: aligned
    assert key(t.bfloat16(), 16) != key(t, 16)  # dtype
    assert key(t, 16.0) is None and key(t, True) is None and key(t, None) is None  # no fast launch


class _Param:
    def __init__(self, name, constexpr=False, default=None):
        self.name, self.is_constexpr = name, constexpr
        self.has_default, self.default = default is not None, default


class _Compiled:
    """Stands for triton's CompiledKernel: compiled[grid](*every argument in parameter order)."""

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        assert len(grid) == 3  # its runner reads grid[0], grid[1], grid[2]
        return lambda *args: self.log.append(("fast", grid, args))


class _Kernel:
    """Stands for a @triton.jit kernel: kernel[grid](*args, **constexprs, num_warps=, num_stages=)
    returns its compiled kernel (None under the interpreter)."""

    def __init__(self, names, constexprs, compiled=True):
        self.params = [_Param(n, n in constexprs) for n in names]
        self.log, self.compiled = [], compiled

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.log.append(("normal", grid, args, kw))
            return _Compiled(self.log) if self.compiled else None
        return run


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(gemm, "_FAST_OK", True)
    monkeypatch.setattr(gemm, "_compiled_kernel_type", lambda: _Compiled)
    return gemm.LaunchCache()


def test_launch_kernel_reuses_the_compiled_kernel_per_key(fast):
    k = _Kernel(["X", "M", "K", "BM", "FLAG"], {"BM", "FLAG"})
    x = torch.zeros(256, dtype=torch.float32)
    run = lambda x, m, bm=16: gemm.launch_kernel(k, (3,), (x, m, 64), dict(BM=bm, FLAG=True), cache=fast)  # noqa: E731
    run(x, 126)
    run(x, 126)
    run(x, 110)  # same specialization
    assert [e[0] for e in k.log] == ["normal", "fast", "fast"]
    assert k.log[1][2] == (x, 126, 64, 16, True)  # every argument in parameter order, constexprs last
    run(x, 128)  # divisible by 16: another compiled kernel
    run(x, 1)  # a constant
    run(x[1:], 126)  # unaligned data
    run(x, 126, bm=32)  # another constexpr
    assert [e[0] for e in k.log[3:]] == ["normal"] * 4
    run(x, 96)
    assert k.log[-1][0] == "fast" and fast.stats == {"fast": 3, "normal": 5}


def test_launch_kernel_keeps_the_normal_path_without_a_compiled_kernel(fast, monkeypatch):
    k = _Kernel(["X", "M", "BM"], {"BM"}, compiled=False)  # the interpreter returns no compiled kernel
    x = torch.zeros(16)
    for _ in range(2):
        gemm.launch_kernel(k, (1,), (x, 16), dict(BM=16), cache=fast)
    assert [e[0] for e in k.log] == ["normal", "normal"] and not fast.entries
    k2 = _Kernel(["X", "S", "BM"], {"BM"})
    for _ in range(2):  # a float argument: no key, no fast launch
        gemm.launch_kernel(k2, (1,), (x, 0.5), dict(BM=16), cache=fast)
    assert [e[0] for e in k2.log] == ["normal", "normal"]
    monkeypatch.setattr(gemm, "_FAST_OK", False)  # LITEFFN_FAST_LAUNCH=0, other Triton versions
    k3 = _Kernel(["X", "M", "BM"], {"BM"})
    for _ in range(2):
        gemm.launch_kernel(k3, (1,), (x, 16), dict(BM=16), cache=fast)
    assert [e[0] for e in k3.log] == ["normal", "normal"]


def test_a_failing_fast_launch_falls_back_and_turns_fast_launches_off(fast):
    class _Broken(_Compiled):
        def __getitem__(self, grid):
            def runner(*args):
                raise TypeError("launcher changed")
            return runner

    k = _Kernel(["X", "M", "BM"], {"BM"})
    x = torch.zeros(16)
    gemm.launch_kernel(k, (1,), (x, 16), dict(BM=16), cache=fast)
    next(iter(fast.entries.values())).compiled = _Broken(k.log)
    gemm.launch_kernel(k, (1,), (x, 16), dict(BM=16), cache=fast)
    assert [e[0] for e in k.log] == ["normal", "normal"] and gemm._FAST_OK is False


def test_launch_gemm_fast_path_sets_the_configs_block_shapes(fast):
    """The second launch with a config goes straight to the compiled kernel, with descriptors of
    the block shapes the config's pre_hook sets, and its grid follows M."""
    names = ["a_desc", "b_desc", "c_desc", "SX", "M", "N", "K", "R", "R2", "M_KEY", "BM", "BN", "BK", "PERSIST",
             "EPI_SPLIT", "FLAG"]
    k = _Kernel(names, {"BM", "BN", "BK", "PERSIST", "EPI_SPLIT", "FLAG"})
    interp = dict(BM=16, BN=32, BK=16, PERSIST=False, EPI_SPLIT=True, num_warps=4, num_stages=2)
    g = gemm.GemmKernel(k, None, None, interp, fp8_ffn._set_block_shapes, ("a_desc", "b_desc", "c_desc"))
    a, b = torch.zeros(64, 64, dtype=torch.float8_e4m3fn), torch.zeros(96, 64, dtype=torch.float8_e4m3fn)
    c, sx = torch.zeros(64, 96), torch.ones(64)

    def run(m, cfg):
        gemm.launch_gemm(g, (a[:m], b, c[:m]), (sx, m, 96, 64, 0, 0, gemm.p2(m)), dict(FLAG=False), m, 96,
                         torch.device("cpu"), cfg, cache=fast)

    run(64, dict(BM=32))
    run(48, dict(BM=32))
    assert [e[0] for e in k.log] == ["normal", "fast"]
    _, grid, args = k.log[1]
    assert grid == (2 * 3, 1, 1)  # ceil(48 / 32) x ceil(96 / 32) tiles, one per program
    assert [d.block_shape for d in args[:3]] == [[32, 16], [32, 16], [32, 16]]  # c: half width (EPI_SPLIT)
    assert tuple(args[0].shape) == (48, 64) and args[0].base.data_ptr() == a.data_ptr()
    assert args[3:] == (sx, 48, 96, 64, 0, 0, 64, 32, 32, 16, False, True, False)
    run(48, dict(BM=16))  # another config: its own entry
    assert k.log[-1][0] == "normal"


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


def _triton_binder(kernel):
    """Triton's own argument binder for a kernel (what JITFunction.run specializes with), built
    for sm_90 without a GPU; under the interpreter from the kernel's Python function."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jf = kernel if hasattr(kernel, "params") else JITFunction(kernel.fn)
    return jf, create_function_from_signature(jf.signature, jf.params, make_backend(GPUTarget("cuda", 90, 32)))


def _gemm_call(m, k=256, n=192, r=24, unaligned=False):
    """The FP8 GEMM's launch as scaled_gemm builds it: (descriptor tensors, other args, constexprs)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    xq, q = torch.zeros(m, k, dtype=torch.float8_e4m3fn), torch.zeros(n, k, dtype=torch.float8_e4m3fn)
    sx = torch.ones(m + 1)[1:] if unaligned else torch.ones(m)  # 4 bytes off 16-byte alignment
    u, A = torch.zeros(m, r), torch.zeros(n, r, dtype=torch.bfloat16)
    out, ptrs, sizes, flags = gemm.gemm_operands(xq, sx, n, u, A, None, False, None, None, None, None, torch.bfloat16)
    cfg = fp8_ffn.DEFAULT_CONFIGS[1]
    consts = {**{k_: v for k_, v in cfg.items() if not k_.startswith("num_")}, **flags}
    descs = {nm: TensorDescriptor.from_tensor(t, [16, 16])
             for nm, t in zip(("a_desc", "b_desc", "c_desc"), (xq, q, out))}
    fp8_ffn._set_block_shapes({**descs, **consts})
    ws = cnt = torch.zeros(16)  # split K's workspace and counters (unused at SPLIT_K=1)
    return (xq, q, out), tuple(descs.values()), (sx, q.new_ones(n, dtype=torch.float32), *ptrs, ws, cnt, *sizes), consts


def test_cache_key_is_at_least_as_fine_as_tritons_specialization():
    """Against Triton's own binder on the real kernels: wherever two launches get the same cache key
    they get the same specialization (so one compiled kernel serves both), and the launch arguments
    (the others, then the constexprs) are the kernel's parameters in order."""
    jf, binder = _triton_binder(fp8_ffn._scaled_gemm_kernel)
    seen = []
    for m in (1, 16, 17, 126, 128, 130, 300):
        for unaligned in (False, True):
            tensors, descs, args, consts = _gemm_call(m, unaligned=unaligned)
            bound, spec, _ = binder(*descs, *args, **consts)
            assert list(bound) == [p.name for p in jf.params]
            tail = [p for p in jf.params[len(descs) + len(args):]]
            assert all(p.is_constexpr and p.name in consts for p in tail)
            seen.append((gemm.spec_key(tensors + args), [tuple(s) for s in spec]))
    for ka, sa in seen:
        for kb, sb in seen:
            if ka == kb:
                assert sa == sb
    assert len({k for k, _ in seen}) >= 4  # M: 1 / divisible by 16 / not; sx aligned or not

    jf, binder = _triton_binder(fp8_ffn._act_quant_rows_kernel)
    seen = []
    for m, k, rz in ((126, 2048, 64), (110, 2048, 64), (128, 2048, 64), (1, 2048, 64), (126, 2056, 64),
                     (126, 2048, 1)):
        x, xq, sx = torch.zeros(m, k, dtype=torch.bfloat16), torch.zeros(m, k, dtype=torch.float8_e4m3fn), torch.ones(m)
        B, u, z = torch.zeros(64, k, dtype=torch.bfloat16), torch.zeros(m, 64), torch.zeros(m, rz)
        args = (x, xq, sx, B, u, z, m, k, 64, rz, x.stride(0))
        consts = dict(ROWS=4, BM=16, BK=256, BK2=1024, RP=64, RZP=max(16, gemm.p2(rz)), INTERP=False)
        bound, spec, _ = binder(*args, **consts)
        assert list(bound) == [p.name for p in jf.params]
        seen.append((gemm.spec_key(args), [tuple(s) for s in spec]))
    for ka, sa in seen:
        for kb, sb in seen:
            assert (ka == kb) == (sa == sb)
