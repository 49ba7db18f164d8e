import copy

import pytest
import torch
from ppo_testing import tiny_models, tiny_trainer

from rlhf_fast.data import ByteTokenizer
from rlhf_fast.model import GPT, ScalarHead, add_lora, reward_scores
from rlhf_fast.model.lora import lora_modules
from rlhf_fast.rl import AdvantageConfig, Experience
from rlhf_fast.trainers.experience import ExperienceMaker
from rlhf_fast.trainers.models import PPOModels, use_adapter
from rlhf_fast.trainers.rollout import action_logprobs

TOK = ByteTokenizer()
PROMPTS = ["\n\nHuman: Tell me about Dogs.\n\nAssistant:", "\n\nHuman: Owls?\n\nAssistant:", "Hi"]


def _prompts():
    return TOK.pad([TOK.encode(p) for p in PROMPTS], side="left")  # lengths 44, 29, 2: odd left padding


def _maker(models, eos_token_id=TOK.eos_token_id, **kw):
    return ExperienceMaker(models, max_new_tokens=11, eos_token_id=eos_token_id, pad_token_id=TOK.pad_token_id,
                           advantage=AdvantageConfig(lam=0.9, whiten=True, backend="torch"), **kw)


def _base_copy(models: PPOModels) -> GPT:
    """The frozen base as a plain GPT (no adapters), with the very same weights."""
    plain = GPT(models.policy.config)
    plain.load_state_dict({k: v for k, v in models.policy.state_dict().items() if ".lora_" not in k})
    return plain.eval()


@torch.no_grad()
def test_reference_logprobs_equal_the_base_model_and_policy_differs():
    models = tiny_models(perturb_policy=True)
    ids, mask = _prompts()
    exp, _ = _maker(models).make(ids, mask, kl_coef=0.1, generator=torch.Generator().manual_seed(1))
    P = ids.shape[1]
    want = action_logprobs(_base_copy(models), exp.sequences, exp.attention_mask, first_action=P - 1)
    m = exp.action_mask
    torch.testing.assert_close(exp.ref_logprobs[m], want[m], atol=1e-6, rtol=1e-6)
    assert (exp.logprobs[m] - exp.ref_logprobs[m]).abs().max() > 1e-3  # the perturbed policy is not the base


@torch.no_grad()
def test_kl_is_zero_before_the_first_update():
    models = tiny_models()  # policy adapter B = 0: policy == reference
    ids, mask = _prompts()
    exp, stats = _maker(models).make(ids, mask, kl_coef=0.5, generator=torch.Generator().manual_seed(2))
    m = exp.action_mask
    torch.testing.assert_close(exp.logprobs[m], exp.ref_logprobs[m], atol=1e-6, rtol=0)
    assert abs(stats["kl"]) < 1e-5
    # with zero KL the shaped reward is the score alone, on each row's last response token
    last = m.flip(1).float().argmax(1)
    last = m.shape[1] - 1 - last
    torch.testing.assert_close(exp.rewards.gather(1, last[:, None]).squeeze(1), exp.scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn_backend", ["sdpa", "torch"])
@torch.no_grad()
def test_generation_and_training_logprobs_agree(attn_backend):
    models = tiny_models(perturb_policy=True, attn_backend=attn_backend)
    ids, mask = _prompts()
    # EOS = a frequent byte, so rows finish early and the post-EOS padding path is exercised
    exp, stats = _maker(models, eos_token_id=ord("e")).make(ids, mask, kl_coef=0.1,
                                                             generator=torch.Generator().manual_seed(3))
    assert stats["gen_logprob_gap_max"] < 1e-4
    assert stats["gen_logprob_gap_mean"] < 1e-5
    assert stats["response_len"] > 0


@torch.no_grad()
def test_experience_fields_follow_the_roles():
    models = tiny_models(perturb_policy=True)
    ids, mask = _prompts()
    exp, stats = _maker(models).make(ids, mask, kl_coef=0.2, generator=torch.Generator().manual_seed(4))
    B, S = exp.sequences.shape
    P = ids.shape[1]
    assert exp.action_mask.shape == (B, S - 1) and not exp.action_mask[:, : P - 1].any()
    assert exp.action_mask[:, P - 1].all()  # every row takes at least one action
    # the length/EOS rule: a response cut at max_new_tokens (11) is scored with an EOS appended
    lengths = exp.action_mask.sum(1)
    truncated = (lengths == 11) & (exp.sequences[:, -1] != TOK.eos_token_id)
    assert truncated.any()
    with use_adapter(models.policy, "reward") as m:
        for b in range(B):
            ids = exp.sequences[b][exp.attention_mask[b]].tolist() + ([TOK.eos_token_id] if truncated[b] else [])
            want = reward_scores(m, models.reward_head, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))
            torch.testing.assert_close(exp.scores[b: b + 1], want)
    for name in ("advantages", "returns", "rewards"):
        assert (getattr(exp, name)[~exp.action_mask] == 0).all(), name
    for key in ("time/generate", "time/score", "time/advantages", "peak_mem_gb"):
        assert stats[key] >= 0
    # the active adapter is restored after every role's pass
    assert {m.active_adapter for _, m in lora_modules(models.policy)} == {"policy"}


