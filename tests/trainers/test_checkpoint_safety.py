"""Checkpoints load under torch.load(weights_only=True): RNG states are stored as tensors and plain containers and
round-trip exactly; a file that needs full unpickling is refused (UnsafeCheckpointError naming it, the checkpoint
left in place, nothing in the file run), and loads only with trust=True (--trust-checkpoint), with a warning."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_fast.errors import CheckpointError
from rlhf_fast.trainers.checkpoint import (
    CheckpointManager,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    capture_rng_state,
    restore_rng_state,
)


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _draws() -> tuple:
    return random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state: that must survive too
    torch.manual_seed(3)
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    _draws()
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def _two_checkpoints(tmp_path, newest_optim) -> CheckpointManager:
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step, optim in ((1, {"m": torch.zeros(2)}), (2, newest_optim)):
        manager.save(step, {"weights": {"w": torch.full((2,), float(step))}, "optim": optim, "rng": {"seed": step}},
                     {"stage": "sft"})
    return manager


def test_a_file_that_needs_full_unpickling_is_refused_and_left_in_place(tmp_path):
    marker = tmp_path / "payload-ran"
    manager = _two_checkpoints(tmp_path / "run", {"m": torch.zeros(2), "x": Payload(marker)})
    newest = manager.latest()
    with pytest.raises(UnsafeCheckpointError) as info:
        manager.load_latest("sft", {"w": None})
    assert info.value.where == str(newest / "optim.pt")
    assert "--trust-checkpoint" in info.value.what and "pathlib" in info.value.what
    assert isinstance(info.value, CheckpointError) and not isinstance(info.value, CorruptCheckpointError)
    assert not marker.exists()
    assert [p.name for p in manager.checkpoints()] == ["step-00000001", "step-00000002"]  # not moved aside


def test_trust_loads_it_with_a_warning(tmp_path, caplog):
    marker = tmp_path / "payload-ran"
    manager = _two_checkpoints(tmp_path / "run", {"m": torch.zeros(2), "x": Payload(marker)})
    manager.trust = True
    with caplog.at_level("WARNING"):
        path, blobs, _ = manager.load_latest("sft", {"w": None})
    assert path.name == "step-00000002" and torch.equal(blobs["weights"]["w"], torch.full((2,), 2.0))
    assert marker.exists()  # the consent was to exactly this
    assert f"--trust-checkpoint: loading {path / 'optim.pt'}" in caplog.text


def test_trust_does_not_load_safe_files_in_full_or_hide_corruption(tmp_path, caplog):
    manager = _two_checkpoints(tmp_path / "run", {"m": torch.ones(2)})
    (manager.latest() / "optim.pt").write_bytes(b"garbage" * 20)
    manager.trust = True
    with caplog.at_level("WARNING"):
        path, blobs, _ = manager.load_latest("sft", {"w": None})
    assert path.name == "step-00000001"  # the garbage file is corrupt (moved aside), not "unsafe"
    assert "--trust-checkpoint" not in caplog.text and "cannot be read (optim.pt:" in caplog.text


def test_files_a_library_unpickles_itself_are_scanned_first(tmp_path, caplog):
    """DeepSpeed loads its engine files with full unpickling: before it does, each .pt under the strategy's
    directory is scanned; a class outside torch's safe set and the strategy's `checkpoint_globals` is refused
    (nothing in the file runs), an allowed one passes, --trust-checkpoint loads anything with a warning."""
    from rlhf_fast.distributed.deepspeed import DeepSpeedStrategy
    from rlhf_fast.trainers.checkpoint import check_library_files

    engine = tmp_path / "strategy" / "step-00000002" / "engine0"
    engine.mkdir(parents=True)
    torch.save({"param_shapes": [torch.zeros(2)]}, engine / "mp_rank_00_model_states.pt")
    check_library_files(engine.parent, DeepSpeedStrategy.checkpoint_globals, trust=False)  # tensors only: passes
    marker = tmp_path / "ran"
    torch.save({"optimizer_state_dict": Payload(marker)}, engine / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    named = "names builtins.getattr, pathlib.Path, pathlib.PosixPath, .*--trust-checkpoint"
    with pytest.raises(UnsafeCheckpointError, match=named) as e:
        check_library_files(engine.parent, DeepSpeedStrategy.checkpoint_globals, trust=False)
    assert e.value.where.endswith("zero_pp_rank_0_mp_rank_00_optim_states.pt") and not marker.exists()
    allowed = ("builtins.getattr", "pathlib.Path", "pathlib.PosixPath")  # as a strategy may declare its classes
    check_library_files(engine.parent, allowed, trust=False)
    with caplog.at_level("WARNING"):
        check_library_files(engine.parent, (), trust=True)
    assert "--trust-checkpoint" in caplog.text and not marker.exists()  # the scan itself never runs the pickle
