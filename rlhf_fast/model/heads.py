"""Scalar heads on the final hidden states: the value head (per token) and the reward head (per sequence).

Both are a Linear(C, 1). A sequence's reward is the head's output at its last real token, found from
the attention mask, so the score is the same for left padding, right padding or none.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ScalarHead(nn.Module):
    """Linear(C, 1) on hidden states (B, T, C) → (B, T) scores, computed in fp32."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.proj = nn.Linear(n_embd, 1)
        # Small init: scores start near 0, so the first pairwise losses are ~log 2 rather than noise.
        nn.init.normal_(self.proj.weight, std=1.0 / (n_embd + 1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[-1] != self.proj.in_features:
            raise ValueError(f"ScalarHead expects hidden states (B, T, {self.proj.in_features}), "
                             f"got {tuple(hidden.shape)}")
        # Scores are RL maths: fp32 even under autocast and whatever the weights' dtype.
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = self.proj.weight.float(), self.proj.bias.float()
            return F.linear(hidden.float(), w, b).squeeze(-1)  # (B, T)


ValueHead = ScalarHead
RewardHead = ScalarHead


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token (mask 1), for any padding side. Rows need >= 1 real token."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got {tuple(attention_mask.shape)}")
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    # Largest position holding a real token; padding positions count as -1 so they never win.
    return torch.where(attention_mask.bool(), positions, -1).amax(dim=1)


def sequence_scores(token_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) score at each row's last real token, from per-token scores (B, T)."""
    if token_scores.shape != attention_mask.shape:
        raise ValueError(f"token_scores {tuple(token_scores.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} must have the same shape")
    idx = last_token_index(attention_mask)
    return token_scores.gather(1, idx.clamp(min=0).unsqueeze(1)).squeeze(1)


def reward_scores(model: nn.Module, head: ScalarHead, input_ids, attention_mask) -> torch.Tensor:
    """(B,) reward of each sequence: the head at the last real token of the model's hidden states."""
    return sequence_scores(head(model.hidden_states(input_ids, attention_mask)), attention_mask)
