"""pytest-benchmark setup for the kernel suites in this folder (never collected by the default test run,
whose testpaths is tests/). Run e.g.:

    python -m pytest benchmarks/bench_lora_linear.py --benchmark-group-by=group \
        --benchmark-json=benchmarks/results/lora_linear-<gpu>.json

The JSON's machine_info carries the GPU name, torch/triton versions and the commit.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment  # noqa: E402


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["rlhf_fast"] = environment()
