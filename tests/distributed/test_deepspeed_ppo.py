"""PPO under DeepSpeedStrategy on CPU (DeepSpeed's CPU accelerator + gloo, one process), against
SingleDeviceStrategy: full-parameter PPO (actor and critic engines, frozen reference and reward model),
LoRA PPO (one engine), exact resume, and the layouts PPO refuses. `slow`: DeepSpeed engines take a few
seconds to build; these tests still run in the default suite and CI."""

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from rlhf_fast.cli import main
from rlhf_fast.data import synthetic_prompts
from rlhf_fast.distributed import DeepSpeedSettings, build_strategy
from rlhf_fast.model import GPT
from rlhf_fast.trainers import build_reward_trainer, build_sft_trainer
from rlhf_fast.trainers.checkpoint import CheckpointManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainers"))
from ppo_testing import stage_config, tiny_full_models, tiny_models, tiny_trainer  # noqa: E402

ZERO2_OFFLOAD = DeepSpeedSettings(zero_stage=2, offload_optimizer=True)
# Two iterations of 6 rollouts, two epochs of minibatches 4 + 2: 8 optimizer steps per engine.
RUN = dict(iterations=2, max_grad_norm=None, lr=1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ds_env():
    """deepspeed importable, and a one-process group on the loopback address for in-process engines."""
    pytest.importorskip("deepspeed", reason="deepspeed not installed (pip install 'rlhf_fast[deepspeed]')")
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def deepspeed(settings=ZERO2_OFFLOAD):
    return lambda config: build_strategy("deepspeed", precision=config.run.precision,
                                         max_grad_norm=config.optim.max_grad_norm, deepspeed=settings,
                                         micro_batch_size=config.rl.mini_batch_size)


def _params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in trainer.trainable.items()}


def _assert_histories_close(a: list[dict], b: list[dict], rel: float):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for key in ("score", "kl", "value_mean", "train/loss", "train/policy_loss", "train/value_loss",
                    "train/grad_norm", "train/entropy"):
            assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-6), key


@pytest.mark.slow
def test_full_parameter_ppo_zero2_offload_matches_single_device(tmp_path, ds_env):
    single = tiny_trainer(tmp_path / "single", tiny_full_models(), **RUN)
    h_single = single.train()
    trainer = tiny_trainer(tmp_path / "ds", tiny_full_models(), strategy=deepspeed(), offload_frozen=True, **RUN)
    engines = list(trainer.strategy.engines.values())
    assert len(engines) == 2 and trainer.actor is not trainer.critic
    assert {type(e.optimizer).__name__ for e in engines} == {"DeepSpeedZeroOptimizer"}
    assert type(engines[0].optimizer.optimizer).__name__ == "DeepSpeedCPUAdam"  # offloaded optimizer step
    assert engines[1].module.head is trainer.models.value_head  # the critic engine trains the value head
    assert not any(p.requires_grad for p in trainer.models.reference.parameters())
    h_ds = trainer.train()
    _assert_histories_close(h_single, h_ds, rel=1e-4)
    assert h_ds[-1]["score"] != h_ds[0]["score"]  # the policy moved between the rollouts
    a, b = _params(single), _params(trainer)
    assert a.keys() == b.keys() and any(n.startswith("critic.") for n in a)
    before = {n: p.float() for n, p in tiny_full_models().named_parameters() if n in a}
    for n in a:
        # Adam turns float noise in an exactly-zero gradient (the attention key bias) into +-lr steps, so
        # the comparison is on the parameters' updates, with a tolerance of a fraction of one step
        torch.testing.assert_close(b[n] - before[n], a[n] - before[n], atol=3e-4, rtol=2e-2, msg=n)
    assert trainer.eval_history and trainer.eval_history[-1]["reward"] == pytest.approx(
        single.eval_history[-1]["reward"], rel=1e-4)


