"""Atomic checkpoints in a run directory, keep-last-N, and RNG state capture for exact resume.

Layout:
    <run_dir>/config.json
    <run_dir>/checkpoints/step-00000100/{weights.pt, optim.pt, rng.pt, trainer_state.json}
    <run_dir>/checkpoints/corrupt-step-00000200/...   (an unreadable checkpoint, moved aside on resume)

A checkpoint is written into `checkpoints/.tmp-step-...` and renamed into place only after every file
is written and flushed; `trainer_state.json` is written last, lists the .pt files and marks a complete
checkpoint. A crash mid-save therefore leaves at most a stale temp directory (removed by the next save)
and never touches the previous checkpoint. A checkpoint damaged later (a truncated copy, a full disk) is
moved aside by `load_latest`, which then resumes from the one before.

Every .pt file loads with `torch.load(weights_only=True)`: a checkpoint holds only tensors and plain containers
(RNG states included, see `capture_rng_state`), so a crafted file cannot run code on --resume. A file that needs
full unpickling (a checkpoint from before this rule, or a tampered one) is refused with an UnsafeCheckpointError
naming it, unless the run says --trust-checkpoint (then it loads with a warning).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from rlhf_fast.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


def capture_rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as tensors, ints, floats, str and tuples only, so that they load
    under weights_only=True (numpy's key array is stored as an int64 tensor, not as an ndarray)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    numpy_state = (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                   float(cached_gaussian))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state[1], torch.Tensor):  # else numpy's own tuple, from a trusted pre-weights_only checkpoint
        name, keys, *rest = numpy_state
        numpy_state = (name, keys.numpy().astype(np.uint32), *rest)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that is missing or cannot be read; `where` is that file."""


class IncompleteCheckpointError(CorruptCheckpointError, FileNotFoundError):
    """A checkpoint file that is not there (also a FileNotFoundError)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that loads only with full unpickling (which can run any code); `where` is that file.
    Not a corrupt file: it is refused, never moved aside or skipped."""


