"""Metrics sinks of a run: JSONL in the run directory (always), TensorBoard (when installed), tqdm."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("rlhf_fast")


class MetricsLogger:
    """Appends {"step", "time", **metrics} lines to <run_dir>/metrics.jsonl; scalars also to TensorBoard."""

    def __init__(self, run_dir, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch's writer needs the tensorboard package
                log.info("TensorBoard logging off (install tensorboard to enable it); metrics go to %s",
                         self.path)
            else:
                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        scalars = {f"{prefix}/{k}": v for k, v in metrics.items()}
        record = {"step": step, "time": round(time.time(), 3), **scalars}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def event(self, step: int, **fields) -> None:
        """A non-scalar record (e.g. data loading report, checkpoint saved)."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "time": round(time.time(), 3), "event": fields}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
