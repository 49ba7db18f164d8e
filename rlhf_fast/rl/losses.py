"""Training losses as free functions returning `(loss, metrics)`; all token means over mask != 0.

`metrics` holds detached scalar tensors (no host sync here; the trainer decides when to log).
Policy-loss variants sit in a registry (`POLICY_LOSSES`) so a trainer picks one by name.
`ppo_loss` is the fused path: policy + value (+ k3 KL) in one call of `kernels.ppo_loss`.

`weighted_policy_loss` takes per-token weights from `loss_weights`, computed once over a whole
minibatch, so loss = sum_t w_t * loss_t and summing it over micro-batch slices gives exactly the
minibatch loss (and gradients), whatever the slices' token counts. The aggregations:
  token_mean  w = 1 / N               N tokens in the minibatch (DAPO, Yu et al. 2025)
  seq_mean    w = 1 / (B * len_b)     mean of per-sequence token means (GRPO, Shao et al. 2024)
  seq_sum     w = 1 / (B * max_new)   constant normaliser, no length bias (Dr. GRPO, Liu et al. 2025)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rlhf_fast import kernels

from .masked import masked_mean

LOSS_AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum")
LOG_RATIO_CLAMP = 20.0  # as in kernels.reference: exp() of the log-ratio stays finite
PolicyLoss = Callable[..., tuple[torch.Tensor, dict]]
POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str):
    def register(fn: PolicyLoss) -> PolicyLoss:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name] = fn
        return fn

    return register


def policy_loss_fn(name: str) -> PolicyLoss:
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; choose one of {sorted(POLICY_LOSSES)}") from None


def _ratio_terms(logprobs, old_logprobs, mask):
    m = mask if mask.dtype == torch.bool else mask != 0
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)
    log_ratio = torch.where(m, logprobs.float() - old_logprobs.float(), zero).clamp(
        -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP
    )
    return m, log_ratio, torch.exp(log_ratio)


def _ratio_metrics(ratio, log_ratio, m, clip_eps) -> dict:
    with torch.no_grad():
        return {
            "clip_frac": masked_mean(((ratio - 1.0).abs() > clip_eps).float(), m),
            "approx_kl": masked_mean(0.5 * log_ratio**2, m),
        }


@register_policy_loss("clip")
def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float = 0.2):
    """PPO clipped surrogate (Schulman et al. 2017): mean(max(-A * r, -A * clamp(r, 1 - eps, 1 + eps)))."""
    m, log_ratio, ratio = _ratio_terms(logprobs, old_logprobs, mask)
    adv = torch.where(m, advantages.float(), torch.zeros((), device=ratio.device))
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps))
    return masked_mean(pg, m), _ratio_metrics(ratio, log_ratio, m, clip_eps)


@register_policy_loss("dual_clip")
def dual_clip_policy_loss(
    logprobs, old_logprobs, advantages, mask, clip_eps: float = 0.2, dual_clip: float = 3.0
):
    """Dual-clip PPO (Ye et al. 2020): for A < 0 the surrogate is also capped at -dual_clip * A, so a
    huge ratio on a bad action cannot dominate the batch."""
    if dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    m, log_ratio, ratio = _ratio_terms(logprobs, old_logprobs, mask)
    adv = torch.where(m, advantages.float(), torch.zeros((), device=ratio.device))
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps))
    pg = torch.where(adv < 0, torch.minimum(pg, -dual_clip * adv), pg)
    return masked_mean(pg, m), _ratio_metrics(ratio, log_ratio, m, clip_eps)


def loss_weights(mask: torch.Tensor, aggregation: str, *, max_new_tokens: int | None = None) -> torch.Tensor:
    """(B, T) fp32 per-token weights over a whole minibatch, 0 where mask == 0 (see the module docstring).

    seq_mean counts only rows with at least one token in B; seq_sum divides by all B rows.
    """
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; choose one of {list(LOSS_AGGREGATIONS)}")
    if mask.dim() != 2:
        raise ValueError(f"loss_weights: mask must be (B, T), got {tuple(mask.shape)}")
    m = mask if mask.dtype == torch.bool else mask != 0
    zero = torch.zeros((), dtype=torch.float32, device=m.device)
    lengths = m.sum(dim=1, keepdim=True).float()  # (B, 1)
    if aggregation == "token_mean":
        w = 1.0 / lengths.sum().clamp(min=1.0)
    elif aggregation == "seq_mean":
        rows = (lengths > 0).sum().clamp(min=1).float()
        w = 1.0 / (rows * lengths.clamp(min=1.0))
    else:
        if max_new_tokens is None or max_new_tokens < 1:
            raise ValueError(f"seq_sum aggregation needs max_new_tokens >= 1, got {max_new_tokens}")
        w = torch.full((), 1.0 / (m.shape[0] * max_new_tokens), device=m.device)
    return torch.where(m, w, zero)


def weighted_policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    weights,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    ref_logprobs=None,
    kl_coef: float = 0.0,
):
    """PPO clipped surrogate with asymmetric clipping, plus kl_coef * k3 KL to the reference.

    pg_t = max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high)) (DAPO clip-higher: e.g. 0.2 / 0.28);
    loss = sum_t w_t pg_t + kl_coef * sum_t w_t k3_t, weights from `loss_weights`. All inputs (B, T).
    """
    clip_high = clip_low if clip_high is None else clip_high
    if not (0.0 < clip_low < 1.0 and clip_high > 0.0 and kl_coef >= 0.0):
        raise ValueError(
            f"weighted_policy_loss needs 0 < clip_low < 1, clip_high > 0, kl_coef >= 0; got "
            f"{clip_low}, {clip_high}, {kl_coef}"
        )
    shapes = [t.shape for t in (logprobs, old_logprobs, advantages, mask, weights)]
    if ref_logprobs is not None:
        shapes.append(ref_logprobs.shape)
    if logprobs.dim() != 2 or any(s != logprobs.shape for s in shapes):
        raise ValueError(f"weighted_policy_loss: inputs must share a (B, T) shape, got {[tuple(s) for s in shapes]}")
    m, log_ratio, ratio = _ratio_terms(logprobs, old_logprobs, mask)
    zero = torch.zeros((), dtype=torch.float32, device=ratio.device)
    adv = torch.where(m, advantages.float(), zero)
    w = torch.where(m, weights.float(), zero)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    policy_loss = torch.where(m, w * pg, zero).sum()
    if ref_logprobs is not None:
        d = torch.where(m, ref_logprobs.float() - logprobs.float(), zero)
        kl = torch.where(m, w * (torch.exp(d) - d - 1.0), zero).sum()
    else:
        kl = zero
    with torch.no_grad():
        metrics = {
            "policy_loss": policy_loss.detach(),
            "kl": kl.detach(),
            "clip_frac": masked_mean(((ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)).float(), m),
            "approx_kl": masked_mean(0.5 * log_ratio**2, m),
        }
    return policy_loss + kl_coef * kl, metrics


def value_loss(values, old_values, returns, mask, clip_eps: float | None = 0.2):
    """0.5 * mean(max((v - R)^2, (old_v + clamp(v - old_v, -eps, eps) - R)^2)); unclipped if eps is None."""
    m = mask if mask.dtype == torch.bool else mask != 0
    zero = torch.zeros((), dtype=torch.float32, device=values.device)
    v, ret = torch.where(m, values.float(), zero), torch.where(m, returns.float(), zero)
    err = (v - ret) ** 2
    if clip_eps is None:
        loss = 0.5 * masked_mean(err, m)
        clip_frac = torch.zeros((), device=values.device)
    else:
        old_v = torch.where(m, old_values.float(), zero)
        v_clipped = old_v + (v - old_v).clamp(-clip_eps, clip_eps)
        err_clipped = (v_clipped - ret) ** 2
        loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), m)
        with torch.no_grad():
            clip_frac = masked_mean((err_clipped > err).float(), m)
    return loss, {"value_clip_frac": clip_frac, "value_mean": masked_mean(v.detach(), m)}


def entropy_loss(entropy, mask):
    """Entropy bonus as a loss: -mean(entropy), so minimising it raises the policy's entropy."""
    mean = masked_mean(entropy.float(), mask)
    return -mean, {"entropy": mean.detach()}


