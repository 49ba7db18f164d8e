"""The rollout batch a PPO / GRPO update consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Experience:
    """One batch of experience. S = prompt + response length; T = S - 1 action positions (token t+1
    is the action taken at position t). Prompts are left-padded; action_mask marks response tokens."""

    sequences: torch.Tensor  # (B, S) int64 token ids
    attention_mask: torch.Tensor  # (B, S) bool, True = real token
    action_mask: torch.Tensor  # (B, T) bool, True = response token (an action the policy took)
    logprobs: torch.Tensor  # (B, T) fp32 log-probs of the actions under the rollout policy
    advantages: torch.Tensor  # (B, T) fp32
    returns: torch.Tensor  # (B, T) fp32 value targets
    ref_logprobs: torch.Tensor | None = None  # (B, T) fp32 under the reference (adapters off)
    values: torch.Tensor | None = None  # (B, T) fp32 critic values at rollout time (PPO only)
    rewards: torch.Tensor | None = None  # (B, T) fp32 shaped per-token rewards
    scores: torch.Tensor | None = None  # (B,) fp32 sequence scores from the reward model

    def __post_init__(self):
        if self.sequences.dim() != 2 or self.attention_mask.shape != self.sequences.shape:
            raise ValueError(
                f"Experience: sequences and attention_mask must share a (B, S) shape, got "
                f"{tuple(self.sequences.shape)} and {tuple(self.attention_mask.shape)}"
            )
        B, S = self.sequences.shape
        for f in fields(self):
            t = getattr(self, f.name)
            if t is None or f.name in ("sequences", "attention_mask"):
                continue
            want = (B,) if f.name == "scores" else (B, S - 1)
            if tuple(t.shape) != want:
                raise ValueError(f"Experience: {f.name} must be {want}, got {tuple(t.shape)}")

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def _map(self, fn) -> Experience:
        return replace(
            self,
            **{
                f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                for f in fields(self)
            },
        )

    def to(self, device) -> Experience:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def select(self, index: torch.Tensor | slice) -> Experience:
        """Rows `index` of every field (a slice, or an index tensor, e.g. a shuffled permutation)."""
        return self._map(lambda t: t[index])

    def split(self, micro_batch_size: int) -> list[Experience]:
        """Consecutive micro-batches of at most micro_batch_size rows."""
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        return [self.select(slice(i, i + micro_batch_size)) for i in range(0, len(self), micro_batch_size)]
