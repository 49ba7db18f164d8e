"""Metrics sinks of a run: JSONL in the run directory (always), plus what `--report-to` names (TensorBoard,
Weights & Biases), plus tqdm.

`--report-to` (`RunSettings.report_to`): `auto` (the default) adds TensorBoard when it is installed (it is a
default dependency) and says so in the log when it is not; `tensorboard` and `wandb` are required (the config
refuses the run with one line naming the install command when one is missing); `none` keeps metrics.jsonl only.
TensorBoard event files go into the run directory itself; wandb gets `dir=<run dir>` (so `<run dir>/wandb/`),
the project $WANDB_PROJECT (default rlhf_fast), the run's resolved config, and its mode from $WANDB_MODE
(`offline` needs no network; `wandb sync` uploads later).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path

from rlhf_fast.errors import ConfigError

log = logging.getLogger("rlhf_fast")

REPORT_TO = ("auto", "none", "tensorboard", "wandb")
_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install 'rlhf_fast[wandb]'"}


def check_report_to(report_to, installed: bool = True) -> tuple[str, ...]:
    """The `--report-to` values as a tuple, or a ConfigError (setting "report_to"): an unknown name, `none` or
    `auto` beside another name, or (`installed`) a named package that is not installed (checked without
    importing it)."""
    names = (report_to,) if isinstance(report_to, str) else tuple(report_to)
    if not names:
        raise ConfigError(f"give one or more of {REPORT_TO}", "report_to")
    for name in names:
        if name not in REPORT_TO:
            raise ConfigError(f"must be one or more of {REPORT_TO}, got {name!r}", "report_to")
    if len(set(names)) > 1 and {"none", "auto"} & set(names):
        raise ConfigError(f"'none' and 'auto' stand alone, got {' '.join(names)}", "report_to")
    for name in names:
        if installed and name in _INSTALL and importlib.util.find_spec(name) is None:
            raise ConfigError(f"{name} is not installed: {_INSTALL[name]} (or --report-to none)", "report_to")
    return tuple(dict.fromkeys(names))


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict | None):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        # the run directory itself: `--overwrite` knows its events.out.tfevents.* files
        self.writer = SummaryWriter(log_dir=str(run_dir))

    def log(self, step: int, scalars: dict) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: dict | None):
        import wandb

        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "rlhf_fast", name=run_dir.name,
                                  dir=str(run_dir), config=config, mode=os.environ.get("WANDB_MODE"))
        except wandb.errors.Error as e:  # e.g. no API key: one line, with the way to run without network
            raise ConfigError(f"wandb: {e} (WANDB_MODE=offline logs without network)", "run.report_to") from e

    def log(self, step: int, scalars: dict) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


_SINKS = {"tensorboard": _TensorBoard, "wandb": _WandB}


class MetricsLogger:
    """Appends {"step", "time", **metrics} lines to <run_dir>/metrics.jsonl; scalars also to the `report_to`
    sinks (see the module docstring).

    One metrics.jsonl serves a run directory across restarts. Once a trainer knows the step it starts
    from, it calls `truncate(step)` (0..step kept: a resumed run logs the later steps again) or, starting
    from scratch, `truncate(-1)` (nothing of an earlier run kept). Lines this logger has already written
    (e.g. the data report a builder logs at step 0 before training) are always kept. Only the main process
    (`enabled`) writes. The sinks open at the first `log` (a trainer that never trains starts no wandb run),
    `close` ends them, and a later `log` opens them again (a second `train()` call); TensorBoard event files
    and wandb runs of earlier processes are left as they are.
    """

    def __init__(self, run_dir, enabled: bool = True, report_to=("auto",), config: dict | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.report_to = check_report_to(report_to, installed=False)  # a missing package: at the first `log`
        self.config = config  # what wandb records as the run's config
        self.sinks: list | None = None  # None: not open
        self._own_from = 0  # byte offset of this logger's first line in metrics.jsonl
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._own_from = self._end_last_line()

    def _open_sinks(self) -> list:
        sinks = []
        for name in self.report_to:
            if name == "none":
                continue
            try:
                sinks.append(_SINKS["tensorboard" if name == "auto" else name](self.run_dir, self.config))
            except ImportError as e:
                if name == "auto":
                    log.info("TensorBoard logging off (install tensorboard to enable it); metrics go to %s",
                             self.path)
                    continue
                for sink in sinks:  # the ones already open
                    sink.close()
                raise ConfigError(f"{name}: {e}; {_INSTALL[name]} (or --report-to none)", "run.report_to") from e
            except BaseException:
                for sink in sinks:
                    sink.close()
                raise
        return sinks

    def log(self, step: int, metrics: dict, prefix: str | None = "train") -> None:
        """One record of `metrics`, each key as `<prefix>/<key>` (prefix None: the keys as they are)."""
        if not self.enabled:
            return
        scalars = {f"{prefix}/{k}" if prefix else k: v for k, v in metrics.items()}
        record = {"step": step, "time": round(time.time(), 3), **scalars}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.sinks is None:
            self.sinks = self._open_sinks()
        numbers = {k: v for k, v in scalars.items() if isinstance(v, (int, float))}
        for sink in self.sinks:
            sink.log(step, numbers)

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
        """End the sinks (flush TensorBoard, finish the wandb run); metrics.jsonl needs nothing."""
        sinks, self.sinks = self.sinks or [], None
        for sink in sinks:
            sink.close()


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