def _load_pt(path: Path, trust: bool):
    """torch.load of one checkpoint file under weights_only=True. A file that needs other globals is refused
    (UnsafeCheckpointError), or with `trust` loaded in full after a warning; a file that cannot be read at all is a
    CorruptCheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:  # a static scan of the pickle's opcodes: nothing in the file runs
            unsafe = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)))
        except Exception:  # not a torch zip file at all
            unsafe = []
        if not unsafe:
            raise CorruptCheckpointError(f"unreadable ({_brief(e)})", str(path)) from None
    except Exception as e:  # truncated, empty, not a torch file: whatever torch raises
        raise CorruptCheckpointError(f"unreadable ({_brief(e)})", str(path)) from e
    shown = ", ".join(unsafe[:3]) + (", ..." if len(unsafe) > 3 else "")
    if not trust:
        raise UnsafeCheckpointError(f"loads only with full unpickling, which can run any code (it needs {shown}): "
                                    "refused; --trust-checkpoint loads it if you trust this file", str(path))
    log.warning("--trust-checkpoint: loading %s with full unpickling (it needs %s); a crafted file runs code here",
                path, shown)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CorruptCheckpointError(f"unreadable ({_brief(e)})", str(path)) from e


def _brief(e: Exception) -> str:
    """One line about an exception, short enough for a log line (torch's messages run long)."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


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

    def __init__(self, run_dir, keep_last: int = 2, trust: bool = False):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_last = keep_last
        self.trust = trust  # --trust-checkpoint: files that need full unpickling load (with a warning)

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
                json.dump({**trainer_state, "step": step, "files": sorted(f"{n}.pt" for n in tensors)}, f,
                          indent=1)
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
        """(path, objects, trainer_state) of the newest intact checkpoint, or None when there is none.

        A checkpoint that cannot be read (CorruptCheckpointError) is logged, moved aside to
        `corrupt-step-...` (never listed, pruned or loaded again) and the one before it is tried. Raises
        CheckpointError when checkpoints exist but none is intact (now or moved aside by an earlier call):
        a run never starts over silently. The checkpoint found must be `stage`'s and hold weights for
        every name in `trainable` (CheckpointError otherwise; it is left in place).
        """
        moved = []
        for path in reversed(self.checkpoints()):
            try:
                blobs, state = self.load(path, trust=self.trust)
            except CorruptCheckpointError as e:
                reason = f"{Path(e.where).name}: {e.what}"
                aside = self._move_aside(path)
                log.warning("checkpoint %s cannot be read (%s): moved it aside to %s; trying the one before",
                            path, reason, aside.name)
                moved.append(f"{path.name} to {aside.name} ({reason})")
                continue
            if state.get("stage") != stage:
                raise CheckpointError(f"a {state.get('stage')!r} checkpoint, not {stage!r}", str(path))
            missing = sorted(set(trainable) - set(blobs.get("weights", {})))
            if missing:
                raise CheckpointError(f"does not fit this model: no weights for {missing[:4]}", str(path))
            return path, blobs, state
        if moved:
            raise CheckpointError(f"no intact checkpoint: moved aside {'; '.join(moved)}", str(self.dir))
        earlier = sorted(p.name for p in self.dir.glob("corrupt-step-*")) if self.dir.is_dir() else []
        if earlier:
            raise CheckpointError(f"no intact checkpoint, only unreadable ones moved aside earlier "
                                  f"({', '.join(earlier)}): remove them to start this run over", str(self.dir))
        return None

    def _move_aside(self, path: Path) -> Path:
        """Rename a corrupt checkpoint to corrupt-step-XXXXXXXX[-N] (kept for inspection, never loaded)."""
        base = self.dir / f"corrupt-{path.name}"
        aside, n = base, 1
        while aside.exists():
            aside, n = base.with_name(f"{base.name}-{n}"), n + 1
        try:
            os.replace(path, aside)
        except FileNotFoundError:  # another process of the run moved it first
            pass
        return aside

    @staticmethod
    def load(path, trust: bool = False) -> tuple[dict[str, object], dict]:
        """({name: object}, trainer_state) of a checkpoint directory, every .pt file loaded under weights_only=True.

        Raises CorruptCheckpointError naming the file that is missing or cannot be read (a directory
        without trainer_state.json: IncompleteCheckpointError, also a FileNotFoundError), UnsafeCheckpointError
        naming a file that needs full unpickling (loaded instead, with a warning, when `trust`).
        """
        path = Path(path)
        state_path = path / STATE_FILE
        if not state_path.is_file():
            raise IncompleteCheckpointError(f"not a complete checkpoint (no {STATE_FILE})", str(path))
        try:
            trainer_state = json.loads(state_path.read_text())
        except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CorruptCheckpointError(f"unreadable ({_brief(e)})", str(state_path)) from e
        if not isinstance(trainer_state, dict) or not isinstance(trainer_state.get("step"), int):
            raise CorruptCheckpointError("not a trainer state (no integer 'step')", str(state_path))
        # Older checkpoints do not list their files; every checkpoint has weights.
        for name in trainer_state.get("files", ["weights.pt"]):
            if not (path / name).is_file():
                raise IncompleteCheckpointError(f"{name} is missing", str(path / name))
        tensors = {p.stem: _load_pt(p, trust) for p in sorted(path.glob("*.pt"))}
        return tensors, trainer_state


# --- the collective checkpoint protocol of every trainer (`strategy`: a rlhf_fast.distributed.Strategy) ---------


def strategy_dir(checkpoints: CheckpointManager, step: int) -> Path:
    """Where a strategy keeps its own (e.g. DeepSpeed's per-engine, sharded) state of checkpoint `step`."""
    return checkpoints.run_dir / "strategy" / f"step-{step:08d}"


def save_collective(strategy, checkpoints: CheckpointManager, step: int, trainable: dict, blobs: dict,
                    trainer_state: dict) -> Path | None:
    """The checkpoint protocol of every trainer. Collective: every process calls it. The strategy's own
    state is written on every rank first; then the main process writes the checkpoint (trainable weights
    that load without the strategy, the strategy's optimizer state, RNG state, plus `blobs`) and prunes
    strategy state whose checkpoint is gone. Returns the checkpoint path on the main process, else None."""
    with strategy.gathered(trainable.values()):
        weights = {n: p.detach().cpu().clone() for n, p in trainable.items()} if strategy.is_main else None
    optim = strategy.save_checkpoint(strategy_dir(checkpoints, step))
    strategy.barrier()
    path = None
    if strategy.is_main:
        path = checkpoints.save(step, {"weights": weights, "optim": optim, "rng": capture_rng_state(), **blobs},
                                trainer_state)
        checkpoints.prune_unkept(checkpoints.run_dir / "strategy")
    strategy.barrier()  # no rank runs ahead (or resumes) before the checkpoint is complete
    return path


def restore_collective(strategy, checkpoints: CheckpointManager, trainable: dict, blobs: dict, step: int) -> None:
    """Undo `save_collective`'s common part: trainable weights, strategy state, RNG state."""
    with torch.no_grad(), strategy.gathered(trainable.values(), modify=True):
        for n, p in trainable.items():
            p.copy_(blobs["weights"][n])
    directory = strategy_dir(checkpoints, step)
    check_library_files(directory, strategy.checkpoint_globals, checkpoints.trust)
    strategy.load_checkpoint(blobs["optim"], directory)
    restore_rng_state(blobs["rng"])


def check_library_files(directory: Path, allowed: tuple[str, ...], trust: bool) -> None:
    """The files a library loads itself with full unpickling (DeepSpeed's engine state, under `directory`): each
    .pt file's pickle is scanned (nothing in it runs) and one that names a class outside torch's safe set and
    `allowed` is refused with an UnsafeCheckpointError naming it, or with `trust` loaded after a warning."""
    if not Path(directory).is_dir():
        return
    for path in sorted(Path(directory).rglob("*.pt")):
        try:
            unsafe = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - set(allowed))
        except Exception as e:  # not a torch zip file: the library's own load says what is wrong with it
            log.debug("%s: not scanned (%s)", path, _brief(e))
            continue
        if not unsafe:
            continue
        shown = ", ".join(unsafe[:3]) + (", ..." if len(unsafe) > 3 else "")
        if not trust:
            raise UnsafeCheckpointError(f"its library loads it with full unpickling, and it names {shown}, which "
                                        "none of its files should: refused; --trust-checkpoint loads it if you "
                                        "trust this file", str(path))
        log.warning("--trust-checkpoint: %s names %s; loading it with full unpickling", path, shown)


