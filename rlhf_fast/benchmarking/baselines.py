"""The baselines our numbers are compared with, on the same weights and shapes:

- `no_cache_generate`: the seed code's generation loop, a full forward over the growing sequence for
  every new token (no KV cache);
- `hf_copy`: the same weights as a Hugging Face `GPT2LMHeadModel`, for `generate` with HF's own cache;
- `SeedStyleBaseline`: a whole seed-style PPO iteration: four separate models (policy, reference,
  critic, reward), eager, torch kernel/attention backends, unfused log-probs (`seed_action_logprobs`),
  no-KV-cache generation. It trains the same
  LoRA adapters as ours, so the speed-up measures the engineering, not a change in what is trained;
- `unfused_logprobs`: the lm-head log-probs / entropy as the seed computed them, through the full
  (N, V) fp32 log-softmax (what `kernels.linear_logprobs` avoids materialising).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlhf_fast.distributed import SingleDeviceStrategy
from rlhf_fast.model import GPT, ScalarHead, add_lora, reward_scores
from rlhf_fast.model.lora import adapter_parameters
from rlhf_fast.rl import AdvantageConfig, Experience, compute_advantages, ppo_loss, shape_rewards
from rlhf_fast.trainers.experience import PhaseTimer
from rlhf_fast.trainers.rollout import action_values


def unfused_logprobs(hidden, weight, targets, temperature: float = 1.0, with_entropy: bool = False):
    """(log p(target), entropy or None), each (...) fp32, from the materialised (..., V) log-softmax of
    hidden @ weight.T / temperature. hidden (..., C); weight (V, C); targets (...) in [0, V)."""
    logp = torch.log_softmax(F.linear(hidden, weight).float() / temperature, dim=-1)  # (..., V)
    logprobs = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logprobs, (-(logp.exp() * logp).sum(dim=-1) if with_entropy else None)


def seed_action_logprobs(model, sequences, attention_mask, first_action: int):
    """`trainers.rollout.action_logprobs` as the seed computed it: the response's (B, T', V) logits and
    their fp32 log-softmax materialised (the fused kernel's baseline); (B, T) fp32, 0 before first_action."""
    h = model.hidden_states(sequences, attention_mask)[:, first_action:-1]
    lp, _ = unfused_logprobs(h, model.lm_head.weight, sequences[:, first_action + 1 :])
    return F.pad(lp, (first_action, 0))


@torch.no_grad()
def no_cache_generate(
    model, input_ids, attention_mask, max_new_tokens: int, generator: torch.Generator | None = None
):
    """(sequences, attention_mask) (B, P + N): greedy, or sampled at temperature 1 with `generator`."""
    ids, mask = input_ids, attention_mask.long()
    for _ in range(max_new_tokens):
        logits = model(ids, mask)[:, -1].float()  # (B, V): the whole prefix is recomputed every token
        if generator is None:
            tok = logits.argmax(dim=-1, keepdim=True)
        else:
            tok = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        ids, mask = torch.cat([ids, tok], dim=1), torch.cat([mask, torch.ones_like(tok)], dim=1)
    return ids, mask


def hf_copy(model: GPT, directory, dtype: torch.dtype, device) -> nn.Module:
    """The same weights as a transformers GPT2LMHeadModel (through our HF export)."""
    import transformers

    model.save_pretrained(directory)
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory)
    return hf.to(device=device, dtype=dtype).eval()


def separate_copy(base: GPT, device, dtype: torch.dtype, **backends) -> GPT:
    """A model of its own on `device` in `dtype` with `base`'s weights and the given attention / kernel
    backends. `base` stays where it is (the suite keeps it on the CPU, so only the copies under test
    count against the GPU memory being measured)."""
    cfg = dataclasses.replace(base.config, **backends)
    model = GPT(cfg).to(device=device, dtype=dtype)
    model.load_state_dict(base.state_dict())  # copies across devices and casts to the model's dtype
    return model


