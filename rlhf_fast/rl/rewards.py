"""Reward shaping for PPO: a per-token KL penalty plus the sequence score on the last response token."""

from __future__ import annotations

import torch

from .kl import kl_estimator


def last_token_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) index of the last mask != 0 position of each row, and (B,) whether the row has one."""
    m = mask if mask.dtype == torch.bool else mask != 0
    T = m.shape[-1]
    has_token = m.any(dim=-1)
    # argmax returns the first maximum, so search the flipped rows for the first True
    last = T - 1 - m.flip(-1).to(torch.uint8).argmax(dim=-1)
    return last, has_token


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator_name: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards[b, t] = -kl_coef * KL_t on response tokens, + scores[b] at each row's last response token.

    scores (B,) sequence scores (reward model); logprobs, ref_logprobs, mask (B, T). Returns
    (rewards, kl), both (B, T) fp32 and 0 where mask == 0. A row with no response token gets nothing.
    """
    if logprobs.dim() != 2 or ref_logprobs.shape != logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError(
            f"shape_rewards: logprobs, ref_logprobs, mask must share a (B, T) shape, got "
            f"{tuple(logprobs.shape)}, {tuple(ref_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"shape_rewards: scores must be ({logprobs.shape[0]},), got {tuple(scores.shape)}")
    m = mask if mask.dtype == torch.bool else mask != 0
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)
    kl = torch.where(m, kl_estimator(kl_estimator_name)(logprobs.float(), ref_logprobs.float()), zero)
    rewards = -kl_coef * kl
    last, has_token = last_token_index(m)
    bonus = torch.where(has_token, scores.float(), zero).unsqueeze(1)  # (B, 1)
    at_last = torch.arange(m.shape[1], device=m.device).unsqueeze(0) == last.unsqueeze(1)
    rewards = rewards + torch.where(at_last & m, bonus, zero)
    return rewards, kl