@pytest.mark.slow
def test_full_parameter_ppo_resume_under_deepspeed_is_exact(tmp_path, ds_env):
    straight = tiny_trainer(tmp_path / "straight", tiny_full_models(), strategy=deepspeed(), iterations=3)
    h_straight = straight.train()

    run = tmp_path / "resumed"
    first = tiny_trainer(run, tiny_full_models(), strategy=deepspeed(), iterations=3)
    first.train(until_iteration=2)
    ckpt = CheckpointManager(run).latest()
    assert ckpt.name == "step-00000002"
    assert {p.name for p in (run / "strategy" / ckpt.name).iterdir() if p.is_dir()} == {"engine0", "engine1"}
    models = tiny_full_models()  # the frozen roles come from their exports, not from the checkpoint
    with torch.no_grad():
        for p in models.trainable_parameters().values():
            p.add_(0.5)  # the checkpoint must restore every trained weight
    second = tiny_trainer(run, models, strategy=deepspeed(), iterations=3, resume=True)
    h_resumed = second.train()
    assert len(h_resumed) == 1 and second.iteration == 3
    for key, value in h_straight[2].items():
        if not key.startswith(("time/", "peak_mem")):
            assert h_resumed[0][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    for n, p in _params(straight).items():
        torch.testing.assert_close(_params(second)[n], p, atol=1e-6, rtol=1e-6, msg=n)
    kept = {p.name for p in CheckpointManager(run).checkpoints()}
    assert {p.name for p in (run / "strategy").iterdir()} == kept


@pytest.mark.slow
def test_lora_ppo_is_one_engine_and_matches_single_device(tmp_path, ds_env):
    h_single = tiny_trainer(tmp_path / "single", tiny_models(), iterations=2).train()
    trainer = tiny_trainer(tmp_path / "ds", tiny_models(), strategy=deepspeed(DeepSpeedSettings(zero_stage=1)),
                           iterations=2)
    assert len(trainer.strategy.engines) == 1 and trainer.actor is trainer.critic
    _assert_histories_close(h_single, trainer.train(), rel=1e-4)


@pytest.mark.slow
def test_deepspeed_ppo_rejects_zero3_and_foreign_batch_layouts(tmp_path, ds_env):
    with pytest.raises(ValueError, match="ZeRO stages 0-2"):
        tiny_trainer(tmp_path, tiny_full_models(), strategy=deepspeed(DeepSpeedSettings(zero_stage=3)))
    from rlhf_fast.distributed import DeepSpeedStrategy

    with pytest.raises(ValueError, match="batch layout"):
        tiny_trainer(tmp_path, tiny_full_models(), strategy=lambda c: DeepSpeedStrategy(
            DeepSpeedSettings(zero_stage=2), micro_batch_size=c.rl.mini_batch_size, grad_accum_steps=2))
    with pytest.raises(ValueError, match="precision"):
        tiny_trainer(tmp_path, tiny_full_models(), strategy=lambda c: DeepSpeedStrategy(
            DeepSpeedSettings(zero_stage=2), precision="bf16", micro_batch_size=c.rl.mini_batch_size))


@pytest.mark.slow
def test_cli_ppo_full_parameter_under_deepspeed(tmp_path, ds_env, capsys, user_error):
    # untrained exports are enough here: the flags and the engines are what is tested
    sft_dir = build_sft_trainer(stage_config(tmp_path / "sft", "sft", steps=1)).export(tmp_path / "sft" / "export")
    rm = build_reward_trainer(stage_config(tmp_path / "rm", "rm", steps=1, model=str(sft_dir)))
    rm_dir = rm.export(tmp_path / "rm" / "export")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in synthetic_prompts(12, 5)))
    out = tmp_path / "run"
    common = ["ppo", "--sft-model", str(sft_dir), "--reward-model", str(rm_dir), "--no-lora", "--iterations", "1",
              "--rollout-batch-size", "4", "--mini-batch-size", "2", "--max-new-tokens", "5", "--data", str(data),
              "--eval-size", "4", "--output-dir", str(out), "--no-progress", "--attn-backend", "sdpa"]
    assert main([*common, "--strategy", "deepspeed", "--zero-stage", "2", "--offload-optimizer",
                 "--offload-frozen"]) == 0
    assert "exported PPO policy" in capsys.readouterr().out
    assert GPT.from_pretrained(str(out / "export")).config.vocab_size == 320
    assert {p.name for p in (out / "strategy" / "step-00000001").iterdir() if p.is_dir()} == {"engine0", "engine1"}
    fresh = ["--output-dir", str(tmp_path / "fresh")]  # `out` holds the run above: refused before the flags
    assert "need --strategy deepspeed" in user_error([*common, "--zero-stage", "2", *fresh])
    zero3 = ["--strategy", "deepspeed", "--zero-stage", "3", "--offload-params"]
    assert "ZeRO stages 0-2" in user_error([*common, *zero3, *fresh])


def test_build_ppo_strategy_rejects_bad_input():
    with pytest.raises(ValueError, match="'single' or 'deepspeed'"):
        build_strategy("fsdp", device="cpu")
    with pytest.raises(ValueError, match="need --strategy deepspeed"):
        build_strategy("single", device="cpu", deepspeed=DeepSpeedSettings(zero_stage=1))


@pytest.mark.slow
def test_grpo_resume_under_deepspeed_is_exact(tmp_path, ds_env):
    """Full-parameter GRPO with a k3 KL to a frozen reference copy, one ZeRO-2 engine: a run split by a
    restart takes the very same steps as a straight one."""
    from test_grpo import HELD_OUT, TRAIN, grpo_config, warmed_up_state

    from rlhf_fast.data import ByteTokenizer
    from rlhf_fast.trainers.grpo import GRPOTrainer
    from rlhf_fast.trainers.reward_functions import reward_function

    def trainer(path, **run):
        config = grpo_config(path, iterations=3, kl_coef=0.05, epochs=2, micro=16, prompts=4, group_size=4, **run)
        model = GPT.from_preset("tiny", attn_backend="sdpa")
        model.load_state_dict(warmed_up_state(60))
        strategy = build_strategy("deepspeed", precision=config.run.precision, max_grad_norm=config.optim.max_grad_norm,
                                  deepspeed=DeepSpeedSettings(zero_stage=2), micro_batch_size=config.rl.mini_batch_size)
        return GRPOTrainer(config, model, ByteTokenizer(), [p.prompt for p in TRAIN], [p.prompt for p in HELD_OUT],
                           reward_function("arithmetic"), strategy)

    straight = trainer(tmp_path / "straight")
    assert len(straight.strategy.engines) == 1 and straight.reference is not None
    h_straight = straight.train()
    first = trainer(tmp_path / "resumed")
    first.train(until_iteration=2)
    assert CheckpointManager(tmp_path / "resumed").latest().name == "step-00000002"
    second = trainer(tmp_path / "resumed", resume=True)
    h_resumed = second.train()
    assert len(h_resumed) == 1 and second.iteration == 3
    for key, value in h_straight[2].items():
        if not key.startswith(("time/", "peak_mem")):
            assert h_resumed[0][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert h_straight[2]["train/kl"] > 0  # the policy moved away from the reference
    for n, p in _params(straight).items():
        torch.testing.assert_close(_params(second)[n], p, atol=1e-6, rtol=1e-6, msg=n)
