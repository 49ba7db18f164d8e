"""GPU readiness on a machine without a GPU: every Triton launch the project makes, compiled for sm_80,
sm_86, sm_89 and sm_90 with Triton's own compiler, must fit the target's shared memory, in 16-bit
configs not spill, and on sm_90 put its tall 16-bit dots on wgmma; streaming kernels must fill a wave of
SMs at GPT-2 XL token counts; the table must match the checked-in record (see cross_compile.py)."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cross_compile import STREAMING, Grid, Row, _grid, ctas_per_sm, occupancy_warnings, problems, wave_problems  # noqa: E402


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
    # the wave rule saw every streaming kernel on every target (a renamed kernel would pass it silently)
    seen = {(g["kernel"], g["target"]) for g in result["grids"]}
    assert seen == {(k, t) for k in STREAMING for t in (80, 86, 89, 90)}
    if result["warnings"]:
        warnings.warn(f"{len(result['warnings'])} launches at 1 CTA/SM, e.g. " + "; ".join(result["warnings"][:3]),
                      stacklevel=1)


def row(**kw) -> Row:
    base = dict(kernel="k", config="c", dtype="bfloat16", target=86, key="x", scenario="s", warps=8, persistent=False,
                registers=128, shared=1000, smem_limit=101376, spill_stores=0, spill_loads=0, stack=0, wgmma=0,
                mma_sync=64, tall_dots_mma_sync=0, ctas_per_sm=2)
    return Row(**{**base, **kw})


def test_limits_are_checked():
    """The checker itself: over-limit shared memory, 16-bit spills and compile errors are problems."""
    assert problems([row()]) == []
    assert problems([row(dtype="float32", spill_stores=64)]) == []  # fp32 may spill (IEEE dots), not 16-bit
    assert len(problems([row(shared=131072), row(spill_stores=8), row(error="OutOfResources")])) == 3


def test_tall_dots_must_use_wgmma_on_sm90():
    """A 16-bit dot of >= 64 rows left on mma.sync is a problem on sm_90 only (sm_80-89 have no wgmma)."""
    slow = row(target=90, tall_dots_mma_sync=3, mma_sync=72)
    (msg,) = problems([slow])
    assert "3 16-bit dot(s) of >= 64 rows compiled to mma.sync" in msg and "0 wgmma / 72 mma.sync" in msg
    assert problems([row(target=86, tall_dots_mma_sync=3)]) == []
    assert problems([row(target=90, wgmma=30, mma_sync=0)]) == []
    assert len(problems([row(target=90, tall_dots_mma_sync=1, spill_stores=8)])) == 2  # each rule reports


def test_streaming_grids_must_fill_a_wave():
    short = Grid("_lora_project_kernel", "bfloat16", 90, "4096 tokens", ctas=64, sms=132)
    (msg,) = wave_problems([short, Grid("_lora_project_kernel", "bfloat16", 90, "16384 tokens", ctas=256, sms=132)])
    assert "_lora_project_kernel sm_90 bfloat16 (4096 tokens): 64 CTAs < 132 SMs" in msg
    assert wave_problems([Grid("k", "bfloat16", 86, "s", ctas=48, sms=48)]) == []


def test_grid_is_resolved_with_the_launch_meta():
    meta_grid = lambda meta: (-(-meta["M"] // meta["BLOCK_M"]), 3)  # noqa: E731 (as launchers write grids)
    assert _grid(meta_grid, {"M": 4096}, {"BLOCK_M": 64}) == (64, 3)
    assert _grid((7, 2), {"M": 1}, {}) == (7, 2)


def test_ctas_per_sm_takes_the_tightest_limit():
    assert ctas_per_sm(255, 28928, 8, 86) == 1  # registers: 8 warps x 256 a thread = the whole file
    assert ctas_per_sm(128, 0, 4, 90) == 4  # registers
    assert ctas_per_sm(121, 0, 4, 90) == 4  # 121 is allocated as 128
    assert ctas_per_sm(32, 0, 16, 86) == 3 and ctas_per_sm(32, 0, 16, 90) == 4  # threads: 1536 vs 2048
    assert ctas_per_sm(64, 57344, 4, 90) == 4 and ctas_per_sm(64, 57344, 4, 80) == 2  # shared + 1 KB reserved
    assert [ctas_per_sm(16, 0, 1, t) for t in (80, 86, 89, 90)] == [32, 16, 24, 32]  # blocks


def test_one_cta_per_sm_warns_unless_persistent():
    assert len(occupancy_warnings([row(ctas_per_sm=1), row(ctas_per_sm=2)])) == 1
    assert occupancy_warnings([row(ctas_per_sm=1, persistent=True), row(ctas_per_sm=0, error="x")]) == []
    assert problems([row(ctas_per_sm=1)]) == []  # a warning, not a failure
