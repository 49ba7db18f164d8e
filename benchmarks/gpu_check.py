"""One-call GPU validation: every GPU-only check of this project, in priority order, under a time budget.

    bash benchmarks/gpu_check.sh --budget 540                    # on the GPU machine (installs .whl/ first)
    python -m benchmarks.gpu_check --smoke --out-dir /tmp/gc     # CPU: the same plumbing at tiny sizes

Each section runs in its own subprocess with timeout = min(its cap, budget left), so a crash or hang in
one never loses the others; a section needing more than the time left is skipped. Each prints one line
`PASS|FAIL|SKIP  name  seconds  numbers`. The output directory ($OUT when set, else --out-dir) gets a
few files only (the device tool brings back at most 8): gpu_check.log (every subprocess's output),
summary.json, summary.txt, kernel_benchmarks.json (the kernel suites' records), dispatch_rows.json (the rows
of the `auto` dispatch table this run measured: `python -m benchmarks.dispatch_table --merge DIR` adds them to
the package's table), e2e-gpt2.json and memory-lora-xl.json. Caps are sized for --budget 520 and stretch in
proportion to a larger budget.

Sections: env, pytest_gpu (`-m gpu` tier), kernels, compile, decode (in-process workers: gpu_workers.py),
bench_lora, bench_attention, bench_ppo, bench_generation, bench_logprobs (the suites `python -m benchmarks.<name>`,
short), e2e (`rlhf-fast bench --preset gpt2`; prompt lengths from --hh-data when given), xl16 (gpt2-xl LoRA PPO under a
16 GiB cap: `python -m benchmarks.bench_memory_16gb --config lora-xl`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlhf_fast.benchmarking.harness import REPO_ROOT as REPO

from .gpu_workers import MARK, last_error, result

REFERENCE_BUDGET_S = 520.0  # the caps below add up to this
RESERVE_S = 3.0  # kept back for writing the summary


@dataclass(frozen=True)
class Section:
    name: str
    cap_s: float  # at --budget 520
    min_s: float  # skipped when less than this is left
    run: Callable  # (Context, timeout_s) -> result dict


SECTIONS: list[Section] = []


def section(name: str, cap_s: float, min_s: float):
    def register(fn):
        SECTIONS.append(Section(name, cap_s, min_s, fn))
        return fn
    return register


# --- running subprocesses ---------------------------------------------------------------------------


class Context:
    def __init__(self, out_dir: Path, smoke: bool, hh_data: str | None = None):
        self.out_dir, self.smoke, self.log = out_dir, smoke, out_dir / "gpu_check.log"
        self.hh_data = hh_data
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        if smoke:
            self.env["TRITON_INTERPRET"] = "1"  # CPU: Triton kernels through the interpreter, as in the tests

    def run(self, cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str]:
        """Run cmd with its output appended to the log; (returncode or None on timeout, its output).
        Its own process group, so a timeout also ends its children (compile workers, pytest's)."""
        with open(self.log, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            start = log.tell()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                    env={**self.env, **(env or {})})
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        with open(self.log) as log:
            log.seek(start)
            return rc, log.read()


def command_result(rc: int | None, text: str, timeout: float, numbers: dict | None = None) -> dict:
    if rc is None:
        return result("FAIL", numbers, error=f"timeout after {timeout:.0f}s; last line: {last_error(text)}")
    return result("PASS", numbers) if rc == 0 else result("FAIL", numbers, error=f"rc {rc}: {last_error(text)}")


# --- in-process sections: run as `python -m benchmarks.gpu_workers NAME` in a subprocess ----------------


def worker_section(name: str, cap_s: float, min_s: float) -> None:
    """Section `name` runs gpu_workers.WORKERS[name] in a subprocess."""
    def run(ctx: Context, timeout: float) -> dict:
        cmd = [sys.executable, "-m", "benchmarks.gpu_workers", name] + ["--smoke"] * ctx.smoke
        rc, text = ctx.run(cmd, timeout)
        marked = [json.loads(ln[len(MARK):]) for ln in text.splitlines() if ln.startswith(MARK)]
        if marked and rc is not None:
            return marked[-1]
        # timed out (keep the numbers reported so far) or died before reporting (segfault, kill)
        out = command_result(1 if rc == 0 else rc, text, timeout, marked[-1]["numbers"] if marked else None)
        return {**out, "detail": marked[-1]["detail"] if marked else ""}
    section(name, cap_s, min_s)(run)


# The sections in the order they run (priority order: a short budget keeps the first ones).
worker_section("env", cap_s=10, min_s=5)


@section("pytest_gpu", cap_s=110, min_s=30)
def pytest_section(ctx: Context, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfE", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append(f"--timeout={max(30, int(timeout / 2))}")
    rc, text = ctx.run(cmd, timeout)
    outcomes = re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text, re.M)
    counts = {k.lower(): sum(o == k for _, o in outcomes) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    bad = sorted({t for t, o in outcomes if o in ("FAILED", "ERROR")}
                 | set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)))
    numbers = {**counts, "failing": bad}
    detail = " ".join(f"{v} {k}" for k, v in counts.items()) + (f"; failing: {', '.join(bad)}" if bad else "")
    if rc is None:
        return result("FAIL", numbers, detail, error=f"timeout after {timeout:.0f}s (counts so far)")
    if bad or rc not in (0, 5):
        return result("FAIL", numbers, detail, error=f"rc {rc}: {last_error(text)}")
    return result("PASS" if counts["passed"] else "SKIP", numbers, detail)


