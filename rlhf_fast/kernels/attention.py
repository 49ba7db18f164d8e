"""Masked (bottom-right causal + key padding) flash attention in Triton, with a split-KV decode path.

Semantics: `reference.masked_attention`. Design:
- forward: online softmax in base 2 with fp32 accumulation; saves the per-row log2-sum-exp (LSE) so
  the backward recomputes probabilities instead of storing them. A row that sees no key gets LSE=+inf,
  which makes every recomputed probability exp2(s - inf) = 0: its output is 0 and it passes no gradient.
- key padding: each batch row's real keys lie in [kv_lo, kv_hi) (first real key, last real key + 1),
  which every program finds by scanning its row of the mask (no host sync, no extra launch). Key
  blocks outside that range are never loaded, so left padding (prompts) and unwritten KV-cache slots
  (decode) cost nothing; inside the range the mask itself is applied, so any mask stays exact.
- decode (Tq <= 4 query rows over a long KV cache, no grad needed): the key range is split across
  programs when B*H alone would not fill the GPU; each split writes a partial output + LSE that a
  small kernel combines (flash-decoding). With one split the kernel writes the output directly.
- backward: deterministic, no atomics. One kernel computes dQ (and the softmax-gradient term
  delta = rowsum(dO * O)) per query block; a second computes dK, dV per key block.
All three are `torch.library.triton_op`s (forward with a registered autograd formula) through
`launch.register_op`, so `torch.compile` keeps them in its graph instead of breaking around them, and
an eager call skips the dispatcher's custom-op layer (host cost, benchmarks/bench_host_overhead.py).
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch

LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DECODE_MAX_TQ = 4  # up to this many query rows over a longer KV cache take the split-KV decode path
_SCAN_BLOCK = 256  # mask elements read per step when a program finds its row's real-key range


# ----------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _key_range(kpm_ptr, Tk, HAS_MASK: tl.constexpr, SCAN_BLOCK: tl.constexpr):
    """(first real key, last real key + 1, dense) of one batch row; ([Tk, 0), False) when it has none.

    dense: every key in the range is real (left/right padding only), so blocks wholly inside it may
    skip the mask. Scanning the (<= 1 KB) mask row in every program is cheaper than a separate launch
    (plus a tensor round trip) per layer, and needs no host sync.
    """
    if HAS_MASK:
        first = tl.zeros([], dtype=tl.int32) + Tk
        end = tl.zeros([], dtype=tl.int32)
        count = tl.zeros([], dtype=tl.int32)
        for start in range(0, Tk, SCAN_BLOCK):
            offs = start + tl.arange(0, SCAN_BLOCK)
            real = tl.load(kpm_ptr + offs, mask=offs < Tk, other=0) != 0
            first = tl.minimum(first, tl.min(tl.where(real, offs, Tk), 0))
            end = tl.maximum(end, tl.max(tl.where(real, offs + 1, 0), 0))
            count += tl.sum(real.to(tl.int32), 0)
        return first, end, count == end - first
    else:
        return 0, Tk, True


@triton.jit
def _key_phases(pid_m, kv_lo, kv_end, dense, Tq, Tk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Key bounds lo <= full_lo <= full_hi <= hi for one query block: blocks in [full_lo, full_hi) are
    visible to every query of the block (no mask work), the rest of [lo, hi) needs the mask."""
    hi = kv_end
    full_hi = kv_end
    if CAUSAL:  # the block's last query sees keys < (pid_m + 1) * BLOCK_M + Tk - Tq, its first fewer
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + Tk - Tq)
        full_hi = tl.minimum(full_hi, pid_m * BLOCK_M + 1 + Tk - Tq)
    lo = (kv_lo // BLOCK_N) * BLOCK_N  # skip leading key blocks that are all padding
    full_lo = ((kv_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    full_hi = (tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N  # non-negative: // must not round toward 0
    use_full = dense & (full_hi > full_lo)
    return lo, tl.where(use_full, full_lo, lo), tl.where(use_full, full_hi, lo), hi


@triton.jit
def _real_keys(offs_n, kv_hi, Tk, kpm_ptr, HAS_MASK: tl.constexpr):
    """(BLOCK_N,) bool: keys below kv_hi that are real tokens (not padding or unwritten cache slots)."""
    real = offs_n < kv_hi
    if HAS_MASK:
        real = real & (tl.load(kpm_ptr + offs_n, mask=offs_n < Tk, other=0) != 0)
    return real


@triton.jit
def _visible(offs_m, offs_n, real, Tq, Tk, CAUSAL: tl.constexpr):
    """Which of these keys each of these queries may see: query indices (BLOCK_M, 1), key indices and
    `real` (1, BLOCK_N) give a (BLOCK_M, BLOCK_N) bool; (1, BLOCK_M) with (BLOCK_N, 1) its transpose."""
    vis = real & (offs_m >= 0)
    if CAUSAL:  # bottom-right aligned: query i sees keys <= i + Tk - Tq
        vis = vis & (offs_n <= offs_m + (Tk - Tq))
    return vis


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_ptr, stride_kt, stride_vt, offs_m, lo, hi,
                    kv_hi, Tq, Tk, D, qk_scale, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    MASKED: tl.constexpr):
    """Online-softmax accumulation of keys [lo, hi) into (acc, l_i, m_i); scores in base 2.

    MASKED=False only for key blocks that every query of the block sees (see `_key_phases`)."""
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < Tk)[:, None] & (offs_d < D)[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:  # the where() also drops the NaN/inf scores of garbage keys
            real = _real_keys(offs_n, kv_hi, Tk, kpm_ptr, HAS_MASK)
            s = tl.where(_visible(offs_m[:, None], offs_n[None, :], real[None, :], Tq, Tk, CAUSAL), s, float("-inf"))
            # p = 0 for padded keys, but 0 * NaN garbage in their V rows would reach acc: don't load them
            kv_mask = real[:, None] & (offs_d < D)[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible so far keeps m = -inf; subtracting 0 instead keeps exp2 at 0
        # rather than exp2(-inf - -inf) = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,  # (B, H, Tq, D), last dim contiguous
    K,  # (B, H, Tk, D)
    V,  # (B, H, Tk, D)
    KPM,  # (B, Tk) bool, True = real key; not read unless HAS_MASK
    O,  # (B, H, Tq, D) output
    LSE,  # (B, H, Tq) fp32 log2-sum-exp of the scaled scores; +inf where a row sees no key
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_mb,
    H, Tq, Tk, D, qk_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
):
    # Scalars as fp32 (torch.compile may pass fp64), batch/head offsets in int64 (they overflow int32).
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m < Tq)[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=q_mask, other=0.0)

    kv_lo, kv_end, dense = _key_range(KPM + b * stride_mb, Tk, HAS_MASK, SCAN_BLOCK)
    lo, full_lo, full_hi, hi = _key_phases(pid_m, kv_lo, kv_end, dense, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    kpm_ptr = KPM + b * stride_mb
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_ptr, stride_kt, stride_vt, offs_m,
                                    lo, full_lo, hi, Tq, Tk, D, qk_scale, CAUSAL, HAS_MASK, BLOCK_N, BLOCK_D,
                                    DOT_PRECISION, MASKED=True)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_ptr, stride_kt, stride_vt, offs_m,
                                    full_lo, full_hi, hi, Tq, Tk, D, qk_scale, CAUSAL, HAS_MASK, BLOCK_N,
                                    BLOCK_D, DOT_PRECISION, MASKED=False)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_ptr, stride_kt, stride_vt, offs_m,
                                    full_hi, hi, hi, Tq, Tk, D, qk_scale, CAUSAL, HAS_MASK, BLOCK_N, BLOCK_D,
                                    DOT_PRECISION, MASKED=True)

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]  # acc is 0 for rows with no key
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + pid_bh * Tq + offs_m, lse, mask=offs_m < Tq)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_ptr, stride_kt, stride_vt, offs_m, lo, hi,
                       kv_hi, Tq, Tk, D, qk_scale, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       MASKED: tl.constexpr):
    """dQ (unscaled) contribution of keys [lo, hi), probabilities recomputed from the forward's LSE."""
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:  # padded keys are not loaded: ds = 0 there, but 0 * NaN garbage in K, V would reach dq
            real = _real_keys(offs_n, kv_hi, Tk, kpm_ptr, HAS_MASK)
        else:
            real = offs_n < Tk
        kv_mask = real[:, None] & (offs_d < D)[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:  # masked before exp2; lse = +inf (row with no key) gives p = 0
            s = tl.where(_visible(offs_m[:, None], offs_n[None, :], real[None, :], Tq, Tk, CAUSAL), s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, stride_qt, stride_dot, offs_n, real,
                         lo, hi, Tq, Tk, D, qk_scale, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """dK, dV (dK unscaled) contributions of query rows [lo, hi) to one key block; real: its real keys.

    Works on transposed scores (keys as rows, s^T = k q^T): every dot's M is then the key block BLOCK_N,
    so the query step BLOCK_M can stay small while the dots are as tall as sm_90's wgmma needs (64)."""
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_mask = (offs_m < Tq)[:, None] & (offs_d < D)[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=offs_m < Tq, other=float("inf"))  # rows past Tq: p = 0
        delta = tl.load(delta_ptr + offs_m, mask=offs_m < Tq, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if MASKED:
            vis = _visible(offs_m[None, :], offs_n[:, None], real[:, None], Tq, Tk, CAUSAL)
            s_t = tl.where(vis, s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V,  # (B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, D)
    O, DO,  # (B, H, Tq, D) forward output and its gradient
    KPM,  # (B, Tk) bool
    LSE,  # (B, H, Tq) fp32 from the forward
    DELTA,  # (B, H, Tq) fp32 output: rowsum(dO * O), reused by the dK/dV kernel
    DQ,  # (B, H, Tq, D) output
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    stride_mb,
    H, Tq, Tk, D, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
):
    qk_scale = tl.cast(qk_scale, tl.float32)  # as in the forward: fp32 scalars, int64 batch/head offsets
    sm_scale = tl.cast(sm_scale, tl.float32)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m < Tq)[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=q_mask, other=0.0)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=q_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (BLOCK_M,)
    tl.store(DELTA + pid_bh * Tq + offs_m, delta, mask=offs_m < Tq)
    lse = tl.load(LSE + pid_bh * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))

    kv_lo, kv_end, dense = _key_range(KPM + b * stride_mb, Tk, HAS_MASK, SCAN_BLOCK)
    lo, full_lo, full_hi, hi = _key_phases(pid_m, kv_lo, kv_end, dense, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    kpm_ptr = KPM + b * stride_mb
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_ptr, stride_kt, stride_vt, offs_m,
                            lo, full_lo, hi, Tq, Tk, D, qk_scale, CAUSAL, HAS_MASK, BLOCK_N, BLOCK_D,
                            DOT_PRECISION, MASKED=True)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_ptr, stride_kt, stride_vt, offs_m,
                            full_lo, full_hi, hi, Tq, Tk, D, qk_scale, CAUSAL, HAS_MASK, BLOCK_N, BLOCK_D,
                            DOT_PRECISION, MASKED=False)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_ptr, stride_kt, stride_vt, offs_m,
                            full_hi, hi, hi, Tq, Tk, D, qk_scale, CAUSAL, HAS_MASK, BLOCK_N, BLOCK_D,
                            DOT_PRECISION, MASKED=True)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V,  # (B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, D)
    DO,  # (B, H, Tq, D)
    KPM,  # (B, Tk) bool
    LSE, DELTA,  # (B, H, Tq) fp32
    DK, DV,  # (B, H, Tk, D) outputs; written (as zeros) for key blocks that are all padding too
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    stride_mb,
    H, Tq, Tk, D, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
):
    qk_scale = tl.cast(qk_scale, tl.float32)  # as in the forward: fp32 scalars, int64 batch/head offsets
    sm_scale = tl.cast(sm_scale, tl.float32)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < Tk)[:, None] & (offs_d < D)[None, :]
    kv_lo, kv_end, dense = _key_range(KPM + b * stride_mb, Tk, HAS_MASK, SCAN_BLOCK)
    kpm_ptr = KPM + b * stride_mb
    real = _real_keys(offs_n, kv_end, Tk, kpm_ptr, HAS_MASK)
    # Padded keys get p = 0 and ds = 0, but 0 * NaN garbage in their K, V rows would reach their dk.
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=kv_mask & real[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=kv_mask & real[:, None], other=0.0)

    # Query rows [q_lo, q_full) need the mask, rows [q_full, q_hi) see every key of this block. Rows
    # before q_lo cannot see it (causal); a block holding no real key has empty loops and stores zeros.
    q_lo = 0
    q_full = 0
    if CAUSAL:
        q_lo = (tl.maximum(start_n - (Tk - Tq), 0) // BLOCK_M) * BLOCK_M
        q_full = tl.maximum(start_n + BLOCK_N - 1 - (Tk - Tq), 0)  # first row that sees the whole block
        q_full = tl.maximum(((q_full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, q_lo)
    block_live = (start_n < kv_end) & (start_n + BLOCK_N > kv_lo)
    block_dense = dense & (start_n >= kv_lo) & (start_n + BLOCK_N <= kv_end)
    q_hi = tl.where(block_live, Tq, 0)
    q_full = tl.where(block_dense, tl.minimum(q_hi, q_full), q_hi)

    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_ptr = LSE + pid_bh * Tq
    delta_ptr = DELTA + pid_bh * Tq
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, stride_qt, stride_dot,
                                  offs_n, real, q_lo, q_full, Tq, Tk, D, qk_scale, CAUSAL, BLOCK_M, BLOCK_D,
                                  DOT_PRECISION, MASKED=True)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, stride_qt, stride_dot,
                                  offs_n, real, q_full, q_hi, Tq, Tk, D, qk_scale, CAUSAL, BLOCK_M, BLOCK_D,
                                  DOT_PRECISION, MASKED=False)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_decode_split_kernel(
    Q,  # (B, H, Tq, D), Tq <= BLOCK_M
    K, V,  # (B, H, Tk, D): the KV cache
    KPM,  # (B, Tk) bool: valid cache slots
    O_PART,  # (B*H, S, Tq, D) fp32: each split's normalised partial output; unused if DIRECT
    LSE_PART,  # (B*H, S, Tq) fp32: each split's log2-sum-exp; -inf for a split that saw no key
    O,  # (B, H, Tq, D) final output, written here only if DIRECT (a single split)
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_mb,
    H, Tq, Tk, D, qk_scale, split_len, num_splits,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
):
    qk_scale = tl.cast(qk_scale, tl.float32)  # as in the forward: fp32 scalars, int64 batch/head offsets
    split = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m < Tq)[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=q_mask, other=0.0)
    kv_lo, kv_hi, _ = _key_range(KPM + b * stride_mb, Tk, HAS_MASK, SCAN_BLOCK)
    # split_len is a multiple of BLOCK_N, so both bounds stay block aligned
    lo = tl.maximum((kv_lo // BLOCK_N) * BLOCK_N, split * split_len)
    hi = tl.minimum(kv_hi, (split + 1) * split_len)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
        KPM + b * stride_mb, stride_kt, stride_vt, offs_m, lo, hi, kv_hi, Tq, Tk, D, qk_scale,
        CAUSAL, HAS_MASK, BLOCK_N, BLOCK_D, DOT_PRECISION, MASKED=True)

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    if DIRECT:  # one split (B*H fills the GPU): no partials round trip, no combine launch
        tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=q_mask)
    else:
        lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("-inf"))
        row = (pid_bh * num_splits + split) * Tq + offs_m
        tl.store(O_PART + row[:, None] * D + offs_d[None, :], out, mask=q_mask)
        tl.store(LSE_PART + row, lse, mask=offs_m < Tq)


