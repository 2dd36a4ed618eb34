"""Past one process, on CPU with gloo: statistics reduced across ranks, compression spread over
processes, compressed layers under sequence parallelism (calibration/distributed.py,
checkpoint.compress_rank, seq_parallel.py). Each test starts 2-4 processes."""
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist_workers as W  # noqa: E402
from _tiny import tiny_checkpoint  # noqa: E402

from liteffn.calibration import distributed as D  # noqa: E402
from liteffn.calibration.checkpoint import assign_by_cost, compress_checkpoint, layer_cost  # noqa: E402
from liteffn.calibration.cli import main  # noqa: E402
from liteffn.calibration.stats import ActivationStats, layer_bytes  # noqa: E402

P = "model.diffusion_model."


def _bytes(p):
    with open(p, "rb") as f:
        return f.read()


# ------------------------------------------------------------------ statistics
@pytest.mark.parametrize("world", [2, 3])
def test_reduced_statistics_equal_merged_per_rank_files(tmp_path, world):
    budget = 2 * layer_bytes(128)  # forces several groups: the widest layer (128) alone nearly fills it
    res = D.launch(W.stats_worker, ["cpu"] * world, str(tmp_path), budget)
    assert res[0]["groups"] > 1
    ranks = [str(tmp_path / f"rank{r}.safetensors") for r in range(world)]
    assert main(["merge-stats", *ranks, "-o", str(tmp_path / "merged.safetensors")]) == 0
    merged = _bytes(tmp_path / "merged.safetensors")
    # ordered: rank 0 adds the others' groups in rank order with LayerStats.merge_: the same file
    assert _bytes(tmp_path / "ordered.safetensors") == merged
    a, m = ActivationStats.load(str(tmp_path / "all_reduce.safetensors")), ActivationStats.load(str(tmp_path / "merged.safetensors"))
    assert a.meta == m.meta and a.meta["runs"] == world
    one = ActivationStats.load(ranks[0])
    for n in m.names():
        assert a[n].rows == m[n].rows > one[n].rows and torch.equal(a[n].absmax, m[n].absmax)
        assert a[n].held_seen == m[n].held_seen > one[n].held_seen and 0 < one[n].held_rows < m[n].held_rows
        assert torch.equal(a[n].held, m[n].held)  # every rank's rows, merged in rank order as merge-stats does
        torch.testing.assert_close(a[n].xtx, m[n].xtx, rtol=1e-6, atol=1e-6 * float(m[n].xtx.abs().max()))
    if world == 2:  # one fp32 addition per element, and it commutes: bit for bit
        assert _bytes(tmp_path / "all_reduce.safetensors") == merged
    for r in res:  # every rank raised the same clear error, none hung
        assert "rank 0 has transformer_blocks.1.audio_ff.net.2 and rank %d does not" % (world - 1) \
            in r["errors"]["missing_layer"]


def test_group_plan_respects_budget_and_refuses_a_layer_too_wide():
    widths = {"a": 16384, "b": 4096, "c": 16384, "d": 2048}
    groups = D.plan_groups(widths, 2 << 30)
    assert groups == [["a", "b", "d"], ["c"]]  # first fit, model order: two 1 GiB layers never share 2 GiB
    for g in groups:
        assert sum(layer_bytes(widths[n]) for n in g) <= 2 << 30
    with pytest.raises(ValueError, match="more than the whole budget"):
        D.plan_groups(widths, 1 << 30)


# ------------------------------------------------------------------ compression
def _checkpoint(tmp_path, blocks=2):
    _, _, ck, stats = tiny_checkpoint(tmp_path, blocks=blocks, batches=2, tokens=64)
    return str(ck), str(stats)


