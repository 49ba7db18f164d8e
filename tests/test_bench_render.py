"""benchmarks/render.py: BENCHMARKS.md's tables come from the records, every row carrying where it ran (device,
torch, triton, commit, date): gpu_check runs of today's format and of the first GPU run's older one, the suite
records inside them (one without its own environment), top-level records; smoke runs are left out."""

import json
import shutil
from pathlib import Path

from benchmarks import render
from benchmarks.gpu_workers import result

OLD_RUN = "gpu_check-20261129T2310Z-h200-f03081a"  # before sections judged targets; no suite records
ENV = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0+cu130", "triton": "3.9.0", "commit": "abc1234",
       "time_utc": "2026-12-08T10:00:00+00:00"}


def _new_run(results: Path, smoke: bool = False) -> Path:
    folder = results / ("gpu_check-new-smoke" if smoke else "gpu_check-new")
    folder.mkdir()
    target = {"what": "gpt2 cold_start_s (ours (triton kernels, compiled))", "value": 41.5, "target": "<= 60",
              "met": True}
    sections = [{"section": "env", **result("PASS", ENV, "device=H100"), "seconds": 3.0},
                {"section": "e2e", **result("FAIL", {"cold_start_s": 41.5}, "e2e detail", "missed: x",
                                            [target, {**target, "what": "gpt2 x baseline", "met": False}]),
                 "seconds": 140.0},
                {"section": "kernels", **result("PASS", {"lora_r8.err_ratio": 0.5, "lora_r8.triton_ms": 1.0,
                                                         "lora_r8.torch_ms": 0.7, "lora_r8.x_torch": 0.7}),
                 "seconds": 30.0},
                {"section": "pytest_gpu", **result("PENDING", detail="not reached yet"), "seconds": 0.0}]
    summary = {"overall": "RUNNING (3 of 4 sections done)", "smoke": smoke, "time_utc": "20261208T100000Z",
               "device": ENV["device"], "commit": ENV["commit"], "sections": sections}
    (folder / "summary.json").write_text(json.dumps(summary))
    e2e = {"benchmark": "e2e", "environment": ENV, "targets": {"gpt2": {"cold_start_s": {**target, "best": "ours"}}},
           "rows": [{"preset": "gpt2", "section": "ppo", "impl": "ours (triton kernels, compiled)", "status": "ok",
                     "samples_per_s": 12.5, "first_iteration_s": 41.5}]}
    (folder / "e2e-gpt2.json").write_text(json.dumps(e2e))
    generation = {"benchmark": "generation", "environment": ENV, "targets": [],
                  "rows": [{"preset": "gpt2", "B": 64, "impl": "ours CUDA graph", "status": "ok", "tokens_per_s": 9e4}]}
    xl16 = {"benchmark": "memory_16gb", "rows": [{"model": "gpt2-xl", "status": "ok", "peak_iter_gib": 13.25}]}
    (folder / "kernel_benchmarks.json").write_text(json.dumps({"generation": generation, "xl16": xl16}))
    return folder


def test_render_puts_where_it_ran_on_every_row_of_old_and_new_gpu_check_runs(tmp_path):
    shutil.copytree(render.RESULTS_DIR / OLD_RUN, tmp_path / OLD_RUN)
    for path in render.RESULTS_DIR.glob("*.json"):
        shutil.copy(path, tmp_path)
    _new_run(tmp_path)
    _new_run(tmp_path, smoke=True)
    text = render.render(tmp_path)
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| run |")
            and "---|" not in ln]
    header_rows = [ln for ln in text.splitlines() if ln.startswith("| ") and ln.rstrip().endswith(
        "| device | torch | triton | commit | date |")]
    separators = [ln for ln in text.splitlines() if ln.startswith("|---|")]
    assert header_rows and len(header_rows) == len(separators)  # every table ends with where it ran
    body = [ln for ln in rows if ln not in header_rows]
    for ln in body:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        device, torch_version, triton_version, commit, date = cells[-5:]
        assert device != "-" and torch_version != "-" and commit != "-" and date[:4] == "2026", ln
    assert "gpu_check-new-smoke" not in text  # smoke runs are left out
    # the new run: its sections (a PENDING one too), its judged targets, its kernels and its suite records
    assert "| gpu_check-new | pytest_gpu | PENDING |" in text
    assert "| gpu_check-new | e2e | gpt2 x baseline | 41.5 | <= 60 | MISSED | NVIDIA H100 80GB HBM3 |" in text
    assert "| gpu_check-new | lora_r8 | 0.5 | 1 | 0.7 | 0.7 | NVIDIA H100 80GB HBM3 |" in text
    assert "`benchmarks/results/gpu_check-new/e2e-gpt2.json`" in text
    assert "`benchmarks/results/gpu_check-new/kernel_benchmarks.json[generation]`" in text
    # xl16's row has no environment of its own: it takes the run's
    assert "| gpt2-xl | - | ok | 13.25 | - | - | - | - | NVIDIA H100 80GB HBM3 | 2.13.0+cu130 |" in text
    # the first GPU run's older summary: every section, its kernels, where it ran
    assert f"| {OLD_RUN} | compile | FAIL |" in text and f"| {OLD_RUN} | lora_r128 | 0.5 |" in text
    assert "| NVIDIA H200 | 2.11.0+cu130 | 3.6.0 | 7afe471-dirty | 2026-11-29 23:10 |" in text
    assert text.index("gpu_check-new |") < text.index(f"{OLD_RUN} |")  # newest first


def test_render_updates_only_the_part_between_the_markers():
    doc = f"head\n{render.START}\nold\n{render.END}\ntail\n"
    assert render.updated(doc, "new") == f"head\n{render.START}\nnew\n{render.END}\ntail\n"