@triton.jit
def _attn_decode_combine_kernel(
    O_PART,  # (B*H, S, Tq, D) fp32
    LSE_PART,  # (B*H, S, Tq) fp32
    O,  # (B, H, Tq, D) output
    stride_ob, stride_oh, stride_ot,
    H, Tq, D, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)  # query row
    pid_bh = tl.program_id(1).to(tl.int64)  # int64: batch/head offsets overflow int32 on big tensors
    b = pid_bh // H
    h = pid_bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    rows = (pid_bh * num_splits + offs_s) * Tq + i  # (BLOCK_S,)
    lse = tl.load(LSE_PART + rows, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)  # 0 for splits that saw no key
    denom = tl.sum(w, 0)
    part = tl.load(O_PART + rows[:, None] * D + offs_d[None, :],
                   mask=(offs_s < num_splits)[:, None] & (offs_d < D)[None, :], other=0.0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(O + b * stride_ob + h * stride_oh + i * stride_ot + offs_d, out.to(O.dtype.element_ty),
             mask=offs_d < D)


# ----------------------------------------------------------------------------------------------
# Host launchers: block configuration, shape checks, grids


def _block_d(D: int) -> int:
    return max(16, launch.next_pow2(D))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32: fp32 is the precision callers ask for exactly.
    return "ieee" if dtype == torch.float32 else "tf32"


# Launch configs per dtype and target (`arch`), checked with Triton's cross compiler for sm_80/86/89/90
# (tests/kernels/cross_compile.py): each fits its target's shared memory and the 16-bit ones do not spill
# registers. One table serves sm_80/86/89 (it fits their smallest, 99 KB) but for one sm_80 tile; sm_90 has
# its own 16-bit backward tiles, because Triton compiles a dot to its wgmma instructions only when the dot
# is at least 64 rows tall (64 rows a warpgroup of 4 warps), to the slower mma.sync otherwise.
# fp32 runs IEEE dots on FMA units, where each thread holds whole D-long rows of both operands: small
# tiles, many warps and no software pipelining (num_stages=1) keep that in registers; 16-bit uses tensor
# cores with cp.async pipelining, and 8 warps, because 4 need ~255 registers for these tiles and spill.
def _fwd_config(D: int, dtype: torch.dtype, arch: int) -> dict:
    if dtype == torch.float32:
        if _block_d(D) <= 64:
            return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1)
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=16, num_stages=1)
    if _block_d(D) <= 64:  # sm_80's ptxas spills 128x64 at 3 stages (255 registers); 128x32 takes 184
        return dict(BLOCK_M=128, BLOCK_N=32 if arch == 80 else 64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)  # q + 2 K/V stages of 128 columns


