"""`liteffn` as a user meets it: one line and exit code 2 for every failure, 130 on Ctrl-C, help on
every option, conflicting options refused, progress and the no-statistics fallback said."""
import argparse
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from _tiny import tiny_checkpoint

from liteffn.calibration import checkpoint
from liteffn.calibration.cli import build_parser, main

P = "model.diffusion_model."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny LTX-2-layout checkpoint, its statistics, and broken variants."""
    d = tmp_path_factory.mktemp("cli")
    _, sd, _, _ = tiny_checkpoint(d, "ck.safetensors")
    save_file({k: (v.to(torch.int8) if k.endswith("net.2.weight") else v) for k, v in sd.items()},
              str(d / "int8.safetensors"))
    data = (d / "ck.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (d / "notes.safetensors").write_text("hello, not a tensor file\n")
    (d / "folder.safetensors").mkdir()
    return {p.stem: str(p) for p in d.iterdir()}


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _run(capsys, *argv):
    rc = main(list(argv))
    return rc, capsys.readouterr()


def test_no_arguments_prints_the_commands(capsys):
    rc, o = _run(capsys)
    assert rc == 2 and "give a command: demo | compress | merge-stats" in o.err
    assert all(c in o.err for c in ("demo", "compress", "merge-stats")) and "cmd" not in o.err.replace("COMMAND", "")


def _parsers(p):
    yield p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                yield from _parsers(sp)


def test_every_option_and_command_has_help():
    for p in _parsers(build_parser()):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                assert all(c.help for c in a._choices_actions), p.prog
            else:
                assert a.help and a.help != argparse.SUPPRESS, (p.prog, a.option_strings or a.dest)


@pytest.mark.parametrize("args, says", [
    (["demo", "--blocks", "0"], "--blocks: 0: must be >= 1"),
    (["demo", "--video-dim", "40"], "multiple of 32"),
    (["demo", "--audio-dim", "32", "--ranks", "64"], "rank 64 is larger than the smallest layer"),
    (["demo", "--formats", "int3"], "invalid choice"),
    (["compress", "{ck}", "-o", "{out}", "--damp", "0"], "--damp: 0: must be > 0"),
    (["compress", "{ck}", "-o", "{out}", "--damp", "nan"], "finite"),
    (["compress", "{ck}", "-o", "{out}", "--rank", "-5"], "--rank: -5: must be >= 0"),
    (["compress", "{ck}", "-o", "{out}", "--energy", "0.5", "--max-rank", "-5"], "--max-rank: -5: must be >= 1"),
    (["compress", "{ck}", "-o", "{out}", "--energy", "2"], "in (0, 1]"),
    (["compress", "{ck}", "-o", "{out}", "--energy", "0.5", "--rank", "8"], "not both"),
    (["compress", "{ck}", "-o", "{out}", "--max-rank", "8"], "--max-rank caps the rank --energy or --match-fp8 chooses"),
    (["compress", "{ck}", "-o", "{out}", "--device", "cpu", "--devices", "cpu,cpu"], "not allowed with"),
    (["compress", "{ck}"], "required: -o/--out"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_values_and_conflicts_are_refused_in_one_line(files, tmp_path, capsys, args, says):
    args = [a.format(ck=files["ck"], out=str(tmp_path / "o.safetensors")) for a in args]
    rc, o = _run(capsys, *args)
    assert rc == 2 and says in _one_line(o.err), o.err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("which, says", [
    ("truncated", "truncated or corrupt"), ("notes", "not a readable .safetensors"),
    ("folder", "is a folder"), ("missing", "no such file"),
])
def test_bad_input_files_are_named(files, tmp_path, capsys, which, says):
    path = files.get(which, str(tmp_path / "missing.safetensors"))
    out = str(tmp_path / "o.safetensors")
    for argv in (["compress", path, "-o", out], ["compress", files["ck"], "--stats", path, "-o", out],
                 ["merge-stats", files["stats"], path, "-o", out]):
        rc, o = _run(capsys, *argv)
        line = _one_line(o.err)
        assert rc == 2 and path in line and says in line, line
    assert not os.listdir(tmp_path)


def test_unwritable_output_folder_fails_before_the_work(files, tmp_path, capsys):
    rc, o = _run(capsys, "compress", files["ck"], "-o", str(tmp_path / "nope" / "o.safetensors"), "--device", "cpu")
    assert rc == 2 and "the folder" in _one_line(o.err) and "does not exist" in o.err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root ignores the mode bits: /sys takes no new file, even for root
            ro = "/sys"
            try:
                open("/sys/liteffn-probe", "wb").close()
                pytest.skip("no read-only folder here")
            except OSError:
                pass
        rc, o = _run(capsys, "compress", files["ck"], "-o", os.path.join(ro, "o.safetensors"), "--device", "cpu")
        line = _one_line(o.err)
        assert rc == 2 and f"cannot write {os.path.join(ro, 'o.safetensors')}" in line and "-o" in line, line
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_device_cuda_without_cuda(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = str(tmp_path / "o.safetensors")
    rc, o = _run(capsys, "compress", files["ck"], "-o", out, "--device", "cuda")
    line = _one_line(o.err)
    assert rc == 2 and "--device cuda: no CUDA here" in line and "--device cpu" in line
    rc, o = _run(capsys, "compress", files["ck"], "-o", out, "--device", "gpu0")
    assert rc == 2 and "is not a device" in _one_line(o.err)
    assert not os.listdir(tmp_path)


def test_int8_weights_are_one_line(files, tmp_path, capsys):
    rc, o = _run(capsys, "compress", files["int8"], "-o", str(tmp_path / "o.safetensors"), "--device", "cpu",
                 "--rank", "4", "--stats", files["stats"])
    err = o.err.replace("\r", "\n")
    line = [ln for ln in err.splitlines() if ln.startswith("liteffn: error:")]
    assert rc == 2 and len(line) == 1 and "int8" in line[0] and "Traceback" not in err, err
    assert not os.listdir(tmp_path)


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(files, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(checkpoint, "compress_checkpoint", boom)
    argv = ["compress", files["ck"], "-o", str(tmp_path / "o.safetensors"), "--stats", files["stats"]]
    rc, o = _run(capsys, *argv)
    line = _one_line(o.err)
    assert rc == 2 and "RuntimeError: boom second line" in line and "--debug" in line
    rc, o = _run(capsys, *argv, "--debug")
    assert rc == 2 and "Traceback" in o.err and o.err.strip().splitlines()[-1].startswith("liteffn: error: Runtime")
    rc, o = _run(capsys, "--debug", *argv)  # before the command as well
    assert rc == 2 and "Traceback" in o.err


@pytest.mark.parametrize("errno, says", [(28, "No space left on device"), (30, "Read-only file system")])
def test_os_errors_during_the_work_are_one_line(files, tmp_path, capsys, monkeypatch, errno, says):
    def full(*a, **k):
        raise OSError(errno, os.strerror(errno))

    monkeypatch.setattr(checkpoint, "compress_checkpoint", full)
    out = str(tmp_path / "o.safetensors")
    rc, o = _run(capsys, "compress", files["ck"], "-o", out, "--stats", files["stats"])
    line = _one_line(o.err)
    assert rc == 2 and says in line and out in line and "elsewhere with -o" in line, line


def test_without_stats_it_says_plain_svd_and_which_error(files, tmp_path, capsys):
    rc, o = _run(capsys, "compress", files["ck"], "-o", str(tmp_path / "a.safetensors"), "--rank", "4",
                 "--device", "cpu")
    assert rc == 0 and "no --stats: every layer gets plain SVD and round-to-nearest" in o.err
    assert "Frobenius, of the weights: no statistics" in o.out
    rc, o = _run(capsys, "compress", files["ck"], "-o", str(tmp_path / "b.safetensors"), "--rank", "4",
                 "--device", "cpu", "--stats", files["stats"])
    assert rc == 0 and "no --stats" not in o.err and "R-weighted" in o.out


def test_with_held_out_rows_it_prints_the_output_error_users_get(tmp_path, capsys):
    from liteffn.calibration.compressed_file import read_meta
    from liteffn.calibration.demo import calibrate

    m, _, ck, _ = tiny_checkpoint(tmp_path, "ck.safetensors")
    calibrate(m, 2, 256, holdout_rows=32).save(str(tmp_path / "held.safetensors"))
    out = str(tmp_path / "o.safetensors")
    rc, o = _run(capsys, "compress", str(ck), "-o", out, "--rank", "4", "--device", "cpu",
                 "--stats", str(tmp_path / "held.safetensors"))
    assert rc == 0 and "output error on held-out rows" in o.out and "without statistics" in o.out, o.out
    held = read_meta(out)["heldout"]
    assert f"total {100 * held['total']:.2f}%" in o.out and held["total"] < held["plain_total"]


def test_match_fp8_chooses_a_rank_per_layer_and_says_how_many_met_it(tmp_path, capsys):
    from liteffn.calibration.compressed_file import load
    from liteffn.calibration.demo import calibrate

    m, _, ck, _ = tiny_checkpoint(tmp_path, "ck.safetensors")
    calibrate(m, 2, 256, holdout_rows=32).save(str(tmp_path / "held.safetensors"))
    out = str(tmp_path / "o.safetensors")
    rc, o = _run(capsys, "compress", str(ck), "-o", out, "--rank", "4", "--format", "nvfp4", "--device", "cpu",
                 "--stats", str(tmp_path / "held.safetensors"), "--match-fp8", "1.5", "--max-rank", "16")
    assert rc == 0 and "1.5x the FP8 residual's held-out error at rank 4" in o.out, o.out
    layers, _ = load(out)
    assert {li.info["match"]["target"] for li in layers.values()} == {1.5}
    assert all(li.info["rank"] in (0, 4, 16) for li in layers.values())  # 4 -/+ 16, capped at 16
    assert all(li.info["match"]["met"] == (li.info["match"]["ratio"] <= 1.5) for li in layers.values())
    for args, says in ((["--match-fp8", "1.5"], "give --stats"),
                       (["--match-fp8", "0"], "must be > 0"),
                       (["--match-fp8", "1.5", "--energy", "0.5", "--stats", str(tmp_path / "held.safetensors")],
                        "not with --energy")):
        rc, o = _run(capsys, "compress", str(ck), "-o", str(tmp_path / "x.safetensors"), "--device", "cpu", *args)
        assert rc == 2 and says in _one_line(o.err), o.err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_compression_that_changes_nothing_is_refused_and_one_larger_than_dense_is_flagged(files, tmp_path, capsys):
    out = tmp_path / "noop.safetensors"
    rc, o = _run(capsys, "compress", files["ck"], "-o", str(out), "--rank", "0", "--format", "bf16", "--device", "cpu")
    assert rc == 2 and "rank 0 with a bf16 residual keeps every weight exactly as it is" in _one_line(o.err)
    assert not out.exists()  # refused before any work
    rc, o = _run(capsys, "compress", files["ck"], "-o", str(tmp_path / "r0.safetensors"), "--rank", "0",
                 "--device", "cpu")  # rank 0, fp8: no SVD to speak of
    assert rc == 0 and "every layer gets round-to-nearest (" in o.err and "plain SVD" not in o.err
    rc, o = _run(capsys, "compress", files["ck"], "-o", str(tmp_path / "big.safetensors"), "--rank", "8",
                 "--format", "bf16", "--device", "cpu")  # a bf16 residual plus factors: more than dense
    assert rc == 0 and "WARNING: the compressed linears take" in o.err and "no memory is saved" in o.err
    assert "every layer gets plain SVD (" in o.err


def test_ctrl_c_is_one_line_130_and_leaves_nothing(files, tmp_path):
    """SIGINT while the second layer compresses: one line, exit code 130, no output or temp file."""
    out = tmp_path / "o.safetensors"
    code = textwrap.dedent(f"""
        import signal, sys, time
        # a test run started in the background (`cmd &` in a script) hands its children SIGINT ignored, and
        # Python then installs no KeyboardInterrupt handler: give this one the terminal's default
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from liteffn.calibration import checkpoint, cli
        real, calls = checkpoint.compress_linear, []
        def slow(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                print("READY", flush=True)
                time.sleep(60)
            return real(*a, **k)
        checkpoint.compress_linear = slow
        sys.exit(cli.main(["compress", {files['ck']!r}, "-o", {str(out)!r}, "--rank", "4", "--device", "cpu"]))
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=tmp_path)
    try:
        assert p.stdout.readline().strip() == "READY", p.stderr.read()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "liteffn: interrupted" and "Traceback" not in err, err
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def test_demo_prints_each_step():
    r = subprocess.run([sys.executable, "-m", "liteffn.calibration.cli", "demo", "--blocks", "1", "--video-dim", "32",
                        "--audio-dim", "32", "--ranks", "0", "4", "--formats", "fp8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for step in ("building a synthetic", "calibrating:", "compressing 2 FFNs at 2 settings", "[1/2] fp8 rank 0",
                 "[2/2] fp8 rank 4", "vs bf16"):
        assert step in r.stdout, (step, r.stdout)
