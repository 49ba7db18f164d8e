"""pytest-benchmark setup for the kernel suites in this folder (never collected by the default test run,
whose testpaths is tests/). Run e.g.:

    python -m pytest benchmarks/bench_lora_linear.py

Conventions for a suite: put each compared implementation of one measurement in the same
`benchmark.group`, mark the group's baseline with `benchmark.extra_info["baseline"] = True` (e.g. eager
PEFT LoRA) and optionally a lower bound with `extra_info["floor"] = True` (e.g. the plain linear). At the
end of the run a summary prints, per group, each entry's median and its speed-up over the baseline /
slow-down against the floor, and writes a record (rows + GPU name, torch/triton versions, commit) to
benchmarks/results/ on a GPU, or to .benchmarks/smoke/ (git-ignored) for CPU smoke runs.

Like tests/conftest.py: without a GPU, TRITON_INTERPRET=1 is set before triton is imported, so the
smoke sizes run the Triton kernels through the interpreter (plumbing check only, times meaningless);
benchmarks marked `gpu` skip cleanly.
"""

import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, environment, print_table, write_record  # noqa: E402


def pytest_configure(config):
    if "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["rlhf_fast"] = environment()


def summary_rows(benchmarks) -> list[dict]:
    """One row per benchmark: its median and, within its group, speed-up vs the baseline entry
    (baseline_median / median) and ratio to the floor entry (median / floor_median)."""
    groups = defaultdict(list)
    for bench in benchmarks:
        if bench.stats and bench.stats.rounds:
            groups[bench.group].append(bench)
    rows = []
    for group, members in groups.items():
        baseline = next((b.stats.median for b in members if b.extra_info.get("baseline")), None)
        floor = next((b.stats.median for b in members if b.extra_info.get("floor")), None)
        for b in members:
            median = b.stats.median
            rows.append(
                {
                    "group": group,
                    "impl": b.extra_info.get("impl", b.name),
                    "median_ms": median * 1e3,
                    "speedup_vs_baseline": baseline / median if baseline else None,
                    "x_floor": median / floor if floor else None,
                    **{k: v for k, v in b.extra_info.items() if k not in ("impl", "baseline", "floor")},
                }
            )
    return rows


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rows = summary_rows(session.benchmarks)
    if not rows:
        return
    terminalreporter.write_sep("=", "speed vs baseline (per group)")
    print_table(rows, ["group", "impl", "median_ms", "speedup_vs_baseline", "x_floor"])
    suites = sorted(
        {Path(str(b.fullname).split("::")[0]).stem.removeprefix("bench_") for b in session.benchmarks}
    )
    env = environment()
    on_gpu = not env["device"].startswith("cpu")
    out_dir = RESULTS_DIR if on_gpu else Path(config.rootpath) / ".benchmarks" / "smoke"
    path = write_record("+".join(suites), rows, out_dir=out_dir)
    terminalreporter.write_line(f"record written to {path}")
