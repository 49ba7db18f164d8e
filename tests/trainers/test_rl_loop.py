"""The shared RL loop: length checks before step 1, log-probs of the sampled distribution, dropout, the two
loss paths, dynamic sampling, overlong rules and the critic/estimator pairing."""

import dataclasses

import pytest
import torch
from ppo_testing import tiny_models, tiny_trainer

from rlhf_fast.data import ByteTokenizer
from rlhf_fast.model import GPT, ScalarHead, add_lora
from rlhf_fast.rl import AdvantageConfig
from rlhf_fast.trainers import RLSettings
from rlhf_fast.trainers.experience import ExperienceMaker
from rlhf_fast.trainers.models import PPOModels
from rlhf_fast.trainers.rollout import action_logprobs

TOK = ByteTokenizer()


def critic_free_models(seed: int = 0, dropout: float = 0.0) -> PPOModels:
    """tiny base with adapters policy / reward (no critic), the reward head scaled to give O(1) scores."""
    torch.manual_seed(seed)
    base = GPT.from_preset("tiny", attn_backend="sdpa")
    add_lora(base, "policy", rank=4, dropout=dropout)
    add_lora(base, "reward", rank=4)
    head = ScalarHead(base.config.n_embd)
    with torch.no_grad():
        head.proj.weight.mul_(30.0)
        for n, p in base.named_parameters():
            if ".lora_B." in n:
                p.normal_(0.0, 0.05)
    base.set_adapter("policy")
    return PPOModels(base, None, head)


def test_lengths_are_checked_before_the_first_step(tmp_path):
    n_positions = GPT.from_preset("tiny").config.n_positions
    with pytest.raises(ValueError, match=r"prompts of up to \d+ tokens \(--max-prompt-len\) \+ --max-new-tokens"):
        tiny_trainer(tmp_path, max_new_tokens=n_positions - 5)


def test_length_check_counts_the_eos_a_token_scorer_appends(tmp_path):
    """At the boundary: longest prompt + --max-new-tokens = n_positions fits the policy, but the reward model
    reads one position more (the EOS appended to a truncated response), so it is refused with an RM scorer and
    accepted with a function scorer; one token less fits both."""
    import re

    n_positions = GPT.from_preset("tiny").config.n_positions
    with pytest.raises(ValueError) as e:
        tiny_trainer(tmp_path, max_new_tokens=n_positions)
    longest = int(re.search(r"prompts of up to (\d+) tokens", str(e.value)).group(1))
    at_boundary = n_positions - longest
    with pytest.raises(ValueError, match=r"\+ 1 \(the EOS appended .*\) exceed the scoring model's n_positions"):
        tiny_trainer(tmp_path / "rm", max_new_tokens=at_boundary)
    tiny_trainer(tmp_path / "rm_ok", max_new_tokens=at_boundary - 1)
    tiny_trainer(tmp_path / "fn", max_new_tokens=at_boundary, scorer=lambda rollout: rollout.truncated.float())


def test_rollouts_refuse_top_k_top_p_and_bad_pairings():
    with pytest.raises(ValueError, match="top_k / top_p are not allowed"):
        RLSettings(top_k=5)
    with pytest.raises(ValueError, match="top_k / top_p are not allowed"):
        RLSettings(top_p=0.9)
    with pytest.raises(ValueError, match=r"group_size >= 2 \(dynamic_sampling\)"):
        RLSettings(dynamic_sampling=True)
    with pytest.raises(ValueError, match=r"exceeds the rollout's 4 rows .*\(mini_batch_size\)"):
        RLSettings(rollout_batch_size=2, group_size=2, mini_batch_size=5)
    with pytest.raises(ValueError, match="gae estimator needs a critic"):
        ExperienceMaker(critic_free_models(), max_new_tokens=4, eos_token_id=None, pad_token_id=None,
                        advantage=AdvantageConfig())


