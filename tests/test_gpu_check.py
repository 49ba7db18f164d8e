"""`python -m benchmarks.gpu_check`: the one-call GPU validation, run here with --smoke (its whole plumbing on CPU at
tiny sizes) and with a budget too small for any section. Checks the summary it writes, never speed.

On CPU every section must PASS (or SKIP: the `-m gpu` tier, sections left out); a FAIL line names the error.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["env", "pytest_gpu", "kernels", "compile", "decode", "bench_lora", "bench_attention", "bench_ppo",
            "bench_generation", "bench_logprobs", "e2e", "xl16"]


def run_check(out_dir: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out-dir", str(out_dir), *args],
                          capture_output=True, text=True, timeout=timeout, env={**_env(), "OUT": ""}, cwd=REPO)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [s["section"] for s in summary["sections"]] == SECTIONS
    assert (out_dir / "summary.txt").read_text().count("\n") == len(SECTIONS) + 1
    return proc, summary


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "OUT"}  # $OUT would win over --out-dir


@pytest.mark.slow
def test_smoke_runs_every_section_and_writes_the_summary(tmp_path):
    # bench_attention is left out to keep this test near a minute: its plumbing is bench_ppo's.
    proc, summary = run_check(tmp_path, "--smoke", "--skip", "bench_attention", timeout=400)
    by_name = {s["section"]: s for s in summary["sections"]}
    for s in summary["sections"]:
        assert s["status"] in ("PASS", "SKIP"), s  # on CPU every section's plumbing must work
        assert isinstance(s["numbers"], dict) and isinstance(s["seconds"], float)
        assert s["status"] != "PASS" or s["numbers"], f"{s['section']} passed without numbers"
        errors = [s["error"], *(v for k, v in s["numbers"].items() if k.endswith(".error"))]
        assert not any("gpu_check.py crashed" in e or "(at gpu_check.py:" in e or "(at gpu_workers.py:" in e
                       for e in errors), s
        assert f"{s['status']:<4}  {s['section']}" in proc.stdout  # one printed line per section
    assert by_name["bench_attention"]["status"] == "SKIP"
    assert by_name["env"]["status"] == "PASS" and by_name["env"]["numbers"]["device"].startswith("cpu")
    assert by_name["pytest_gpu"]["status"] == "SKIP"  # -m gpu on CPU: every test skips
    for name in ("kernels", "compile", "decode"):  # the in-process sections report their numbers
        assert by_name[name]["numbers"], by_name[name]
    assert summary["overall"] == ("FAIL" if any(s["status"] == "FAIL" for s in summary["sections"]) else "PASS")
    # the files the device tool brings back: few, flat
    files = sorted(p.name for p in tmp_path.iterdir())
    assert {"gpu_check.log", "summary.json", "summary.txt"} <= set(files) and len(files) <= 8, files
    assert "GPU_CHECK_RESULT" in (tmp_path / "gpu_check.log").read_text()


def test_budget_skips_sections_that_do_not_fit(tmp_path):
    proc, summary = run_check(tmp_path, "--smoke", "--budget", "1", timeout=120)
    assert proc.returncode == 0 and summary["overall"] == "PASS"
    for s in summary["sections"]:
        assert s["status"] == "SKIP" and "of the budget left" in s["detail"], s
    assert summary["elapsed_s"] < 30
