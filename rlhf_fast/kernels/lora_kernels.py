"""The Triton kernels of the fused LoRA linear (`lora.py` holds their launch configs, launchers, torch ops
and the design notes). Kernels only: nothing here runs on the host.

`_lora_linear_fwd_kernel`: a tiled GEMM whose accumulator is seeded with the tile's low-rank term;
`_lora_project_kernel`: the thin (tokens, r) projection; `_lora_adapter_grad_kernel` + `_lora_grad_reduce_kernel`:
the adapter gradients as a deterministic split-K reduction over tokens.
"""

import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _lora_linear_fwd_kernel(
    p_ptr,  # (M, K) x or dY
    q_ptr,  # (K, N) W^T (forward), W (dX) or x (dW); any strides
    lo_ptr,  # (M, R) fp32 low-rank activations: x A^T (forward) or dY B (dX)
    up_ptr,  # (R, N) B^T (forward) or A (dX)
    bias_ptr,  # (N,)
    out_ptr,  # (M, N)
    M,
    N,
    K,
    R,
    M_BUCKET,  # M_BUCKET: autotune key only (power-of-two bucket of M)
    stride_pm,
    stride_pk,
    stride_qk,
    stride_qn,
    stride_lm,
    stride_lr,
    stride_ur,
    stride_un,
    stride_om,
    stride_on,
    scale,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # inductor may pass a Python float as fp64 (not .to(): the interpreter)
    # Grouped tile order: GROUP_M row-tiles share each column band of q while it is hot in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrap out-of-range rows/cols onto valid ones so loads need no M/N masks; the store is masked.
    rows_in = (rows % M).to(tl.int64)
    cols_in = (cols % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        # Seed the accumulator with this tile's low-rank term, at most BLOCK_K ranks per dot so that rank
        # 128 costs no more registers or shared memory than a K step; padded ranks load as 0.
        R_STEP: tl.constexpr = min(R_PAD, BLOCK_K)
        for r0 in tl.static_range(0, R_PAD, R_STEP):
            offs_r = r0 + tl.arange(0, R_STEP)
            lo = tl.load(
                lo_ptr + rows_in[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                mask=offs_r[None, :] < R,
                other=0.0,
            )
            up = tl.load(
                up_ptr + offs_r[:, None] * stride_ur + cols_in[None, :] * stride_un,
                mask=offs_r[:, None] < R,
                other=0.0,
            )
            acc = tl.dot((lo * scale).to(up.dtype), up, acc, input_precision=DOT_PRECISION)

    p_ptrs = p_ptr + rows_in[:, None] * stride_pm + offs_k[None, :] * stride_pk
    q_ptrs = q_ptr + offs_k[:, None] * stride_qk + cols_in[None, :] * stride_qn
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        p = tl.load(p_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        q = tl.load(q_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(p, q, acc, input_precision=DOT_PRECISION)
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_in).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :].to(tl.int64) * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _lora_project_kernel(
    p_ptr,  # (M, K) x (forward) or dY (backward)
    q_ptr,  # (K, R) A^T (forward) or B (backward); any strides
    z_ptr,  # (M, R) fp32 out: x A^T or dY B
    M,
    K,
    R,
    stride_pm,
    stride_pk,
    stride_qk,
    stride_qr,
    stride_zm,
    stride_zr,
    DOT_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = (rows % M).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    p_ptrs = p_ptr + rows_in[:, None] * stride_pm + offs_k[None, :] * stride_pk
    q_ptrs = q_ptr + offs_k[:, None] * stride_qk + offs_r[None, :] * stride_qr
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        p = tl.load(p_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        q = tl.load(q_ptrs, mask=(offs_k[:, None] < k_left) & (offs_r[None, :] < R), other=0.0)
        acc = tl.dot(p, q, acc, input_precision=DOT_PRECISION)
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk
    z_ptrs = z_ptr + rows[:, None].to(tl.int64) * stride_zm + offs_r[None, :] * stride_zr
    tl.store(z_ptrs, acc, mask=(rows[:, None] < M) & (offs_r[None, :] < R))


@triton.jit
def _lora_adapter_grad_kernel(
    lo_ptr,  # (M, R) fp32: dY B (for dA) or x A^T (for dB^T)
    p_ptr,  # (M, N) x (for dA) or dY (for dB^T)
    part_ptr,  # (SPLIT, R, N) out: scale * lo^T p over this split's rows; fp32, or the gradient if SPLIT == 1
    M,
    N,
    R,
    ROWS_PER_SPLIT,
    stride_lm,
    stride_lr,
    stride_pm,
    stride_pn,
    stride_ps,
    stride_sr,
    stride_sn,
    scale,
    DOT_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Split-K over tokens: program (pid_n, pid_s) owns columns pid_n and rows of split pid_s. Each
    # split writes its own scaled partial, so the final sum (`_lora_grad_reduce_kernel`, fixed order) is
    # deterministic; with one split the partial is the gradient itself, stored in its own dtype.
    scale = tl.cast(scale, tl.float32)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_in = (cols % N).to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    offs_m = tl.arange(0, BLOCK_M)
    row_start = pid_s * ROWS_PER_SPLIT
    row_end = min(row_start + ROWS_PER_SPLIT, M)
    acc = tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + offs_m
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        lo_t = tl.load(
            lo_ptr + offs_r[:, None] * stride_lr + rows64[None, :] * stride_lm,
            mask=(offs_r[:, None] < R) & row_ok[None, :],
            other=0.0,
        )  # (R_PAD, BLOCK_M)
        p = tl.load(
            p_ptr + rows64[:, None] * stride_pm + cols_in[None, :] * stride_pn,
            mask=row_ok[:, None],
            other=0.0,
        )  # (BLOCK_M, BLOCK_N)
        acc = tl.dot(lo_t.to(p.dtype), p, acc, input_precision=DOT_PRECISION)
    part_ptrs = part_ptr + pid_s * stride_ps + offs_r[:, None] * stride_sr + cols[None, :] * stride_sn
    tl.store(part_ptrs, (acc * scale).to(part_ptr.dtype.element_ty), mask=(offs_r[:, None] < R) & (cols[None, :] < N))


@triton.jit
def _lora_grad_reduce_kernel(
    part_ptr,  # (SPLIT, NUMEL) fp32 split-K partials, contiguous
    out_ptr,  # (NUMEL,) out: their sum, in the gradient's dtype
    SPLIT,
    NUMEL,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NUMEL
    ptrs = part_ptr + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, SPLIT):  # fixed order: deterministic
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += NUMEL
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)
