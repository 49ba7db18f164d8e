"""Every trainer runs end to end with --precision bf16 and fp16 (CPU autocast stands in for CUDA's):
finite losses, fp32 RL maths, and fp32 master weights that move."""

import pytest
import torch
from ppo_testing import tiny_models, tiny_trainer
from test_grpo import grpo_config, make_trainer

from rlhf_fast.trainers import build_reward_trainer, build_sft_trainer

PRECISIONS = ["bf16", "fp16"]


def _finite(history, *keys):
    """Every iteration logged each of `keys` (PPO's and GRPO's metric names differ: issue 14) as a finite number."""
    assert history and all(k in h for h in history for k in keys), (keys, sorted(history[-1]))
    return all(torch.isfinite(torch.tensor(float(h[k]))) for h in history for k in keys)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_sft_and_reward_model(tmp_path, make_config, precision):
    sft = build_sft_trainer(make_config(tmp_path / "sft", "sft", steps=2, precision=precision))
    before = [p.detach().clone() for p in sft.module.parameters()]
    sft.train()
    assert all(p.dtype == torch.float32 for p in sft.module.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, sft.module.parameters()))
    assert torch.isfinite(torch.tensor(sft.evaluate()["loss"]))
    rm = build_reward_trainer(make_config(tmp_path / "rm", "rm", lora=True, steps=2, precision=precision))
    rm.train()
    assert 0.0 <= rm.evaluate()["accuracy"] <= 1.0


@pytest.mark.parametrize("precision", PRECISIONS)
def test_ppo_lora(tmp_path, precision):
    trainer = tiny_trainer(tmp_path, iterations=2, precision=precision)
    trainer.train()
    h = trainer.history[-1]
    assert _finite(trainer.history, "train/loss", "train/policy_loss", "train/value_loss", "kl", "score")
    # generation ran under autocast too: its log-probs still track the training-time ones
    assert h["gen_logprob_gap_max"] < 0.5, h


def test_ppo_fp16_through_the_triton_kernels(tmp_path):
    """fp16 autocast with every Triton kernel (LoRA-linear, attention, GAE, PPO loss) via the interpreter."""
    if torch.cuda.is_available():
        pytest.skip("interpreter case (CPU tensors)")
    models = tiny_models(attn_backend="triton")
    for m in models.policy.modules():
        if hasattr(m, "kernel_backend"):
            m.kernel_backend = "triton"
    trainer = tiny_trainer(tmp_path, models=models, n_eval=1, iterations=1, rollout_batch_size=2, mini_batch_size=2,
                           epochs=1, max_new_tokens=3, precision="fp16", kernel_backend="triton")
    trainer.train()
    assert _finite(trainer.history, "train/loss", "train/policy_loss", "train/value_loss", "kl", "score")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_grpo(tmp_path, precision):
    trainer = make_trainer(grpo_config(tmp_path, lora=True, iterations=2, prompts=4, group_size=4, micro=16,
                                       precision=precision))
    trainer.train()
    assert _finite(trainer.history, "train/loss", "train/policy_loss", "train/kl", "score")
