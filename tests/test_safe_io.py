"""Every file LiteFFN writes goes through calibration/safe_io.py: outputs that are inputs,
directories, devices or other kinds of file are refused before any work; the temp beside the
output is created exclusively, never follows a planted link, is removed on errors, SIGTERM and
SIGHUP, and a SIGKILLed writer's is removed by the next write; free space is checked first; the
data is written once (no second copy). Each test checks the message and that nothing is left or lost."""
import errno
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

import liteffn.calibration.checkpoint as checkpoint_mod
from liteffn.calibration import compressed_file as cf
from liteffn.calibration import safe_io, st_writer
from liteffn.calibration.cli import main
from liteffn.calibration.compress import compress_linear
from liteffn.calibration.lowrank import RankPolicy
from liteffn.calibration.stats import ActivationStats, LayerStats, check_stats_output
from _tiny import tiny_checkpoint

P = "model.diffusion_model."
SAFE_IO = safe_io.__file__


def test_worktree_code_is_tested():
    assert os.path.basename(os.path.dirname(SAFE_IO)) == "calibration"
    print("liteffn imported from", os.path.dirname(os.path.dirname(SAFE_IO)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny LTX-2 checkpoint and its statistics file (made once)."""
    _, _, ck, stats = tiny_checkpoint(tmp_path_factory.mktemp("ck"), video_dim=16, audio_dim=8)
    return ck, stats


def _snapshot(*paths):
    return {str(p): (os.lstat(p).st_mode, p.read_bytes() if p.is_file() else None) for p in paths}


def _leftovers(d):
    return [n for n in os.listdir(d) if "liteffn-tmp" in n or n.endswith(".tmp") or n.startswith(".tmp")]


def _no_work(monkeypatch):
    """The compression must not start: refusals come before any work."""
    def boom(*a, **k):
        raise AssertionError("compression started before the output was checked")
    monkeypatch.setattr(checkpoint_mod, "compress_checkpoint", boom)


def _compress(ck, out, *extra):
    return main(["compress", str(ck), "-o", str(out), "--rank", "2", "--device", "cpu", *extra])


def _layer():
    W, x = torch.randn(8, 16), torch.randn(64, 16)
    return compress_linear(W, None, LayerStats(x.T @ x, x.abs().amax(0), 64), RankPolicy(rank=2), "fp8",
                           device="cpu", name="x"), W


# ------------------------------------------------------------------ refused before any work
def test_output_equal_to_source_checkpoint_refused(ckpt, tmp_path, monkeypatch, capsys):
    ck, st = ckpt
    before = _snapshot(ck, st)
    _no_work(monkeypatch)
    assert _compress(ck, ck, "--stats", str(st)) == 2
    err = capsys.readouterr().err
    assert f"-o {ck} is the input {ck}: writing it would destroy the input; give -o another file name" in err
    assert err.count("\n") == 1
    # the same file under other names: a hard link, a symlink, a path with '..'
    os.link(ck, tmp_path / "hard.safetensors")
    os.symlink(ck, tmp_path / "soft.safetensors")
    for other in (tmp_path / "hard.safetensors", tmp_path / "soft.safetensors",
                  ck.parent / ".." / ck.parent.name / ck.name):
        assert _compress(ck, other) == 2
        assert "is the input" in capsys.readouterr().err
    assert _snapshot(ck, st) == before and not _leftovers(ck.parent) and not _leftovers(tmp_path)


def test_output_equal_to_stats_refused(ckpt, monkeypatch, capsys):
    ck, st = ckpt
    before = _snapshot(ck, st)
    _no_work(monkeypatch)
    assert _compress(ck, st, "--stats", str(st)) == 2
    assert f"-o {st} is the input {st}" in capsys.readouterr().err
    assert _snapshot(ck, st) == before and not _leftovers(st.parent)


def test_existing_file_of_another_kind_refused(ckpt, tmp_path, capsys):
    """Compress Model's save_name naming an existing statistics file (its Writer), and the other
    way round (Calibrate's filename naming a compressed file); a model checkpoint is never replaced."""
    ck, st = ckpt
    stats_copy = tmp_path / "stats.safetensors"
    stats_copy.write_bytes(st.read_bytes())
    before = _snapshot(stats_copy, ck)
    with pytest.raises(safe_io.OutputError, match="save_name .* exists and is a LiteFFN statistics file, not a "
                                                  "LiteFFN compressed file: writing would destroy it; give "
                                                  "save_name another file name"):
        cf.Writer(str(stats_copy), "ltx2", option="save_name")
    with pytest.raises(safe_io.OutputError, match="a safetensors file that is not LiteFFN's"):
        cf.Writer(str(ck), "ltx2")  # the Python API, no inputs given: still refused
    comp = tmp_path / "c.safetensors"
    layer, W = _layer()
    with cf.Writer(str(comp), "ltx2") as w:
        w.add("a", layer, W)
    with pytest.raises(safe_io.OutputError, match="filename .* is a LiteFFN compressed file, not a LiteFFN "
                                                  "statistics file"):
        check_stats_output(str(comp), {"a": 16}, option="filename")
    with pytest.raises(safe_io.OutputError, match="is a LiteFFN compressed file"):
        ActivationStats.load(str(st)).save(str(comp))
    assert _snapshot(stats_copy, ck) == before and not _leftovers(tmp_path)
    # overwriting an earlier file of the same kind is fine (re-running a compression)
    with cf.Writer(str(comp), "ltx2") as w:
        w.add("b", layer, W)
    assert set(cf.load(str(comp))[0]) == {"b"}


def test_output_directory_refused(ckpt, tmp_path, monkeypatch, capsys):
    ck, _ = ckpt
    _no_work(monkeypatch)
    d = tmp_path / "outdir"
    d.mkdir()
    assert _compress(ck, d) == 2
    err = capsys.readouterr().err
    assert f"-o {d} is a directory; give -o another file name, e.g. {d}/model-liteffn.safetensors" in err
    assert _compress(ck, str(tmp_path / "new") + "/") == 2
    assert "names a directory" in capsys.readouterr().err
    assert os.listdir(d) == [] and not _leftovers(tmp_path)


def test_merge_stats_output_equal_to_input_refused(ckpt, tmp_path, capsys):
    _, st = ckpt
    before = _snapshot(st)
    assert main(["merge-stats", str(st), str(st), "-o", str(st)]) == 2
    assert f"-o {st} is the input {st}" in capsys.readouterr().err
    assert _snapshot(st) == before and not _leftovers(st.parent)


def test_fifo_and_device_outputs_refused(ckpt, tmp_path, monkeypatch, capsys):
    ck, _ = ckpt
    _no_work(monkeypatch)
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    assert _compress(ck, fifo) == 2  # opening a FIFO would block: refused from its stat
    assert f"-o {fifo} exists and is not a regular file (a device, FIFO or socket)" in capsys.readouterr().err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and not _leftovers(tmp_path)
    if os.geteuid() != 0 and os.path.exists("/dev/null"):  # as root a failure here would replace it
        assert _compress(ck, "/dev/null") == 2
        assert "/dev/null exists and is not a regular file" in capsys.readouterr().err
        assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)
    with pytest.raises(safe_io.OutputError, match="not a regular file"):
        ActivationStats().save(str(fifo))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_dangling_symlink_refused_and_symlinked_output_written_at_target(tmp_path):
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "missing" / "x.safetensors")
    with pytest.raises(safe_io.OutputError, match="is a symbolic link to a missing file"):
        safe_io.check_output(str(tmp_path / "dangling.safetensors"))
    target = tmp_path / "real.safetensors"
    target.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    with safe_io.SafeOutput(str(link)) as o:
        o.file.write(b"data")
    assert link.is_symlink() and target.read_bytes() == b"data" and not _leftovers(tmp_path)


# ------------------------------------------------------------------ free space
def test_free_space_checked_before_work(ckpt, tmp_path, monkeypatch, capsys):
    ck, st = ckpt
    _no_work(monkeypatch)

    class Full:
        f_bavail, f_frsize = 1, 4096

    monkeypatch.setattr(safe_io.os, "statvfs", lambda d: Full)
    out = tmp_path / "o.safetensors"
    assert _compress(ck, out) == 2
    err = capsys.readouterr().err
    assert f"not enough free space for {out}: it needs about" in err and f"{tmp_path} has 0.0 MiB free" in err
    assert "Free some space there or write the output to another disk" in err
    assert main(["merge-stats", str(st), "-o", str(out)]) == 2
    assert "not enough free space" in capsys.readouterr().err
    assert not out.exists() and not _leftovers(tmp_path)


def test_size_estimate_matches_the_file(tmp_path):
    layer, W = _layer()
    out = tmp_path / "c.safetensors"
    with cf.Writer(str(out), "ltx2", expected_layers=3) as w:
        for n in "abc":
            w.add(n, layer, W)
    with open(out, "rb") as f:
        data = os.path.getsize(out) - 8 - int.from_bytes(f.read(8), "little")
    est = cf.estimate_bytes([(8, 16)] * 3, 2, "fp8", bias=False)
    assert data == est - 8 - st_writer.DEFAULT_HEADER_ROOM  # the tensors exactly; the header room at most
    assert os.path.getsize(out) <= est
    s = ActivationStats({"a": LayerStats(torch.eye(16), torch.ones(16), 4)})
    s.save(str(tmp_path / "s.safetensors"))
    from liteffn.calibration.stats import stats_file_bytes

    assert os.path.getsize(tmp_path / "s.safetensors") <= stats_file_bytes({"a": 16}) + 4096


# ------------------------------------------------------------------ disk full mid-write
class _FullAfter:
    """A file whose write raises ENOSPC once limit bytes have gone through."""

    def __init__(self, f, limit):
        self.f, self.left = f, limit

    def write(self, b):
        n = len(memoryview(b).cast("B"))
        if n > self.left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= n
        return self.f.write(b)

    def __getattr__(self, k):
        return getattr(self.f, k)


def test_disk_full_mid_write_keeps_old_output(tmp_path):
    out = tmp_path / "c.safetensors"
    layer, W = _layer()
    with cf.Writer(str(out), "ltx2") as w:
        w.add("old", layer, W)
    old = out.read_bytes()
    w = cf.Writer(str(out), "ltx2")
    w._w._data = _FullAfter(w._w._data, 300)
    with pytest.raises(safe_io.OutputError, match=f"the disk of {out} became full while writing .*nothing was "
                                                  "written .*old file, if any, is as it was"):
        with w:
            for n in "abcdef":
                w.add(n, layer, W)
    assert out.read_bytes() == old and not _leftovers(tmp_path)


def test_disk_full_at_commit_keeps_old_output(tmp_path, monkeypatch):
    out = tmp_path / "s.safetensors"
    s = ActivationStats({"a": LayerStats(torch.eye(4), torch.ones(4), 4)})
    s.save(str(out))
    old = out.read_bytes()

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safe_io.os, "fsync", fsync)
    with pytest.raises(safe_io.OutputError, match="became full"):
        ActivationStats({"b": LayerStats(torch.eye(4), torch.ones(4), 4)}).save(str(out))
    assert out.read_bytes() == old and not _leftovers(tmp_path)


