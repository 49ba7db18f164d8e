"""Fused lm-head log-probs: log p(target), entropy and logsumexp of softmax(hidden W^T / temperature)
without the (N, V) logits.

Forward (`_logprobs_fwd_kernel`, one launch): each program owns BLOCK_N tokens and a slice of the
vocabulary; it computes a (BLOCK_N, BLOCK_V) tile of logits with a K loop of tensor-core dots (fp32
accumulation), folds it into a running max m, sum s = sum exp(z - m) and a = sum exp(z - m) (z - m)
(an online logsumexp that also carries the entropy), picks the target's logit when it falls in the tile,
and drops the tile. The vocabulary is split over programs when there are too few token blocks to fill
the GPU; `_logprobs_merge_kernel` merges the (N, splits, 4) partial states per token (one launch, not a
dozen (N, splits) torch ops):
    lse = M + log S,  entropy = log S - A / S,  log p(target) = z_target - lse.

Backward: with the saved per-token lse and entropy, the gradient of the logits is
    dz = g_lse p - g_lp (p - onehot(target)) - g_ent p (log p + entropy),   divided by the temperature,
recomputed tile by tile by `_logprobs_bwd_kernel` (the forward's K loop, so the same z) into a
(chunk, V) buffer in the inputs' dtype; dh = dz W and, only when the head is trained, dW += dz^T h are
cuBLAS matmuls per chunk. Only one chunk of LOGPROB_CHUNK_BYTES exists at a time.

Targets < 0 are ignored: their outputs are 0 and they get no gradient (selected with tl.where, and
their hidden rows are zeroed before dW, so NaN/inf there cannot leak).

Launch configs come from per-(dtype, target) tables through `launch.arch`; 16-bit configs fit sm_86's
99 KB of shared memory without spilling (tests/kernels/cross_compile.py). Registered as the torch ops
`rlhf_fast::linear_logprobs_fwd` / `_bwd` with autograd (`launch.register_op`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .reference import LinearLogprobsOutput, linear_logprobs_chunk

# ----------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, N, V, C, stride_hn, stride_hc, stride_wv, stride_wc,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 tile of h W^T; out-of-range rows / columns read zeros."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    k = tl.arange(0, BLOCK_K)
    row_ok = rows[:, None] < N
    col_ok = cols[None, :] < V
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + k
        h = tl.load(h_ptr + rows[:, None] * stride_hn + kk[None, :] * stride_hc,
                    mask=row_ok & (kk[None, :] < C), other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wv + kk[:, None] * stride_wc,
                    mask=col_ok & (kk[:, None] < C), other=0.0)  # (BLOCK_K, BLOCK_V) = W^T tile
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _logprobs_fwd_kernel(
    h_ptr,  # (N, C) hidden, any strides
    w_ptr,  # (V, C) weight, any strides
    tgt_ptr,  # (N,) int targets, < 0 = ignored
    part_ptr,  # (N, S, 4) fp32 out: m, s, a, target logit of this program's vocabulary slice
    N,
    V,
    C,
    stride_hn,
    stride_hc,
    stride_wv,
    stride_wc,
    inv_temp,
    V_SPLIT,  # vocabulary columns per split (a multiple of BLOCK_V)
    S,  # splits
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    inv_temp = tl.cast(inv_temp, tl.float32)  # inductor may pass Python floats as fp64
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tgt = tl.load(tgt_ptr + rows, mask=rows < N, other=-1)
    # A finite start (not -inf): s * (m - m_new) stays 0 instead of 0 * -inf on the first tile.
    m = tl.full((BLOCK_N,), -1.0e30, tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_lo = pid_s * V_SPLIT
    v_hi = tl.minimum(v_lo + V_SPLIT, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, C, stride_hn, stride_hc, stride_wv, stride_wc,
                         BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION) * inv_temp
        col_ok = cols[None, :] < V
        z = tl.where(col_ok, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        d = z - m_new[:, None]
        e = tl.exp(d)  # 0 in padded columns
        # a is kept relative to the running max: re-centre it on m_new, then add this tile.
        a = alpha * (a + s * (m - m_new)) + tl.sum(tl.where(col_ok, e * d, 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = part_ptr + (rows * S + pid_s) * 4
    ok = rows < N
    tl.store(out + 0, m, mask=ok)
    tl.store(out + 1, s, mask=ok)
    tl.store(out + 2, a, mask=ok)
    tl.store(out + 3, zt, mask=ok)


@triton.jit
def _logprobs_merge_kernel(
    part_ptr,  # (N, S, 4) fp32: each split's m, s, a, target logit (`_logprobs_fwd_kernel`)
    tgt_ptr,  # (N,) int targets, < 0 = ignored
    lp_ptr,  # (N,) fp32 out: log p(target)
    ent_ptr,  # (N,) fp32 out: entropy
    lse_ptr,  # (N,) fp32 out: logsumexp
    N,
    S,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    splits = tl.arange(0, BLOCK_S)
    ok = (rows[:, None] < N) & (splits[None, :] < S)
    ptrs = part_ptr + (rows[:, None] * S + splits[None, :]) * 4
    m = tl.load(ptrs + 0, mask=ok, other=float("-inf"))
    s = tl.load(ptrs + 1, mask=ok, other=0.0)
    a = tl.load(ptrs + 2, mask=ok, other=0.0)
    zt = tl.load(ptrs + 3, mask=ok, other=0.0)
    out = rows < N
    # Real rows: top is finite (each split starts its running max at -1e30) and total >= 1 (the max's own
    # term); rows past N get 0 and 1 instead, so that no inf / NaN is computed for them.
    top = tl.where(out, tl.max(m, axis=1), 0.0)
    d = tl.where(ok, m - top[:, None], 0.0)
    w = tl.where(ok, tl.exp(d), 0.0)
    total = tl.where(out, tl.sum(s * w, axis=1), 1.0)
    centred = tl.sum(w * (a + s * d), axis=1)  # sum_j exp(z_j - top) (z_j - top)
    log_total = tl.log(total)
    lse = top + log_total
    tgt = tl.load(tgt_ptr + rows, mask=out, other=-1)
    use = tgt >= 0
    tl.store(lp_ptr + rows, tl.where(use, tl.sum(zt, axis=1) - lse, 0.0), mask=out)
    tl.store(ent_ptr + rows, tl.where(use, log_total - centred / total, 0.0), mask=out)
    tl.store(lse_ptr + rows, tl.where(use, lse, 0.0), mask=out)


@triton.jit
def _logprobs_bwd_kernel(
    h_ptr,  # (N, C) hidden rows of this chunk
    w_ptr,  # (V, C)
    tgt_ptr,  # (N,)
    lse_ptr,  # (N,) fp32
    ent_ptr,  # (N,) fp32
    glp_ptr,  # (N,) fp32 upstream gradients (those of entropy / logsumexp read only if HAS_ENT / HAS_LSE)
    gent_ptr,
    glse_ptr,
    dz_ptr,  # (N, V) out: gradient of the logits h W^T, in its own dtype, row stride stride_dz
    N,
    V,
    C,
    stride_hn,
    stride_hc,
    stride_wv,
    stride_wc,
    stride_dz,
    inv_temp,
    HAS_ENT: tl.constexpr,
    HAS_LSE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    inv_temp = tl.cast(inv_temp, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    tgt = tl.load(tgt_ptr + rows, mask=rows < N, other=-1)
    use = tgt >= 0
    lse = tl.load(lse_ptr + rows, mask=use, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=use, other=0.0)
    z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, C, stride_hn, stride_hc, stride_wv, stride_wc,
                     BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION) * inv_temp
    logp = z - lse[:, None]
    p = tl.exp(logp)
    if HAS_LSE:
        dz = p * (tl.load(glse_ptr + rows, mask=use, other=0.0) - g_lp)[:, None]
    else:
        dz = -p * g_lp[:, None]
    if HAS_ENT:
        ent = tl.load(ent_ptr + rows, mask=use, other=0.0)
        g_ent = tl.load(gent_ptr + rows, mask=use, other=0.0)
        dz -= g_ent[:, None] * p * (logp + ent[:, None])
    dz += tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0)
    dz = tl.where(use[:, None], dz * inv_temp, 0.0)
    tl.store(dz_ptr + rows[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=(rows[:, None] < N) & (cols[None, :] < V))


# ----------------------------------------------------------------------------------------------
# Launch configs: (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages) keyed by (element bits, arch).
# Shared memory ~ (BLOCK_N + BLOCK_V) * BLOCK_K * element bytes * stages: 16-bit 64x128x64 at 3 stages
# is 72 KB (fits sm_86/89's 99 KB); 8 warps hold the fp32 tile and its softmax temporaries without
# spilling. fp32 uses IEEE dots on CUDA cores (as torch does without TF32), so small BLOCK_K.
_TABLE = {
    **{(16, arch): (64, 128, 64, 8, 3) for arch in launch.TARGETS},
    **{(32, arch): (64, 64, 16, 4, 3) for arch in launch.TARGETS},
}
_INTERPRET = (16, 512, 16, 4, 1)  # small token tiles so tests cross token-block, split and chunk edges
CHUNK_MULTIPLE = 128  # backward chunks are whole numbers of token tiles
MERGE_ELEMENTS = 2048  # (tokens, splits) per program of the merge: its four fp32 tiles stay in registers


def launch_config(dtype: torch.dtype, arch: int) -> tuple[int, int, int, int, int]:
    if launch.INTERPRET:
        return _INTERPRET
    bits = 32 if dtype == torch.float32 else 16
    if arch not in launch.TARGETS:  # an unknown target gets the 99 KB consumer table (both are equal now)
        arch = 86
    return _TABLE[(bits, arch)]


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands


def _check_inputs(hidden, weight, targets):
    name = "linear_logprobs (triton)"
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16) or weight.dtype != hidden.dtype:
        raise TypeError(f"{name}: hidden and weight must share one of float32/float16/bfloat16, got "
                        f"{hidden.dtype} and {weight.dtype}")
    launch.require_launchable(hidden.device, name)
    if launch.INTERPRET and hidden.dtype == torch.bfloat16:
        raise TypeError(f"{name}: the Triton interpreter has no bfloat16; use float32/float16 or a GPU")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: need hidden (N, C) and weight (V, C), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"{name}: targets must be ({hidden.shape[0]},), got {tuple(targets.shape)}")


# ----------------------------------------------------------------------------------------------
# Host launchers + torch ops


def _fwd_fake(hidden, weight, targets, temperature, with_entropy, chunk_tokens):
    _check_inputs(hidden, weight, targets)
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(3))


def _bwd_fake(g_lp, g_ent, g_lse, hidden, weight, targets, lse, ent, temperature, with_entropy, chunk_tokens,
              need_hidden, need_weight):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)))


@launch.register_op("rlhf_fast::linear_logprobs_fwd", _fwd_fake)
def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(target), entropy, logsumexp), each (N,) fp32; `chunk_tokens` is the backward's (0: auto)."""
    _check_inputs(hidden, weight, targets)
    (N, C), V = hidden.shape, weight.shape[0]
    lp, ent, lse = (torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(3))
    if N == 0:
        return lp, ent, lse
    cdiv = launch.cdiv  # not triton.cdiv: ~5 us per host call
    sms = launch.num_sms(hidden.device)
    bn, bv, bk, warps, stages = launch_config(hidden.dtype, launch.arch(hidden.device))
    n_blocks, v_blocks = cdiv(N, bn), cdiv(V, bv)
    # Split the vocabulary when the token blocks alone would leave SMs idle (short batches, decode).
    splits = max(1, min(v_blocks, cdiv(2 * sms, n_blocks)))
    v_split = cdiv(v_blocks, splits) * bv
    splits = cdiv(V, v_split)
    part = torch.empty((N, splits, 4), dtype=torch.float32, device=hidden.device)
    launch.wrap(_logprobs_fwd_kernel)[(n_blocks, splits)](
        hidden, weight, targets, part, N, V, C,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        1.0 / temperature, v_split, splits,
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, DOT_PRECISION=_dot_precision(hidden.dtype),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    # Merge tile: all splits of a token in one program; as many tokens as fit, fewer while that fills < a wave.
    block_s = max(2, launch.next_pow2(splits))
    block_n = max(1, MERGE_ELEMENTS // block_s)
    while block_n > 16 and cdiv(N, block_n) < sms:
        block_n //= 2
    launch.wrap(_logprobs_merge_kernel)[(cdiv(N, block_n),)](
        part, targets, lp, ent, lse, N, splits, BLOCK_N=block_n, BLOCK_S=block_s, num_warps=4
    )
    return lp, ent, lse


@launch.register_op("rlhf_fast::linear_logprobs_bwd", _bwd_fake)
def linear_logprobs_bwd(
    g_lp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    g_lse: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ent: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    chunk_tokens: int,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d hidden, d weight); an unneeded one comes back empty (outputs of an op may not alias)."""
    (N, C), V = hidden.shape, weight.shape[0]
    dh = hidden.new_empty(hidden.shape if need_hidden else (0,))
    if not need_weight:
        dw = weight.new_empty(0)
    elif N == 0:
        dw = torch.zeros_like(weight)
    if N == 0 or not (need_hidden or need_weight):
        return dh, dw
    bn, bv, bk, warps, stages = launch_config(hidden.dtype, launch.arch(hidden.device))
    multiple = bn if launch.INTERPRET else CHUNK_MULTIPLE
    chunk = chunk_tokens or linear_logprobs_chunk(N, V, hidden.element_size(), multiple=multiple)
    dz = hidden.new_empty((min(chunk, N), V))
    # Upstream gradients may be strided (an expanded scalar's, from .sum()): the kernel reads them densely.
    g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.contiguous()  # None: only entropy / lse are used
    has_ent, has_lse = with_entropy and g_ent is not None, g_lse is not None
    g_ent, g_lse = (g_lp if g is None else g.contiguous() for g in (g_ent, g_lse))  # None: a placeholder, not read
    if need_weight:  # fp32 accumulation over chunks; ignored rows may hold garbage: zeroed, as 0 * NaN would reach dW
        dw32 = torch.zeros((V, C), dtype=torch.float32, device=hidden.device) if chunk < N else None
        use = (targets >= 0)[:, None]
    for s in range(0, N, chunk):
        n = min(chunk, N - s)
        rows = (lambda t: t) if n == N else (lambda t, s=s, n=n: t[s : s + n])  # noqa: E731  (one chunk: no slices)
        h, dz_n = rows(hidden), dz[:n] if n < dz.shape[0] else dz
        launch.wrap(_logprobs_bwd_kernel)[(launch.cdiv(n, bn), launch.cdiv(V, bv))](
            h, weight, rows(targets), rows(lse), rows(ent), rows(g_lp), rows(g_ent), rows(g_lse), dz, n, V, C,
            h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
            1.0 / temperature,
            HAS_ENT=has_ent, HAS_LSE=has_lse, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk,
            DOT_PRECISION=_dot_precision(hidden.dtype), num_warps=warps, num_stages=stages,
        )  # fmt: skip
        if need_hidden:
            torch.mm(dz_n, weight, out=rows(dh))
        if need_weight:
            h = torch.where(rows(use), h, torch.zeros((), dtype=h.dtype, device=h.device))
            if dw32 is None:  # one chunk: dW in one matmul, in the weight's dtype (fp32 accumulation inside)
                dw = torch.mm(dz_n.t(), h)
            else:
                dw32 += (dz_n.t() @ h).float()
    if need_weight and dw32 is not None:
        dw = dw32.to(weight.dtype)
    return dh, dw


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, temperature, with_entropy, chunk_tokens = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, targets, lse, ent)
    ctx.args = (temperature, with_entropy, chunk_tokens)
    ctx.set_materialize_grads(False)  # unused outputs' gradients stay None: no zeros to make and read


def _backward(ctx, g_lp, g_ent, g_lse):
    hidden, weight, targets, lse, ent = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[:2]
    dh, dw = linear_logprobs_bwd(
        g_lp, g_ent, g_lse, hidden, weight, targets, lse, ent, *ctx.args, need_h, need_w
    )
    return (dh if need_h else None, dw if need_w else None, None, None, None, None)


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_logprobs(hidden, weight, targets, temperature: float = 1.0, with_entropy: bool = False,
                    chunk_tokens: int | None = None) -> LinearLogprobsOutput:
    """The fused kernels behind `rlhf_fast.kernels.linear_logprobs` (inputs validated there)."""
    lead = targets.shape
    h2, t1 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    lp, ent, lse = linear_logprobs_fwd(
        h2, weight, t1, float(temperature), bool(with_entropy), int(chunk_tokens or 0)
    )
    return LinearLogprobsOutput(lp.view(lead), ent.view(lead) if with_entropy else None, lse.view(lead))
