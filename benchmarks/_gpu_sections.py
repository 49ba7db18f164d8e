"""The sections of `python -m benchmarks.gpu_check` (a private helper, not a suite; the order and caps are
gpu_check.PLAN): each runs its work in a subprocess under a timeout and returns `result(status, numbers, detail,
error, targets)`. A target a section measures is judged there: a record's `met: false` makes it FAIL with the number.

Files a section writes into the output directory: e2e-<preset>.json (the e2e record), kernel_benchmarks.json
(every other suite record, by section), dispatch_rows.json, compile_cache.bin/.json (by the e2e's trainers)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rlhf_fast.benchmarking.harness import REPO_ROOT as REPO
from rlhf_fast.benchmarking.harness import fmt
from rlhf_fast.model.compile import CACHE_ENV, CACHE_FILE, CACHE_META

from .gpu_workers import MARK, last_error, result

SECTIONS: dict[str, Callable] = {}  # name -> fn(Context, timeout_s) -> result dict
CACHE_FILES = (CACHE_FILE, CACHE_META)  # what a compile cache directory holds


def section(name: str):
    def register(fn):
        SECTIONS[name] = fn
        return fn
    return register


class Context:
    """What every section shares: the output directory, the log, --smoke, the subprocesses' environment (no
    compile cache but where a section passes one) and a scratch directory for fresh compile caches."""

    def __init__(self, out_dir: Path, smoke: bool, scratch: Path, hh_data: str | None = None):
        self.out_dir, self.smoke, self.scratch, self.hh_data = out_dir, smoke, scratch, hh_data
        self.log = out_dir / "gpu_check.log"
        self.env = {k: v for k, v in os.environ.items() if k != CACHE_ENV}
        self.env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                                      os.environ.get("PYTHONPATH")])))
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

    def fresh_caches(self, name: str) -> dict:
        """Empty inductor and Triton cache directories: a compile in this section starts cold on any machine."""
        dirs = {k: self.scratch / f"{name}-{k.split('_')[0].lower()}" for k in ("TORCHINDUCTOR_CACHE_DIR",
                                                                              "TRITON_CACHE_DIR")}
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        return {k: str(d) for k, d in dirs.items()}

    def bench(self, args: list[str], timeout: float, cache_dir: Path, name: str) -> tuple[dict | None, int | None, str]:
        """`rlhf-fast bench args` cold (fresh inductor / Triton caches) with the compile cache of cache_dir; its
        record as far as it got (the bench rewrites it after every row), rc, output."""
        env = {**self.fresh_caches(name), CACHE_ENV: str(cache_dir)}
        if self.smoke:
            env["TORCH_COMPILE_DISABLE"] = "1"  # the compiled rows' plumbing, eagerly: CPU inductor takes minutes
        with tempfile.TemporaryDirectory() as tmp:  # the chart stays behind: the tool brings back few files
            rc, text = self.run([sys.executable, "-m", "rlhf_fast.cli", "bench", *args, "--out-dir", tmp], timeout, env)
            records = sorted(Path(tmp).glob("e2e-*.json"))
            return (json.loads(records[-1].read_text()) if records else None), rc, text

    def store(self, name: str, record: dict) -> None:
        """One place for the run's suite records: kernel_benchmarks.json, by section."""
        path = self.out_dir / "kernel_benchmarks.json"
        merged = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**merged, name: record}, indent=1, default=str))


def command_result(rc: int | None, text: str, timeout: float, numbers: dict | None = None, detail: str = "",
                   targets: list | None = None) -> dict:
    """PASS on rc 0, else FAIL naming the timeout or the last error; then FAIL for a missed target."""
    if rc is None:
        out = result("FAIL", numbers, detail, f"timeout after {timeout:.0f}s; last line: {last_error(text)}", targets)
    else:
        out = result("PASS" if rc == 0 else "FAIL", numbers, detail, "" if rc == 0 else f"rc {rc}: {last_error(text)}",
                     targets)
    return judged(out)


def target_label(t: dict) -> str:
    """A judged target's name: its `what`, after the case and width of a suite that judges per case."""
    return " ".join([*(str(t[k]) for k in ("case", "width") if k in t), t["what"]])


def judged(out: dict) -> dict:
    """FAIL, naming the numbers, when a target of the section was missed (met False)."""
    missed = [f"{target_label(t)} = {fmt(t['value'])} (want {t['target']})" for t in out["targets"]
              if t["met"] is False]
    if missed:
        error = "; ".join(filter(None, [out["error"], "missed: " + "; ".join(missed)]))
        return {**out, "status": "FAIL", "error": error[:600]}
    return out


