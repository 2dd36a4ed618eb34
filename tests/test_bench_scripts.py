"""Bench scripts that the device runs, checked on the CPU first (their --dry-run), so device time is not
spent finding a script's bugs."""
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