def test_error_in_the_with_block_removes_temp(tmp_path):
    out = tmp_path / "x.bin"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with safe_io.SafeOutput(str(out)) as o:
            o.file.write(b"new")
            assert os.path.exists(o.tmp)
            raise RuntimeError("boom")
    assert out.read_bytes() == b"old" and not _leftovers(tmp_path)


# ------------------------------------------------------------------ the temp file
def test_written_once_and_renamed(tmp_path):
    """No second copy: the temp's inode becomes the output; it lives beside the output under a
    recognisable name, mode from the umask (or the old file's)."""
    out = tmp_path / "c.safetensors"
    w = st_writer.StreamingSafetensorsWriter(str(out))
    tmp = w.temp_path
    assert os.path.dirname(tmp) == str(tmp_path)
    assert os.path.basename(tmp).startswith(f".c.safetensors{safe_io.TMP_TAG}")
    assert _leftovers(tmp_path) == [os.path.basename(tmp)]
    w.add("t", torch.arange(10.0))
    ino = os.stat(tmp).st_ino
    w.close({})
    assert os.stat(out).st_ino == ino and not _leftovers(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~umask
    os.chmod(out, 0o640)
    with safe_io.SafeOutput(str(out)) as o:
        o.file.write(b"x")
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o640


def test_planted_symlink_at_temp_name_is_not_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    tokens = iter(["deadbeef", "0123abcd"])
    monkeypatch.setattr(safe_io.secrets, "token_hex", lambda n: next(tokens))
    planted = tmp_path / f".out.bin{safe_io.TMP_TAG}{safe_io._host()}-{os.getpid()}-deadbeef"
    planted.symlink_to(victim)
    with safe_io.SafeOutput(str(tmp_path / "out.bin")) as o:
        assert o.tmp.endswith("0123abcd")
        o.file.write(b"output")
    assert victim.read_bytes() == b"precious" and os.readlink(planted) == str(victim)
    assert (tmp_path / "out.bin").read_bytes() == b"output"


def test_header_outgrowing_its_room_moves_the_data(tmp_path, monkeypatch):
    monkeypatch.setattr(st_writer, "_CHUNK", 24)  # several chunks, not a multiple of the size
    out = tmp_path / "t.safetensors"
    w = st_writer.StreamingSafetensorsWriter(str(out), header_room=8)
    ts = {f"t{i}": torch.arange(i * 7 + 1, dtype=torch.float32) * (i + 1) for i in range(6)}
    for n, t in ts.items():
        w.add(n, t)
    w.close({"k": "v" * 100})
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"k": "v" * 100}
        for n, t in ts.items():
            assert torch.equal(f.get_tensor(n), t)
    assert not _leftovers(tmp_path)


