"""The one timer and record format of every benchmark: `rlhf-fast bench` (suite.py) and the suites under
benchmarks/ (`python -m benchmarks.<name>`).

    timed_calls / time_fn   wall seconds per call after warm-up (host + GPU: CUDA-synchronised around each
                            call); the median. What end-to-end numbers (tokens/s, steps/s) are made of
    time_kernels            GPU seconds per call by CUDA events with the host's launch cost hidden (the
                            stream is held by a calibrated sleep while the call is queued), and wall seconds
                            beside it: what kernel comparisons are judged on; CPU: wall for both
    time_interleaved        several calls compared with one another: time_kernels each on CUDA, round-robin
                            wall times on CPU (a passing load weighs on all alike)
    copy_bandwidth          measured device-to-device copy bytes/s (the yardstick of memory-bound kernels)
    compare                 per group of rows timing the same thing: speed-up over the group's baseline row
                            and slow-down against its floor row
    print_table             an aligned table on stdout
    write_record            {benchmark, environment, rows, ...} as JSON: benchmarks/results/ on a GPU,
                            .benchmarks/smoke/ (git-ignored) on CPU, or a directory given with --out-dir
    suite_parser            the flags every suite shares (--smoke, --out-dir)
    environment, describe   what a record carries (device, versions, commit) and its one-line summary

Imports torch only (never triton or the kernels), so a suite can choose the Triton interpreter
(`use_interpreter_without_cuda`) after importing this and before importing rlhf_fast.kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from .monitor import REPO_ROOT, environment, sync

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"  # recorded GPU runs (committed)
SMOKE_DIR = REPO_ROOT / ".benchmarks" / "smoke"  # CPU plumbing runs (git-ignored)


def use_interpreter_without_cuda() -> bool:
    """Without CUDA, set TRITON_INTERPRET=1 (unless set) so Triton kernels run on CPU tensors through the
    interpreter; call before rlhf_fast.kernels is imported. True when the interpreter is on."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --- timing ---------------------------------------------------------------------------------------


def median(xs, key=None):
    """The middle element of xs in `key` order (the upper one of an even count)."""
    xs = sorted(xs, key=key)
    return xs[len(xs) // 2]


def timed_calls(fn: Callable, *, device="cpu", warmup: int = 3, iters: int = 10,
                keep: bool = True) -> tuple[list[float], list]:
    """(wall seconds, return value) of each of `iters` calls of fn() after `warmup` untimed ones. CUDA is
    synchronised before and after every timed call, so a time is the host's work (Python, launches) and
    the GPU's together, whichever is longer per kernel: wall time, not kernel time (see `time_kernels`).
    keep=False drops each return value at once (outputs kept alive would make the allocator grow mid-run)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times, outs = [], []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        if keep:
            outs.append(fn())
        else:
            fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, outs


def time_fn(fn: Callable, *, device="cpu", warmup: int = 3, iters: int = 10) -> float:
    """Median wall seconds per call of fn() (see `timed_calls`; return values are dropped)."""
    return median(timed_calls(fn, device=device, warmup=warmup, iters=iters, keep=False)[0])


_SLEEP_CYCLES_PER_S: dict[int, float] = {}


def _sleep_cycles_per_s(device: torch.device) -> float:
    """torch.cuda._sleep's cycles per second on this device, measured once with CUDA events."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SLEEP_CYCLES_PER_S:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 10_000_000
        torch.cuda._sleep(cycles // 10)  # warm the path
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _SLEEP_CYCLES_PER_S[index] = cycles / (start.elapsed_time(end) / 1e3)
    return _SLEEP_CYCLES_PER_S[index]


def time_kernels(fn: Callable, *, device="cpu", warmup: int = 3, iters: int = 10) -> tuple[float, float]:
    """(median GPU seconds, median wall seconds) per call of fn().

    GPU seconds: CUDA events recorded around each call while the stream is held by a sleep kernel longer
    than the call's measured wall time, so every launch is queued before the first kernel starts and the
    events see the kernels back to back: kernel time without the host's share (a call that synchronises
    inside falls back to including it). Wall seconds: `time_fn`'s. On CPU both are the wall time.
    """
    device = torch.device(device)
    wall = time_fn(fn, device=device, warmup=warmup, iters=iters)
    if device.type != "cuda":
        return wall, wall
    sleep = int(min(2 * wall + 1e-3, 0.2) * _sleep_cycles_per_s(device))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    gpu = []
    for _ in range(iters):
        torch.cuda.synchronize(device)
        torch.cuda._sleep(sleep)
        start.record()
        fn()
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end) / 1e3)
    return median(gpu), wall