def resume_or_start(resume, run, checkpoints: CheckpointManager) -> bool:
    """A trainer's start: whether `resume()` (the trainer's own, True when it loaded a checkpoint) continued the
    run. `run` is the run section: --resume without a checkpoint is an error, --resume-if-possible starts over."""
    if not run.resuming:
        return False
    checkpoints.trust = run.trust_checkpoint  # the run's consent to full unpickling (--trust-checkpoint)
    if resume():
        return True
    if run.resume:
        raise CheckpointError("--resume: no checkpoint to continue from (--resume-if-possible starts from step 0 "
                              "when there is none)", str(checkpoints.dir))
    log.info("no checkpoint in %s: starting from step 0", checkpoints.dir)
    return False


# What a run writes into its directory: the only files --overwrite deletes.
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "export", "summary.json", "wandb")
RUN_PATTERNS = ("events.out.tfevents.*", "*.png")


def claim_run_dir(run) -> None:
    """Before a command starts a run in `run.output_dir`: an earlier run there is continued (--resume,
    --resume-if-possible), replaced (--overwrite: its run files deleted, each named in the log), or refused
    with one line. Never two runs' metrics, checkpoints and export mixed in one directory."""
    d = Path(run.output_dir)
    if run.resuming or not d.is_dir() or not any(d.iterdir()):
        return
    ours = [d / n for n in RUN_FILES if (d / n).exists()] + sorted(p for pat in RUN_PATTERNS for p in d.glob(pat))
    if not run.overwrite:
        raise ConfigError(f"{d} holds an earlier run: --resume (or --resume-if-possible) continues it, "
                          "--overwrite replaces it, or give another --output-dir", "run.output_dir")
    other = sorted(p.name for p in d.iterdir() if p not in ours)
    if other:
        raise ConfigError(f"{d} holds files no run writes ({', '.join(other[:3])}); --overwrite deletes only a "
                          "run's own files: give another --output-dir", "run.output_dir")
    if int(os.environ.get("RANK", "0")) != 0:  # launched ranks all check (and agree); the first one deletes
        return
    for p in ours:
        log.warning("--overwrite: deleting %s", p)
        shutil.rmtree(p) if p.is_dir() else p.unlink()
