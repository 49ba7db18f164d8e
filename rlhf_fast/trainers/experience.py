"""Experience collection for PPO: rollout -> score -> advantages, as a few whole-batch calls.

`PPOModels` holds the four roles. LoRA mode (DESIGN.md): one frozen base (the SFT model) carries the
adapters `policy`, `value` (+ value head) and `reward` (+ reward head); the reference is the same base
with adapters off. Full-parameter mode: the policy is trained in full, the critic is a separate model,
the reference a frozen copy of the SFT model. Either way the reward model may instead be a separate
frozen model (e.g. one trained with a different base), as long as it shares the policy's vocabulary.

`ExperienceMaker.make` generates with the KV cache under the policy adapter, then runs the policy,
reference, critic and reward passes over the full prompt + response batch (no loop over tokens),
shapes per-token rewards with the KL penalty and runs GAE through `kernels.gae`. It times each phase
and reports how far the generation-time log-probs are from the training-time ones.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time

import torch
import torch.nn as nn

from rlhf_fast.generation import generate
from rlhf_fast.model import GPT, ScalarHead, disable_adapters, reward_scores
from rlhf_fast.model.lora import adapter_names, adapter_parameters, lora_modules
from rlhf_fast.rl import AdvantageConfig, Experience, compute_advantages, masked_mean, shape_rewards

POLICY, VALUE, REWARD = "policy", "value", "reward"  # adapter names of the LoRA roles


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | None):
    """Run `model` with adapter `name` active inside the block; restores the previous one after."""
    modules = [m for _, m in lora_modules(model)]
    if name is None or not modules:
        yield model
        return
    previous = [m.active_adapter for m in modules]
    model.set_adapter(name)
    try:
        yield model
    finally:
        for m, prev in zip(modules, previous):
            m.active_adapter = prev


def _vocab(model: GPT) -> int:
    return model.config.vocab_size


class PPOModels(nn.Module):
    """Policy, reference, critic and reward model of a PPO run (see the module docstring).

    policy: GPT. With a `policy` LoRA adapter it is the shared frozen base (LoRA mode); else it is
    trained in full and `critic` and `reference` must be given. critic / reference / reward_model:
    separate GPTs, or None for "the base with adapter value / adapters off / adapter reward".
    """

    def __init__(self, policy: GPT, value_head: ScalarHead, reward_head: ScalarHead, *,
                 critic: GPT | None = None, reference: GPT | None = None, reward_model: GPT | None = None):
        super().__init__()
        adapters = adapter_names(policy)
        self.lora = POLICY in adapters
        if not self.lora and (critic is None or reference is None):
            raise ValueError("full-parameter PPO (no 'policy' LoRA adapter) needs a separate critic and "
                             "reference model")
        needed = [(critic, VALUE), (reward_model, REWARD)] if self.lora else [(reward_model, REWARD)]
        for model, adapter in needed:
            if model is None and adapter not in adapters:
                raise ValueError(f"no separate {adapter} model and no {adapter!r} adapter on the policy "
                                 f"(its adapters: {adapters or 'none'})")
        for role, model in (("critic", critic), ("reference", reference), ("reward model", reward_model)):
            if model is not None and _vocab(model) != _vocab(policy):
                raise ValueError(f"the {role} has vocab_size {_vocab(model)} but the policy has "
                                 f"{_vocab(policy)}: they were trained with different tokenizers")
        value_width = (critic if critic is not None else policy).config.n_embd
        reward_width = (reward_model if reward_model is not None else policy).config.n_embd
        for name, head, width in (("value", value_head, value_width), ("reward", reward_head, reward_width)):
            if head.proj.in_features != width:
                raise ValueError(f"the {name} head expects width {head.proj.in_features}, its model has {width}")
        self.policy, self.critic, self.reference, self.reward_model = policy, critic, reference, reward_model
        self.value_head, self.reward_head = value_head, reward_head
        for frozen in (reference, reward_model, reward_head):
            if frozen is not None:
                frozen.requires_grad_(False)
        if self.lora:  # only the policy and value adapters (and the value head) learn
            policy.requires_grad_(False)
            for p in adapter_parameters(policy, POLICY) + (adapter_parameters(policy, VALUE) if critic is None
                                                           else []):
                p.requires_grad_(True)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def acting(self):
        """The policy as it generates (policy adapter active)."""
        with use_adapter(self.policy, POLICY if self.lora else None) as m:
            yield m

    def policy_logprobs(self, sequences, attention_mask, first_action: int, with_entropy: bool = False):
        from .rollout import action_logprobs

        with self.acting() as m:
            return action_logprobs(m, sequences, attention_mask, first_action=first_action,
                                   with_entropy=with_entropy)

    def ref_logprobs(self, sequences, attention_mask, first_action: int):
        from .rollout import action_logprobs

        if self.reference is not None:
            return action_logprobs(self.reference, sequences, attention_mask, first_action=first_action)
        with disable_adapters(self.policy):
            return action_logprobs(self.policy, sequences, attention_mask, first_action=first_action)

    def values(self, sequences, attention_mask, first_action: int):
        from .rollout import action_values

        if self.critic is not None:
            return action_values(self.critic, self.value_head, sequences, attention_mask,
                                 first_action=first_action)
        with use_adapter(self.policy, VALUE) as m:
            return action_values(m, self.value_head, sequences, attention_mask, first_action=first_action)

    def scores(self, sequences, attention_mask):
        """(B,) reward-model score at each row's last real token (the last response token)."""
        if self.reward_model is not None:
            return reward_scores(self.reward_model, self.reward_head, sequences, attention_mask)
        with use_adapter(self.policy, REWARD) as m:
            return reward_scores(m, self.reward_head, sequences, attention_mask)