@pytest.fixture
def one_thread(monkeypatch):
    """CPU results depend on the thread count: the workers and the one-process run use one."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_compress_on_two_processes_writes_the_same_bytes(tmp_path, one_thread, capsys):
    ckpt, stats = _checkpoint(tmp_path)
    one = tmp_path / "one.safetensors"
    compress_checkpoint(ckpt, str(one), stats, 8, "nvfp4", device="cpu", progress=False)
    two = tmp_path / "two.safetensors"
    assert main(["compress", ckpt, "-o", str(two), "--stats", stats, "--rank", "8", "--format", "nvfp4",
                 "--devices", "cpu,cpu"]) == 0
    out = capsys.readouterr().out
    assert "8 layers" in out and "layers per process: cpu 4" in out, out
    assert _bytes(two) == _bytes(one)
    assert sorted(os.listdir(tmp_path)) == ["ltx2.safetensors", "one.safetensors", "stats.safetensors",
                                            "two.safetensors"]  # no parts or temporary files left


def test_compress_under_torchrun_writes_the_same_bytes(tmp_path, one_thread):
    ckpt, stats = _checkpoint(tmp_path)
    one = tmp_path / "one.safetensors"
    compress_checkpoint(ckpt, str(one), stats, 8, "fp8", device="cpu", progress=False)
    two = tmp_path / "two.safetensors"
    def torchrun(*args):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "liteffn.calibration.cli", "compress", ckpt, "-o", str(two), "--stats", stats,
                               "--device", "cpu", *args], capture_output=True, text=True, timeout=120)

    r = torchrun("--rank", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote") == 1 and "layers per process" in r.stdout  # rank 0 alone reports
    assert _bytes(two) == _bytes(one)
    r = torchrun("--rank", "999")  # an error on the ranks: said once, by rank 0
    assert r.returncode != 0 and r.stderr.count("liteffn: error: rank 999 is larger than layer") == 1, r.stderr[-3000:]


def test_compress_on_devices_fails_cleanly(tmp_path, capsys):
    ckpt, stats = _checkpoint(tmp_path, blocks=1)
    out = str(tmp_path / "o.safetensors")
    assert main(["compress", ckpt, "-o", out, "--devices", f"cuda:{torch.cuda.device_count()}"]) == 2
    assert "does not exist: this machine has" in capsys.readouterr().err
    assert main(["compress", ckpt, "-o", out, "--devices", "gpu0"]) == 2
    assert "'gpu0' is not a device" in capsys.readouterr().err
    assert main(["compress", ckpt, "-o", out, "--devices", "meta,meta"]) == 2
    assert "only cuda:N and cpu" in capsys.readouterr().err
    assert main(["compress", ckpt, "-o", out, "--devices", "cpu,cpu", "--device", "cpu"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    # an error inside the workers: one line naming the rank, no traceback, nothing left behind
    assert main(["compress", ckpt, "-o", out, "--devices", "cpu,cpu", "--rank", "999"]) == 2
    err = capsys.readouterr().err
    assert "rank 999 is larger than layer" in err and "(rank " in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["ltx2.safetensors", "stats.safetensors"]


def test_layers_are_divided_by_cost():
    shapes = {}
    for b in range(48):  # LTX-2 19B's 192 FFN linears
        for s, (d, h) in (("ff", (4096, 16384)), ("audio_ff", (2048, 8192))):
            shapes[f"transformer_blocks.{b}.{s}.net.0.proj"] = (h, d)
            shapes[f"transformer_blocks.{b}.{s}.net.2"] = (d, h)
    costs = {n: layer_cost(*nk) for n, nk in shapes.items()}
    for world in (2, 3, 4, 8):
        owner = assign_by_cost(costs, world)
        assert list(owner) == list(costs) and set(owner.values()) == set(range(world))
        load = [sum(c for n, c in costs.items() if owner[n] == r) for r in range(world)]
        assert max(load) / (sum(load) / world) < 1.01, load
    # the cost model follows the measured times (bench/compress_time_h100.md) with one scale
    t = {"vu": 0.51, "vd": 1.14, "au": 0.14, "ad": 0.24}
    c = {"vu": layer_cost(16384, 4096), "vd": layer_cost(4096, 16384), "au": layer_cost(8192, 2048),
         "ad": layer_cost(2048, 8192)}
    scale = sum(t.values()) / sum(c.values())
    for k in t:
        assert abs(c[k] * scale / t[k] - 1) < 0.11, (k, c[k] * scale, t[k])
    assert assign_by_cost({"a": 5, "b": 5}, 3) == {"a": 0, "b": 1}


# ------------------------------------------------------------------ sequence parallel
@pytest.mark.parametrize("world", [2, 4])
def test_compressed_layers_under_sequence_parallelism(world):
    res = D.launch(W.sp_worker, ["cpu"] * world, 32)
    for r in res:
        assert r["heads_ok"] and r["round_trip"]
        # token-local: the compressed FFN on a shard gives the whole sequence's rows
        assert r["ffn_rel"] < 1e-6, r
        # Ulysses around attention, everything else on the shard: the whole block matches
        assert r["block_rel"] < 1e-5, r
        # the control: attention on the shard alone sees a fraction of the tokens and does not
        assert r["local_rel"] > 1e-2, r
        # uneven token or head splits are refused with a message, on every rank
        assert len(r["uneven"]) == 2 and all("do not split evenly" in m for m in r["uneven"]), r["uneven"]


def test_bench_multi_gpu_runs_on_cpu(tmp_path):
    """bench/multi_gpu.py's --cpu-smoke: every part on 2 gloo processes at tiny sizes."""
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "multi_gpu.py")
    r = subprocess.run([sys.executable, bench, "--cpu-smoke", "--out", str(tmp_path / "mg.md"), "--json",
                        str(tmp_path / "mg.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    import json

    res = json.loads((tmp_path / "mg.json").read_text())
    assert not res["errors"]
    assert [c["identical_bytes"] for c in res["calib"]] == [True, True]
    assert [c["devices"] for c in res["compress"]] == [1, 2] and all(c["identical_to_1"] for c in res["compress"])
    assert res["sp"][0]["ffn_rel_diff"] < 1e-6 and res["sp"][0]["attn_rel_diff"] < 1e-6
    assert "| 2 | ordered | yes |" in (tmp_path / "mg.md").read_text()
