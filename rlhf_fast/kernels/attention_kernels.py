"""The Triton kernels of masked attention (`attention.py` holds their launch configs, launchers and
torch ops, and the design notes). Kernels only: nothing here runs on the host.

forward: online softmax in base 2, fp32 accumulation, the per-row log2-sum-exp saved for the backward;
backward: dQ (+ delta) per query block, dK/dV per key block on transposed scores (deterministic, no
atomics); decode: split-KV partials and their combine (flash-decoding).
"""

import triton
import triton.language as tl

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
