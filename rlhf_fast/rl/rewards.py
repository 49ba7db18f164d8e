"""Reward shaping: a per-token KL penalty plus the sequence score on the last response token, and the
DAPO (Yu et al. 2025) helpers: the soft overlong punishment and dynamic sampling's group filter."""

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


def overlong_penalty(
    lengths: torch.Tensor, truncated: torch.Tensor, max_new_tokens: int, buffer: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO soft overlong punishment (eq. 13), (B,) fp32, added to the scores.

    With L_max = max_new_tokens and L_cache = buffer: 0 for L <= L_max - L_cache, a linear ramp
    (L_max - L_cache - L) / L_cache * factor down to -factor at L_max, and -factor for a truncated row
    (it hit the limit without EOS). lengths (B,) response lengths, truncated (B,) bool.
    """
    if not 0 < buffer < max_new_tokens:
        raise ValueError(f"overlong_penalty needs 0 < buffer < max_new_tokens, got {buffer}, {max_new_tokens}")
    if factor < 0:
        raise ValueError(f"overlong_penalty factor must be >= 0, got {factor}")
    if lengths.dim() != 1 or truncated.shape != lengths.shape:
        raise ValueError(
            f"overlong_penalty: lengths and truncated must both be (B,), got "
            f"{tuple(lengths.shape)}, {tuple(truncated.shape)}"
        )
    L = lengths.float()
    start = float(max_new_tokens - buffer)
    ramp = ((start - L) / buffer).clamp(min=-1.0) * factor
    penalty = torch.where(L > start, ramp, torch.zeros((), device=L.device))
    cut = truncated if truncated.dtype == torch.bool else truncated != 0
    return torch.where(cut, torch.full((), -float(factor), device=L.device), penalty)


def groups_with_signal(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B // group_size,) bool: True where a group's scores are not all equal. A group with equal scores
    has zero advantage under grpo/dr_grpo/rloo, so DAPO dynamic sampling keeps only these groups."""
    if scores.dim() != 1 or group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(
            f"groups_with_signal: scores must be (B,) with B a multiple of group_size, got "
            f"{tuple(scores.shape)} and group_size {group_size}"
        )
    grouped = scores.view(-1, group_size)  # (G, k)
    return (grouped != grouped[:, :1]).any(dim=1)
