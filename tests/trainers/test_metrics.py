import json
import sys
import types

from rlhf_fast.trainers.metrics import MetricsLogger


def test_jsonl_always_and_tensorboard_when_available(tmp_path, monkeypatch, caplog):
    scalars = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter (tensorboard may be absent)
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")

    fake = types.SimpleNamespace(SummaryWriter=FakeWriter)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    logger = MetricsLogger(tmp_path / "run")
    logger.log(3, {"loss": 0.5, "lr": 1e-3})
    logger.event(3, checkpoint="x")
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["train/loss"] == 0.5 and lines[0]["step"] == 3
    assert lines[1]["event"] == {"checkpoint": "x"}
    assert scalars == [("train/loss", 0.5, 3), ("train/lr", 1e-3, 3), "closed"]

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    quiet = MetricsLogger(tmp_path / "run2")  # report_to "auto": TensorBoard only when it imports
    with caplog.at_level("INFO", logger="rlhf_fast"):
        quiet.log(1, {"loss": 1.0})
    assert quiet.sinks == [] and "TensorBoard logging off" in caplog.text
    assert (tmp_path / "run2" / "metrics.jsonl").is_file()
