"""Bench scripts that the device runs, checked on the CPU first (their --dry-run), so device time is not
spent finding a script's bugs."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_host_overhead_rank_part_runs_its_cases(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "host_overhead.py"), "--parts", "rank", "--m", "20",
           "--dry-run", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    md = (tmp_path / "host_overhead.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| launch")]
    assert len(rows) == 5 and "FAILED" not in r.stdout and "## Errors" not in md, md + r.stdout
    r = subprocess.run(cmd[:2] + ["--parts", "host", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--dry-run runs only --parts rank" in r.stderr


def test_ffn_kernels_dry_run_writes_the_interleaved_goal(tmp_path):
    """The kernel bench's writers on tiny shapes: the few-token FFN goal carries the interleaved timing, the
    goals' FFN device times are medians of rounds."""
    md, js = tmp_path / "k.md", tmp_path / "k.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "ffn_kernels.py"), "--dry-run", "--families", "audio",
           "--sections", "ffn", "--out", str(md), "--json", str(js)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    text = md.read_text()
    goal = [ln for ln in text.splitlines() if "called from Python without graphs" in ln]
    assert len(goal) == 1 and "interleaved with the bf16 FFN in the same rounds" in goal[0], text
    recs = json.loads(js.read_text())
    recs = recs["records"] if isinstance(recs, dict) else recs
    inter = [x for x in recs if x.get("impl") == "module_interleaved"]
    assert inter and all(x["us"] > 0 and x["bf16_us"] > 0 for x in inter)
    # the goals' device times (bf16, ours at r = 0 and 64): medians of three rounds
    rounds = [x for x in recs if x.get("us_rounds")]
    assert {(x["impl"], x["rank"]) for x in rounds} == {("bf16", None), ("ours_fused", 0), ("ours_fused", 64)}
    assert all(len(x["us_rounds"]) == 3 and x["us"] == sorted(x["us_rounds"])[1] for x in rounds)


def test_shared_input_dry_run_times_both_ways(tmp_path):
    """bench/shared_input.py on tiny shapes: every case timed linked and alone in both modes, and the linked
    outputs equal the unlinked ones (the interpreter sums in one order)."""
    md, js = tmp_path / "s.md", tmp_path / "s.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "shared_input.py"), "--dry-run", "--out", str(md),
           "--json", str(js)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(js.read_text())["rows"]
    assert len(rows) == 2 and all(x["diff"] == 0 for x in rows)
    assert all(x[mode][impl] > 0 for x in rows for mode in ("device", "python") for impl in ("bf16", "alone", "linked"))
    assert md.read_text().count("| q/k/v (128->64 x 3) | 24 |") == 2
