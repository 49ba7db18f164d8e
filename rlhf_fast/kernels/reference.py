"""Pure-PyTorch references of every kernel in `rlhf_fast.kernels`.

These are the semantics the Triton kernels are held to (tests, benchmarks) and the CPU fallback
(`backend="torch"`). They favour clarity and numerical safety over speed: masks are applied with
`torch.where` (select, never multiply) so garbage, inf or NaN in masked positions cannot leak into
results or gradients. Inputs are assumed already validated by the dispatch in `__init__.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# LoRA linear


def lora_linear(x, weight, bias, lora_a, lora_b, scale: float):
    """x @ weight.T + bias + scale * (x @ lora_a.T) @ lora_b.T, as PEFT computes it."""
    out = F.linear(x, weight, bias)
    if scale != 0.0:
        out = out + scale * F.linear(F.linear(x, lora_a), lora_b)
    return out


# ----------------------------------------------------------------------------------------------
# Masked attention


def attention_visibility(tq: int, tk: int, key_padding_mask, causal: bool, device) -> torch.Tensor | None:
    """Boolean (B or 1, 1, Tq, Tk) mask of the keys each query may see, or None when all are visible.

    Causal is aligned bottom-right: query i of Tq sees keys <= i + Tk - Tq, so the same rule serves
    prefill (Tq == Tk) and decode over a cache (Tq < Tk).
    """
    visible = None
    if causal:
        qi = torch.arange(tq, device=device).unsqueeze(1)
        kj = torch.arange(tk, device=device).unsqueeze(0)
        visible = (kj <= qi + (tk - tq)).view(1, 1, tq, tk)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(key_padding_mask.shape[0], 1, 1, tk)
        visible = kpm if visible is None else (visible & kpm)
    return visible


def masked_attention(q, k, v, key_padding_mask=None, causal: bool = True, sm_scale: float | None = None):
    """softmax(q k^T * sm_scale + mask) v, computed in fp32; rows with no visible key are zero.

    q (B, H, Tq, D), k/v (B, H, Tk, D), key_padding_mask (B, Tk) bool (True = real token).
    """
    tq, tk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = sm_scale if sm_scale is not None else d**-0.5
    qf, kf, vf = q.float(), k.float(), v.float()
    scores = torch.matmul(qf, kf.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    visible = attention_visibility(tq, tk, key_padding_mask, causal, q.device)
    if visible is None:
        return torch.matmul(torch.softmax(scores, dim=-1), vf).to(q.dtype)
    # masked_fill blocks the gradient into masked scores, so NaN from an all-masked row's softmax
    # (exp(-inf - -inf)) never reaches q or k; the where() below zeroes such rows in the forward.
    scores = scores.masked_fill(~visible, float("-inf"))
    has_key = visible.any(dim=-1, keepdim=True)  # (B|1, 1, Tq, 1)
    probs = torch.where(has_key, torch.softmax(scores, dim=-1), 0.0)
    return torch.matmul(probs, vf).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# GAE


@torch.no_grad()
def gae(rewards, values, mask, gamma: float, lam: float):
    """Masked reverse-scan GAE (DESIGN.md): returns (advantages, returns), both (B, T) fp32."""
    rewards, values, m = rewards.float(), values.float(), mask.bool()
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float32, device=rewards.device)
    running = torch.zeros(B, dtype=torch.float32, device=rewards.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(T)):
        mt = m[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * running
        running = torch.where(mt, a, running)
        next_value = torch.where(mt, values[:, t], next_value)
        adv[:, t] = torch.where(mt, a, 0.0)
    returns = torch.where(m, adv + values, 0.0)
    return adv, returns


# ----------------------------------------------------------------------------------------------
# PPO loss


class PPOLossOutput(NamedTuple):
    loss: torch.Tensor  # () policy_loss + vf_coef * value_loss + kl_coef * kl
    policy_loss: torch.Tensor  # () clipped surrogate, token mean
    value_loss: torch.Tensor  # () clipped value loss, token mean
    kl: torch.Tensor  # () k3(logprobs, ref_logprobs) token mean; 0 without ref_logprobs
    clip_frac: torch.Tensor  # () fraction of tokens with |ratio - 1| > clip_eps (no grad)
    approx_kl: torch.Tensor  # () token mean of 0.5 * (logprobs - old_logprobs)^2 (no grad)


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
) -> PPOLossOutput:
    """Clipped PPO policy + value loss (DESIGN.md), token mean over mask == 1; all inputs (B, T)."""
    m = mask.bool()
    n = m.sum().clamp(min=1).float()
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)

    def masked_mean(x):
        return torch.where(m, x, zero).sum() / n

    lp = torch.where(m, logprobs.float(), zero)
    log_ratio = (lp - torch.where(m, old_logprobs.float(), zero)).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    adv = torch.where(m, advantages.float(), zero)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps))
    policy_loss = masked_mean(pg)

    v = torch.where(m, values.float(), zero)
    old_v = torch.where(m, old_values.float(), zero)
    ret = torch.where(m, returns.float(), zero)
    v_clipped = old_v + (v - old_v).clamp(-value_clip_eps, value_clip_eps)
    value_loss = 0.5 * masked_mean(torch.maximum((v - ret) ** 2, (v_clipped - ret) ** 2))

    if ref_logprobs is not None:
        d = torch.where(m, ref_logprobs.float(), zero) - lp
        kl = masked_mean(torch.exp(d) - d - 1.0)
    else:
        kl = zero
    loss = policy_loss + vf_coef * value_loss + kl_coef * kl

    with torch.no_grad():
        clip_frac = masked_mean(((ratio - 1.0).abs() > clip_eps).float())
        approx_kl = masked_mean(0.5 * log_ratio**2)
    return PPOLossOutput(loss, policy_loss, value_loss, kl, clip_frac, approx_kl)