worker_section("kernels", cap_s=50, min_s=20)
worker_section("compile", cap_s=75, min_s=25)  # cold inductor compile: > 45 s on an H200
worker_section("decode", cap_s=50, min_s=20)

# --- command sections ----------------------------------------------------------------------------------


def ratios(rows: list[dict], ids: tuple[str, ...], cols: tuple[str, ...], where=lambda r: True) -> dict:
    """{'<id values> <col>': value} for the ratio columns of a record's rows (the table's key numbers)."""
    return {" ".join(str(r.get(i)) for i in ids) + f" {c}": r[c]
            for r in rows if where(r) for c in cols if r.get(c) is not None}


def add_dispatch_rows(out_dir: Path, rows: list[dict]) -> None:
    """The dispatch-table rows this run measured, in dispatch_rows.json: `python -m benchmarks.dispatch_table
    --merge <this directory>` adds them to the package's table (rlhf_fast/kernels/dispatch_table.json)."""
    from rlhf_fast.kernels.dispatch import merge_rows

    path = out_dir / "dispatch_rows.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    path.write_text(json.dumps({"rows": merge_rows(old, rows)}, indent=1))


def bench_section(name: str, cap_s: float, min_s: float, suite: str, gpu_args: list, smoke_args: list, keys):
    """`python -m benchmarks.<suite>`: its output goes to the log, its record into kernel_benchmarks.json and
    its dispatch-table rows (if any) into dispatch_rows.json."""
    def run(ctx: Context, timeout: float) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", f"benchmarks.{suite}", *(smoke_args if ctx.smoke else gpu_args),
                   "--out-dir", tmp]
            # smoke: compiled baselines run eagerly (plumbing only; CPU inductor would take minutes)
            rc, text = ctx.run(cmd, timeout, env={"TORCH_COMPILE_DISABLE": "1"} if ctx.smoke else None)
            records = sorted(Path(tmp).glob("*.json"))
            rec = json.loads(records[-1].read_text()) if records else None
        numbers = {}
        if rec is not None:  # one place for the whole run's records
            path = ctx.out_dir / "kernel_benchmarks.json"
            merged = json.loads(path.read_text()) if path.exists() else {}
            path.write_text(json.dumps({**merged, name: rec}, indent=1, default=str))
            numbers = {"rows": len(rec["rows"]), **keys(rec["rows"])}
            if rec.get("dispatch_rows"):
                add_dispatch_rows(ctx.out_dir, rec["dispatch_rows"])
                numbers["dispatch_rows"] = len(rec["dispatch_rows"])
        return command_result(rc, text, timeout, numbers)
    section(name, cap_s, min_s)(run)


