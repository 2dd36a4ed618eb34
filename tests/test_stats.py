import os

import pytest
import torch

from liteffn.calibration.stats import ActivationStats, LayerStats, StatsCollector, layer_bytes, plan_passes
from liteffn.calibration.synthetic import SyntheticLTX2
from liteffn.calibration import ltx2


def _model():
    return SyntheticLTX2(blocks=2, video_dim=32, audio_dim=16, seed=0)


def _run(model, batches, seed0=0, names=None, **kw):
    names = names or ltx2.select(n for n, _ in model.named_modules())
    with StatsCollector(model, names, **kw) as col, torch.no_grad():
        for i in range(batches):
            model(model.video_acts.sample(64, seed0 + i), model.audio_acts.sample(16, seed0 + i))
    return col.stats


def test_collector_matches_direct_computation():
    m = _model()
    x = m.video_acts.sample(64, 0)
    with StatsCollector(m, ["transformer_blocks.0.ff.net.0.proj"]) as col, torch.no_grad():
        m.transformer_blocks[0].ff(x)
    s = col.stats["transformer_blocks.0.ff.net.0.proj"]
    torch.testing.assert_close(s.xtx, x.T @ x, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(s.absmax, x.abs().amax(0))
    assert s.rows == 64


def test_down_linear_run_without_its_module_is_counted_once():
    """ComfyUI 0.33 runs an int8 (int8-ConvRot) FFN's down linear as a kernel with the GELU folded in, never
    calling the module (comfy.ops.linear_input_act): its statistics come from the up linear's output then,
    the same rows as when the module runs, each once; chunked calls too."""
    m = _model()
    ff = m.transformer_blocks[0].ff
    names = [f"transformer_blocks.0.ff.{ltx2.UP}", f"transformer_blocks.0.ff.{ltx2.DOWN}"]
    x = m.video_acts.sample(64, 0)
    stock = _ff_stats(m, names, lambda: ff(x))
    up, down = ff.net[0].proj, ff.net[2]

    def fused(h):  # the down linear computed without calling its module
        return torch.nn.functional.linear(torch.nn.functional.gelu(up(h), approximate="tanh"), down.weight, down.bias)
    ff.forward = fused
    for chunks in (1, 4):
        got = _ff_stats(m, names, lambda: torch.cat([ff(c) for c in x.chunk(chunks)]))
        for n in names:
            assert got[n].rows == stock[n].rows == 64, (chunks, n)
            torch.testing.assert_close(got[n].xtx, stock[n].xtx, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(got[n].absmax, stock[n].absmax)
    ff.forward = lambda h: torch.cat([ff.net(c) for c in h.chunk(4)])  # chunked through the modules: once each
    got = _ff_stats(m, names, lambda: ff(x))
    assert got[names[1]].rows == 64
    torch.testing.assert_close(got[names[1]].xtx, stock[names[1]].xtx, rtol=1e-5, atol=1e-4)


def _ff_stats(m, names, run):
    with StatsCollector(m, names) as col, torch.no_grad():
        run()
    return col.stats


def test_merged_statistics_equal_statistics_of_the_union():
    m = _model()
    a, b = _run(m, 2, seed0=0), _run(m, 3, seed0=2)
    union = _run(m, 5, seed0=0)
    merged = a.merge_(b)
    for n in union.names():
        assert merged[n].rows == union[n].rows
        torch.testing.assert_close(merged[n].xtx, union[n].xtx, rtol=1e-5, atol=1e-2)
        assert torch.equal(merged[n].absmax, union[n].absmax)


def test_save_load_round_trip_and_merge_from_disk(tmp_path):
    m = _model()
    s = _run(m, 2)
    p = tmp_path / "stats.safetensors"
    s.save(str(p))
    back = ActivationStats.load(str(p))
    assert back.names() == s.names()
    for n in s.names():
        assert torch.equal(back[n].xtx, s[n].xtx) and back[n].rows == s[n].rows
    only = ActivationStats.load(str(p), names=[s.names()[0]])
    assert only.names() == [s.names()[0]]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    s = _run(_model(), 1)
    p = tmp_path / "stats.safetensors"
    s.save(str(p))
    data = p.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt|not a readable"):
        ActivationStats.load(str(bad))
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a LiteFFN"):
        ActivationStats.load(str(foreign))
    with pytest.raises(FileNotFoundError):
        ActivationStats.load(str(tmp_path / "missing.safetensors"))


def test_nan_activations_and_nan_statistics_are_refused(tmp_path):
    m = _model()
    x = m.video_acts.sample(8, 0)
    x[3, 2] = float("nan")
    with StatsCollector(m, ["transformer_blocks.0.ff.net.0.proj"]) as col, torch.no_grad():
        with pytest.raises(ValueError, match="non-finite"):
            m.transformer_blocks[0].ff(x)
    s = ActivationStats({"a": LayerStats(torch.full((4, 4), float("nan")), torch.zeros(4), 3)})
    with pytest.raises(ValueError, match="NaN"):
        s.save(str(tmp_path / "nan.safetensors"))
    assert not os.path.exists(tmp_path / "nan.safetensors")


def test_fp32_accumulation_is_accurate():
    """The documented choice: fp32 accumulators stay within ~1e-5 of an fp64 sum."""
    g = torch.Generator().manual_seed(0)
    k = 64
    acc32, acc64 = torch.zeros(k, k), torch.zeros(k, k, dtype=torch.float64)
    for _ in range(400):
        x = torch.randn(256, k, generator=g) * torch.logspace(-1, 1, k)
        acc32 += x.T @ x
        acc64 += x.double().T @ x.double()
    rel = float((acc32.double() - acc64).norm() / acc64.norm())
    assert rel < 1e-5


def test_memory_budget_plans_passes_and_is_respected():
    widths = {"v_up": 4096, "v_down": 16384, "a_up": 2048, "a_down": 8192} | {f"x{i}": 16384 for i in range(3)}
    budget = 2 << 30
    groups = plan_passes(widths, budget, chunk_rows=4096)
    assert sorted(n for g in groups for n in g) == sorted(widths)
    for g in groups:
        need = sum(layer_bytes(widths[n]) for n in g) + 4096 * max(widths[n] for n in g) * 4
        assert need <= budget
    assert len(groups) >= 3  # four 1 GiB layers cannot share 2 GiB
    with pytest.raises(ValueError, match="more than the whole budget"):
        plan_passes({"huge": 32768}, budget)


def test_collector_refuses_over_budget_and_group_passes_equal_one_pass():
    m = _model()
    names = ltx2.select(n for n, _ in m.named_modules())
    widths = {n: m.get_submodule(n).in_features for n in names}
    total = sum(layer_bytes(k) for k in widths.values()) + 64 * max(widths.values()) * 4
    with pytest.raises(MemoryError, match="plan_passes"):
        StatsCollector(m, names, budget_bytes=total - 1, chunk_rows=64)
    budget = total // 2
    groups = plan_passes(widths, budget, chunk_rows=64)
    assert len(groups) > 1
    merged = ActivationStats()
    for g in groups:
        col_stats = _run(m, 3, names=g, budget_bytes=budget, chunk_rows=64)
        assert col_stats.nbytes() <= budget
        merged.merge_(col_stats)
    single = _run(m, 3, names=names)
    for n in names:
        torch.testing.assert_close(merged[n].xtx, single[n].xtx)


def test_chunked_update_equals_one_shot():
    m = _model()
    x = m.video_acts.sample(100, 0)
    name = "transformer_blocks.0.ff.net.0.proj"
    outs = []
    for chunk in (7, 1000):
        with StatsCollector(m, [name], chunk_rows=chunk) as col, torch.no_grad():
            m.transformer_blocks[0].ff(x)
        outs.append(col.stats[name].xtx)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-3)


def test_collector_without_a_model_hooks_whatever_tree_it_is_given():
    """for_widths + attach/detach: a host (ComfyUI) may swap modules between calls."""
    torch.manual_seed(0)
    col = StatsCollector.for_widths({"lin": 8})
    root = torch.nn.Module()
    root.lin = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8)
    root.lin(x)  # not attached: not counted
    col.attach(root)
    root.lin(x)
    col.detach()
    root.lin(x)
    s = col.stats["lin"]
    assert s.rows == 5
    torch.testing.assert_close(s.xtx, x.T @ x)
