"""BENCHMARKS.md's tables of recorded runs, rendered from the records in benchmarks/results/ (never by hand).

    python -m benchmarks.render            # rewrite the part of BENCHMARKS.md between the markers
    python -m benchmarks.render --check    # exit 1 when that part is stale (tests/test_bench_harness.py)

What is rendered, newest first, every row carrying where it ran (device, torch, triton, commit, date):
- every gpu_check run (`gpu_check-*/summary.json`): one row per section (status, seconds, its numbers), the
  targets its sections judged, and the kernels section's error ratios and CUDA-event times. Older summaries
  (before sections judged targets) render too: what they lack is left out;
- every suite record of a type in COLUMNS: `*.json` directly under benchmarks/results/, and inside a gpu_check
  folder its e2e-*.json and the records in kernel_benchmarks.json (by section); a record without its own
  environment (xl16's row) takes the run's. Smoke runs are left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhf_fast.benchmarking.harness import RESULTS_DIR, fmt

from ._gpu_sections import target_label

DOC = RESULTS_DIR.parent.parent / "BENCHMARKS.md"
START, END = "<!-- rendered records: start (python -m benchmarks.render) -->", "<!-- rendered records: end -->"
WHERE = ["device", "torch", "triton", "commit", "date"]
# benchmark name -> (title, the columns shown)
COLUMNS = {
    "e2e": ("End to end (`rlhf-fast bench`)", ["preset", "section", "impl", "status", "samples_per_s", "tokens_per_s",
                                               "first_iteration_s", "generate_fraction", "iteration_gpu_util_mean",
                                               "train_peak_reserved_gib"]),
    "generation": ("Generation (`bench_generation`)", ["preset", "B", "P", "N", "dtype", "impl", "status",
                                                       "tokens_per_s", "first_call_s", "step_ms", "floor_ms",
                                                       "step_over_floor", "x_vs_ours_eager"]),
    "memory_16gb": ("16 GiB memory plan (`bench_memory_16gb`)", ["model", "config", "status", "peak_iter_gib",
                                                                 "predicted_peak_gib", "plan_micro_batch",
                                                                 "plan_grad_checkpoint", "iter_s"]),
    "logprobs": ("Fused lm-head log-probs (`bench_logprobs`)", ["case", "width", "impl", "backend", "B", "T",
                                                                "peak_mib", "time_ms"]),
    "lora_linear": ("LoRA linear (`bench_lora_linear`)", ["group", "impl", "median_ms", "wall_ms",
                                                         "speedup_vs_baseline", "x_floor"]),
    "host_overhead": ("Host cost per fwd+bwd, launches stubbed (`bench_host_overhead`)",
                      ["kernel", "triton_us", "torch_us", "ratio", "launches", "triton_aten_ops", "torch_aten_ops"]),
    "serve": ("Serving: dynamic batching vs one request at a time (`bench_serve`)",
              ["mode", "server_args", "clients", "requests", "tokens_per_s", "p50_ms", "p95_ms", "mean_batch",
               "load_1m"]),
    "rl_algorithms": ("Does every RL option learn? (`rl_algorithms`, held-out reward before -> after)",
                      ["task", "option", "reward_before", "reward_after", "greedy_before", "greedy_after",
                       "kl_after", "iterations", "seconds"]),
    "compile": ("Compile cost: regional vs whole-model, and an RL run's recompiles (`bench_compile`)",
                ["section", "mode", "backend", "compile_s", "cold_minus_warm_s", "speedup_vs_whole", "iteration",
                 "max_new_tokens", "compiles", "compile_graphs"]),
    "attention": ("Masked attention (`bench_attention`)", ["T", "H", "B", "method", "fwd_ms", "bwd_ms", "fwdbwd_ms",
                                                           "fwdbwd_wall_ms", "vs_triton", "note"]),
}
KERNEL_FIELDS = ["err_ratio", "triton_ms", "torch_ms", "x_torch"]


def cell(v, width: int = 0) -> str:
    text = fmt(v).replace("|", "\\|").replace("\n", " ")
    return text if not width or len(text) <= width else text[: width - 3] + "..."


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def where(env: dict, stamp: str | None = None) -> dict:
    """The columns every row carries: device, torch, triton, commit, date (UTC, to the minute)."""
    t = str(env.get("time_utc") or stamp or "")
    if "-" not in t and len(t) >= 13:  # 20261129T230957Z
        t = f"{t[:4]}-{t[4:6]}-{t[6:8]}T{t[9:11]}:{t[11:13]}"
    return {"device": env.get("device"), "torch": env.get("torch"), "triton": env.get("triton"),
            "commit": env.get("commit"), "date": t[:16].replace("T", " ") or None}


def record_targets(rec: dict) -> list[dict]:
    """A record's judged targets as [{what, value, target, met}]: suites keep a list, the e2e record a dict per
    preset."""
    targets = rec.get("targets") or []
    if isinstance(targets, dict):
        return [{"what": f"{preset} {name} ({t.get('best')})", **t} for preset, ts in targets.items()
                for name, t in ts.items() if isinstance(t, dict)]
    return [{**t, "what": target_label(t)} for t in targets if isinstance(t, dict) and "what" in t]


def record_part(rec: dict, name: str, env: dict) -> str:
    title, columns = COLUMNS[rec["benchmark"]]
    at = where(rec.get("environment") or env)
    rows = [{**r, **at} for r in rec["rows"] if "T_max" not in r]
    part = f"**{title}** (`benchmarks/results/{name}`)\n\n" + markdown_table(rows, columns + WHERE)
    verdict = {True: "met", False: "NOT met", None: "not judged here"}
    targets = [f"- target: {t['what']} = {fmt(t['value'])} (want {t['target']}): {verdict[t.get('met')]}"
               for t in record_targets(rec)]
    return "\n\n".join([part, "\n".join(targets)]) if targets else part


def gpu_check_runs(results: Path) -> list[tuple[str, str, dict, dict, list]]:
    """(time, folder, summary, the run's environment, [(name, record)]) of every non-smoke gpu_check run."""
    runs = []
    for folder in sorted(results.glob("gpu_check-*/")):
        path = folder / "summary.json"
        if not path.exists():
            continue
        summary = json.loads(path.read_text())
        if summary.get("smoke"):
            continue
        env_section = next((s for s in summary["sections"] if s["section"] == "env"), {})
        env = {"device": summary.get("device"), "commit": summary.get("commit"), **env_section.get("numbers", {})}
        env.setdefault("time_utc", summary.get("time_utc"))
        records = [(f"{folder.name}/{p.name}", json.loads(p.read_text())) for p in sorted(folder.glob("e2e-*.json"))]
        suites = folder / "kernel_benchmarks.json"
        if suites.exists():
            records += [(f"{folder.name}/kernel_benchmarks.json[{k}]", rec)
                        for k, rec in json.loads(suites.read_text()).items()]
        runs.append((str(where(env)["date"]), folder.name, summary, env, records))
    return runs


def gpu_check_parts(runs) -> list[str]:
    sections, targets, kernel_rows = [], [], []
    for _, folder, summary, env, _ in runs:
        at = where(env)
        for s in summary["sections"]:
            result = s.get("detail") or " ".join(f"{k}={fmt(v)}" for k, v in s.get("numbers", {}).items())
            sections.append({"run": folder, "section": s["section"], "status": s["status"],
                             "seconds": round(s["seconds"], 1),
                             "result": cell(result, 300), "error": cell(s.get("error"), 200), **at})
            targets += [{"run": folder, "section": s["section"], "target": target_label(t), "value": t["value"],
                         "want": t["target"], "met": {True: "met", False: "MISSED", None: "not judged"}[t["met"]],
                         **at} for t in s.get("targets") or []]
            if s["section"] == "kernels":
                names = dict.fromkeys(k.split(".")[0] for k in s.get("numbers", {}) if "." in k)
                kernel_rows += [{"run": folder, "kernel": n, **{f: s["numbers"].get(f"{n}.{f}") for f in KERNEL_FIELDS},
                                 **at} for n in names]
    parts = []
    if sections:
        parts.append("**gpu_check runs**: one row per section (`benchmarks/results/<run>/summary.json`)\n\n"
                     + markdown_table(sections, ["run", "section", "status", "seconds", "result", "error", *WHERE]))
    if targets:
        parts.append("**Targets judged by gpu_check**\n\n" + markdown_table(
            targets, ["run", "section", "target", "value", "want", "met", *WHERE]))
    if kernel_rows:
        parts.append("**Kernels, Triton vs the torch path** (gpu_check `kernels`: err = kernel error / (2 x eager "
                     "error + atol), <= 1 passes; ms: fwd+bwd by CUDA events; x_torch = torch ms / triton ms)\n\n"
                     + markdown_table(kernel_rows, ["run", "kernel", *KERNEL_FIELDS, *WHERE]))
    return parts


def render(results: Path = RESULTS_DIR) -> str:
    runs = sorted(gpu_check_runs(results), key=lambda r: r[0], reverse=True)
    records = [(str(where(rec["environment"])["date"]), path.name, rec, {})
               for path in sorted(results.glob("*.json")) for rec in [json.loads(path.read_text())]]
    records += [(date, name, rec, env) for date, _, _, env, recs in runs for name, rec in recs]
    records = [r for r in records if r[2].get("benchmark") in COLUMNS and not r[2].get("smoke")]
    parts = gpu_check_parts(runs)
    parts += [record_part(rec, name, env) for _, name, rec, env in sorted(records, key=lambda t: t[0], reverse=True)]
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