def _bwd_configs(D: int, dtype: torch.dtype, arch: int) -> tuple[dict, dict]:
    """(dQ kernel, dK/dV kernel) configs. The dQ kernel's dots are BLOCK_M (its query block) tall, the
    dK/dV kernel's BLOCK_N (its key block); the other tile is the step of its key / query loop."""
    # Each kernel keeps two fp32 tiles (dQ and dS, or dK and dV) plus q, k, v, dO tiles, so the tiles are
    # smaller than the forward's.
    if dtype == torch.float32:
        if _block_d(D) <= 64:
            cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1)
            return cfg, cfg
        # D = 128: a 16-query step keeps dK/dV's FMA operands in 16 warps' 128 registers (32 spill)
        return (dict(BLOCK_M=32, BLOCK_N=32, num_warps=16, num_stages=1),
                dict(BLOCK_M=16, BLOCK_N=32, num_warps=16, num_stages=1))
    if arch == 90:  # 128-tall dots (wgmma needs 64 rows a warpgroup); 4 warps would spill these tiles
        return (dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
                dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3))
    cfg = dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)
    return cfg, cfg


def _decode_config(D: int, dtype: torch.dtype, arch: int) -> dict:
    # BLOCK_M = 16 is tl.dot's minimum; decode is bound by reading K/V, so padded query rows are free.
    if dtype == torch.float32:
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1)
    return dict(BLOCK_M=16, BLOCK_N=64 if _block_d(D) <= 64 else 32, num_warps=4, num_stages=3)


