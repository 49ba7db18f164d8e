"""Benchmark suites, one module per thing measured; run each from the repository root as

    python -m benchmarks.<name> [--smoke] [--out-dir DIR] ...

Every suite times its baseline in the same run, prints a table and writes a JSON record through
`rlhf_fast.benchmarking.harness` (benchmarks/results/ on a GPU, .benchmarks/smoke/ on CPU). BENCHMARKS.md
lists them; `python -m benchmarks.gpu_check` runs the GPU ones under a time budget.
"""