def verdicts(targets: list[dict]) -> str:
    return "; ".join(f"{target_label(t)} {fmt(t['value'])} ({t['target']}: "
                     f"{ {True: 'met', False: 'MISSED', None: 'not judged'}[t['met']]})" for t in targets)


# --- in-process sections: `python -m benchmarks.gpu_workers NAME` in a subprocess ------------------------


def worker_section(name: str) -> None:
    """Section `name` runs gpu_workers.WORKERS[name] in a subprocess; a worker reports as it goes (MARK lines),
    so a timeout keeps the numbers reported so far."""
    def run(ctx: Context, timeout: float) -> dict:
        cmd = [sys.executable, "-m", "benchmarks.gpu_workers", name] + ["--smoke"] * ctx.smoke
        rc, text = ctx.run(cmd, timeout)
        marked = [json.loads(ln[len(MARK):]) for ln in text.splitlines() if ln.startswith(MARK)]
        if marked and rc is not None:
            return marked[-1]
        # timed out (keep the numbers reported so far) or died before reporting (segfault, kill)
        out = command_result(1 if rc == 0 else rc, text, timeout, marked[-1]["numbers"] if marked else None)
        return {**out, "detail": marked[-1]["detail"] if marked else ""}
    section(name)(run)


for _name in ("env", "decode", "kernels", "compile", "decode_inductor"):
    worker_section(_name)


# --- the end-to-end PPO iteration and its cold start ---------------------------------------------------------


def bench_sizes(ctx: Context) -> list[str]:
    """`rlhf-fast bench`'s reference sizes on CUDA (gpt2, 64 x (256 + 128), bf16); tiny ones on CPU with the
    compiled rows run eagerly."""
    if ctx.smoke:
        return ["--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--prompt-len", "8", "--new-tokens", "4",
                "--mini-batch-size", "2", "--compile"]
    return ["--preset", "gpt2", *(["--data", ctx.hh_data] if ctx.hh_data else [])]


def bench_targets(rec: dict) -> list[dict]:
    return [{"what": f"{preset} {name} ({t['best']})", "value": t["value"], "target": t["target"], "met": t["met"]}
            for preset, ts in rec["targets"].items() for name, t in ts.items()]


@section("e2e")
def e2e_section(ctx: Context, timeout: float) -> dict:
    """Every PPO row of `rlhf-fast bench` (ours eager, then compiled, per backend) and the seed-style baseline,
    cold; each compiled row's trainer loads the compile cache of the output directory and saves it there after
    its first iteration."""
    iters = ["--backend", "torch", "--warmup", "0", "--iters", "1"] if ctx.smoke else ["--warmup", "1", "--iters", "2"]
    rec, rc, text = ctx.bench([*bench_sizes(ctx), "--section", "ppo", "--section", "baseline", *iters], timeout,
                              ctx.out_dir, "e2e")
    if rec is None:
        return command_result(1 if rc == 0 else rc, text, timeout)
    (ctx.out_dir / f"e2e-{rec['config']['presets'][0]}.json").write_text(json.dumps(rec, indent=1, default=str))
    numbers = {f"{r['section']}: {r['impl']}": r.get("samples_per_s") for r in rec["rows"] if r["status"] == "ok"}
    numbers.update({f"{r['impl']} first_iteration_s": r["first_iteration_s"] for r in rec["rows"]
                    if r.get("first_iteration_s") is not None})
    numbers.update({f"{r['impl']} compiles_after_first": r["compiles_after_first"] for r in rec["rows"]
                    if r.get("compiles_after_first") is not None})
    cold, cache = rec.get("cold_start") or {}, rec["compile_cache"]
    numbers.update(cold_start_s=cold.get("seconds"), cold_start_from_process_start_s=cold.get("from_process_start_s"),
                   compile_cache_loaded=cache["loaded"], compile_cache_bytes=cache["bytes"])
    targets = bench_targets(rec)
    cfg = rec["config"]
    detail = (f"{cfg['batch_size']} x ({cfg['prompt_len']} + {cfg['new_tokens']}) {cfg['dtype']}: "
              + "; ".join(f"{k} {fmt(v)}" for k, v in numbers.items() if k.startswith("ppo") or k.startswith("base"))
              + f"; {verdicts(targets)}")
    out = command_result(rc, text, timeout, numbers, detail, targets)
    problems = [f"{r['impl']}: {r['status']}" for r in rec["rows"]
                if r["status"] != "ok" and not r["status"].startswith("skipped")]
    if any(r.get("mode") == "compiled" and r["status"] == "ok" for r in rec["rows"]) and not ctx.smoke \
            and not cache["bytes"]:
        problems.append("the compiled rows saved no compile cache")
    if not rec.get("complete"):
        problems.append("incomplete: the bench ended before its last row")
    if problems:
        return {**out, "status": "FAIL", "error": "; ".join(filter(None, [out["error"], *problems]))[:600]}
    return out


