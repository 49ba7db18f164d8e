"""GRPOTrainer on the `tiny` preset: learning, reference/KL, masking, advantages, resume, bad input."""

import dataclasses
import functools
import json

import pytest
import torch

from rlhf_fast.data import ByteTokenizer, arithmetic_split
from rlhf_fast.model import GPT, add_lora
from rlhf_fast.trainers.grpo import GRPOConfig, GRPOTrainer, TaskSettings
from rlhf_fast.trainers.reward_functions import FunctionScorer, reward_function
from rlhf_fast.trainers.sft import cold_start

TRAIN, HELD_OUT = arithmetic_split(32, seed=0, max_operand=9)  # 123 training problems, 32 held out


def grpo_config(
    tmp_path,
    *,
    lora=False,
    iterations=4,
    kl_coef=0.0,
    micro=32,
    accum=1,
    epochs=1,
    lr=1e-3,
    group_size=8,
    prompts=8,
    options=None,
    **run,
) -> GRPOConfig:
    return GRPOConfig.from_dict({
        "model": {"preset": "tiny", "attn_backend": "sdpa"},
        "lora": {"enabled": lora, "rank": 4},
        "rl": {"group_size": group_size, "rollout_batch_size": prompts, "iterations": iterations, "epochs": epochs,
               "kl_loss_coef": kl_coef, "max_new_tokens": 10, "eval_prompts": 32, "eval_samples": 4,
               "mini_batch_size": micro * accum, "micro_batch_size": micro, **(options or {})},
        "optim": {"lr": lr, "warmup_steps": 0, "schedule": "constant"},
        "run": {"output_dir": str(tmp_path), "device": "cpu", "compile": False, "progress": False, "eval_every": 0,
                "save_every": 0, "log_every": 1, **run},
    })


@functools.cache
def warmed_up_state(steps: int) -> dict:
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", attn_backend="sdpa")
    cold_start(model, ByteTokenizer(), [p.to_sft() for p in TRAIN], steps=steps, lr=3e-3, seed=0)
    return model.state_dict()


def rollout(trainer):
    """(experience, first action column, stats) of the trainer's next rollout."""
    exp, stats = trainer.rollout()
    return exp, int(exp.action_mask.any(0).to(torch.uint8).argmax()), stats


def make_trainer(config, *, cold_start_steps=60, reward="arithmetic") -> GRPOTrainer:
    """A tiny policy warmed up on the answer format (deterministic, computed once per step count), so it
    emits the format only sometimes, wrapped in a GRPOTrainer."""
    model = GPT.from_preset("tiny", attn_backend="sdpa")
    model.load_state_dict(warmed_up_state(cold_start_steps))
    tok = ByteTokenizer()
    if config.lora.enabled:
        torch.manual_seed(1)  # the adapter's random A: the same for every trainer built here
        add_lora(model, "policy", rank=config.lora.rank)
    return GRPOTrainer(
        config, model, tok, [p.prompt for p in TRAIN], [p.prompt for p in HELD_OUT], reward_function(reward)
    )


