"""One-call GPU validation: every GPU-only check of this project, the most valuable first, under a time budget.

    bash benchmarks/gpu_check.sh --budget 540                    # on the GPU machine (installs .whl/ first)
    python -m benchmarks.gpu_check --smoke --out-dir /tmp/gc     # CPU: the same plumbing at tiny sizes

The order (PLAN; caps in seconds at --budget 540, stretched in proportion to a larger budget):
  env 10 -> e2e 150 (every PPO row of `rlhf-fast bench --preset gpt2`, 64 x (256 + 128) bf16: ours eager, then
  compiled, per kernel backend, and the seed-style baseline; cold start <= 60 s) -> cold_start_cached 30 (a fresh
  process with the e2e's compile cache: <= 20 s) -> generation 70 (ours eager, ours CUDA graph, the no-cache loop,
  HF generate static cache + compile: >= 2x HF, >= 30x no-cache, decode step <= 2x its memory floor) -> decode 15
  (CUDA-graph tokens = eager's, LoRA) -> kernels 30 (CUDA events, flash-attention's error rule) -> bench_lora 20,
  bench_logprobs 20 -> xl16 40 (gpt2-xl LoRA PPO under 16 GiB) -> the compile-heavy rows: compile 35
  (compile_model: graph breaks, new graphs per length), generation_inductor 35 (ours CUDA graph + inductor),
  decode_inductor 25, bench_attention 15 (FlexAttention compiles) -> pytest_gpu (`-m gpu`: the rest of the budget).

Each section runs in its own subprocess with timeout = min(its cap, budget left), so a crash or hang in one never
loses the others; a section needing more than the time left is skipped (--smoke: every cap at least SMOKE_CAP_S,
CPU start-up being slow). `python -m benchmarks.bench_ppo` (GAE / PPO loss against the Python loop) is left out:
the kernels section times the same kernels. Each returns PASS / FAIL / SKIP with its
numbers; a target it measures is judged there (FAIL with the number when missed); it prints one line
`PASS|FAIL|SKIP  name  seconds  numbers`, and summary.json / summary.txt are rewritten after every section (the
sections not reached yet: PENDING), so a run cut off keeps what it finished.

The output directory ($OUT when set, else --out-dir) gets at most 8 files (what the device tool brings back):
gpu_check.log (every subprocess's output), summary.json, summary.txt, e2e-gpt2.json (the e2e record),
kernel_benchmarks.json (every other suite record, by section), dispatch_rows.json (the `auto` dispatch rows
measured: `python -m benchmarks.dispatch_table --merge DIR`), compile_cache.bin + .json (PyTorch's mega-cache of
the e2e's compiles, saved by its trainers after their first iteration; the summary notes its size: the tool brings
back files up to 16 MiB). `--compile-cache DIR` (or $RLHF_FAST_COMPILE_CACHE) starts from a cache saved by an
earlier run: the e2e's trainers load it (its cold start is then judged against 20 s when they say they did). The
compile cache reaches only the sections that train PPO (e2e, and cold_start_cached with a copy of it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

from rlhf_fast.benchmarking.harness import REPO_ROOT as REPO

from ._gpu_sections import CACHE_ENV, CACHE_FILES, SECTIONS, Context
from .gpu_workers import result

REFERENCE_BUDGET_S = 540.0  # the caps below add up to about this (RESERVE_S included); pytest_gpu takes the rest
RESERVE_S = 3.0  # kept back for writing the summary
SMOKE_CAP_S = 60.0
COMES_BACK_BYTES = 16 << 20  # the device tool brings back files up to this size
# (section, cap_s at the reference budget, min_s: skipped when less is left); None: the rest of the budget
PLAN = [
    ("env", 10, 5),
    ("e2e", 150, 60),
    ("cold_start_cached", 30, 15),
    ("generation", 70, 30),
    ("decode", 15, 10),
    ("kernels", 30, 15),
    ("bench_lora", 20, 10),
    ("bench_logprobs", 20, 10),
    ("xl16", 40, 25),
    ("compile", 35, 20),
    ("generation_inductor", 35, 20),
    ("decode_inductor", 25, 15),
    ("bench_attention", 15, 10),
    ("pytest_gpu", None, 30),
]
assert {name for name, *_ in PLAN} == set(SECTIONS), "every section has a place in the plan"


def finite(x):
    """JSON without NaN/inf (strict parsers reject them)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    return [finite(v) for v in x] if isinstance(x, list) else x


def line(r: dict) -> str:
    nums = r["detail"] or " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in r["numbers"].items())
    error = f"  | {r['error']}" if r["error"] else ""
    return f"{r['status']:<4}  {r['section']:<19} {r['seconds']:6.1f}s  {nums}{error}"[:800]


def compile_cache(out_dir: Path, given: str | None) -> dict:
    path = out_dir / CACHE_FILES[0]
    size = path.stat().st_size if path.exists() else None
    return {"given": given, "file": path.name if size is not None else None, "bytes": size,
            "comes_back": size is not None and size <= COMES_BACK_BYTES}