@section("cold_start_cached")
def cold_start_cached_section(ctx: Context, timeout: float) -> dict:
    """A fresh process with fresh inductor / Triton caches and the e2e's compile cache (a copy: this run's own
    save must not shrink it): model build -> end of the first compiled PPO iteration (triton kernels)."""
    saved = ctx.out_dir / CACHE_FILES[0]
    if not saved.exists() and not ctx.smoke:
        return result("SKIP", detail="no compile cache in the output directory (the e2e section saves it)")
    backend = "torch" if ctx.smoke else "triton"
    with tempfile.TemporaryDirectory() as cache_copy:
        for name in CACHE_FILES:
            if (ctx.out_dir / name).exists():
                shutil.copy(ctx.out_dir / name, cache_copy)
        t0 = time.monotonic()
        rec, rc, text = ctx.bench([*bench_sizes(ctx), "--section", "ppo", "--no-eager", "--backend", backend,
                                   "--warmup", "0", "--iters", "1"], timeout, Path(cache_copy), "cold_start_cached")
        wall = time.monotonic() - t0
    if rec is None:
        return command_result(1 if rc == 0 else rc, text, timeout, {"process_s": wall})
    from rlhf_fast.benchmarking.suite import COLD_START_CACHED_S

    ctx.store("cold_start_cached", rec)
    cold, loaded = rec.get("cold_start") or {}, rec["compile_cache"]["loaded"]
    numbers = {"cold_start_s": cold.get("seconds"), "from_process_start_s": cold.get("from_process_start_s"),
               "process_s": wall, "compile_cache_loaded": loaded,
               "compile_cache_bytes": saved.stat().st_size if saved.exists() else None}
    # judged here against the cached bound whatever the trainer says it loaded (the bench uses 60 s unless it knows)
    targets = [{"what": f"cold start with the compile cache ({cold.get('impl')})", "value": cold.get("seconds"),
                "target": f"<= {COLD_START_CACHED_S:g}",
                "met": None if ctx.smoke or cold.get("seconds") is None else cold["seconds"] <= COLD_START_CACHED_S}]
    detail = (f"{cold.get('impl')}: {fmt(cold.get('seconds'))} s from the model build to the end of the first "
              f"iteration ({fmt(cold.get('from_process_start_s'))} s from process start; the trainer loaded the "
              f"cache: {loaded}); {verdicts(targets)}")
    out = command_result(rc, text, timeout, numbers, detail, targets)
    if not ctx.smoke and loaded is False:
        return {**out, "status": "FAIL", "error": "; ".join(filter(None, [out["error"], "the compile cache did not "
                                                                         "load (see the log for why)"]))}
    return out


# --- suites: `python -m benchmarks.<suite>`, their records into kernel_benchmarks.json -----------------------


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


def bench_section(name: str, suite: str, gpu_args: list, smoke_args: list, keys, judge: bool = True) -> None:
    """`python -m benchmarks.<suite>`: its output goes to the log, its record (also a partial one, from a suite that
    writes as it goes) into kernel_benchmarks.json, its dispatch-table rows into dispatch_rows.json; the targets
    its record judged decide PASS / FAIL (judge=False: reported only, judged by another section)."""
    def run(ctx: Context, timeout: float) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", f"benchmarks.{suite}", *(smoke_args if ctx.smoke else gpu_args),
                   "--out-dir", tmp]
            # smoke: compiled baselines run eagerly (plumbing only; CPU inductor would take minutes)
            rc, text = ctx.run(cmd, timeout, env={"TORCH_COMPILE_DISABLE": "1"} if ctx.smoke else None)
            records = sorted(Path(tmp).glob("*.json"))
            rec = json.loads(records[-1].read_text()) if records else None
        if rec is None:
            return command_result(1 if rc == 0 else rc, text, timeout)
        ctx.store(name, rec)
        numbers = {"rows": len(rec["rows"]), **keys(rec["rows"])}
        if rec.get("dispatch_rows"):
            add_dispatch_rows(ctx.out_dir, rec["dispatch_rows"])
            numbers["dispatch_rows"] = len(rec["dispatch_rows"])
        targets = [t for t in rec.get("targets") or [] if isinstance(t, dict)] if judge else []
        warned = [f"{k}: {v}" for k, v in numbers.items() if k.endswith(".warnings")]
        return command_result(rc, text, timeout, numbers, "; ".join(filter(None, [verdicts(targets), *warned])),
                              targets)
    section(name)(run)


