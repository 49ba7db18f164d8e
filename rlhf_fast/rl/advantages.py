"""Advantage estimators behind a registry.

Every estimator has the same signature, `(rewards, mask, values, config) -> (advantages, returns)`,
all (B, T) fp32 and 0 where mask == 0, so a trainer picks one by name from `AdvantageConfig` instead
of branching on it. rewards (B, T) are per-token (shaped) rewards: the per-token KL penalty plus the
sequence score on the last response token (`rewards.shape_rewards`).

  gae           critic: Schulman et al. 2016, masked reverse scan (`kernels.gae`)
  grpo          (score - group mean) / (group std + eps)            Shao et al. 2024 (DeepSeekMath)
  dr_grpo       score - group mean, no std division                  Liu et al. 2025 (Dr. GRPO)
  rloo          score - mean score of the other k - 1 samples        Ahmadian et al. 2024
  reinforce_pp  G_t = sum_{s >= t} gamma^(s - t) r_s, whitened over the batch's tokens  Hu 2025

The group estimators score a sequence by its total reward and return that score, broadcast, as
`returns`; their batch holds `group_size` samples per prompt stored contiguously (rows g*k ... g*k+k-1
share a prompt). Discounting in `gae` and `reinforce_pp` steps over mask != 0 positions only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf_fast import kernels

from .masked import masked_sum, masked_whiten

AdvantageEstimator = Callable[..., tuple[torch.Tensor, torch.Tensor]]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}
CRITIC_ESTIMATORS = ("gae",)  # need critic values (B, T)
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")  # baseline from the prompt's other samples: group_size >= 2


def register_advantage_estimator(name: str):
    def register(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return register


@dataclass(frozen=True)
class AdvantageConfig:
    estimator: str = "gae"
    gamma: float = 1.0  # no discounting: episodes are one short response
    lam: float = 0.95
    group_size: int = 1  # samples per prompt (grpo, dr_grpo, rloo)
    whiten: bool = False  # whiten the final advantages over the batch's tokens (common with gae)
    std_eps: float = 1e-4  # grpo, reinforce_pp: std floor; 1e-6 turns score noise into O(1) advantages
    backend: str = "auto"  # kernels backend for gae

    def __post_init__(self):
        if self.estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"unknown advantage estimator {self.estimator!r}; "
                f"choose one of {sorted(ADVANTAGE_ESTIMATORS)}"
            )
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"gamma and lam must lie in [0, 1], got {self.gamma}, {self.lam}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.estimator in GROUP_ESTIMATORS and self.group_size < 2:
            raise ValueError(
                f"{self.estimator} needs group_size >= 2 (group_size must be >= 2: the baseline is the other "
                f"samples of the prompt), "
                f"got {self.group_size}"
            )
        if self.std_eps <= 0:
            raise ValueError(f"std_eps must be > 0, got {self.std_eps}")


def compute_advantages(config: AdvantageConfig, rewards, mask, values=None, *, all_reduce=None):
    """(advantages, returns) from the estimator `config.estimator`, optionally whitened.

    `mask` is the loss mask: a row it leaves empty (a truncated response under DAPO's overlong filtering) is
    no member of its group's baseline and no part of the whitening statistics. `all_reduce` (a tensor -> its
    sum over data-parallel ranks): whitening over every rank's tokens (groups never straddle ranks).
    """
    if rewards.dim() != 2 or mask.shape != rewards.shape:
        raise ValueError(
            f"rewards and mask must share a (B, T) shape, got {tuple(rewards.shape)}, {tuple(mask.shape)}"
        )
    advantages, returns = ADVANTAGE_ESTIMATORS[config.estimator](rewards, mask, values, config)
    if config.estimator == "reinforce_pp":  # its baseline and scale are the whole batch's
        advantages = masked_whiten(advantages, mask, eps=config.std_eps**2, all_reduce=all_reduce)
    elif config.whiten:
        advantages = masked_whiten(advantages, mask, all_reduce=all_reduce)
    return advantages, returns


@register_advantage_estimator("gae")
def gae_advantages(rewards, mask, values, config: AdvantageConfig):
    if values is None:
        raise ValueError("the gae estimator needs critic values (B, T)")
    return kernels.gae(rewards, values, mask, config.gamma, config.lam, backend=config.backend)


def _bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _grouped_scores(rewards, mask, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, members, n): (G, k) sequence scores, (G, k) bool "the row is in the loss" (a row the mask
    leaves empty is not), (G, 1) members per group."""
    B = rewards.shape[0]
    if B % group_size:
        raise ValueError(f"batch of {B} rows is not a whole number of groups of {group_size}")
    members = _bool(mask).any(dim=1).view(B // group_size, group_size)
    scores = masked_sum(rewards.float(), mask, dim=1).view(B // group_size, group_size)  # (G, k)
    return scores, members, members.sum(dim=1, keepdim=True)


def _group_mean(scores, members, n) -> torch.Tensor:
    return torch.where(members, scores, 0.0).sum(dim=1, keepdim=True) / n.clamp(min=1)  # (G, 1)


def _broadcast(advantage, score, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, k) per-sequence advantage and score -> (B, T) advantages and returns (the sequence score)."""
    m = _bool(mask)
    zero = torch.zeros((), device=m.device)
    return torch.where(m, advantage.reshape(-1, 1), zero), torch.where(m, score.reshape(-1, 1), zero)


@register_advantage_estimator("grpo")
def grpo_advantages(rewards, mask, values, config: AdvantageConfig):
    """Shao et al. 2024 (DeepSeekMath), outcome supervision: (score - group mean) / (group std + eps)."""
    scores, members, n = _grouped_scores(rewards, mask, config.group_size)
    mean = _group_mean(scores, members, n)
    centered = torch.where(members, scores - mean, 0.0)
    std = (centered.square().sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()  # Bessel, as the paper's code
    return _broadcast(centered / (std + config.std_eps), scores, mask)


@register_advantage_estimator("dr_grpo")
def dr_grpo_advantages(rewards, mask, values, config: AdvantageConfig):
    """Liu et al. 2025 (Understanding R1-Zero-like training): score - group mean. Dividing by the group
    std up-weights prompts that are nearly always (or never) solved; Dr. GRPO drops it."""
    scores, members, n = _grouped_scores(rewards, mask, config.group_size)
    return _broadcast(torch.where(members, scores - _group_mean(scores, members, n), 0.0), scores, mask)


@register_advantage_estimator("rloo")
def rloo_advantages(rewards, mask, values, config: AdvantageConfig):
    """Ahmadian et al. 2024: score minus the mean score of the other k - 1 samples of the prompt."""
    scores, members, n = _grouped_scores(rewards, mask, config.group_size)
    total = torch.where(members, scores, 0.0).sum(dim=1, keepdim=True)
    baseline = (total - scores) / (n - 1).clamp(min=1)
    return _broadcast(torch.where(members & (n >= 2), scores - baseline, 0.0), scores, mask)  # alone: no baseline


@register_advantage_estimator("reinforce_pp")
def reinforce_pp_advantages(rewards, mask, values, config: AdvantageConfig):
    """REINFORCE++ (Hu 2025): per-token discounted returns G_t, whitened over all of the batch's tokens.

    The baseline is the global mean and the scale the global std (floored: rsqrt(var + std_eps^2)), so
    no critic and no groups are needed; the per-token KL penalty in `rewards` makes G_t token-level. This
    returns G_t twice: `compute_advantages` whitens the first over the batch (every rank's, when distributed).
    """
    m = _bool(mask)
    r = torch.where(m, rewards.float(), torch.zeros((), device=rewards.device))  # (B, T)
    returns = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])  # (B,)
    for t in reversed(range(r.shape[1])):  # masked positions carry the running return unchanged
        running = torch.where(m[:, t], r[:, t] + config.gamma * running, running)
        returns[:, t] = torch.where(m[:, t], running, 0.0)
    return returns, returns