# ------------------------------------------------------------------ signals and stale temps
_CHILD = r"""
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("safe_io", sys.argv[1])
safe_io = importlib.util.module_from_spec(spec); spec.loader.exec_module(safe_io)
with safe_io.SafeOutput(sys.argv[2]) as o:
    print(o.tmp, flush=True)
    for _ in range(100000):  # about 1 GiB, slowly: killed long before the end
        o.file.write(b"x" * (1 << 14))
        time.sleep(0.001)
"""


def _default_signals():
    # a test run under nohup (or started in the background) hands children SIGHUP / SIGINT ignored, which
    # safe_io rightly leaves ignored: the child starts as from a terminal instead
    for n in ("SIGTERM", "SIGHUP", "SIGINT"):
        if hasattr(signal, n):
            signal.signal(getattr(signal, n), signal.SIG_DFL)


def _spawn(out):
    p = subprocess.Popen([sys.executable, "-c", _CHILD, SAFE_IO, str(out)], stdout=subprocess.PIPE, text=True,
                         preexec_fn=_default_signals if os.name == "posix" else None)
    tmp = p.stdout.readline().strip()
    deadline = time.time() + 10
    while os.path.getsize(tmp) < 1 << 16 and time.time() < deadline:  # mid-write
        time.sleep(0.01)
    return p, tmp


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_signal_mid_write_leaves_no_temp(tmp_path, sig):
    if not hasattr(signal, sig):
        pytest.skip(f"no {sig} here")
    out = tmp_path / "big.bin"
    out.write_bytes(b"old output")
    p, tmp = _spawn(out)
    assert os.path.exists(tmp)
    p.send_signal(getattr(signal, sig))
    assert p.wait(10) == 128 + getattr(signal, sig)  # exited through SystemExit: outer cleanup ran too
    assert out.read_bytes() == b"old output" and not _leftovers(tmp_path)