def generation_numbers(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        if r.get("status") == "ok":
            out.update({f"{r['preset']} B{r['B']} {r['key']}.{k}": r[k] for k in ("tokens_per_s", "first_call_s",
                                                                                  "step_ms") if r.get(k) is not None})
            out[f"{r['preset']} B{r['B']} floor_ms"] = r["floor_ms"]
            if r.get("warnings"):  # e.g. a CUDA graph that fell back to eager: the row timed something else
                out[f"{r['preset']} B{r['B']} {r['key']}.warnings"] = "; ".join(r["warnings"])
    return out


REFERENCE = ["--preset", "gpt2", "--batch-size", "64", "--prompt-len", "256", "--new-tokens", "128"]
bench_section("generation", "bench_generation", [*REFERENCE, "--impl", "eager", "--impl", "cuda_graph", "--impl",
              "nocache", "--impl", "hf_static", "--warmup", "2", "--iters", "3"], ["--smoke"], generation_numbers)
bench_section("generation_inductor", "bench_generation", [*REFERENCE, "--impl", "cuda_graph", "--impl", "inductor",
              "--warmup", "2", "--iters", "3"], ["--smoke", "--impl", "eager", "--impl", "inductor"],
              generation_numbers, judge=False)
# gpt2-xl's c_attn and mlp c_proj at 4,096 tokens, r 8 / 16: auto, torch and triton against PEFT's chain
bench_section("bench_lora", "bench_lora_linear",
              ["--shape", "4096x1600x4800x8", "--shape", "4096x6400x1600x16", "--rounds", "10"], ["--smoke"],
              lambda rows: ratios(rows, ("pass_", "d_in", "r", "impl"), ("speedup_vs_baseline", "x_floor"),
                                  lambda r: r["impl"] in ("auto", "triton") and r["pass_"] != "bwd"))
bench_section("bench_attention", "bench_attention", ["--iters", "5"], ["--smoke", "--iters", "1"],
              lambda rows: ratios(rows, ("T", "H", "method"), ("vs_triton",), lambda r: r.get("method") == "sdpa_mask"))


def fused_over_unfused(rows: list[dict]) -> dict:
    """bench_logprobs: unfused / fused peak memory and time per (case, width); > 1: the fused kernel wins."""
    by = {(r["case"], r["width"], r["impl"]): r for r in rows}
    return {f"{case}.{width}.{k}": by[case, width, "unfused"][col] / r[col]
            for (case, width, impl), r in by.items() if impl == "fused" and (case, width, "unfused") in by
            for k, col in (("peak_x", "peak_mib"), ("time_x", "time_ms"))}


bench_section("bench_logprobs", "bench_logprobs", ["--repeats", "3", "--warmup", "1"], ["--smoke"], fused_over_unfused)


@section("xl16")
def xl16_section(ctx: Context, timeout: float) -> dict:
    """gpt2-xl LoRA PPO under a 16 GiB cap (`bench_memory_16gb --config lora-xl`): its peak must fit."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "memory-lora-xl.json"
        cmd = [sys.executable, "-m", "benchmarks.bench_memory_16gb", "--config", "lora-xl", "--iters", "1",
               "--json", str(path)] + ["--smoke"] * ctx.smoke
        rc, text = ctx.run(cmd, timeout)
        row = json.loads(path.read_text()) if rc == 0 and path.exists() else None
    if row is None:
        return command_result(1 if rc == 0 else rc, text, timeout)
    ctx.store("xl16", {"benchmark": "memory_16gb", "rows": [row]})
    numbers = {k: v for k, v in row.items() if k.startswith(("peak", "iter", "predicted", "plan", "status", "model"))}
    if row["status"] != "ok":
        return result("FAIL", numbers, error=f"{row['status']}: {row.get('error', '')}"[:240])
    target = {"what": f"{row['model']} LoRA PPO peak GiB (16 GiB cap)", "value": row["peak_iter_gib"],
              "target": "<= 16", "met": None if ctx.smoke else row["peak_iter_gib"] <= 16.0}
    return judged(result("PASS", numbers, f"{row['model']} peak {row['peak_iter_gib']:.2f} GiB (cap 16; plan "
                         f"{row['predicted_peak_gib']:.2f} at micro-batch {row['plan_micro_batch']}"
                         f"{', checkpointing' if row['plan_grad_checkpoint'] else ''})", targets=[target]))


@section("pytest_gpu")
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