def pairwise_ranking_loss(chosen_rewards, rejected_rewards, margin=None):
    """Bradley-Terry reward-model loss: -mean(log sigmoid(r_chosen - r_rejected - margin)); all (B,)."""
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(
            f"chosen and rejected rewards must both be (B,), got {tuple(chosen_rewards.shape)} "
            f"and {tuple(rejected_rewards.shape)}"
        )
    diff = chosen_rewards.float() - rejected_rewards.float()
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    with torch.no_grad():
        metrics = {
            "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "reward_margin": (chosen_rewards.float() - rejected_rewards.float()).mean(),
        }
    return loss, metrics


def ppo_loss(
    logprobs,
    old_logprobs,
    advantages,
    values,
    old_values,
    returns,
    mask,
    *,
    clip_eps: float = 0.2,
    value_clip_eps: float = 0.2,
    vf_coef: float = 0.5,
    ref_logprobs=None,
    kl_coef: float = 0.0,
    backend: str = "auto",
):
    """Fused PPO policy + value (+ k3 KL) loss through `kernels.ppo_loss`; returns (loss, metrics)."""
    out = kernels.ppo_loss(
        logprobs,
        old_logprobs,
        advantages,
        values,
        old_values,
        returns,
        mask,
        clip_eps=clip_eps,
        value_clip_eps=value_clip_eps,
        vf_coef=vf_coef,
        ref_logprobs=ref_logprobs,
        kl_coef=kl_coef,
        backend=backend,
    )
    metrics = {name: getattr(out, name).detach() for name in out._fields if name != "loss"}
    return out.loss, metrics