def _garbage_like(t, mask, gen):
    noise = torch.randn(t.shape, generator=gen) * 1e3
    return torch.where(mask, t, noise.to(t.dtype))


def test_garbage_in_masked_positions_changes_no_loss_or_gradient(tmp_path):
    trainer = tiny_trainer(tmp_path, models=tiny_models(perturb_policy=True))
    gen = torch.Generator().manual_seed(5)
    B, S, V = 5, 23, 258
    attention = torch.ones(B, S, dtype=torch.bool)
    lengths = [(0, 20), (3, 23), (6, 17), (1, 23), (9, 12)]  # (left pad, end): odd pads on both sides
    for b, (lo, hi) in enumerate(lengths):
        attention[b, :lo] = False
        attention[b, hi:] = False
    P = 10  # prompt columns; actions from P - 1 to each row's end
    action = attention[:, 1:].clone()
    action[:, : P - 1] = False
    seq = torch.randint(0, 256, (B, S), generator=gen)
    fields = {n: torch.randn(B, S - 1, generator=gen) for n in ("advantages", "returns", "values")}
    logprobs = -torch.rand(B, S - 1, generator=gen) * 3
    clean = Experience(sequences=torch.where(attention, seq, TOK.pad_token_id), attention_mask=attention,
                       action_mask=action, logprobs=torch.where(action, logprobs, 0.0),
                       ref_logprobs=torch.where(action, logprobs - 0.1, 0.0),
                       **{n: torch.where(action, t, 0.0) for n, t in fields.items()})
    dirty = Experience(sequences=torch.where(attention, seq, torch.randint(0, V, (B, S), generator=gen)),
                       attention_mask=attention, action_mask=action,
                       logprobs=_garbage_like(clean.logprobs, action, gen),
                       ref_logprobs=_garbage_like(clean.ref_logprobs, action, gen),
                       **{n: _garbage_like(getattr(clean, n), action, gen) for n in fields})

    def loss_and_grads(exp):
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, metrics = trainer.loss(exp)
        loss.backward()
        return loss.detach(), metrics, {n: p.grad.clone() for n, p in trainer.trainable.items()}

    loss_a, metrics_a, grads_a = loss_and_grads(clean)
    loss_b, metrics_b, grads_b = loss_and_grads(dirty)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-5)
    for k in metrics_a:
        torch.testing.assert_close(metrics_b[k], metrics_a[k], atol=1e-6, rtol=1e-5)
    assert any(g.abs().max() > 0 for g in grads_a.values())
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], atol=1e-7, rtol=1e-5, msg=n)


def test_ppo_models_reject_missing_roles_and_mismatched_vocabularies():
    torch.manual_seed(0)
    base = GPT.from_preset("tiny")
    add_lora(base, "policy", rank=2)
    head = ScalarHead(base.config.n_embd)
    with pytest.raises(ValueError, match="'value' adapter"):
        PPOModels(base, head, head)
    add_lora(base, "value", rank=2)
    with pytest.raises(ValueError, match="'reward' adapter"):
        PPOModels(base, head, head)
    other_vocab = GPT.from_preset("tiny", vocab_size=384)
    with pytest.raises(ValueError, match="vocab_size 384 but the policy has 320"):
        PPOModels(base, head, head, reward_model=other_vocab)
    with pytest.raises(ValueError, match="reward head expects width 32"):
        PPOModels(base, head, head, reward_model=GPT.from_preset("demo", vocab_size=320))
    plain = GPT.from_preset("tiny")
    with pytest.raises(ValueError, match="full-parameter PPO"):
        PPOModels(plain, head, head, reward_model=copy.deepcopy(plain))
    with pytest.raises(ValueError, match="gae estimator"):
        ExperienceMaker(PPOModels(base, head, head, reward_model=plain), max_new_tokens=4, eos_token_id=None,
                        pad_token_id=None, advantage=AdvantageConfig(estimator="grpo", group_size=2))
