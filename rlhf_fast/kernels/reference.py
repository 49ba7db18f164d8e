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


# ----------------------------------------------------------------------------------------------
# lm-head log-probs

# Bytes of (chunk, V) scratch a log-prob pass may hold at once, whatever the token count: two fp32 blocks
# here (logits and probabilities), the one gradient block (inputs' dtype) of the Triton backward
# (kernels/logprobs.py; its forward needs none). `linear_logprobs_chunk` turns it into tokens.
LOGPROB_CHUNK_BYTES = 256 * 2**20


class LinearLogprobsOutput(NamedTuple):
    logprobs: torch.Tensor  # (...) fp32 log p(target); 0 where the target is ignored (< 0)
    entropy: torch.Tensor | None  # (...) fp32 entropy of p; None unless with_entropy (0 where ignored)
    logsumexp: torch.Tensor  # (...) fp32 logsumexp of hidden @ weight.T / temperature (0 where ignored)


def linear_logprobs_chunk(n_tokens: int, vocab: int, element_bytes: int, chunk_bytes: int = LOGPROB_CHUNK_BYTES,
                          multiple: int = 1) -> int:
    """Tokens per chunk so that (chunk, vocab) elements of `element_bytes` fit `chunk_bytes` (at least
    `multiple`, rounded down to a multiple of it, and never more than n_tokens)."""
    chunk = max(multiple, chunk_bytes // max(1, vocab * element_bytes) // multiple * multiple)
    return max(1, min(n_tokens, chunk))


def _logprob_dtype(hidden) -> torch.dtype:
    return torch.promote_types(hidden.dtype, torch.float32)  # fp32 (fp64 for fp64 inputs: exact tests)


def _logits_chunk(h, w, temperature: float):
    z = torch.matmul(h, w.t())  # (n, V) in the compute dtype
    return z if temperature == 1.0 else z.div_(temperature)


class _LinearLogprobs(torch.autograd.Function):
    """Chunked over tokens, in place: at most two (chunk, V) blocks exist at a time, in the forward and
    again (recomputed) in the backward, which needs only the per-token logsumexp and entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk):
        n, cd = hidden.shape[0], _logprob_dtype(hidden)
        w = weight.to(cd)
        valid = targets >= 0
        safe_t = torch.where(valid, targets, 0).unsqueeze(-1)
        lp = hidden.new_zeros(n, dtype=cd)
        ent = torch.zeros_like(lp)
        lse = torch.zeros_like(lp)
        for s in range(0, n, chunk):
            sl = slice(s, s + chunk)
            logp = _logits_chunk(hidden[sl].to(cd), w, temperature)
            lse[sl] = torch.logsumexp(logp, dim=-1)
            logp.sub_(lse[sl].unsqueeze(-1))
            lp[sl] = logp.gather(-1, safe_t[sl]).squeeze(-1)
            if with_entropy:
                ent[sl] = -logp.exp().mul_(logp).sum(-1)
        # Ignored rows give 0 (selected, so NaN/inf in their hidden states cannot leak out).
        lp, ent, lse = (torch.where(valid, t, 0.0) for t in (lp, ent, lse))
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(targets)
        return lp, ent, lse

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_lse):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        if not (need_h or need_w):
            return None, None, None, None, None, None
        with torch.autocast(hidden.device.type, enabled=False):
            return _LinearLogprobs._backward(ctx, hidden, weight, targets, lse, ent, g_lp, g_ent, g_lse, need_h, need_w)

    @staticmethod
    def _backward(ctx, hidden, weight, targets, lse, ent, g_lp, g_ent, g_lse, need_h, need_w):
        n, tau = hidden.shape[0], ctx.temperature
        valid = targets >= 0
        safe_t = torch.where(valid, targets, 0).unsqueeze(-1)
        zeros = lse.new_zeros(n)
        # Zeroed upstream gradients and hidden rows of ignored tokens make their dz exactly 0.
        g_lp, g_ent, g_lse = (torch.where(valid, g.to(lse.dtype), 0.0).unsqueeze(-1) if g is not None
                              else zeros.unsqueeze(-1) for g in (g_lp, g_ent, g_lse))
        w = weight.to(lse.dtype)
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros_like(w) if need_w else None
        for s in range(0, n, ctx.chunk):
            sl = slice(s, s + ctx.chunk)
            h = torch.where(valid[sl].unsqueeze(-1), hidden[sl].to(w.dtype), 0.0)
            logp = _logits_chunk(h, w, tau).sub_(lse[sl].unsqueeze(-1))
            dz = logp.exp()  # p
            # d lp/dz = onehot - p; d lse/dz = p; d entropy/dz = -p (log p + entropy)
            ent_term = logp.add_(ent[sl].unsqueeze(-1)).mul_(dz).mul_(g_ent[sl])  # reuses logp's block
            dz.mul_(g_lse[sl] - g_lp[sl]).sub_(ent_term)
            del logp, ent_term
            dz.scatter_add_(-1, safe_t[sl], g_lp[sl])
            if tau != 1.0:
                dz.div_(tau)
            if need_h:
                dh[sl] = (dz @ w).to(hidden.dtype)
            if need_w:
                dw.addmm_(dz.t(), h)
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None, None


def linear_logprobs(hidden, weight, targets, temperature: float = 1.0, with_entropy: bool = False,
                    chunk_tokens: int | None = None) -> LinearLogprobsOutput:
    """log softmax(hidden @ weight.T / temperature)[target] per token, fp32, chunked over tokens.

    hidden (..., C) with targets (...) integer (negative = ignored: 0 out, no gradient); weight (V, C).
    Entropy and logsumexp are of the same distribution; all three are differentiable. Computed in fp32
    (fp64 for fp64 inputs).
    """
    lead = targets.shape
    h2, t1 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    chunk = chunk_tokens or linear_logprobs_chunk(h2.shape[0], weight.shape[0], 2 * _logprob_dtype(hidden).itemsize)
    # Autocast off inside: the matmuls must run in fp32 on the (already autocast-dtype) inputs, as the
    # kernel's fp32 accumulation does; autocast would round the logits to bf16 first.
    with torch.autocast(hidden.device.type, enabled=False):
        lp, ent, lse = _LinearLogprobs.apply(h2, weight, t1, float(temperature), bool(with_entropy), max(1, chunk))
    return LinearLogprobsOutput(lp.view(lead), ent.view(lead) if with_entropy else None, lse.view(lead))