def _combine_config(D: int, num_splits: int) -> dict:
    # Up to 64 splits x 128 fp32 partials: 4 warps keep that at <= 64 registers a thread.
    return dict(BLOCK_S=launch.next_pow2(num_splits), num_warps=4)


def decode_num_splits(batch_heads: int, Tk: int, device: torch.device, block_n: int = 64) -> int:
    """How many programs share one (batch, head)'s key range: enough for ~2 programs per SM."""
    want = launch.cdiv(2 * launch.num_sms(device), batch_heads)
    return max(1, min(want, launch.cdiv(Tk, block_n), 64))


def _out_like(q: torch.Tensor, T: int, dtype=None) -> torch.Tensor:
    """Empty (B, H, T, D) tensor stored as (B, T, H, D): the model's transpose back to (B, T, C) is free."""
    B, H, _, D = q.shape
    return torch.empty(B, T, H, D, dtype=dtype or q.dtype, device=q.device).transpose(1, 2)


def _strides3(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _check_inputs(q, k, v, key_padding_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"masked_attention(triton): {name} must be fp16, bf16 or fp32, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"masked_attention(triton): {name}'s last dim must be contiguous")
    launch.require_launchable(q.device, "masked_attention (triton)")
    D = q.shape[-1]
    if not 16 <= D <= 128:
        raise ValueError(f"masked_attention(triton): head dim must be in [16, 128], got {D}")
    if key_padding_mask is not None and key_padding_mask.stride(-1) != 1:
        raise ValueError("masked_attention(triton): key_padding_mask's last dim must be contiguous")


def _mask_args(key_padding_mask, q):
    """(mask pointer, its batch stride, HAS_MASK). Without a mask q stands in as a never-read pointer."""
    if key_padding_mask is None:
        return q, 0, False
    return key_padding_mask, key_padding_mask.stride(0), True


def _attention_forward(q, k, v, key_padding_mask, causal: bool, sm_scale: float):
    _check_inputs(q, k, v, key_padding_mask)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    o = _out_like(q, Tq)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    cfg = _fwd_config(D, q.dtype, launch.arch(q.device))
    kpm, stride_mb, has_mask = _mask_args(key_padding_mask, q)
    launch.wrap(_attn_fwd_kernel)[(launch.cdiv(Tq, cfg["BLOCK_M"]), B * H)](
        q, k, v, kpm, o, lse,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o), stride_mb,
        H, Tq, Tk, D, sm_scale * LOG2E,
        CAUSAL=causal, HAS_MASK=has_mask, BLOCK_D=_block_d(D), DOT_PRECISION=_dot_precision(q.dtype),
        SCAN_BLOCK=_SCAN_BLOCK, **cfg)
    return o, lse


def _attention_backward(do, q, k, v, o, lse, key_padding_mask, causal: bool, sm_scale: float):
    _check_inputs(q, k, v, key_padding_mask)
    if do.stride(-1) != 1:
        do = do.contiguous()
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dq, dk, dv = _out_like(q, Tq), _out_like(q, Tk), _out_like(q, Tk)
    delta = torch.empty_like(lse)
    dq_cfg, dkdv_cfg = _bwd_configs(D, q.dtype, launch.arch(q.device))
    kpm, stride_mb, has_mask = _mask_args(key_padding_mask, q)
    common = dict(CAUSAL=causal, HAS_MASK=has_mask, BLOCK_D=_block_d(D), DOT_PRECISION=_dot_precision(q.dtype),
                  SCAN_BLOCK=_SCAN_BLOCK)
    # dQ first: it also writes delta, which the dK/dV kernel reads for every query row.
    launch.wrap(_attn_bwd_dq_kernel)[(launch.cdiv(Tq, dq_cfg["BLOCK_M"]), B * H)](
        q, k, v, o, do, kpm, lse, delta, dq,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o), *_strides3(do), *_strides3(dq),
        stride_mb, H, Tq, Tk, D, sm_scale * LOG2E, sm_scale, **common, **dq_cfg)
    launch.wrap(_attn_bwd_dkdv_kernel)[(launch.cdiv(Tk, dkdv_cfg["BLOCK_N"]), B * H)](
        q, k, v, do, kpm, lse, delta, dk, dv,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *_strides3(dv),
        stride_mb, H, Tq, Tk, D, sm_scale * LOG2E, sm_scale, **common, **dkdv_cfg)
    return dq, dk, dv


