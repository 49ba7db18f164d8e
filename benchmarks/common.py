"""Shared benchmark helpers: environment record, timing, copy bandwidth, result files.

Every benchmark prints a table and writes a machine-readable record (GPU name, versions, commit)
under benchmarks/results/, and always times its baseline in the same run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rlhf_fast

# shared with `rlhf-fast bench`
from rlhf_fast.benchmarking.monitor import environment, git_commit  # noqa: E402, F401

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, *, device="cpu", warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call of fn() (CUDA-synchronised around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(device="cuda", nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
    n = nbytes // 4 if torch.device(device).type == "cuda" else (64 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, warmup=3, iters=10)
    return 2 * src.numel() * src.element_size() / t


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_record(name: str, rows: list[dict], extra: dict | None = None, out_dir: Path | None = None) -> Path:
    """Write {environment, rows, extra} to results/<name>-<device>-<utc time>.json; returns the path."""
    env = environment()
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "".join(ch if ch.isalnum() else "-" for ch in env["device"].split(" (")[0]).strip("-").lower()
    stamp = env["time_utc"].replace(":", "").replace("+0000", "").replace("-", "")
    path = out_dir / f"{name}-{device}-{stamp}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": env, "rows": rows, **(extra or {})}, indent=2))
    return path
