"""The `auto` dispatch table (rlhf_fast/kernels/dispatch_table.json): show it, or merge a GPU run's rows into it.

    python -m benchmarks.dispatch_table                                        # print the shipped table
    python -m benchmarks.dispatch_table --merge benchmarks/results/gpu_check-*/  # add a run's measured rows

--merge takes record files or directories (searched recursively): a gpu_check run's dispatch_rows.json and
any suite record (bench_lora_linear, bench_attention) with a "dispatch_rows" list. A row replaces the table's
row of the same (kernel, key); every row must name the GPU it was measured on (the table holds GPU runs only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhf_fast.benchmarking.harness import print_table
from rlhf_fast.kernels import dispatch


def rows_in(path: Path) -> list[dict]:
    """The dispatch rows a record file, or every JSON file under a directory, carries."""
    files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
    rows = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"dispatch_table: cannot read {f}: {e}") from None
        records = data.values() if f.name == "kernel_benchmarks.json" and isinstance(data, dict) else [data]
        for rec in records:
            if isinstance(rec, dict):
                rows += rec.get("dispatch_rows") or (rec.get("rows", []) if f.name == "dispatch_rows.json" else [])
    for r in rows:
        if not dispatch.is_gpu_row(r):
            raise SystemExit(f"dispatch_table: {path}: not a GPU dispatch row: {r!r}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--merge", type=Path, nargs="+", help="record files or directories whose rows to add")
    p.add_argument("--table", type=Path, default=dispatch.TABLE_PATH, help="the table (default: the package's)")
    args = p.parse_args(argv)
    rows = dispatch.load_rows(args.table)
    if args.merge:
        new = [r for path in args.merge for r in rows_in(path)]
        rows = dispatch.merge_rows(rows, new)
        dispatch.write_rows(rows, args.table)
        print(f"merged {len(new)} row(s) into {args.table}: {len(rows)} in all")
    print_table([{"kernel": r["kernel"], "key": r["key"], "winner": r["winner"], "device": r["device"],
                  **{f"{k}_ms": v for k, v in r.get("ms", {}).items()}} for r in rows]
                or [{"table": f"{args.table}: empty (auto picks the library paths everywhere)"}])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