def _attention_decode(q, k, v, key_padding_mask, causal: bool, sm_scale: float, num_splits: int):
    _check_inputs(q, k, v, key_padding_mask)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    cfg = _decode_config(D, q.dtype, launch.arch(q.device))
    if Tq > cfg["BLOCK_M"]:
        raise ValueError(f"masked_attention(triton) decode path takes at most {cfg['BLOCK_M']} query rows")
    if num_splits < 1:
        raise ValueError(f"masked_attention(triton): num_splits must be >= 1, got {num_splits}")
    split_len = launch.cdiv(launch.cdiv(Tk, num_splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    o = _out_like(q, Tq)
    direct = num_splits == 1
    if direct:
        o_part = lse_part = o  # never touched
    else:
        o_part = torch.empty(B * H, num_splits, Tq, D, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B * H, num_splits, Tq, dtype=torch.float32, device=q.device)
    kpm, stride_mb, has_mask = _mask_args(key_padding_mask, q)
    launch.wrap(_attn_decode_split_kernel)[(num_splits, B * H)](
        q, k, v, kpm, o_part, lse_part, o,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o), stride_mb,
        H, Tq, Tk, D, sm_scale * LOG2E, split_len, num_splits,
        CAUSAL=causal, HAS_MASK=has_mask, DIRECT=direct, BLOCK_D=_block_d(D),
        DOT_PRECISION=_dot_precision(q.dtype), SCAN_BLOCK=_SCAN_BLOCK, **cfg)
    if not direct:
        launch.wrap(_attn_decode_combine_kernel)[(Tq, B * H)](
            o_part, lse_part, o, *_strides3(o), H, Tq, D, num_splits, BLOCK_D=_block_d(D),
            **_combine_config(D, num_splits))
    return o


# ----------------------------------------------------------------------------------------------
# torch.library ops (so torch.compile keeps the kernels in its graph) and the public entry point


@launch.register_op("rlhf_fast::masked_attention_fwd")
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            key_padding_mask: Optional[torch.Tensor],  # noqa: UP045 (schema inference on torch 2.6+)
            causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_forward(q, k, v, key_padding_mask, causal, sm_scale)


@launch.register_op("rlhf_fast::masked_attention_bwd")
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor],  # noqa: UP045
            causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_backward(do, q, k, v, o, lse, key_padding_mask, causal, sm_scale)