# gpt2-xl's c_attn and mlp c_proj at 4,096 tokens, r 8 / 16: auto, torch and triton against PEFT's chain
bench_section("bench_lora", 25, 12, "bench_lora_linear",
              ["--shape", "4096x1600x4800x8", "--shape", "4096x6400x1600x16", "--rounds", "10"], ["--smoke"],
              lambda rows: ratios(rows, ("pass_", "d_in", "r", "impl"), ("speedup_vs_baseline", "x_floor"),
                                  lambda r: r["impl"] in ("auto", "triton") and r["pass_"] != "bwd"))
bench_section("bench_attention", 30, 20, "bench_attention", ["--iters", "5"], ["--smoke", "--iters", "1"],
              lambda rows: ratios(rows, ("T", "H", "method"), ("vs_triton",), lambda r: r.get("method") == "sdpa_mask"))
bench_section("bench_ppo", 20, 15, "bench_ppo", ["--B", "256", "--T", "512", "--iters", "10", "--compile-max-t", "0"],
              ["--smoke"], lambda rows: ratios(rows, ("bench", "B", "T"), ("x_loop", "x_eager", "x_compiled")))
bench_section("bench_generation", 25, 20, "bench_generation",
              ["--preset", "gpt2", "--batch-size", "64", "--prompt-len", "256", "--new-tokens", "64", "--warmup", "1",
               "--iters", "1"], ["--smoke"],
              lambda rows: ratios(rows, ("preset", "B"), ("x_hf", "x_nocache", "step_over_floor")))


def fused_over_unfused(rows: list[dict]) -> dict:
    """bench_logprobs: unfused / fused peak memory and time per (case, width); > 1: the fused kernel wins."""
    by = {(r["case"], r["width"], r["impl"]): r for r in rows}
    return {f"{case}.{width}.{k}": by[case, width, "unfused"][col] / r[col]
            for (case, width, impl), r in by.items() if impl == "fused" and (case, width, "unfused") in by
            for k, col in (("peak_x", "peak_mib"), ("time_x", "time_ms"))}


bench_section("bench_logprobs", 35, 20, "bench_logprobs", ["--repeats", "3", "--warmup", "1"], ["--smoke"],
              fused_over_unfused)


@section("e2e", cap_s=60, min_s=25)
def e2e_section(ctx: Context, timeout: float) -> dict:
    sizes = (["--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--prompt-len", "8", "--new-tokens", "4",
              "--mini-batch-size", "2", "--backend", "torch", "--no-hf"] if ctx.smoke else
             ["--preset", "gpt2", "--batch-size", "32", "--prompt-len", "128", "--new-tokens", "64"])
    with tempfile.TemporaryDirectory() as tmp:  # the chart stays behind: the tool brings back few files
        cli = [sys.executable, "-m", "rlhf_fast.cli", "bench"]
        data = ["--data", ctx.hh_data] if ctx.hh_data and not ctx.smoke else []
        rc, text = ctx.run([*cli, *sizes, *data, "--warmup", "1", "--iters", "1", "--out-dir", tmp], timeout)
        records = list(Path(tmp).glob("e2e-*.json"))
        if not records:
            return command_result(1 if rc == 0 else rc, text, timeout)
        rec = json.loads(records[0].read_text())
        shutil.copy(records[0], ctx.out_dir / f"e2e-{rec['config']['presets'][0]}.json")
    rows = rec["rows"]  # generation rows: tokens/s; ppo and baseline rows: samples/s
    numbers = {f"{r['section']}: {r['impl'].split(' (no KV')[0]}": r.get("tokens_per_s") or r.get("samples_per_s")
               for r in rows if r["status"] == "ok"}
    for targets in rec["targets"].values():
        numbers.update({k: t["value"] for k, t in targets.items()})
    bad = [f"{r['impl']}: {r['status']}" for r in rows if r["status"] != "ok" and not r["status"].startswith("skipped")]
    out = command_result(rc, text, timeout, numbers)
    return result("FAIL", numbers, error="; ".join(bad)[:240]) if bad else out


