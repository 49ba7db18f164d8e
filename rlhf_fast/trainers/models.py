"""The roles of an RL run over one frozen base (DESIGN.md, "Training roles and memory").

LoRA mode: one frozen base (the SFT model) carries the adapters `policy`, `value` (+ value head) and
`reward` (+ reward head); the reference is the same base with adapters off. Full-parameter mode: the
policy is trained in full, a critic is a separate model and the reference a frozen copy. The critic is
optional (critic-free estimators: GRPO, RLOO, REINFORCE++), and so is the reward role (a `Scorer` may
score instead: a reward function, or a reward model of its own).
"""

from __future__ import annotations

import contextlib

import torch.nn as nn

from rlhf_fast.model import GPT, ScalarHead, disable_adapters, reward_scores
from rlhf_fast.model.lora import adapter_names, adapter_parameters, lora_modules

from .rollout import action_logprobs, action_values

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


class PPOModels(nn.Module):
    """Policy, reference, critic and reward model of an RL run (see the module docstring).

    policy: GPT. With a `policy` LoRA adapter it is the shared frozen base (LoRA mode); else it is trained
    in full. value_head None: no critic; reward_head None: no reward role (a Scorer scores). critic /
    reference / reward_model: separate GPTs, or None for "the base with adapter value / adapters off /
    adapter reward" (LoRA mode; full mode needs a separate critic, and a reference to compute a KL).
    """

    def __init__(self, policy: GPT, value_head: ScalarHead | None = None, reward_head: ScalarHead | None = None,
                 *, critic: GPT | None = None, reference: GPT | None = None, reward_model: GPT | None = None):
        super().__init__()
        adapters = adapter_names(policy)
        self.lora = POLICY in adapters
        if not self.lora and value_head is not None and critic is None:
            raise ValueError("full-parameter PPO (no 'policy' LoRA adapter) needs a separate critic and "
                             "reference model")
        needed = [(critic, VALUE, value_head)] if self.lora else []
        for model, adapter, head in needed + [(reward_model, REWARD, reward_head)]:
            if head is not None and model is None and adapter not in adapters:
                raise ValueError(f"no separate {adapter} model and no {adapter!r} adapter on the policy "
                                 f"(its adapters: {adapters or 'none'})")
        for role, model in (("critic", critic), ("reference", reference), ("reward model", reward_model)):
            if model is not None and model.config.vocab_size != policy.config.vocab_size:
                raise ValueError(f"the {role} has vocab_size {model.config.vocab_size} but the policy has "
                                 f"{policy.config.vocab_size}: they were trained with different tokenizers")
        for name, head, model in (("value", value_head, critic), ("reward", reward_head, reward_model)):
            width = (model if model is not None else policy).config.n_embd
            if head is not None and head.proj.in_features != width:
                raise ValueError(f"the {name} head expects width {head.proj.in_features}, its model has {width}")
        self.policy, self.critic, self.reference, self.reward_model = policy, critic, reference, reward_model
        self.value_head, self.reward_head = value_head, reward_head
        for frozen in (reference, reward_model, reward_head):
            if frozen is not None:
                frozen.requires_grad_(False)
        if self.lora:  # only the policy and value adapters (and the value head) learn
            policy.requires_grad_(False)
            value = value_head is not None and critic is None
            for p in adapter_parameters(policy, POLICY) + (adapter_parameters(policy, VALUE) if value else []):
                p.requires_grad_(True)

    @property
    def has_critic(self) -> bool:
        return self.value_head is not None

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def acting(self):
        """The policy as it generates (policy adapter active)."""
        with use_adapter(self.policy, POLICY if self.lora else None) as m:
            yield m

    def policy_logprobs(self, sequences, attention_mask, first_action: int, with_entropy: bool = False,
                        temperature: float = 1.0):
        with self.acting() as m:
            return action_logprobs(m, sequences, attention_mask, first_action=first_action,
                                   with_entropy=with_entropy, temperature=temperature)

    def ref_logprobs(self, sequences, attention_mask, first_action: int, temperature: float = 1.0):
        kw = dict(first_action=first_action, temperature=temperature)
        if self.reference is not None:
            return action_logprobs(self.reference, sequences, attention_mask, **kw)
        if not self.lora:
            raise ValueError("full-parameter training has no reference model: give PPOModels(reference=...)")
        with disable_adapters(self.policy):
            return action_logprobs(self.policy, sequences, attention_mask, **kw)

    def values(self, sequences, attention_mask, first_action: int):
        if self.critic is not None:
            return action_values(self.critic, self.value_head, sequences, attention_mask, first_action=first_action)
        with use_adapter(self.policy, VALUE) as m:
            return action_values(m, self.value_head, sequences, attention_mask, first_action=first_action)

    def scores(self, sequences, attention_mask):
        """(B,) reward-model score at each row's last real token."""
        if self.reward_model is not None:
            return reward_scores(self.reward_model, self.reward_head, sequences, attention_mask)
        with use_adapter(self.policy, REWARD) as m:
            return reward_scores(m, self.reward_head, sequences, attention_mask)
