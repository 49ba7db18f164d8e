"""Benchmarking: the end-to-end suite behind `rlhf-fast bench` and the harness every suite under benchmarks/
uses (cli-level code: it may import trainers and below).

from rlhf_fast.benchmarking import BenchConfig, run_bench
record = run_bench(BenchConfig())  # the reference sizes on CUDA, tiny ones on CPU

Names resolve on first use, so `rlhf_fast.benchmarking.harness` imports without the kernels (a kernel
suite chooses the Triton interpreter after importing the harness and before importing the kernels).
"""

import importlib

_EXPORTS = {"BenchConfig": "bench_config", "run_bench": "suite", "bench_command": "suite", "format_report": "report",
            "write_chart": "report", "write_json": "report"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