@torch.no_grad()
@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_logprobs_are_those_of_the_sampled_distribution(temperature):
    """Generation-time and training-time log-probs agree at any temperature, and differ from T = 1."""
    models = critic_free_models()
    maker = ExperienceMaker(models, max_new_tokens=9, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id,
                            advantage=AdvantageConfig("rloo", group_size=2), temperature=temperature)
    ids, mask = TOK.pad([TOK.encode(p) for p in ("Hello there", "Hi")], side="left")
    exp, stats = maker.make(ids, mask, kl_coef=0.1, generator=torch.Generator().manual_seed(0))
    assert stats["gen_logprob_gap_max"] < 1e-4
    m, first = exp.action_mask, ids.shape[1] - 1
    with models.acting() as policy:
        at_one = action_logprobs(policy, exp.sequences, exp.attention_mask, first_action=first)
    assert (exp.logprobs[m] - at_one[m]).abs().max() > 1e-2
    with models.acting() as policy:  # old and reference log-probs at the same temperature
        want = action_logprobs(policy, exp.sequences, exp.attention_mask, first_action=first, temperature=temperature)
    torch.testing.assert_close(exp.logprobs[m], want[m])


def test_lora_dropout_does_not_move_the_first_ratio(tmp_path):
    """A LoRA dropout from a config file: rollout and update both run without it, so ratio = 1 at first."""
    trainer = tiny_trainer(tmp_path, models=critic_free_models(dropout=0.3), estimator="rloo", group_size=2,
                           rollout_batch_size=4, mini_batch_size=8, epochs=1, init_kl_coef=0.0)
    exp, _ = trainer.rollout()
    stats = trainer.update(exp)
    assert stats["approx_kl"] == 0.0 and stats["clip_frac"] == 0.0


def test_weighted_loss_path_equals_the_fused_kernel_where_both_apply(tmp_path):
    """token mean + symmetric clip: rl.weighted_policy_loss (+ value_loss) gives the fused kernel's loss and
    gradients, with a critic, off-policy old log-probs and a k3 KL term."""
    trainer = tiny_trainer(tmp_path, models=tiny_models(perturb_policy=True), kl_loss_coef=0.1, kernel_backend="torch")
    exp, _ = trainer.rollout()
    g = torch.Generator().manual_seed(3)
    exp = dataclasses.replace(exp, logprobs=exp.logprobs + 0.3 * torch.randn(exp.logprobs.shape, generator=g),
                              values=exp.values + 0.3 * torch.randn(exp.logprobs.shape, generator=g))
    params = list(trainer.trainable.values())
    results = []
    for fused in (True, False):
        trainer.fused = fused
        loss, metrics = trainer.loss(exp)
        results.append((loss.detach(), metrics, torch.autograd.grad(loss, params)))
    (loss_f, m_f, g_f), (loss_w, m_w, g_w) = results
    assert m_f["clip_frac"] > 0 and m_f["kl"] > 0
    torch.testing.assert_close(loss_w, loss_f, atol=1e-6, rtol=1e-5)
    for k in ("policy_loss", "value_loss", "kl", "clip_frac", "approx_kl", "entropy"):
        torch.testing.assert_close(m_w[k], m_f[k], atol=1e-6, rtol=1e-5, msg=k)
    for a, b in zip(g_f, g_w):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-4)


def test_dynamic_sampling_keeps_only_groups_with_signal(tmp_path):
    """Scores that are equal within every other group: those groups go, more prompts refill the batch."""
    calls = []

    def every_other_group_flat(rollout):
        B = len(rollout.truncated)
        calls.append(B)
        scores = torch.arange(B, dtype=torch.float32)
        group = torch.arange(B) // 2
        return torch.where(group % 2 == 0, scores, 1.0)

    trainer = tiny_trainer(tmp_path, models=critic_free_models(), estimator="grpo", group_size=2,
                           rollout_batch_size=3, mini_batch_size=6, dynamic_sampling=True, max_sampling_rounds=4,
                           scorer=every_other_group_flat)
    exp, stats = trainer.rollout()
    assert calls == [6, 6] and stats["sampling_rounds"] == 2  # 2 + 2 groups with signal: the first 3 kept
    assert len(exp) == 6 and (exp.scores.view(-1, 2).std(dim=1) > 0).all()
    assert stats["groups_without_signal"] == 0.0 and stats["groups_trained"] == 3


