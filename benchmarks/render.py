"""BENCHMARKS.md's tables of recorded runs, rendered from the records in benchmarks/results/ (never by hand).

    python -m benchmarks.render            # rewrite the part of BENCHMARKS.md between the markers
    python -m benchmarks.render --check    # exit 1 when that part is stale (tests/test_bench_harness.py)

Every record (`*.json` directly under benchmarks/results/) of a suite listed in COLUMNS becomes one table,
newest first, headed by where it ran (device, torch/triton versions, commit, UTC time) and its file name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhf_fast.benchmarking.harness import RESULTS_DIR, describe, fmt

DOC = RESULTS_DIR.parent.parent / "BENCHMARKS.md"
START, END = "<!-- rendered records: start (python -m benchmarks.render) -->", "<!-- rendered records: end -->"
# benchmark name -> (title, the columns shown)
COLUMNS = {
    "lora_linear": ("LoRA linear (`bench_lora_linear`)", ["group", "impl", "median_ms", "wall_ms",
                                                         "speedup_vs_baseline", "x_floor"]),
    "host_overhead": ("Host cost per fwd+bwd, launches stubbed (`bench_host_overhead`)",
                      ["kernel", "triton_us", "torch_us", "ratio", "launches", "triton_aten_ops", "torch_aten_ops"]),
    "attention": ("Masked attention (`bench_attention`)", ["T", "H", "B", "method", "fwd_ms", "bwd_ms", "fwdbwd_ms",
                                                           "fwdbwd_wall_ms", "vs_triton", "note"]),
}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def render(results: Path = RESULTS_DIR) -> str:
    records = []
    for path in sorted(results.glob("*.json")):
        rec = json.loads(path.read_text())
        if rec.get("benchmark") in COLUMNS and not rec.get("smoke"):
            records.append((rec["environment"]["time_utc"], path.name, rec))
    parts = []
    for _, name, rec in sorted(records, key=lambda t: t[0], reverse=True):
        title, columns = COLUMNS[rec["benchmark"]]
        env = rec["environment"]
        parts.append(f"**{title}**: {describe(env)}, {env['time_utc']} (`benchmarks/results/{name}`)\n\n"
                     + markdown_table([r for r in rec["rows"] if "T_max" not in r], columns))
        for t in rec.get("targets") or []:
            met = {True: "met", False: "NOT met", None: "not judged here"}[t.get("met")]
            parts.append(f"- target: {t['what']} = {fmt(t['value'])} (want {t['target']}): {met}")
    return "\n\n".join(parts) if parts else "(no records yet)"


def updated(doc: str, body: str) -> str:
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}\n{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 when BENCHMARKS.md's rendered part is stale")
    args = p.parse_args(argv)
    doc = DOC.read_text()
    new = updated(doc, render())
    if args.check:
        if new != doc:
            print("BENCHMARKS.md is stale: run python -m benchmarks.render")
            return 1
        return 0
    DOC.write_text(new)
    print(f"rendered {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
