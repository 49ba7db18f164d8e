"""Fused Triton kernels for the RL maths of a PPO step: masked GAE and the clipped PPO loss.

Semantics are those of `reference.gae` / `reference.ppo_loss` (DESIGN.md contracts); callers go
through `rlhf_fast.kernels.gae` / `ppo_loss`, which validate the inputs first.

gae: one program per row, one launch for the batch. The masked recursion
    if mask[t]: a = r[t] + gamma * v_next - v[t] + gamma * lam * a;  v_next = v[t]
is an affine map on the state (a, v_next), and a masked step is the identity map. Composing affine
maps is associative, so each tile of BLOCK_T time steps is one `tl.associative_scan` (loaded in
reverse time order so that a forward scan runs the recursion backwards), and the state leaving a
tile is carried into the next one. The state is two scalars, so the tile never leaves registers.

ppo_loss: one pass over the B*T tokens computes every per-token term; each program writes its six
masked partial sums to a (programs, 8) buffer and a one-program kernel reduces them in a fixed order
into the output statistics. No float atomics, so the result is bitwise reproducible run to run. The
backward pass recomputes the per-token terms (cheaper than storing three B*T tensors in the forward,
and stateless) and reads the upstream gradients and the token count from device memory, so neither
pass synchronises with the host.

Float scalars (gamma, clip_eps, ...) are cast to fp32 inside the kernels: inductor may pass Python floats
as fp64, which would turn the loop-carried GAE state (and the loss maths) into fp64.

Masks are applied by select (masked loads return 0 and every sum goes through tl.where), never by
multiplication, so NaN/inf in masked positions cannot reach results or gradients.

Both are registered with `torch.library.triton_op` (`launch.register_op`), so `torch.compile` keeps them in its
graph; eager calls skip the dispatcher's custom-op layer (`launch.Op`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .reference import PPOLossOutput

# Layout of the statistics vector produced by the loss kernel (and of its gradient).
STAT_LOSS, STAT_POLICY, STAT_VALUE, STAT_KL, STAT_CLIP_FRAC, STAT_APPROX_KL, STAT_COUNT = range(7)
NUM_STATS = 8  # 7 used, padded to a power of two so the reduction kernel can load rows as one tile


# ----------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _gae_combine(p1, q1, s1, u1, w1, p2, q2, s2, u2, w2):
    # Each element is the affine map  a' = p*a + q*vn + s,  vn' = u*vn + w  on the state (a, vn).
    # Result: apply map 1 (the later time step) first, then map 2.
    return p2 * p1, p2 * q1 + q2 * u1, p2 * s1 + q2 * w1 + s2, u2 * u1, u2 * w1 + w2


@triton.jit
def _gae_fwd_kernel(
    rewards_ptr,  # (B, T) any float dtype, strided
    values_ptr,  # (B, T) any float dtype, strided
    mask_ptr,  # (B, T) nonzero = real token (bool passed as uint8), strided
    adv_ptr,  # (B, T) fp32 out, contiguous
    ret_ptr,  # (B, T) fp32 out, contiguous
    T,
    stride_rb,
    stride_rt,
    stride_vb,
    stride_vt,
    stride_mb,
    stride_mt,
    gamma,
    gamma_lam,
    BLOCK_T: tl.constexpr,
):
    gamma = tl.cast(gamma, tl.float32)  # tl.cast, not .to(): under the interpreter these are Python floats
    gamma_lam = tl.cast(gamma_lam, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_T)
    a_in = tl.full((), 0.0, tl.float32)  # advantage carried in from later tiles (none: no bootstrap)
    vn_in = tl.full((), 0.0, tl.float32)  # value of the next real token after this tile
    for start in range(0, T, BLOCK_T):
        t = T - 1 - start - j  # reverse time order: element 0 is the latest step of the tile
        inb = t >= 0
        m = tl.load(mask_ptr + row * stride_mb + t * stride_mt, mask=inb, other=0) != 0
        # Masked loads: garbage in masked positions is never read.
        r = tl.load(rewards_ptr + row * stride_rb + t * stride_rt, mask=m, other=0.0).to(tl.float32)
        v = tl.load(values_ptr + row * stride_vb + t * stride_vt, mask=m, other=0.0).to(tl.float32)
        p = tl.where(m, gamma_lam, 1.0)
        q = tl.where(m, gamma, 0.0)
        s = tl.where(m, r - v, 0.0)
        u = tl.where(m, 0.0, 1.0)
        w = tl.where(m, v, 0.0)
        P, Q, S, U, W = tl.associative_scan((p, q, s, u, w), 0, _gae_combine)
        a = P * a_in + Q * vn_in + S
        vn = U * vn_in + W
        out = row * T + t
        tl.store(adv_ptr + out, tl.where(m, a, 0.0), mask=inb)
        tl.store(ret_ptr + out, tl.where(m, a + v, 0.0), mask=inb)
        # Out-of-range elements are identity maps, so the last element holds the state leaving the tile.
        last = j == BLOCK_T - 1
        a_in = tl.sum(tl.where(last, a, 0.0), axis=0)
        vn_in = tl.sum(tl.where(last, vn, 0.0), axis=0)


@triton.jit
def _ppo_token_terms(
    lp, old_lp, adv, v, old_v, ret, ref, clip_eps, clip_lo, clip_hi, value_clip, HAS_REF: tl.constexpr
):
    """Per-token forward terms and their local derivatives, all fp32, mirroring the reference's ops
    (same clamps, same max()) so that ties resolve the way autograd resolves them."""
    clip_eps = tl.cast(clip_eps, tl.float32)
    clip_lo = tl.cast(clip_lo, tl.float32)
    clip_hi = tl.cast(clip_hi, tl.float32)
    value_clip = tl.cast(value_clip, tl.float32)
    # log-ratio clamped to [-20, 20] before exp(), as in the reference: ratio stays finite. A literal, not a
    # module global, so that inductor's copy of the kernel source needs nothing from this module.
    lr_raw = lp - old_lp
    lr = tl.minimum(tl.maximum(lr_raw, -20.0), 20.0)
    ratio = tl.exp(lr)
    ratio_c = tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
    x1 = -adv * ratio
    x2 = -adv * ratio_c
    pg = tl.maximum(x1, x2)
    # torch.maximum's backward splits the gradient evenly on a tie; clamp passes it on its closed range.
    w1 = tl.where(x1 > x2, 1.0, tl.where(x1 == x2, 0.5, 0.0))
    w2 = tl.where((ratio >= clip_lo) & (ratio <= clip_hi), 1.0 - w1, 0.0)
    lr_pass = (lr_raw >= -20.0) & (lr_raw <= 20.0)
    dpg_dlp = tl.where(lr_pass, -adv * (w1 + w2) * ratio, 0.0)

    dv = v - old_v
    v_clipped = old_v + tl.minimum(tl.maximum(dv, -value_clip), value_clip)
    e1 = v - ret
    e2 = v_clipped - ret
    sq1 = e1 * e1
    sq2 = e2 * e2
    vsq = tl.maximum(sq1, sq2)
    u1 = tl.where(sq1 > sq2, 1.0, tl.where(sq1 == sq2, 0.5, 0.0))
    u2 = tl.where((dv >= -value_clip) & (dv <= value_clip), 1.0 - u1, 0.0)
    dvsq_dv = 2.0 * (u1 * e1 + u2 * e2)

    if HAS_REF:
        d = ref - lp
        ed = tl.exp(d)
        kl = ed - d - 1.0
        dkl_dlp = 1.0 - ed
    else:
        kl = tl.zeros_like(lp)
        dkl_dlp = tl.zeros_like(lp)
    clipped = tl.where(tl.abs(ratio - 1.0) > clip_eps, 1.0, 0.0)
    approx_kl = 0.5 * lr * lr
    return pg, vsq, kl, clipped, approx_kl, dpg_dlp, dvsq_dv, dkl_dlp


@triton.jit
def _ppo_loss_fwd_kernel(
    lp_ptr,  # (N,) logprobs, N = B*T, contiguous
    old_lp_ptr,  # (N,)
    adv_ptr,  # (N,)
    v_ptr,  # (N,) values
    old_v_ptr,  # (N,)
    ret_ptr,  # (N,) returns
    mask_ptr,  # (N,) nonzero = real token
    ref_ptr,  # (N,) ref_logprobs (unused unless HAS_REF)
    partial_ptr,  # (programs, NUM_STATS) fp32 out: masked partial sums of this program's tokens
    N,
    clip_eps,
    clip_lo,
    clip_hi,
    value_clip,
    HAS_REF: tl.constexpr,
    NUM_STATS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = tl.load(mask_ptr + offs, mask=offs < N, other=0) != 0
    lp = tl.load(lp_ptr + offs, mask=m, other=0.0).to(tl.float32)
    old_lp = tl.load(old_lp_ptr + offs, mask=m, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=m, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
    old_v = tl.load(old_v_ptr + offs, mask=m, other=0.0).to(tl.float32)
    ret = tl.load(ret_ptr + offs, mask=m, other=0.0).to(tl.float32)
    ref = lp
    if HAS_REF:
        ref = tl.load(ref_ptr + offs, mask=m, other=0.0).to(tl.float32)
    pg, vsq, kl, clipped, approx_kl, _, _, _ = _ppo_token_terms(
        lp, old_lp, adv, v, old_v, ret, ref, clip_eps, clip_lo, clip_hi, value_clip, HAS_REF
    )
    out = partial_ptr + pid * NUM_STATS
    tl.store(out + 0, tl.sum(tl.where(m, pg, 0.0), axis=0))
    tl.store(out + 1, tl.sum(tl.where(m, vsq, 0.0), axis=0))
    tl.store(out + 2, tl.sum(tl.where(m, kl, 0.0), axis=0))
    tl.store(out + 3, tl.sum(tl.where(m, clipped, 0.0), axis=0))
    tl.store(out + 4, tl.sum(tl.where(m, approx_kl, 0.0), axis=0))
    # Token count in fp32: exact up to 2**24 tokens per batch, far above any PPO batch here.
    tl.store(out + 5, tl.sum(tl.where(m, 1.0, 0.0), axis=0))


@triton.jit
def _ppo_loss_reduce_kernel(
    partial_ptr,  # (P, NUM_STATS) fp32 partial sums
    stats_ptr,  # (NUM_STATS,) fp32 out: see the STAT_* layout
    P,
    vf_coef,
    kl_coef,
    NUM_STATS: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    vf_coef = tl.cast(vf_coef, tl.float32)
    kl_coef = tl.cast(kl_coef, tl.float32)
    rows = tl.arange(0, BLOCK_P)
    cols = tl.arange(0, NUM_STATS)
    acc = tl.zeros((BLOCK_P, NUM_STATS), dtype=tl.float32)
    for start in range(0, P, BLOCK_P):  # fixed order: deterministic
        r = start + rows
        acc += tl.load(partial_ptr + r[:, None] * NUM_STATS + cols[None, :], mask=(r < P)[:, None], other=0.0)
    sums = tl.sum(acc, axis=0)  # (NUM_STATS,)
    pg = tl.sum(tl.where(cols == 0, sums, 0.0), axis=0)
    vsq = tl.sum(tl.where(cols == 1, sums, 0.0), axis=0)
    kl = tl.sum(tl.where(cols == 2, sums, 0.0), axis=0)
    clipped = tl.sum(tl.where(cols == 3, sums, 0.0), axis=0)
    approx_kl = tl.sum(tl.where(cols == 4, sums, 0.0), axis=0)
    n = tl.maximum(tl.sum(tl.where(cols == 5, sums, 0.0), axis=0), 1.0)
    policy_loss = pg / n
    value_loss = 0.5 * (vsq / n)
    kl_mean = kl / n
    tl.store(stats_ptr + 0, policy_loss + vf_coef * value_loss + kl_coef * kl_mean)
    tl.store(stats_ptr + 1, policy_loss)
    tl.store(stats_ptr + 2, value_loss)
    tl.store(stats_ptr + 3, kl_mean)
    tl.store(stats_ptr + 4, clipped / n)
    tl.store(stats_ptr + 5, approx_kl / n)
    tl.store(stats_ptr + 6, n)
    tl.store(stats_ptr + 7, 0.0)


@triton.jit
def _ppo_loss_bwd_kernel(
    grad_stats_ptr,  # (NUM_STATS,) fp32 upstream gradient of the statistics vector
    stats_ptr,  # (NUM_STATS,) fp32 forward statistics (token count at STAT_COUNT)
    lp_ptr,  # (N,) logprobs
    old_lp_ptr,  # (N,)
    adv_ptr,  # (N,)
    v_ptr,  # (N,) values
    old_v_ptr,  # (N,)
    ret_ptr,  # (N,)
    mask_ptr,  # (N,)
    ref_ptr,  # (N,) (unused unless HAS_REF)
    dlp_ptr,  # (N,) out, logprobs dtype
    dv_ptr,  # (N,) out, values dtype
    N,
    clip_eps,
    clip_lo,
    clip_hi,
    value_clip,
    vf_coef,
    kl_coef,
    HAS_REF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    vf_coef = tl.cast(vf_coef, tl.float32)
    kl_coef = tl.cast(kl_coef, tl.float32)
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    # loss = policy + vf_coef * value + kl_coef * kl, and each of the four is also an output.
    g_loss = tl.load(grad_stats_ptr + 0)
    n = tl.load(stats_ptr + 6)
    c_pg = (g_loss + tl.load(grad_stats_ptr + 1)) / n
    c_v = (vf_coef * g_loss + tl.load(grad_stats_ptr + 2)) * 0.5 / n
    c_kl = (kl_coef * g_loss + tl.load(grad_stats_ptr + 3)) / n

    m = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
    lp = tl.load(lp_ptr + offs, mask=m, other=0.0).to(tl.float32)
    old_lp = tl.load(old_lp_ptr + offs, mask=m, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=m, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
    old_v = tl.load(old_v_ptr + offs, mask=m, other=0.0).to(tl.float32)
    ret = tl.load(ret_ptr + offs, mask=m, other=0.0).to(tl.float32)
    ref = lp
    if HAS_REF:
        ref = tl.load(ref_ptr + offs, mask=m, other=0.0).to(tl.float32)
    _, _, _, _, _, dpg_dlp, dvsq_dv, dkl_dlp = _ppo_token_terms(
        lp, old_lp, adv, v, old_v, ret, ref, clip_eps, clip_lo, clip_hi, value_clip, HAS_REF
    )
    dlp = tl.where(m, c_pg * dpg_dlp + c_kl * dkl_dlp, 0.0)
    dv = tl.where(m, c_v * dvsq_dv, 0.0)
    tl.store(dlp_ptr + offs, dlp.to(dlp_ptr.dtype.element_ty), mask=inb)
    tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------------------------
# Host launchers (shapes already validated by rlhf_fast.kernels; these fix layouts and grids)

_PPO_BLOCK = 1024  # tokens per program: 6-8 fp32 loads per token keep 4 warps busy without spilling
_REDUCE_BLOCK = 256
_GAE_MAX_BLOCK_T = 1024  # one tile of 5 scan operands x 1024 fp32 stays in registers at 4 warps


def _mask_arg(mask: torch.Tensor) -> torch.Tensor:
    # Triton pointers to torch.bool are awkward across versions; a uint8 view is free and exact.
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _flat(t: torch.Tensor) -> torch.Tensor:
    # The kernels index (B, T) inputs flat: a contiguous tensor is its own flat view, so no view op.
    return t.contiguous()


def _ppo_hparams(clip_eps: float, value_clip_eps: float):
    # Computed in float64 on the host and rounded once to fp32 by the launch, as torch.clamp does.
    return 1.0 - clip_eps, 1.0 + clip_eps, value_clip_eps


@launch.register_op("rlhf_fast::gae")
def _gae_op(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, block_t: int
) -> tuple[torch.Tensor, torch.Tensor]:
    launch.require_launchable(rewards.device, "gae")
    B, T = rewards.shape
    adv = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    ret = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    if B == 0 or T == 0:
        return adv, ret
    if block_t <= 0:
        block_t = min(_GAE_MAX_BLOCK_T, max(16, launch.next_pow2(T)))
    m = _mask_arg(mask)
    launch.wrap(_gae_fwd_kernel)[(B,)](
        rewards, values, m, adv, ret, T,
        rewards.stride(0), rewards.stride(1), values.stride(0), values.stride(1), m.stride(0), m.stride(1),
        gamma, gamma * lam,
        BLOCK_T=block_t, num_warps=4 if block_t >= 256 else 1,
    )  # fmt: skip
    return adv, ret


@launch.register_op("rlhf_fast::ppo_loss_fwd")
def _ppo_loss_fwd_op(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    clip_eps: float,
    value_clip_eps: float,
    vf_coef: float,
    kl_coef: float,
) -> torch.Tensor:
    launch.require_launchable(logprobs.device, "ppo_loss")
    N = logprobs.numel()
    programs = max(1, launch.cdiv(N, _PPO_BLOCK))
    partial = torch.empty((programs, NUM_STATS), dtype=torch.float32, device=logprobs.device)
    stats = torch.empty((NUM_STATS,), dtype=torch.float32, device=logprobs.device)
    has_ref = ref_logprobs is not None
    lp = _flat(logprobs)
    clip_lo, clip_hi, value_clip = _ppo_hparams(clip_eps, value_clip_eps)
    launch.wrap(_ppo_loss_fwd_kernel)[(programs,)](
        lp, _flat(old_logprobs), _flat(advantages), _flat(values), _flat(old_values), _flat(returns),
        _flat(_mask_arg(mask)), _flat(ref_logprobs) if has_ref else lp, partial,
        N, clip_eps, clip_lo, clip_hi, value_clip,
        HAS_REF=has_ref, NUM_STATS=NUM_STATS, BLOCK=_PPO_BLOCK, num_warps=4,
    )  # fmt: skip
    launch.wrap(_ppo_loss_reduce_kernel)[(1,)](
        partial, stats, programs, vf_coef, kl_coef, NUM_STATS=NUM_STATS, BLOCK_P=_REDUCE_BLOCK, num_warps=4
    )
    return stats


@launch.register_op("rlhf_fast::ppo_loss_bwd")
def _ppo_loss_bwd_op(
    grad_stats: torch.Tensor,
    stats: torch.Tensor,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    clip_eps: float,
    value_clip_eps: float,
    vf_coef: float,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    launch.require_launchable(logprobs.device, "ppo_loss")
    N = logprobs.numel()
    dlp = torch.empty(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)
    dv = torch.empty(values.shape, dtype=values.dtype, device=values.device)
    has_ref = ref_logprobs is not None
    lp = _flat(logprobs)
    clip_lo, clip_hi, value_clip = _ppo_hparams(clip_eps, value_clip_eps)
    launch.wrap(_ppo_loss_bwd_kernel)[(max(1, launch.cdiv(N, _PPO_BLOCK)),)](
        grad_stats.float().contiguous(), stats,
        lp, _flat(old_logprobs), _flat(advantages), _flat(values), _flat(old_values), _flat(returns),
        _flat(_mask_arg(mask)), _flat(ref_logprobs) if has_ref else lp, dlp, dv,
        N, clip_eps, clip_lo, clip_hi, value_clip, vf_coef, kl_coef,
        HAS_REF=has_ref, BLOCK=_PPO_BLOCK, num_warps=4,
    )  # fmt: skip
    return dlp, dv


# ----------------------------------------------------------------------------------------------
# Autograd registration and the functions rlhf_fast.kernels dispatches to


def _ppo_loss_setup_context(ctx, inputs, output):
    *tensors, ref_logprobs, clip_eps, value_clip_eps, vf_coef, kl_coef = inputs
    ctx.save_for_backward(*tensors, ref_logprobs, output)
    ctx.hparams = (clip_eps, value_clip_eps, vf_coef, kl_coef)


def _ppo_loss_backward(ctx, grad_stats):
    *tensors, ref_logprobs, stats = ctx.saved_tensors
    dlp, dv = _ppo_loss_bwd_op(grad_stats, stats, *tensors, ref_logprobs, *ctx.hparams)
    # Gradients flow to logprobs and values only (DESIGN.md); the rest are rollout constants.
    return dlp, None, None, dv, None, None, None, None, None, None, None, None


_ppo_loss_fwd_op.register_autograd(_ppo_loss_backward, setup_context=_ppo_loss_setup_context)


def gae(rewards, values, mask, gamma: float, lam: float, *, block_t: int = 0):
    """Masked GAE in one launch: (advantages, returns), both (B, T) fp32, no gradient.

    `block_t` (a power of two >= 16) overrides the time tile; 0 picks min(1024, next_pow2(T)).
    """
    if block_t and (block_t < 16 or block_t & (block_t - 1)):
        raise ValueError(f"gae: block_t must be a power of two >= 16, got {block_t}")
    with torch.no_grad():
        return _gae_op(rewards.detach(), values.detach(), mask, float(gamma), float(lam), int(block_t))


def ppo_loss(
    logprobs, old_logprobs, advantages, values, old_values, returns, mask, *,
    clip_eps: float, value_clip_eps: float, vf_coef: float, ref_logprobs, kl_coef: float,
) -> PPOLossOutput:  # fmt: skip
    """Fused clipped PPO policy + value (+ k3 KL) loss; gradients to logprobs and values."""
    stats = _ppo_loss_fwd_op(
        logprobs, old_logprobs, advantages, values, old_values, returns, mask, ref_logprobs,
        float(clip_eps), float(value_clip_eps), float(vf_coef), float(kl_coef),
    )  # fmt: skip
    loss, policy_loss, value_loss, kl, clip_frac, approx_kl = stats[:STAT_COUNT].unbind(0)
    return PPOLossOutput(loss, policy_loss, value_loss, kl, clip_frac.detach(), approx_kl.detach())
