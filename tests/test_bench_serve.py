"""`python -m benchmarks.bench_serve --smoke` against real `rlhf-fast serve --model tiny` servers: the record holds the
batched and the unbatched mode, each with its request count, tokens and throughput/latency fields, and their
ratios; the issue's target is not judged on smoke sizes. Speed is never judged here."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("requests", "completion_tokens", "wall_s", "tokens_per_s", "requests_per_s", "p50_ms", "p95_ms", "mean_ms")


def test_smoke_record_has_both_modes_with_throughput_and_latency(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a plumbing check: no torch threads waiting on a busy machine
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_serve", "--smoke", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = list(tmp_path.glob("serve-smoke-cpu-*.json"))
    assert len(records) == 1 and f"record: {records[0]}" in proc.stdout
    rec = json.loads(records[0].read_text())
    env = rec["environment"]
    assert env["device"] and env["torch"] and env["commit"]
    cfg = rec["config"]
    assert cfg["model"] == "tiny" and cfg["smoke"]

    rows = {r["mode"]: r for r in rec["rows"]}
    assert set(rows) == {"batched", "unbatched"}
    assert rows["unbatched"]["server_args"] == "--max-batch-size 1"
    assert f"--max-batch-size {cfg['max_batch_size']}" in rows["batched"]["server_args"]
    for mode, r in rows.items():
        assert all(isinstance(r[f], (int, float)) and r[f] > 0 for f in FIELDS), (mode, r)
        assert r["requests"] == cfg["clients"] * cfg["requests_per_client"], mode
        assert 0 < r["completion_tokens"] <= r["requests"] * cfg["max_tokens"], mode
        assert r["p50_ms"] <= r["p95_ms"], mode
        assert abs(r["tokens_per_s"] - r["completion_tokens"] / r["wall_s"]) < 1e-6 * r["tokens_per_s"], mode
    # requests per generate call, from the servers' /health counters: one at a time means batches of one
    unbatched = rows["unbatched"]
    assert unbatched["mean_batch"] == 1 and unbatched["batch_sizes"] == {"1": unbatched["requests"]}
    assert 1 <= rows["batched"]["mean_batch"] <= cfg["max_batch_size"]

    comp = rec["comparison"]
    assert comp["tokens_per_s_ratio"] == rows["batched"]["tokens_per_s"] / rows["unbatched"]["tokens_per_s"]
    assert comp["p95_ratio"] == rows["batched"]["p95_ms"] / rows["unbatched"]["p95_ms"]
    assert [t["met"] for t in rec["targets"]] == [None, None]  # the target is for demo x 16 clients, not smoke
    for header in ("tokens_per_s", "p95_ms", "batched / unbatched", "== targets (issue 17"):
        assert header in proc.stdout