def test_sigkilled_writers_temp_is_cleaned_at_next_run(tmp_path):
    out = tmp_path / "big.bin"
    p, tmp = _spawn(out)
    p.kill()
    p.wait(10)
    assert os.path.exists(tmp) and not out.exists()  # SIGKILL cannot be caught
    dead = p.pid
    old_names = [f".s.safetensors.{dead}.data.tmp", f".s.safetensors.{dead}.tmp"]  # earlier versions' temps
    for n in old_names:
        (tmp_path / n).write_bytes(b"x")
    keep = [f".big.bin{safe_io.TMP_TAG}{safe_io._host()}-{os.getpid()}-00000000",  # a live writer's
            f".big.bin{safe_io.TMP_TAG}otherhost-{dead}-00000000",  # another machine's (shared disk)
            "unrelated.tmp", ".tmpAbC123"]
    for n in keep:
        (tmp_path / n).write_bytes(b"x")
    with safe_io.SafeOutput(str(out)) as o:
        o.file.write(b"new")
    assert out.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["big.bin"])


def test_handlers_restored_and_ignored_signals_stay_ignored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with safe_io.SafeOutput(str(tmp_path / "a")) as o:
        assert signal.getsignal(signal.SIGTERM) is safe_io._on_signal
        with safe_io.SafeOutput(str(tmp_path / "b")):  # nested: restored when the last one ends
            pass
        assert signal.getsignal(signal.SIGTERM) is safe_io._on_signal
        o.file.write(b"a")
    assert signal.getsignal(signal.SIGTERM) is before
    if hasattr(signal, "SIGHUP"):
        old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            with safe_io.SafeOutput(str(tmp_path / "c")):
                assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        finally:
            signal.signal(signal.SIGHUP, old)


_CHILD_LIMITED = r"""
import importlib.util, os, resource, signal, sys
spec = importlib.util.spec_from_file_location("safe_io", sys.argv[1])
safe_io = importlib.util.module_from_spec(spec); spec.loader.exec_module(safe_io)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # a real limit: files of at most 1 MiB
try:
    with safe_io.SafeOutput(sys.argv[2]) as o:
        for _ in range(64):  # 4 MiB
            o.file.write(b"x" * (1 << 16))
except safe_io.OutputError as e:
    print(e)
    sys.exit(3)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="no file size limits here")
def test_a_real_size_limit_mid_write_keeps_old_output(tmp_path):
    """Not a simulated error: the kernel refuses the write past RLIMIT_FSIZE (as a full disk would)."""
    out = tmp_path / "big.bin"
    out.write_bytes(b"old output")
    p = subprocess.run([sys.executable, "-c", _CHILD_LIMITED, SAFE_IO, str(out)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 3, p.stderr
    assert f"the disk of {out} became full" in p.stdout and "nothing was written" in p.stdout
    assert out.read_bytes() == b"old output" and not _leftovers(tmp_path)
