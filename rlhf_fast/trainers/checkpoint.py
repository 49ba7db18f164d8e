"""Atomic checkpoints in a run directory, keep-last-N, and RNG state capture for exact resume.

Layout:
    <run_dir>/config.json
    <run_dir>/checkpoints/step-00000100/{weights.pt, optim.pt, rng.pt, trainer_state.json}

A checkpoint is written into `checkpoints/.tmp-step-...` and renamed into place only after every file
is written and flushed; `trainer_state.json` is written last and marks a complete checkpoint. A crash
mid-save therefore leaves at most a stale temp directory (removed by the next save) and never touches
the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_STEP_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


def capture_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds: the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Save / find / load checkpoints of one run directory."""

    def __init__(self, run_dir, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_last = keep_last

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        for old in self.dir.glob(".old-step-*"):  # a crash while re-saving a step: bring the old copy back
            final = self.dir / old.name.removeprefix(".old-")
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, final)
        found = [p for p in self.dir.iterdir() if _STEP_RE.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def save(self, step: int, tensors: dict[str, object], trainer_state: dict) -> Path:
        """Write {name: object} as <name>.pt plus trainer_state.json as checkpoint `step`, atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".tmp-*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f".tmp-step-{step:08d}"
        tmp.mkdir()
        try:
            for name, obj in tensors.items():
                with open(tmp / f"{name}.pt", "wb") as f:
                    torch.save(obj, f)
                    f.flush()
                    os.fsync(f.fileno())
            with open(tmp / STATE_FILE, "w") as f:
                json.dump({**trainer_state, "step": step}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            # Re-saving a step (e.g. the final save right after a periodic one): move the old copy aside
            # first, so that a complete copy of the step exists at every moment (see checkpoints()).
            aside = self.dir / f".old-step-{step:08d}"
            if final.exists():
                os.replace(final, aside)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            shutil.rmtree(aside, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.checkpoints()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def prune_unkept(self, directory) -> None:
        """Remove the `step-*` entries of `directory` (e.g. a strategy's own per-step state) whose
        checkpoint is no longer kept."""
        directory = Path(directory)
        if not directory.is_dir():
            return
        kept = {p.name for p in self.checkpoints()}
        for old in directory.glob("step-*"):
            if old.name not in kept:
                shutil.rmtree(old, ignore_errors=True)

    def load_latest(self, stage: str, trainable: dict) -> tuple[Path, dict[str, object], dict] | None:
        """(path, objects, trainer_state) of the newest complete checkpoint, or None when there is none.

        Checks that it was written by `stage` and holds weights for every name in `trainable`.
        """
        path = self.latest()
        if path is None:
            return None
        blobs, state = self.load(path)
        if state.get("stage") != stage:
            raise ValueError(f"{path} is a {state.get('stage')!r} checkpoint, not {stage!r}")
        missing = sorted(set(trainable) - set(blobs["weights"]))
        if missing:
            raise ValueError(f"{path} does not fit this model: no weights for {missing[:4]}")
        return path, blobs, state

    @staticmethod
    def load(path) -> tuple[dict[str, object], dict]:
        """({name: object}, trainer_state) of a checkpoint directory."""
        path = Path(path)
        state_path = path / STATE_FILE
        if not state_path.is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
        trainer_state = json.loads(state_path.read_text())
        # weights_only=False: optimizer and RNG states hold numpy arrays and tuples; these files are
        # our own checkpoints, not downloads.
        tensors = {p.stem: torch.load(p, map_location="cpu", weights_only=False)
                   for p in sorted(path.glob("*.pt"))}
        return tensors, trainer_state
