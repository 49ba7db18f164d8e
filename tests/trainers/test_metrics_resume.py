"""metrics.jsonl across restarts: a resumed run does not repeat steps; a fresh one starts a fresh file."""

import json

from rlhf_fast.trainers.metrics import MetricsLogger


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _first_run(run, steps):
    logger = MetricsLogger(run, report_to="none")
    logger.event(0, data="synthetic")
    for step in range(1, steps + 1):
        logger.log(step, {"loss": 1.0 / step})
    logger.event(steps // 2, checkpoint="step-half")
    logger.close()


def test_resume_drops_the_steps_it_logs_again_and_keeps_its_own_lines(tmp_path):
    run = tmp_path / "run"
    _first_run(run, steps=5)  # crashed after step 5; its last checkpoint was step 2
    resumed = MetricsLogger(run, report_to="none")
    resumed.event(0, data="synthetic", resumed=True)  # a builder's data report, before training starts
    resumed.truncate(2)
    resumed.log(3, {"loss": 0.3})
    records = _records(run)
    assert [r["step"] for r in records] == [0, 1, 2, 2, 0, 3]
    assert records[3]["event"] == {"checkpoint": "step-half"} and records[4]["event"]["resumed"]
    assert not list(run.glob(".*tmp"))  # the rewrite went through a temporary file


def test_fresh_start_drops_an_earlier_run_but_not_its_own_report(tmp_path):
    run = tmp_path / "run"
    _first_run(run, steps=3)
    fresh = MetricsLogger(run, report_to="none")
    fresh.event(0, data="hh")
    fresh.truncate(-1)
    fresh.log(1, {"loss": 2.0})
    assert _records(run) == [{"step": 0, "time": _records(run)[0]["time"], "event": {"data": "hh"}},
                             {"step": 1, "time": _records(run)[1]["time"], "train/loss": 2.0}]
    fresh.truncate(-1)  # again (train() called twice): this logger's lines stay
    assert len(_records(run)) == 2


def test_a_torn_last_line_is_dropped_other_odd_lines_kept(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": 1, "x": 1}), "not json, but not ours to judge", json.dumps({"note": "no step"}),
             json.dumps({"step": 4, "x": 4}), '{"step": 5, "x']  # the crash cut the last write short
    (run / "metrics.jsonl").write_text("\n".join(lines))
    logger = MetricsLogger(run, report_to="none")
    logger.event(0, data="d")  # lands on a line of its own despite the torn line before it
    logger.truncate(3)
    kept = (run / "metrics.jsonl").read_text().splitlines()
    assert kept[:3] == lines[:3] and len(kept) == 4 and json.loads(kept[3])["event"] == {"data": "d"}


def test_only_the_main_process_writes(tmp_path):
    run = tmp_path / "run"
    _first_run(run, steps=3)
    before = (run / "metrics.jsonl").read_text()
    other_rank = MetricsLogger(run, enabled=False)
    other_rank.truncate(-1)
    other_rank.log(9, {"loss": 0.0})
    assert (run / "metrics.jsonl").read_text() == before
    MetricsLogger(tmp_path / "empty", report_to="none").truncate(0)  # no file yet: nothing to do
    assert not (tmp_path / "empty" / "metrics.jsonl").exists()
