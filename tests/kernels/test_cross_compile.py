"""GPU readiness on a machine without a GPU: every Triton launch the project makes, compiled for sm_80,
sm_86, sm_89 and sm_90 with Triton's own compiler, must fit the target's shared memory and, in 16-bit
configs, not spill; the table must match the checked-in record (see cross_compile.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_every_launch_fits_every_target(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(HERE / "cross_compile.py"), "--check", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not result["problems"], "\n".join(result["problems"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = result["rows"]
    assert {r["target"] for r in rows} == {80, 86, 89, 90}
    assert {r["dtype"] for r in rows} == {"float32", "float16", "bfloat16"}
    kernels = {r["kernel"] for r in rows}
    assert {"_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel", "_attn_decode_split_kernel",
            "_lora_linear_fwd_kernel", "_lora_project_kernel", "_lora_adapter_grad_kernel", "_gae_fwd_kernel",
            "_ppo_loss_fwd_kernel", "_ppo_loss_bwd_kernel", "_logprobs_fwd_kernel", "_logprobs_bwd_kernel"} <= kernels


def test_limits_are_checked():
    """The checker itself: over-limit shared memory, 16-bit spills and compile errors are problems."""
    sys.path.insert(0, str(HERE))
    from cross_compile import Row, problems

    def row(**kw):
        base = dict(kernel="k", config="c", dtype="bfloat16", target=86, key="x", scenario="s", registers=128,
                    shared=1000, smem_limit=101376, spill_stores=0, spill_loads=0, stack=0)
        return Row(**{**base, **kw})

    assert problems([row()]) == []
    assert problems([row(dtype="float32", spill_stores=64)]) == []  # fp32 may spill (IEEE dots), not 16-bit
    assert len(problems([row(shared=131072), row(spill_stores=8), row(error="OutOfResources")])) == 3
