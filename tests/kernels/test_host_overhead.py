"""Host cost of the Triton paths (benchmarks/bench_host_overhead.py): per forward+backward, the Triton path of every
public kernel, its GPU launches stubbed out, costs the host at most 1.2x what its torch path costs.

Timed on CPU, in a subprocess without TRITON_INTERPRET (the ops registered as on a GPU, not the interpreter's), on
tiny tensors. Robust on a busy 2-core machine: each path's time is the minimum over interleaved repeats (load can
only inflate a minimum), and a kernel over the target is measured again with more repeats, each path keeping its
minimum over both runs, before the test fails. Beside the times, counts no load can change: launches per call, and
ATen ops per call (the Triton path's no more than the torch path's).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ("lora_linear", "masked_attention", "gae", "ppo_loss", "linear_logprobs")
TARGET_RATIO = 1.2
# Launches per call at the bench's tiny shapes (one split everywhere on the stubbed 132-SM sm_90):
# lora_linear: projection + GEMM forward; projection + dX GEMM + dA + dB backward. linear_logprobs: forward
# + merge + one backward chunk. ppo_loss: forward + reduce + backward.
LAUNCHES = {"lora_linear": 6, "masked_attention": 3, "gae": 1, "ppo_loss": 3, "linear_logprobs": 3}


def _bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"host_overhead_{len(list(tmp_path.iterdir()))}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_host_overhead", "--json", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r["kernel"]: r for r in json.loads(out.read_text())["rows"]}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("host_overhead")
    rows = _bench(tmp, "--repeats", "300")
    over = [k for k, r in rows.items() if r["ratio"] > TARGET_RATIO]
    if over:  # a load spike can inflate one path's minimum: measure those again, longer
        again = _bench(tmp, "--repeats", "1500", *(a for k in over for a in ("--kernel", k)))
        for k, r in again.items():
            triton_us, torch_us = min(rows[k]["triton_us"], r["triton_us"]), min(rows[k]["torch_us"], r["torch_us"])
            rows[k] = dict(rows[k], triton_us=triton_us, torch_us=torch_us, ratio=triton_us / torch_us)
    return rows


@pytest.mark.parametrize("kernel", KERNELS)
def test_triton_host_time_at_most_1_2x_the_torch_path(measured, kernel):
    r = measured[kernel]
    assert r["ratio"] <= TARGET_RATIO, (
        f"{kernel}: the Triton path costs the host {r['triton_us']:.1f} us per fwd+bwd, the torch path "
        f"{r['torch_us']:.1f} us: {r['ratio']:.2f}x > {TARGET_RATIO}x (python -m benchmarks.bench_host_overhead)")


@pytest.mark.parametrize("kernel", KERNELS)
def test_launches_and_aten_ops_per_call(measured, kernel):
    r = measured[kernel]
    assert r["launches"] == LAUNCHES[kernel], f"{kernel}: {r['launches']} launches per call"
    assert r["triton_aten_ops"] <= r["torch_aten_ops"], (
        f"{kernel}: the Triton path dispatches {r['triton_aten_ops']} ATen ops per call, the torch path "
        f"{r['torch_aten_ops']}")