VARIANTS = {  # estimator / loss options of the shared loop (benchmarks/rl_algorithms.py has the numbers)
    "grpo": {},
    "grpo_seq_mean": dict(loss_aggregation="seq_mean"),
    "dr_grpo": dict(estimator="dr_grpo", loss_aggregation="seq_sum"),
    "rloo": dict(estimator="rloo"),
    "reinforce_pp": dict(estimator="reinforce_pp"),
    "dapo": dict(clip_eps_high=0.28, dynamic_sampling=True, max_new_tokens=16, overlong_buffer=4),
    "mask_truncated": dict(mask_truncated=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_grpo_raises_the_verifiable_reward(tmp_path, variant):
    trainer = make_trainer(grpo_config(tmp_path, iterations=50, lr=1e-3, options=VARIANTS[variant]))
    before = trainer.evaluate()
    history = trainer.train()
    after = trainer.evaluate()
    # the warm-up emits the format only sometimes (reward ~0.16 of 1.5); GRPO makes it the rule
    assert after["reward"] > max(2 * before["reward"], before["reward"] + 0.2), (before, after)
    assert sum(h["score"] for h in history[-10:]) > sum(h["score"] for h in history[:10]) + 1.0
    assert all(h["gen_logprob_gap_max"] < 1e-4 for h in history)  # generation-time == training-time log-probs


def test_reference_is_the_base_and_kl_starts_at_zero(tmp_path):
    trainer = make_trainer(grpo_config(tmp_path, lora=True, kl_coef=0.1, lr=1e-2, micro=64))  # 1 step/update
    base = GPT.from_preset("tiny", attn_backend="sdpa")
    base.load_state_dict({k: v for k, v in trainer.model.state_dict().items() if ".lora_" not in k})
    exp, first, stats = rollout(trainer)
    m = exp.action_mask
    assert stats["gen_logprob_gap_max"] < 1e-4  # fp32: the KV-cached engine and the full forward agree
    with torch.no_grad():
        want_ref = base(exp.sequences, exp.attention_mask).float().log_softmax(-1)[:, :-1]
        want_ref = want_ref.gather(-1, exp.sequences[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(exp.ref_logprobs[m], want_ref[m], atol=1e-5, rtol=1e-5)
    assert torch.equal(exp.ref_logprobs[m], exp.logprobs[m])  # B = 0 adapter: policy is the reference
    first_update = trainer.update(exp)
    assert first_update["kl"] == 0.0 and first_update["approx_kl"] == 0.0 and first_update["clip_frac"] == 0.0
    for _ in range(3):
        later = trainer.step()
    assert later["train/kl"] > 0.0  # the policy moved away; the reference (adapters off) did not
    exp2, _, _ = rollout(trainer)
    with torch.no_grad():
        ref2 = base(exp2.sequences, exp2.attention_mask).float().log_softmax(-1)[:, :-1]
        ref2 = ref2.gather(-1, exp2.sequences[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(
        exp2.ref_logprobs[exp2.action_mask], ref2[exp2.action_mask], atol=1e-5, rtol=1e-5
    )


def test_full_parameter_mode_keeps_a_frozen_reference_copy(tmp_path):
    trainer = make_trainer(grpo_config(tmp_path, kl_coef=0.1, lr=1e-2))
    assert trainer.reference is not None and not any(p.requires_grad for p in trainer.reference.parameters())
    for _ in range(3):
        stats = trainer.step()
    assert stats["train/kl"] > 0.0
    moved = [
        n
        for n, p in trainer.model.named_parameters()
        if not torch.equal(p, trainer.reference.get_parameter(n))
    ]
    assert moved


def test_advantages_are_group_normalised_scores(tmp_path):
    trainer = make_trainer(grpo_config(tmp_path))
    exp, first, _ = rollout(trainer)
    G = trainer.config.rl.group_size
    scores = exp.scores.view(-1, G)
    want = ((scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-4)).reshape(-1)
    m = exp.action_mask
    assert (exp.advantages[~m] == 0).all() and (exp.logprobs[~m] == 0).all()
    assert (m[:, :first] == 0).all() and m[:, first].all()  # every row's first response token is an action
    for row in range(len(exp)):
        torch.testing.assert_close(exp.advantages[row][m[row]], want[row].expand(int(m[row].sum())))
    # the scores are the arithmetic reward of the decoded completions
    assert set(exp.scores.tolist()) <= {0.0, 0.5, 1.5}


def test_garbage_in_masked_positions_changes_nothing(tmp_path):
    trainer = make_trainer(grpo_config(tmp_path, lora=True, kl_coef=0.05))
    exp, first, _ = rollout(trainer)
    params = list(trainer.trainable.values())

    def loss_and_grads(e):
        loss, metrics = trainer.loss(e)
        return loss.detach(), metrics, torch.autograd.grad(loss, params)

    # make the ratio differ from 1 so the clipped branch and the KL term are live
    g = torch.Generator().manual_seed(1)
    exp = dataclasses.replace(
        exp,
        logprobs=exp.logprobs + 0.3 * torch.randn(exp.logprobs.shape, generator=g),
        ref_logprobs=exp.ref_logprobs + 0.3 * torch.randn(exp.logprobs.shape, generator=g),
    )
    loss, metrics, grads = loss_and_grads(exp)
    m, am = exp.action_mask, exp.attention_mask
    noise = lambda t: torch.where(m, t, 1e4 * torch.randn(t.shape, generator=g))  # noqa: E731
    junk_tokens = torch.randint(0, 256, exp.sequences.shape, generator=g)
    poked = dataclasses.replace(
        exp,
        logprobs=noise(exp.logprobs),
        advantages=noise(exp.advantages),
        ref_logprobs=noise(exp.ref_logprobs),
        sequences=torch.where(am, exp.sequences, junk_tokens),
    )
    assert (~am).any() and not torch.equal(poked.sequences, exp.sequences)  # left padding got garbage
    loss2, metrics2, grads2 = loss_and_grads(poked)
    torch.testing.assert_close(loss2, loss, atol=1e-6, rtol=1e-6)
    for k in metrics:
        torch.testing.assert_close(metrics2[k], metrics[k], atol=1e-6, rtol=1e-6)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    assert metrics["clip_frac"] > 0 and metrics["kl"] > 0 and any(a.abs().sum() > 0 for a in grads)


def test_micro_batch_split_gives_the_same_update(tmp_path):
    """Minibatch of 32 rows as 1 x 32 or 4 x 8 micro-batches: the same gradients (token-weighted micro
    means). Weights are not compared: Adam magnifies float noise on near-zero gradients. 64 rows =
    2 optimizer steps per pass, run twice: off-policy steps too."""
    grads = []
    for micro, accum in ((32, 1), (8, 4)):
        trainer = make_trainer(grpo_config(tmp_path / f"{micro}", micro=micro, accum=accum, lr=1e-2))
        params, step, seen = list(trainer.trainable.values()), trainer.strategy.step, []

        def recording_step(model=None, params=params, step=step, seen=seen):
            seen.append(torch.cat([p.grad.flatten() for p in params]))
            return step(model=model)

        trainer.strategy.step = recording_step
        exp, first, _ = rollout(trainer)
        for _ in range(2):
            stats = trainer.update(exp)
        assert stats["clip_frac"] > 0 and len(seen) == 4  # the later steps really are off-policy
        grads.append(seen)
    for a, b in zip(*grads):
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-4)


def test_resume_in_the_middle_continues_exactly(tmp_path):
    straight = make_trainer(grpo_config(tmp_path / "a", iterations=4, kl_coef=0.05, epochs=2, micro=16))
    full = straight.train()
    first = make_trainer(grpo_config(tmp_path / "b", iterations=4, kl_coef=0.05, epochs=2, micro=16))
    first.train(until_iteration=2)
    resumed = make_trainer(
        grpo_config(tmp_path / "b", iterations=4, kl_coef=0.05, epochs=2, micro=16, resume=True)
    )
    tail = resumed.train()
    assert resumed.iteration == 4 and len(tail) == 2
    for a, b in zip(full[2:], tail):
        for k in ("score", "train/loss", "train/kl", "train/grad_norm", "train/entropy"):
            assert a[k] == b[k], k
    for n, p in straight.trainable.items():
        assert torch.equal(p, resumed.trainable[n]), n
    assert straight.evaluate() == resumed.evaluate()


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="group_size >= 2") as e:
        GRPOConfig.from_dict({"rl": {"group_size": 1}})
    assert e.value.where == "rl.estimator"
    with pytest.raises(ValueError, match="whole minibatches"):
        GRPOConfig.from_dict({"rl": {"group_size": 3, "rollout_batch_size": 3, "mini_batch_size": 4}})
    with pytest.raises(ValueError, match="a built-in --task or a --reward-model, not both"):
        GRPOConfig.from_dict({"task": {"task": "arithmetic"}, "model": {"reward_model": "rm_dir"}})
    assert GRPOConfig().task.task == "arithmetic"  # the built-in task unless a reward model is given
    assert GRPOConfig.from_dict({"model": {"reward_model": "rm_dir"}}).task.task is None
    with pytest.raises(ValueError, match="unknown reward function"):
        TaskSettings(reward="nope")
    with pytest.raises(ValueError, match="unknown setting grpo"):
        GRPOConfig.from_dict({"grpo": {"group": 4}})


def test_bad_reward_function_output_is_named(tmp_path):
    def wrong_length(prompts, completions):
        return [1.0] * (len(completions) - 1)

    def not_finite(prompts, completions):
        return torch.full((len(completions),), float("nan"))

    trainer = make_trainer(grpo_config(tmp_path))
    for fn, match in (
        (wrong_length, r"wrong_length returned shape \(63,\), expected \(64,\)"),
        (not_finite, "not_finite returned a non-finite score"),
    ):
        trainer.maker.scorer = FunctionScorer(fn, trainer.tokenizer)
        with pytest.raises(ValueError, match=match):
            rollout(trainer)


def test_lora_config_needs_the_policy_adapter(tmp_path):
    model = GPT.from_preset("tiny", attn_backend="sdpa")
    with pytest.raises(ValueError, match="no 'policy' adapter"):
        GRPOTrainer(
            grpo_config(tmp_path, lora=True),
            model,
            ByteTokenizer(),
            ["1+1="],
            ["2+2="],
            reward_function("arithmetic"),
        )


def test_policy_loss_through_the_triton_kernel_matches_torch(tmp_path):
    """The fused ppo_loss kernel (interpreter on CPU) gives GRPO's loss and gradients as the torch reference."""
    results = []
    for backend in ("torch", "triton"):
        cfg = grpo_config(tmp_path / backend, lora=True, kl_coef=0.05)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kernel_backend=backend))
        trainer = make_trainer(cfg)
        exp, first, _ = rollout(trainer)
        g = torch.Generator().manual_seed(1)  # off-policy old log-probs: clipping and KL are live
        exp = dataclasses.replace(
            exp,
            logprobs=exp.logprobs + 0.3 * torch.randn(exp.logprobs.shape, generator=g),
            ref_logprobs=exp.ref_logprobs + 0.3 * torch.randn(exp.logprobs.shape, generator=g),
        )
        loss, metrics = trainer.loss(exp)
        grads = torch.autograd.grad(loss, list(trainer.trainable.values()))
        results.append((loss.detach(), metrics, grads))
    (loss_t, metrics_t, grads_t), (loss_k, metrics_k, grads_k) = results
    torch.testing.assert_close(loss_k, loss_t, atol=1e-6, rtol=1e-5)
    for k in metrics_t:
        torch.testing.assert_close(metrics_k[k], metrics_t[k], atol=1e-6, rtol=1e-5)
    for a, b in zip(grads_t, grads_k):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-4)


def test_compiled_run_compiles_the_region_only_in_its_first_iteration(tmp_path, monkeypatch):
    # Prompt and response lengths change every iteration; the block region's graphs do not: one graph for
    # the policy with grad, one for the scoring passes (policy and reference share it), both in iteration 1.
    # Dynamo's guards decide recompiles, so the "eager" backend (no AOTAutograd) is enough, and fast.
    monkeypatch.setenv("RLHF_FAST_COMPILE_CACHE", str(tmp_path / "cache"))
    torch._dynamo.reset()
    config = grpo_config(tmp_path, lora=True, kl_coef=0.05, iterations=4, micro=16, group_size=4, prompts=8,
                         compile=True, compile_backend="eager")
    history = make_trainer(config).train()
    torch._dynamo.reset()
    compiles = [h["compiles"] for h in history]
    assert compiles == [2, 0, 0, 0], compiles
    assert history[-1]["compile_graphs"] == compiles[0]
    assert len({h["response_len"] for h in history}) > 1  # the shapes did change
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["compiles"] for r in logged if "compiles" in r] == compiles