def time_interleaved(calls: dict[str, Callable], *, device="cpu", warmup: int = 3,
                     iters: int = 10) -> dict[str, tuple[float, float]]:
    """{name: (GPU seconds, wall seconds)} per call of each of `calls`, compared with one another. CUDA:
    `time_kernels` per call. CPU: round-robin, one call of each per round, median over `iters` rounds, so
    a load that comes and goes (a shared machine) weighs on every call alike."""
    device = torch.device(device)
    if device.type == "cuda":
        return {name: time_kernels(fn, device=device, warmup=warmup, iters=iters) for name, fn in calls.items()}
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(iters):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (median(ts), median(ts)) for name, ts in times.items()}


def copy_bandwidth(device="cuda", nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted); 64 MiB on CPU."""
    device = torch.device(device)
    n = (nbytes if device.type == "cuda" else 64 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / time_fn(lambda: dst.copy_(src), device=device)


def compare(rows: list[dict], *, group: str = "group", key: str = "median_ms") -> list[dict]:
    """Within each group (rows with the same `group` value, timing the same thing), set on every row
    speedup_vs_baseline = the baseline row's time / its time (> 1: faster than the baseline) and
    x_floor = its time / the floor row's time (>= 1: how far from the lower bound). A row is the baseline
    with `baseline=True`, the floor with `floor=True`; a group without one gets None. `key`: the time
    column. Returns rows."""
    members = defaultdict(list)
    for r in rows:
        members[r[group]].append(r)
    for rs in members.values():
        base = next((r[key] for r in rs if r.get("baseline") and r.get(key)), None)
        floor = next((r[key] for r in rs if r.get("floor") and r.get(key)), None)
        for r in rs:
            t = r.get(key)
            r["speedup_vs_baseline"] = base / t if base and t else None
            r["x_floor"] = t / floor if floor and t else None
    return rows


# --- tables and records ---------------------------------------------------------------------------


def fmt(v) -> str:
    """A table cell."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows as aligned columns (default: the first row's keys); floats to 4 significant digits, None as -."""
    if not rows:
        return ""
    columns = columns or list(rows[0])
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    if rows:
        print(format_table(rows, columns), flush=True)


def describe(env: dict) -> str:
    """One line naming where a run ran: device, versions, commit."""
    return f"{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}"


def default_out_dir(device=None) -> Path:
    """benchmarks/results/ for a CUDA run, .benchmarks/smoke/ otherwise (device None: CUDA if available)."""
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return RESULTS_DIR if cuda else SMOKE_DIR


def record_stem(name: str, env: dict) -> str:
    """<name>-<device>-<UTC time>, e.g. ppo-nvidia-h200-20261129T231000."""
    device = "".join(ch if ch.isalnum() else "-" for ch in env["device"].split(" (")[0]).strip("-").lower()
    stamp = env["time_utc"].removesuffix("+00:00").replace(":", "").replace("-", "")
    return f"{name}-{device}-{stamp}"


def write_json(record: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def write_record(name: str, rows: list[dict], extra: dict | None = None, out_dir=None,
                 env: dict | None = None) -> Path:
    """Write {benchmark, environment, rows, **extra} to <out_dir>/<record_stem>.json (out_dir None:
    `default_out_dir()`); returns the path."""
    env = env or environment()
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    record = {"benchmark": name, "environment": env, "rows": rows, **(extra or {})}
    return write_json(record, out_dir / f"{record_stem(name, env)}.json")


# --- the suites' command line ---------------------------------------------------------------------


def suite_parser(doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser with the flags every suite under benchmarks/ shares."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: a CPU plumbing check in seconds (times "
                   "meaningless)")
    p.add_argument("--out-dir", type=Path, default=None, help="directory of the JSON record (default: "
                   "benchmarks/results/ on a GPU, .benchmarks/smoke/ on CPU)")
    return p


def print_targets(targets: list[dict], title: str = "targets") -> None:
    """Print judged targets: {..., value, target, met (True / False / None: not judged here)}."""
    if targets:
        print(f"\n== {title}")
        print_table([{**t, "met": {True: "met", False: "NOT met", None: "n/a"}[t["met"]]} for t in targets])
