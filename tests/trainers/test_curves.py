"""curves.png: the shared plotting function, and the file every stage writes at the end of a run."""

import json

import pytest

from rlhf_fast.cli import main
from rlhf_fast.trainers.curves import RL_PANELS, STAGE_PANELS, plot_curves, read_metrics, series, write_curves

PNG = b"\x89PNG\r\n\x1a\n"
TINY_SFT = ["--preset", "tiny", "--attn-backend", "sdpa", "--device", "cpu", "--max-steps", "3", "--micro-batch-size",
            "4", "--eval-size", "8", "--synthetic-size", "32", "--no-progress", "--no-export", "--log-every", "1",
            "--report-to", "none"]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 5000, (path, len(data))


def test_plot_curves_draws_the_panels_that_have_data(tmp_path):
    # an RM run: train metrics every step, eval every 2 steps; no eval/margin, no train/margin -> no margin panel
    records = [{"step": s, "train/loss": 1.0 / s, "train/accuracy": 0.5 + s / 20} for s in range(1, 7)]
    records += [{"step": s, "eval/loss": 1.2 / s, "eval/accuracy": 0.4 + s / 20} for s in (2, 4, 6)]
    path = tmp_path / "deep" / "curves.png"
    assert plot_curves(records, path, STAGE_PANELS["rm"], title="rm") == ["loss", "pair accuracy"]
    assert_png(path)
    rl = [{"step": 1, "score": 0.1, "kl": 0.0, "train/loss": 0.3}, {"step": 2, "score": 0.4, "kl": 0.2}]
    titles = plot_curves(rl, tmp_path / "rl.png", RL_PANELS, xlabel="iteration")
    assert titles == ["reward", "KL to the reference (nats / sequence)", "loss"]
    assert plot_curves([{"step": 1, "other": 1.0}], tmp_path / "none.png", STAGE_PANELS["sft"]) == []
    assert not (tmp_path / "none.png").exists()  # nothing to draw: no file


def test_read_metrics_keeps_step_records_and_the_last_value_of_a_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 0, "time": 1.0, "event": {"data": "synthetic"}}, {"step": 2, "train/loss": 3.0},
             {"step": 1, "train/loss": 4.0}, {"step": 2, "train/loss": 2.0}, {"step": 3, "eval/loss": 1.5}]
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + '\n{"step": 4, "train/lo')
    records = read_metrics(run / "metrics.jsonl")
    assert len(records) == 4  # the event and the torn last line are skipped
    assert series(records, "train/loss") == ([1, 2], [4.0, 2.0])
    assert write_curves(run, STAGE_PANELS["sft"]) == run / "curves.png"
    assert_png(run / "curves.png")
    assert read_metrics(tmp_path / "missing.jsonl") == [] and write_curves(tmp_path / "missing", RL_PANELS) is None


@pytest.mark.slow
def test_an_sft_run_writes_its_curves_and_overwrite_replaces_them(tmp_path):
    out = tmp_path / "sft"
    assert main(["sft", *TINY_SFT, "--output-dir", str(out)]) == 0
    assert_png(out / "curves.png")
    first = (out / "curves.png").read_bytes()
    assert main(["sft", *TINY_SFT, "--max-steps", "2", "--output-dir", str(out), "--overwrite"]) == 0
    assert (out / "curves.png").read_bytes() != first  # deleted with the old run, drawn again for 2 steps
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r] == [1, 2]