def write_summary(out_dir: Path, results: list[dict], *, args, stamp: str, elapsed: float, cache_given: str | None,
                  final: bool) -> dict:
    """summary.json and summary.txt as they stand: the sections not reached yet are PENDING until the end."""
    done = {r["section"] for r in results}
    pending = [{"section": name, **result("PENDING", detail="not reached yet"), "seconds": 0.0}
               for name, *_ in PLAN if name not in done]
    failed = [r["section"] for r in results if r["status"] == "FAIL"]
    env = next((r["numbers"] for r in results if r["section"] == "env" and r["status"] == "PASS"), {})
    overall = ("FAIL" if failed else "PASS") if final else f"RUNNING ({len(results)} of {len(PLAN)} sections done)"
    summary = {"overall": overall, "failed": failed, "budget_s": args.budget, "elapsed_s": elapsed,
               "smoke": args.smoke, "time_utc": stamp, "device": env.get("device"), "commit": env.get("commit"),
               "compile_cache": compile_cache(out_dir, cache_given), "sections": results + pending}
    (out_dir / "summary.json").write_text(json.dumps(finite(summary), indent=1, default=str))
    cache = summary["compile_cache"]
    head = (f"gpu_check {overall} in {elapsed:.0f}s of {args.budget:.0f}s; device {summary['device']}, commit "
            f"{summary['commit']}" + (" (smoke)" if args.smoke else "")
            + (f"; compile cache {cache['bytes'] / 2**20:.1f} MiB"
               + ("" if cache["comes_back"] else " (over 16 MiB: not brought back)") if cache["bytes"] else ""))
    (out_dir / "summary.txt").write_text("\n".join([head, *map(line, summary["sections"])]) + "\n")
    return summary


def main(argv=None) -> int:
    names = [name for name, *_ in PLAN]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole run (default 540)")
    p.add_argument("--only", help=f"comma-separated sections to run, of: {','.join(names)}")
    p.add_argument("--skip", help="comma-separated sections to leave out")
    p.add_argument("--out-dir", help="output directory ($OUT wins; default benchmarks/results/gpu_check-<time>)")
    p.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny sizes, interpreter, aot_eager")
    p.add_argument("--hh-data", help="HH-RLHF .jsonl(.gz) file or directory: the e2e section's prompt lengths "
                   "(default: synthetic)")
    p.add_argument("--compile-cache", default=os.environ.get(CACHE_ENV), metavar="DIR",
                   help="a directory holding an earlier run's compile_cache.bin/.json, loaded by the e2e section "
                   f"(default: ${CACHE_ENV})")
    args = p.parse_args(argv)
    chosen = set(args.only.split(",")) if args.only else set(names)
    skipped = set(args.skip.split(",")) if args.skip else set()
    if unknown := (chosen | skipped) - set(names):
        p.error(f"unknown section(s) {sorted(unknown)}; known: {','.join(names)}")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA GPU here: run with --smoke for the CPU plumbing check")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = Path(os.environ.get("OUT") or args.out_dir or REPO / "benchmarks" / "results" / f"gpu_check-{stamp}")
    out_dir.mkdir(parents=True, exist_ok=True)
    given = Path(args.compile_cache) if args.compile_cache else None
    if given and given.resolve() != out_dir.resolve():
        for name in CACHE_FILES:
            if (given / name).exists():
                shutil.copy(given / name, out_dir / name)
    t_start, results = time.monotonic(), []
    stretch = max(1.0, args.budget / REFERENCE_BUDGET_S)
    print(f"gpu_check: budget {args.budget:.0f}s, output {out_dir}"
          + (f", compile cache from {given}" if given else ""), flush=True)
    write_summary(out_dir, results, args=args, stamp=stamp, elapsed=0.0, cache_given=args.compile_cache, final=False)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        ctx = Context(out_dir, args.smoke, Path(scratch), args.hh_data)
        for name, cap_s, min_s in PLAN:
            left = args.budget - RESERVE_S - (time.monotonic() - t_start)
            t0 = time.monotonic()
            if name not in chosen or name in skipped:
                r = result("SKIP", detail="not selected (--only/--skip)")
            elif left < min_s:
                r = result("SKIP", detail=f"needs >= {min_s:.0f}s, {max(left, 0):.0f}s of the budget left")
            else:
                cap = left if cap_s is None else max(cap_s * stretch, SMOKE_CAP_S if args.smoke else 0)
                try:
                    r = SECTIONS[name](ctx, min(cap, left))
                except Exception as e:  # a bug in this script's own handling: say so, run the rest
                    traceback.print_exc()
                    r = result("FAIL", error=f"gpu_check crashed: {type(e).__name__}: {e}"[:240])
            results.append({"section": name, **r, "seconds": time.monotonic() - t0})
            print(line(results[-1]), flush=True)
            write_summary(out_dir, results, args=args, stamp=stamp, elapsed=time.monotonic() - t_start,
                          cache_given=args.compile_cache, final=False)
    summary = write_summary(out_dir, results, args=args, stamp=stamp, elapsed=time.monotonic() - t_start,
                            cache_given=args.compile_cache, final=True)
    print((out_dir / "summary.txt").read_text().splitlines()[0], flush=True)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
