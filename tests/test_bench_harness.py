"""rlhf_fast.benchmarking.harness, the one timer and record format of every suite, and the shape of benchmarks/:
one package of `python -m benchmarks.<name>` modules, no path hacks, no hard-coded data directories."""

import importlib
import json
import re
from pathlib import Path

import pytest
import torch

from rlhf_fast.benchmarking import harness

REPO = Path(__file__).resolve().parents[1]
# every module but the package's own and private helpers (_gpu_sections.py: gpu_check's sections)
SUITES = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


def test_timed_calls_warm_up_then_time_each_call():
    calls = []
    times, outs = harness.timed_calls(lambda: calls.append(len(calls)) or len(calls), warmup=2, iters=3)
    assert len(calls) == 5 and outs == [3, 4, 5]  # the timed calls' return values, after two untimed ones
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert harness.time_fn(lambda: None, warmup=0, iters=3) >= 0


def test_median_picks_the_middle_element_by_key():
    assert harness.median([3.0, 1.0, 2.0]) == 2.0
    assert harness.median([(0.3, "c"), (0.1, "a"), (0.2, "b")], key=lambda x: x[0]) == (0.2, "b")


def test_compare_gives_speedup_over_the_baseline_and_distance_to_the_floor():
    rows = [dict(group="fwd", impl="ours", median_ms=2.0), dict(group="fwd", impl="eager", median_ms=5.0,
                                                                  baseline=True),
            dict(group="fwd", impl="plain", median_ms=1.0, floor=True), dict(group="bwd", impl="ours", median_ms=4.0)]
    out = {(r["group"], r["impl"]): r for r in harness.compare(rows)}
    assert out["fwd", "ours"]["speedup_vs_baseline"] == 2.5 and out["fwd", "ours"]["x_floor"] == 2.0
    assert out["fwd", "eager"]["speedup_vs_baseline"] == 1.0 and out["fwd", "plain"]["x_floor"] == 1.0
    assert out["bwd", "ours"]["speedup_vs_baseline"] is None and out["bwd", "ours"]["x_floor"] is None  # no baseline


def test_write_record_names_the_file_and_carries_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_COMMIT", "abc1234")  # what the GPU machine's copy of the tree is told
    path = harness.write_record("demo", [{"impl": "x", "median_ms": 1.5}], {"targets": []}, out_dir=tmp_path)
    rec = json.loads(path.read_text())
    assert rec["benchmark"] == "demo" and rec["rows"] == [{"impl": "x", "median_ms": 1.5}] and rec["targets"] == []
    env = rec["environment"]
    assert env["commit"] == "abc1234" and env["torch"] == torch.__version__ and env["device"]
    assert path.parent == tmp_path and re.fullmatch(r"demo-[a-z0-9-]+-\d{8}T\d{6}\.json", path.name), path.name


def test_default_out_dir_is_results_on_a_gpu_and_smoke_elsewhere():
    assert harness.default_out_dir("cpu") == REPO / ".benchmarks" / "smoke"
    assert harness.default_out_dir("cuda") == REPO / "benchmarks" / "results"


def test_format_table_aligns_columns():
    text = harness.format_table([{"a": 1.23456, "b": None}, {"a": 10, "b": "x"}])
    assert text.splitlines() == ["a      b", "1.235  -", "10     x"]


def test_benchmarks_is_one_package_without_path_hacks_or_data_directories():
    assert (REPO / "benchmarks" / "__init__.py").is_file()
    assert not (REPO / "benchmarks" / "common.py").exists() and not (REPO / "benchmarks" / "conftest.py").exists()
    sources = list((REPO / "benchmarks").glob("*.py")) + list((REPO / "rlhf_fast" / "benchmarking").glob("*.py"))
    for path in sources:
        text = path.read_text()
        assert "sys.path" not in text, path
        assert "../shared" not in text and '"shared"' not in text, path  # data paths come from flags


@pytest.mark.parametrize("name", SUITES)
def test_every_suite_is_a_runnable_module(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(module.main)
    assert 'if __name__ == "__main__":' in Path(module.__file__).read_text()
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0


def test_benchmarks_md_tables_are_rendered_from_the_records():
    """BENCHMARKS.md's recorded runs come from benchmarks/results/ (python -m benchmarks.render), never by hand."""
    from benchmarks import render

    assert render.main(["--check"]) == 0, "BENCHMARKS.md is stale: run python -m benchmarks.render"
    doc = render.DOC.read_text()
    for path in render.RESULTS_DIR.glob("*.json"):
        if json.loads(path.read_text()).get("benchmark") in render.COLUMNS:
            assert f"benchmarks/results/{path.name}" in doc
    for folder in render.RESULTS_DIR.glob("gpu_check-*/"):
        if not json.loads((folder / "summary.json").read_text()).get("smoke"):
            assert f"| {folder.name} |" in doc
