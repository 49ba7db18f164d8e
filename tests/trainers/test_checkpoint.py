import json

import pytest
import torch

from rlhf_fast.trainers import CheckpointManager, build_reward_trainer, build_sft_trainer
from rlhf_fast.trainers import checkpoint as checkpoint_module


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.trainable.items()}


@pytest.mark.parametrize("stage, build, lora", [("sft", build_sft_trainer, True),
                                                ("rm", build_reward_trainer, False)])
def test_resume_continues_exactly(tmp_path, make_config, stage, build, lora):
    N = 6
    # 15 training pairs = 5 micro-batches per epoch: the 12 micro-batches of the run cross two epochs
    kw = dict(steps=N, micro=3, accum=2, lr=1e-2, lora=lora, synthetic_size=15)
    straight = build(make_config(tmp_path / "straight", stage, **kw))
    losses = [h["loss"] for h in straight.train()]

    first = build(make_config(tmp_path / "resumed", stage, **kw))
    first_losses = [h["loss"] for h in first.train(until_step=N // 2)]
    del first
    second = build(make_config(tmp_path / "resumed", stage, resume=True, **kw))  # a fresh process, in effect
    second_losses = [h["loss"] for h in second.train()]

    assert second.step == N
    assert first_losses + second_losses == losses  # bit-identical on CPU
    for n, p in _params(straight).items():
        assert torch.equal(p, second.trainable[n]), n
    assert straight.scheduler.get_last_lr() == second.scheduler.get_last_lr()


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, make_config, monkeypatch):
    cfg = make_config(tmp_path, steps=4, save_every=2, keep_last=2)
    trainer = build_sft_trainer(cfg)
    trainer.train(until_step=2)
    manager = CheckpointManager(tmp_path)
    good = manager.latest()
    assert good.name == "step-00000002"
    saved = {n: p.detach().clone() for n, p in trainer.trainable.items()}

    real_save = torch.save
    def failing_save(obj, f, *args, **kwargs):  # noqa: E306
        if getattr(f, "name", "").endswith("optim.pt"):
            real_save({"partial": True}, f)  # some bytes hit the disk, then the "crash"
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    trainer.step = 3
    with pytest.raises(OSError, match="simulated"):
        trainer.save()
    monkeypatch.undo()
    assert manager.latest() == good and [p.name for p in manager.checkpoints()] == ["step-00000002"]
    # a hard kill leaves its temp directory behind: it must be ignored too
    stale = manager.dir / ".tmp-step-00000003"
    stale.mkdir()
    (stale / "weights.pt").write_bytes(b"garbage")

    resumed = build_sft_trainer(make_config(tmp_path, steps=4, save_every=2, keep_last=2, resume=True))
    assert resumed.resume() and resumed.step == 2
    for n, p in saved.items():
        assert torch.equal(resumed.trainable[n], p)
    resumed.train()
    assert not stale.exists()  # cleaned by the next save
    assert [p.name for p in manager.checkpoints()] == ["step-00000002", "step-00000004"]


def test_keep_last_and_checkpoint_contents(tmp_path, make_config):
    trainer = build_sft_trainer(make_config(tmp_path, steps=5, save_every=1, keep_last=2))
    trainer.train()
    ckpts = CheckpointManager(tmp_path).checkpoints()
    assert [p.name for p in ckpts] == ["step-00000004", "step-00000005"]
    blobs, state = CheckpointManager.load(ckpts[-1])
    assert set(blobs) == {"weights", "optim", "rng"} and state["step"] == 5 and state["stage"] == "sft"
    assert set(blobs["optim"]) == {"optimizer", "scheduler", "scaler"}
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["max_steps"] == 5
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        CheckpointManager.load(tmp_path)
    # a checkpoint of the other stage is refused
    rm = build_reward_trainer(make_config(tmp_path, "rm", steps=5, resume=True))
    with pytest.raises(ValueError, match="'sft' checkpoint"):
        rm.resume()


def test_crash_while_resaving_a_step_keeps_a_complete_copy(tmp_path, monkeypatch):
    import os

    manager = CheckpointManager(tmp_path, keep_last=1)
    first = manager.save(3, {"weights": {"w": torch.ones(2)}}, {"stage": "sft"})
    real_replace = os.replace

    def crash_on_second(src, dst):  # move the old copy aside, then die before the new one lands
        real_replace(src, dst)
        if str(dst).endswith(".old-step-00000003"):
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        manager.save(3, {"weights": {"w": torch.zeros(2)}}, {"stage": "sft"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert manager.latest() == first  # the aside copy was brought back
    path, blobs, state = manager.load_latest("sft", {"w": None})
    assert torch.equal(blobs["weights"]["w"], torch.ones(2)) and state["step"] == 3
    with pytest.raises(ValueError, match="not 'rm'"):
        manager.load_latest("rm", {"w": None})
    with pytest.raises(ValueError, match="no weights for"):
        manager.load_latest("sft", {"v": None})
