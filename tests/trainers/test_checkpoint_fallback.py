"""A damaged newest checkpoint: load_latest moves it aside and resumes from the one before."""

import json

import pytest
import torch

from rlhf_fast.errors import CheckpointError
from rlhf_fast.trainers.checkpoint import CheckpointManager, CorruptCheckpointError


def _save_three(tmp_path) -> CheckpointManager:
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        tensors = {"weights": {"w": torch.full((3, 5), float(step))}, "optim": {"m": torch.zeros(7)},
                   "rng": {"seed": step}}
        manager.save(step, tensors, {"stage": "sft", "data": {"epoch": 0, "position": step}})
    return manager


def _truncate_weights(ckpt):
    data = (ckpt / "weights.pt").read_bytes()
    (ckpt / "weights.pt").write_bytes(data[: len(data) // 2])


def _empty_optim(ckpt):
    (ckpt / "optim.pt").write_bytes(b"")


def _garbage_state(ckpt):
    (ckpt / "trainer_state.json").write_text('{"stage": "sft", "st')


def _no_step(ckpt):
    (ckpt / "trainer_state.json").write_text(json.dumps({"stage": "sft"}))


def _missing_rng(ckpt):
    (ckpt / "rng.pt").unlink()


CORRUPTIONS = [(_truncate_weights, "weights.pt"), (_empty_optim, "optim.pt"), (_garbage_state, "trainer_state.json"),
               (_no_step, "trainer_state.json"), (_missing_rng, "rng.pt")]


@pytest.mark.parametrize("corrupt, bad_file", CORRUPTIONS)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, corrupt, bad_file):
    manager = _save_three(tmp_path)
    newest = manager.latest()
    corrupt(newest)
    with pytest.raises(CorruptCheckpointError) as info:
        CheckpointManager.load(newest)
    assert info.value.where == str(newest / bad_file)

    with caplog.at_level("WARNING"):
        path, blobs, state = manager.load_latest("sft", {"w": None})
    assert path.name == "step-00000002" and state["step"] == 2 and state["data"]["position"] == 2
    assert torch.equal(blobs["weights"]["w"], torch.full((3, 5), 2.0))
    aside = manager.dir / "corrupt-step-00000003"
    assert aside.is_dir() and not newest.exists()  # moved, not deleted: kept for a look
    assert f"checkpoint {newest} cannot be read ({bad_file}:" in caplog.text and "corrupt-step-00000003" in caplog.text
    assert [p.name for p in manager.checkpoints()] == ["step-00000001", "step-00000002"]

    # the run goes on: the re-saved step 3 is a checkpoint again; keep_last never counts or prunes the one aside
    manager.save(3, {"weights": {"w": torch.ones(3, 5)}}, {"stage": "sft"})
    manager.save(4, {"weights": {"w": torch.ones(3, 5)}}, {"stage": "sft"})
    assert [p.name for p in manager.checkpoints()] == ["step-00000002", "step-00000003", "step-00000004"]
    assert aside.is_dir()


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(tmp_path, caplog):
    manager = _save_three(tmp_path)
    (manager.dir / "corrupt-step-00000002").mkdir()  # left by an earlier resume: the next name gets a suffix
    for ckpt, (corrupt, _) in zip(manager.checkpoints(), CORRUPTIONS):
        corrupt(ckpt)
    with caplog.at_level("WARNING"), pytest.raises(CheckpointError, match="no intact checkpoint") as info:
        manager.load_latest("sft", {"w": None})
    assert info.value.where == str(manager.dir)
    for moved in ("step-00000003 to corrupt-step-00000003 (trainer_state.json:",
                  "step-00000002 to corrupt-step-00000002-1 (optim.pt:",
                  "step-00000001 to corrupt-step-00000001 (weights.pt:"):
        assert moved in info.value.what
    assert caplog.text.count("cannot be read") == 3 and manager.checkpoints() == []
    # a second try finds only what was moved aside: still an error, not a silent start from step 0
    with pytest.raises(CheckpointError, match="only unreadable ones moved aside earlier"):
        manager.load_latest("sft", {"w": None})


def test_no_checkpoint_at_all_is_none(tmp_path):
    assert CheckpointManager(tmp_path).load_latest("sft", {"w": None}) is None
    (tmp_path / "checkpoints").mkdir()
    assert CheckpointManager(tmp_path).load_latest("sft", {"w": None}) is None


def test_a_foreign_checkpoint_is_refused_and_left_in_place(tmp_path):
    manager = _save_three(tmp_path)
    newest = manager.latest()
    with pytest.raises(CheckpointError, match="a 'sft' checkpoint, not 'rm'") as info:
        manager.load_latest("rm", {"w": None})
    assert info.value.where == str(newest)
    with pytest.raises(CheckpointError, match=r"no weights for \['v'\]") as info:
        manager.load_latest("sft", {"w": None, "v": None})
    assert info.value.where == str(newest)
    assert manager.latest() == newest and not list(manager.dir.glob("corrupt-*"))


def test_load_of_a_directory_that_is_no_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint") as info:
        CheckpointManager.load(tmp_path)
    assert isinstance(info.value, CheckpointError) and info.value.where == str(tmp_path)
