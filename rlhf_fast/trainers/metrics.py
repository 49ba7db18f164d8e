"""Metrics sinks of a run: JSONL in the run directory (always), TensorBoard (when installed), tqdm."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("rlhf_fast")


class MetricsLogger:
    """Appends {"step", "time", **metrics} lines to <run_dir>/metrics.jsonl; scalars also to TensorBoard.

    One metrics.jsonl serves a run directory across restarts. Once a trainer knows the step it starts
    from, it calls `truncate(step)` (0..step kept: a resumed run logs the later steps again) or, starting
    from scratch, `truncate(-1)` (nothing of an earlier run kept). Lines this logger has already written
    (e.g. the data report a builder logs at step 0 before training) are always kept. Only the main process
    (`enabled`) writes. TensorBoard event files are left as they are.
    """

    def __init__(self, run_dir, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self._own_from = 0  # byte offset of this logger's first line in metrics.jsonl
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._own_from = self._end_last_line()
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

    def truncate(self, after_step: int) -> None:
        """Drop the records earlier processes wrote for steps > `after_step`, and a torn last line of theirs
        (a crash mid-write); keep every line of this logger. Atomic: a crash leaves the old file or the new."""
        if not self.enabled or not self.path.is_file():
            return
        data = self.path.read_bytes()
        earlier, own = data[: self._own_from], data[self._own_from:]
        lines = earlier.splitlines(keepends=True)
        kept = [line for i, line in enumerate(lines) if _keep(line, after_step, last=i == len(lines) - 1)]
        if kept == lines:
            return
        head = b"".join(kept)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(head + own)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._own_from = len(head)

    def _end_last_line(self) -> int:
        """Size of metrics.jsonl after ending a torn last line with a newline (so that this logger's first
        line starts a line of its own); 0 when there is no file."""
        if not self.path.is_file():
            return 0
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    size += f.write(b"\n")
        return size

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _keep(line: bytes, after_step: int, last: bool) -> bool:
    """Whether `truncate` keeps a line an earlier process wrote."""
    if not line.strip():
        return False
    try:
        record = json.loads(line)
    except ValueError:
        return not last  # a torn last line goes; keep what we cannot read elsewhere (not ours to judge)
    step = record.get("step") if isinstance(record, dict) else None
    return not isinstance(step, int) or step <= after_step