def test_dynamic_sampling_says_once_when_it_trains_on_fewer_groups(tmp_path, caplog):
    """Only one group in four has signal and 2 rounds are allowed: the batch stays short (2 of 3 groups), one
    warning says so, and groups_trained records it each iteration."""

    def one_group_in_four(rollout):
        B = len(rollout.truncated)
        scores = torch.arange(B, dtype=torch.float32)
        return torch.where(torch.arange(B) // 2 % 4 == 0, scores, 1.0)

    trainer = tiny_trainer(tmp_path, models=critic_free_models(), estimator="grpo", group_size=2,
                           rollout_batch_size=4, mini_batch_size=4, dynamic_sampling=True, max_sampling_rounds=2,
                           scorer=one_group_in_four)
    with caplog.at_level("WARNING", logger="rlhf_fast"):
        stats = [trainer.rollout()[1] for _ in range(2)]
    assert [s["groups_trained"] for s in stats] == [2, 2]
    warnings = [r.getMessage() for r in caplog.records if "dynamic sampling" in r.getMessage()]
    assert len(warnings) == 1 and "only 2 of 4 groups" in warnings[0] and "--max-sampling-rounds" in warnings[0]


def test_truncated_responses_penalised_or_masked(tmp_path):
    """DAPO's overlong rules: a response cut at max_new_tokens gets the full soft penalty, or no loss."""

    def zero(rollout):
        return torch.zeros(len(rollout.truncated))

    common = dict(models=critic_free_models(), estimator="reinforce_pp", rollout_batch_size=4, mini_batch_size=4,
                  max_new_tokens=6, scorer=zero)
    ids, mask = TOK.pad([TOK.encode(p) for p in ("Hello there", "Hi", "Owls?", "A")], side="left")
    penalised = tiny_trainer(tmp_path / "a", overlong_buffer=2, overlong_penalty=0.5, **common)
    r = penalised.maker.sample(ids, mask, generator=torch.Generator().manual_seed(0))
    assert r.truncated.any()
    torch.testing.assert_close(r.scores[r.truncated], torch.full((int(r.truncated.sum()),), -0.5))
    masked = tiny_trainer(tmp_path / "b", mask_truncated=True, **common)
    r = masked.maker.sample(ids, mask, generator=torch.Generator().manual_seed(0))
    exp, stats = masked.maker.experience(r, kl_coef=0.0, mask_truncated=True)
    assert stats["truncated_frac"] == pytest.approx(float(r.truncated.float().mean())) and r.truncated.any()
    assert not exp.action_mask[r.truncated].any()  # no loss on the truncated rows
    assert (exp.action_mask[~r.truncated].sum(1) == r.response_mask[~r.truncated].sum(1)).all()


@torch.no_grad()
def test_a_weighted_list_of_scorers_scores_the_rollout():
    """A reward model plus a reward function of the texts, weighted: the experience maker's scores."""
    from rlhf_fast.trainers.reward_functions import FunctionScorer, ModelScorer, WeightedScorer

    models = critic_free_models()
    rm = ModelScorer(models.policy, models.reward_head, eos_token_id=TOK.eos_token_id, adapter="reward")

    def length(prompts, completions):
        return [float(len(c)) for c in completions]

    scorer = WeightedScorer([(rm, 0.5), (FunctionScorer(length, TOK), -0.1)])
    maker = ExperienceMaker(models, max_new_tokens=7, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id,
                            advantage=AdvantageConfig("rloo", group_size=2), scorer=scorer)
    prompts = ["Hello there", "Hi"]
    ids, mask = TOK.pad([TOK.encode(p) for p in prompts], side="left")
    r = maker.sample(ids, mask, prompts, generator=torch.Generator().manual_seed(0))
    want = 0.5 * rm(r) - 0.1 * torch.tensor([float(len(c)) for c in r.completions(TOK)])
    torch.testing.assert_close(r.scores, want)
    assert r.prompts == ["Hello there", "Hello there", "Hi", "Hi"]  # rows of a group share their prompt


def test_a_gold_measure_is_logged_at_evaluations_never_trained_on(tmp_path):
    """RLTrainer.gold (a task's own rule): eval/gold and eval/greedy_gold at each evaluation; the rollouts and the
    update are the same as without it (the scorer, not the gold rule, is the reward)."""
    import json

    def length_gold(prompts, completions):
        return [float(len(c)) for c in completions]

    runs = {}
    for name in ("plain", "gold"):
        trainer = tiny_trainer(tmp_path / name, iterations=2, eval_every=1, eval_prompts=4, n_eval=4)
        if name == "gold":
            trainer.gold = length_gold
        runs[name] = trainer.train()
    assert [h["score"] for h in runs["gold"]] == [h["score"] for h in runs["plain"]]
    records = [json.loads(line) for line in (tmp_path / "gold" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/gold" in r]
    assert len(evals) == 2 and all(r["eval/gold"] > 0 and "eval/greedy_gold" in r for r in evals)
    assert not any("eval/gold" in line for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines())