class PhaseTimer:
    """Wall time per named phase (synchronising CUDA so the GPU work is counted where it happens)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - t0


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class ExperienceMaker:
    """Turns a batch of left-padded prompts into an `Experience` (see the module docstring)."""

    def __init__(self, models: PPOModels, *, max_new_tokens: int, eos_token_id: int | None,
                 pad_token_id: int | None, advantage: AdvantageConfig, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, kl_estimator: str = "k1", compile: bool | None = None,
                 frozen_on_device=None):
        if advantage.estimator != "gae":
            raise ValueError(f"PPO experience uses the gae estimator, got {advantage.estimator!r}")
        self.models, self.advantage = models, advantage
        self.generation = dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                               top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                               compile=compile)
        self.kl_estimator = kl_estimator
        # model -> context in which a separate frozen model (reference, reward) is on the device (the
        # strategy's on_device: offloading between uses); None for a role played by the shared base
        self.frozen_on_device = frozen_on_device or (lambda model: contextlib.nullcontext())

    @torch.no_grad()
    def make(self, input_ids, attention_mask, *, kl_coef: float, generator: torch.Generator | None = None):
        """(Experience, stats) for prompts input_ids / attention_mask (B, P), left-padded."""
        device = input_ids.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timer = PhaseTimer(device)
        m = self.models
        m.eval()
        with timer("generate"), m.acting() as policy:
            out = generate(policy, input_ids, attention_mask, generator=generator, return_logprobs=True,
                           **self.generation)
        P = input_ids.shape[1]
        first = P - 1  # the last prompt column predicts the first response token
        seq, mask = out.sequences, out.attention_mask.bool()  # (B, S)
        action_mask = torch.cat([torch.zeros_like(mask[:, :first]), out.response_mask.bool()], dim=1)  # (B, T)
        with timer("score"):
            logprobs = m.policy_logprobs(seq, mask, first)  # (B, T)
            with self.frozen_on_device(m.reference):
                ref_logprobs = m.ref_logprobs(seq, mask, first)
            values = m.values(seq, mask, first)
            with self.frozen_on_device(m.reward_model):
                scores = m.scores(seq, mask)  # (B,)
        with timer("advantages"):
            rewards, kl = shape_rewards(scores, logprobs, ref_logprobs, action_mask, kl_coef, self.kl_estimator)
            advantages, returns = compute_advantages(self.advantage, rewards, action_mask, values)
        gap = torch.where(out.response_mask.bool(), (logprobs[:, first:] - out.logprobs).abs(), 0.0)
        n_tokens = out.response_mask.sum(dim=1).float()
        stats = {
            "score": scores.mean(),
            "kl": (kl.sum(dim=1)).mean(),  # per-sequence KL estimate to the reference
            "response_len": n_tokens.mean(),
            "value_mean": masked_mean(values, action_mask),
            "gen_logprob_gap_max": gap.max(),
            "gen_logprob_gap_mean": gap.sum() / n_tokens.sum().clamp(min=1),
        }
        stats = {k: float(v) for k, v in stats.items()}
        stats.update(timer.times)
        stats["peak_mem_gb"] = peak_memory_gb(device)
        exp = Experience(sequences=seq, attention_mask=mask, action_mask=action_mask, logprobs=logprobs,
                         advantages=advantages, returns=returns, ref_logprobs=ref_logprobs, values=values,
                         rewards=rewards, scores=scores)
        return exp, stats