@launch.register_op("rlhf_fast::masked_attention_decode")
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_padding_mask: Optional[torch.Tensor],  # noqa: UP045
               causal: bool, sm_scale: float, num_splits: int) -> torch.Tensor:
    return _attention_decode(q, k, v, key_padding_mask, causal, sm_scale, num_splits)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, sm_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_padding_mask)
    ctx.causal, ctx.sm_scale = causal, sm_scale
    ctx.set_materialize_grads(False)  # lse's gradient stays None: no zeros tensor per call


def _backward(ctx, grad_o, grad_lse):
    # lse never leaves this module (masked_attention returns only o), so grad_lse is always zero.
    q, k, v, o, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = _bwd_op(grad_o, q, k, v, o, lse, key_padding_mask, ctx.causal, ctx.sm_scale)
    return dq, dk, dv, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def masked_attention(q, k, v, key_padding_mask=None, causal: bool = True, sm_scale: float | None = None,
                     num_splits: int | None = None):
    """Triton backend of `rlhf_fast.kernels.masked_attention` (inputs already validated there).

    Tq <= 4 query rows over a longer KV range, with no gradient needed, take the split-KV decode
    kernel; `num_splits` overrides its heuristic (tests). Everything else takes the flash kernel.
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(D)
    if key_padding_mask is not None and key_padding_mask.stride(-1) != 1:
        key_padding_mask = key_padding_mask.contiguous()
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if Tq <= _DECODE_MAX_TQ and Tk > Tq and not needs_grad:
        if num_splits is None:
            block_n = _decode_config(D, q.dtype, launch.arch(q.device))["BLOCK_N"]
            num_splits = decode_num_splits(B * H, Tk, q.device, block_n)
        return _decode_op(q, k, v, key_padding_mask, bool(causal), scale, int(num_splits))
    return _fwd_op(q, k, v, key_padding_mask, bool(causal), scale)[0]
