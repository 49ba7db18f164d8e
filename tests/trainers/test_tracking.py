"""--report-to (TensorBoard, wandb, none, auto), the RL metric names, and closing the sinks however a run ends."""

import importlib.util
import json
import sys
import types

import pytest

from rlhf_fast.cli import main
from rlhf_fast.errors import ConfigError
from rlhf_fast.trainers import RunSettings, build_sft_trainer
from rlhf_fast.trainers.metrics import MetricsLogger

PNG = b"\x89PNG\r\n\x1a\n"
TINY_SFT = ["--preset", "tiny", "--attn-backend", "sdpa", "--device", "cpu", "--max-steps", "3", "--micro-batch-size",
            "4", "--eval-size", "8", "--synthetic-size", "32", "--no-progress", "--no-export", "--log-every", "1"]
TINY_GRPO = ["--preset", "tiny", "--attn-backend", "sdpa", "--device", "cpu", "--iterations", "2", "--group-size", "4",
             "--rollout-batch-size", "2", "--mini-batch-size", "8", "--max-new-tokens", "6", "--eval-prompts", "4",
             "--eval-every", "0", "--save-every", "0", "--no-progress", "--no-export", "--no-compile"]


def _missing(*names):
    """importlib.util.find_spec as on a machine without `names` installed."""
    real = importlib.util.find_spec
    return lambda name, *a, **k: None if name in names else real(name, *a, **k)


def test_report_to_is_validated_with_the_setting_named(monkeypatch):
    assert RunSettings().report_to == ("auto",)
    assert RunSettings(report_to="none").report_to == ("none",)  # a single name from code
    assert RunSettings(report_to=["tensorboard", "wandb", "wandb"]).report_to == ("tensorboard", "wandb")
    for bad, said in ((("none", "wandb"), "stand alone"), (("auto", "tensorboard"), "stand alone"),
                      (("mlflow",), "mlflow"), ((), "one or more")):
        with pytest.raises(ConfigError, match=said) as e:
            RunSettings(report_to=bad)
        assert e.value.where == "report_to"
    monkeypatch.setattr(importlib.util, "find_spec", _missing("tensorboard", "wandb"))
    with pytest.raises(ConfigError, match=r"tensorboard is not installed: pip install tensorboard"):
        RunSettings(report_to="tensorboard")
    with pytest.raises(ConfigError, match=r"wandb is not installed: pip install 'rlhf_fast\[wandb\]'"):
        RunSettings(report_to="wandb")
    assert RunSettings(report_to="auto").report_to == ("auto",)  # auto never fails: TensorBoard when installed


def test_wandb_sink_gets_the_run_config_and_scalars_and_is_finished(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, scalars, step):
            calls.append(("log", step, scalars))

        def finish(self):
            calls.append("finish")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    errors = types.SimpleNamespace(Error=RuntimeError)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, errors=errors))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    MetricsLogger(tmp_path / "rank1", enabled=False, report_to="wandb").log(1, {"loss": 1.0})
    assert calls == []  # only the main process reports
    logger = MetricsLogger(tmp_path / "run", report_to="wandb", config={"optim": {"lr": 0.1}})
    assert calls == []  # nothing started before the first record
    logger.log(1, {"loss": 0.5, "note": "text"})
    logger.log(1, {"loss": 0.4}, prefix="eval")
    logger.close()
    logger.close()  # a second close is a no-op
    assert calls == [("init", {"project": "rlhf_fast", "name": "run", "dir": str(tmp_path / "run"),
                               "config": {"optim": {"lr": 0.1}}, "mode": "offline"}),
                     ("log", 1, {"train/loss": 0.5}), ("log", 1, {"eval/loss": 0.4}), "finish"]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **k: (_ for _ in ()).throw(
        RuntimeError("api_key not configured")), errors=errors))
    with pytest.raises(ConfigError, match="api_key not configured.*WANDB_MODE=offline"):
        MetricsLogger(tmp_path / "online", report_to="wandb").log(1, {"loss": 1.0})


def test_an_asked_for_sink_that_does_not_import_is_an_error_auto_is_not(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match="pip install tensorboard") as e:
        MetricsLogger(tmp_path / "run", report_to="tensorboard").log(1, {"loss": 1.0})
    assert e.value.where == "run.report_to"
    auto = MetricsLogger(tmp_path / "auto")
    with caplog.at_level("INFO", logger="rlhf_fast"):
        auto.log(1, {"loss": 1.0})
    assert auto.sinks == [] and "TensorBoard logging off" in caplog.text


def test_sinks_close_when_training_fails(tmp_path, make_config, monkeypatch):
    closed = []

    class FakeWriter:
        def __init__(self, log_dir):
            pass

        def add_scalar(self, *args):
            pass

        def close(self):
            closed.append(True)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    trainer = build_sft_trainer(make_config(tmp_path, steps=3, report_to="tensorboard"))
    step = trainer.train_step

    def failing_step():
        if trainer.step == 1:
            raise RuntimeError("CUDA error: an illegal memory access")
        return step()

    monkeypatch.setattr(trainer, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        trainer.train()
    assert closed == [True]


@pytest.mark.slow
def test_grpo_metric_names_tensorboard_events_and_curves(tmp_path):
    out = tmp_path / "grpo"
    assert main(["grpo", *TINY_GRPO, "--report-to", "tensorboard", "--output-dir", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = {k for r in records for k in r}
    assert not [k for k in keys if k.startswith("train/train/")], sorted(keys)
    assert {"score", "kl", "kl_coef", "time/generate", "train/loss", "train/grad_norm", "eval/reward"} <= keys
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    assert (out / "curves.png").read_bytes()[:8] == PNG and (out / "curves.png").stat().st_size > 5000
    events = list(out.glob("events.out.tfevents.*"))  # in the run directory: --overwrite knows them
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0])).Reload().Tags()["scalars"]
    assert {"score", "train/loss", "eval/reward"} <= set(tags), tags


@pytest.mark.slow
def test_wandb_offline_run_records_the_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no API key
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # dir=<run dir> wins
    out = tmp_path / "sft"
    assert main(["sft", *TINY_SFT, "--report-to", "wandb", "--output-dir", str(out)]) == 0
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list(out.rglob("*"))
    data = runs[0].read_bytes()  # the offline transaction log: protobuf records, keys stored as plain text
    for key in (b"train/loss", b"train/grad_norm", b"eval/loss", b"report_to"):  # scalars and the run's config
        assert key in data, key