class SeedStyleBaseline:
    """One PPO iteration the seed way (see the module docstring). `iteration(ids, mask)` returns the
    per-phase times {"time/generate", "time/score", "time/advantages", "time/train"}."""

    TORCH = dict(attn_backend="torch", kernel_backend="torch")

    def __init__(
        self,
        base: GPT,
        device,
        dtype: torch.dtype,
        value_head: ScalarHead,
        reward_head: ScalarHead,
        *,
        max_new_tokens: int,
        mini_batch_size: int,
        ppo_epochs: int,
        lora_rank: int,
        precision: str,
        lr: float = 5e-4,
        kl_coef: float = 0.05,
        seed: int = 0,
    ):
        self.device = torch.device(device)
        self.policy, self.reference, self.critic, self.reward_model = (
            separate_copy(base, device, dtype, **self.TORCH) for _ in range(4)
        )
        for m in (self.policy, self.reference, self.critic, self.reward_model):
            m.requires_grad_(False)
        torch.manual_seed(seed)
        add_lora(self.policy, "policy", rank=lora_rank)
        add_lora(self.critic, "value", rank=lora_rank)
        self.value_head, self.reward_head = (
            copy.deepcopy(value_head),
            copy.deepcopy(reward_head).requires_grad_(False),
        )
        params = adapter_parameters(self.policy, "policy") + adapter_parameters(self.critic, "value")
        for p in params:
            p.requires_grad_(True)
        params += list(self.value_head.parameters())
        self.modules = nn.ModuleList(
            [self.policy, self.reference, self.critic, self.reward_model, self.value_head, self.reward_head]
        )
        self.strategy = SingleDeviceStrategy(self.device, precision, 1.0)
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))
        self.modules, self.optimizer, _ = self.strategy.prepare(self.modules, optimizer)
        self.max_new_tokens, self.mini_batch_size, self.ppo_epochs = (
            max_new_tokens,
            mini_batch_size,
            ppo_epochs,
        )
        self.kl_coef = kl_coef
        self.advantage = AdvantageConfig(estimator="gae", whiten=True, backend="torch")  # as PPOConfig
        self.generator = torch.Generator(self.device).manual_seed(seed)

    @torch.no_grad()
    def experience(self, input_ids, attention_mask, timer: PhaseTimer) -> Experience:
        self.modules.eval()
        with timer("generate"), self.strategy.autocast():
            seq, mask = no_cache_generate(
                self.policy, input_ids, attention_mask, self.max_new_tokens, self.generator
            )
        first = input_ids.shape[1] - 1
        mask = mask.bool()
        action_mask = F.pad(torch.ones_like(mask[:, first + 1 :]), (first, 0), value=False)  # (B, S - 1)
        with timer("score"), self.strategy.autocast():
            logprobs = seed_action_logprobs(self.policy, seq, mask, first)
            ref_logprobs = seed_action_logprobs(self.reference, seq, mask, first)
            values = action_values(self.critic, self.value_head, seq, mask, first_action=first)
            scores = reward_scores(self.reward_model, self.reward_head, seq, mask).float()
        with timer("advantages"):
            rewards, _ = shape_rewards(scores, logprobs, ref_logprobs, action_mask, self.kl_coef, "k1")
            advantages, returns = compute_advantages(self.advantage, rewards, action_mask, values)
        return Experience(
            sequences=seq,
            attention_mask=mask,
            action_mask=action_mask,
            logprobs=logprobs,
            advantages=advantages,
            returns=returns,
            ref_logprobs=ref_logprobs,
            values=values,
            rewards=rewards,
            scores=scores,
        )

    def update(self, exp: Experience) -> None:
        self.modules.train()
        B, first = len(exp), int(exp.action_mask.any(dim=0).to(torch.uint8).argmax())
        for _ in range(self.ppo_epochs):
            order = torch.randperm(B, device=self.device)
            for i in range(0, B, self.mini_batch_size):
                mb = exp.select(order[i : i + self.mini_batch_size])
                with self.strategy.autocast():
                    logprobs = seed_action_logprobs(self.policy, mb.sequences, mb.attention_mask, first)
                    values = action_values(
                        self.critic, self.value_head, mb.sequences, mb.attention_mask, first_action=first
                    )
                    loss, _ = ppo_loss(
                        logprobs,
                        mb.logprobs,
                        mb.advantages,
                        values,
                        mb.values,
                        mb.returns,
                        mb.action_mask,
                        ref_logprobs=mb.ref_logprobs,
                        backend="torch",
                    )
                self.strategy.backward(loss)
                self.strategy.step()

    def iteration(self, input_ids, attention_mask) -> dict[str, float]:
        timer = PhaseTimer(self.device)
        exp = self.experience(input_ids, attention_mask, timer)
        with timer("train"):
            self.update(exp)
        return timer.times