@section("xl16", cap_s=30, min_s=25)
def xl16_section(ctx: Context, timeout: float) -> dict:
    path = ctx.out_dir / "memory-lora-xl.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_memory_16gb", "--config", "lora-xl", "--iters", "1",
           "--json", str(path)] + ["--smoke"] * ctx.smoke
    rc, text = ctx.run(cmd, timeout)
    if rc != 0 or not path.exists():
        return command_result(1 if rc == 0 else rc, text, timeout)
    row = json.loads(path.read_text())
    numbers = {k: v for k, v in row.items() if k.startswith(("peak", "iter", "predicted", "plan", "status", "model"))}
    if row["status"] != "ok":
        return result("FAIL", numbers, error=f"{row['status']}: {row.get('error', '')}"[:240])
    fits = ctx.smoke or row["peak_iter_gib"] <= 16.0
    return result("PASS" if fits else "FAIL", numbers, f"{row['model']} peak {row['peak_iter_gib']:.2f} GiB (cap 16; "
                  f"plan {row['predicted_peak_gib']:.2f} at micro-batch {row['plan_micro_batch']}"
                  f"{', checkpointing' if row['plan_grad_checkpoint'] else ''})")


# --- the orchestrator ----------------------------------------------------------------------------------


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
    return f"{r['status']:<4}  {r['section']:<16} {r['seconds']:6.1f}s  {nums}{error}"[:600]


def main(argv=None) -> int:
    names = [s.name for s in SECTIONS]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole run (default 540)")
    p.add_argument("--only", help=f"comma-separated sections to run, of: {','.join(names)}")
    p.add_argument("--skip", help="comma-separated sections to leave out")
    p.add_argument("--out-dir", help="output directory ($OUT wins; default benchmarks/results/gpu_check-<time>)")
    p.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny sizes, interpreter, aot_eager")
    p.add_argument("--hh-data", help="HH-RLHF .jsonl(.gz) file or directory: the e2e section's prompt lengths "
                   "(default: synthetic)")
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
    ctx, t_start, results = Context(out_dir, args.smoke, args.hh_data), time.monotonic(), []
    stretch = max(1.0, args.budget / REFERENCE_BUDGET_S)
    print(f"gpu_check: budget {args.budget:.0f}s, output {out_dir}", flush=True)
    for s in SECTIONS:
        left = args.budget - RESERVE_S - (time.monotonic() - t_start)
        t0 = time.monotonic()
        if s.name not in chosen or s.name in skipped:
            r = result("SKIP", detail="not selected (--only/--skip)")
        elif left < s.min_s:
            r = result("SKIP", detail=f"needs >= {s.min_s:.0f}s, {max(left, 0):.0f}s of the budget left")
        else:
            try:
                r = s.run(ctx, min(s.cap_s * stretch, left))
            except Exception as e:  # a bug in this script's own handling: say so, run the rest
                traceback.print_exc()
                r = result("FAIL", error=f"gpu_check.py crashed: {type(e).__name__}: {e}"[:240])
        results.append({"section": s.name, **r, "seconds": time.monotonic() - t0})
        print(line(results[-1]), flush=True)
    failed = [r["section"] for r in results if r["status"] == "FAIL"]
    env = next((r["numbers"] for r in results if r["section"] == "env" and r["status"] == "PASS"), {})
    summary = {"overall": "FAIL" if failed else "PASS", "failed": failed, "budget_s": args.budget,
               "elapsed_s": time.monotonic() - t_start, "smoke": args.smoke, "time_utc": stamp,
               "device": env.get("device"), "commit": env.get("commit"), "sections": results}
    (out_dir / "summary.json").write_text(json.dumps(finite(summary), indent=1, default=str))
    head = (f"gpu_check {summary['overall']} in {summary['elapsed_s']:.0f}s of {args.budget:.0f}s; "
            f"device {summary['device']}, commit {summary['commit']}" + (" (smoke)" if args.smoke else ""))
    (out_dir / "summary.txt").write_text("\n".join([head, *map(line, results)]) + "\n")
    print(head, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
