"""End-to-end benchmark behind `rlhf-fast bench` (cli-level code: it may import trainers and below).

from rlhf_fast.benchmarking import BenchConfig, run_bench
record = run_bench(BenchConfig.for_device())
"""

from .report import format_report, write_chart, write_json
from .suite import BenchConfig, run_bench

__all__ = ["BenchConfig", "format_report", "run_bench", "write_chart", "write_json"]
