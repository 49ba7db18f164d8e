"""Fused LoRA linear: y = x W^T + b + s (x A^T) B^T, forward and backward in Triton: `backend="triton"`.
`auto` picks it only where a GPU record shows it faster than the cuBLAS-first torch path (`library.py`,
`dispatch.py`).

Forward (two launches):
  1. `_lora_project_kernel`: xa = x A^T, (N, r) in fp32 - one read of x, the only activation saved
     besides x itself.
  2. `_lora_linear_fwd_kernel`: a tiled GEMM whose fp32 accumulator is seeded with s * xa B^T for its
     (BLOCK_M, BLOCK_N) tile before the K loop over x W^T, then gets the bias in the epilogue. The
     (N, out) LoRA product never exists in memory; it costs one extra K=R_PAD MMA per output tile
     (issued BLOCK_K ranks at a time, so rank 128 needs no more registers or shared memory than r = 8).
Backward:
  dyb = dY B (N, r) with the projection kernel; dX = dY W + s dyb A with the same seeded GEMM (one pass
  over W); dA = s dyb^T x and dB^T = s xa^T dY with `_lora_adapter_grad_kernel`, a split-K reduction
  over tokens: with one split it stores the scaled gradient in its dtype; with more, each split stores
  its scaled fp32 partial and `_lora_grad_reduce_kernel` sums them in a fixed order (deterministic, no
  atomics). dW (same GEMM kernel, no seed) and db only when they require grad - normally they are frozen.

Ranks below 16 are zero-padded to R_PAD = max(16, next_pow2(r)) in registers (masked loads), so every
tl.dot has K, M, N >= 16 as NVIDIA tensor cores require. All kernels take strides, so non-contiguous
weights/adapters work as views; x is flattened to (N, in) with reshape (a copy only when its leading
dims cannot be viewed flat). fp32 inputs use IEEE fp32 dots (as torch does by default, no TF32);
fp16/bf16 use tensor-core dots with fp32 accumulation, cast once at the store.

Launch configs come from per-(dtype, target) tables (`gemm_configs`, `project_config`, `grad_config`),
chosen for the launching device through `launch.arch` (the projection's row tile also by the token count,
to fill a wave of `launch.num_sms`); every entry fits its target's shared memory, and the 16-bit ones do
not spill registers (checked by cross-compiling, tests/kernels/cross_compile.py).

Registered as the torch.library.triton_ops `rlhf_fast::lora_linear_fwd` / `rlhf_fast::lora_linear_bwd`
(+ `rlhf_fast::lora_linear_bwd_weight`) with autograd, so torch.compile keeps them in the graph (under
TRITON_INTERPRET they are opaque custom_ops with fake impls instead); eager calls run the same bodies and
autograd formula without the dispatcher's custom-op layer (`launch.register_op` / `launch.Op`). Host code
counts: benchmarks/bench_host_overhead.py. The kernels themselves are in `lora_kernels.py`.
"""

from __future__ import annotations

import torch
import triton

from . import launch
from .lora_kernels import (
    _lora_adapter_grad_kernel,
    _lora_grad_reduce_kernel,
    _lora_linear_fwd_kernel,
    _lora_project_kernel,
)

MAX_RANK = 128  # the skinny kernels' (BLOCK_M, R_PAD) / (R_PAD, BLOCK_N) fp32 tiles are sized for R_PAD <= 128


# ----------------------------------------------------------------------------------------------
# Launch configs, per element size and target (see launch.py). A GEMM config's shared memory is about
# (BLOCK_M + BLOCK_N) * BLOCK_K * element bytes times num_stages - 1 (sm_80-89) or num_stages (sm_90,
# wgmma); it must fit the target's opt-in limit (99 KB on sm_86/89), and 16-bit configs must not spill.
# fp32 runs IEEE dots on CUDA cores: each thread holds its rows of p and columns of q over all of BLOCK_K
# in registers, so fp32 tiles keep BLOCK_K small.

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), keyed by (element bits, arch)
_FP32_GEMM = [(128, 128, 8, 8, 3), (64, 128, 8, 8, 3), (64, 64, 16, 4, 3), (32, 64, 8, 4, 3)]
_GEMM_TABLE = {
    (16, 80): [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 3), (64, 64, 64, 4, 4)],  # 128x256 spills
    (16, 86): [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4)],
    (16, 89): [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4)],
    (16, 90): [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 3), (64, 128, 64, 4, 4)],
    **{(32, arch): _FP32_GEMM for arch in launch.TARGETS},
}
# Skinny kernels: bandwidth-bound (K or N is the rank), so one config each, sized for R_PAD = 128.
# Projection: (BLOCK_K, num_warps, num_stages); its BLOCK_M is chosen per launch (`project_config`).
# Adapter grads: (BLOCK_M, BLOCK_N, num_warps, num_stages).
_PROJECT_TABLE = {
    (16, 80): (64, 4, 3), (16, 86): (64, 4, 2), (16, 89): (64, 4, 2), (16, 90): (64, 4, 3),
    **{(32, arch): (16, 4, 3) for arch in launch.TARGETS},
}
# The projection streams x once, one row tile per program: at 4,096 tokens 64-row tiles are 64 programs, half a
# wave of an H100's 132 SMs, so half its bandwidth idles. Per launch, the largest of these tiles whose grid
# fills one wave of the device's SMs is used (16 at least: tl.dot needs M >= 16). The price of a smaller tile:
# each program re-reads the (K, r) A^T (or B) tile, from L2 (it is small), once more per 16 rows.
_PROJECT_BLOCK_M = (64, 32, 16)
_GRAD_TABLE = {
    (16, 80): (64, 128, 8, 3), (16, 86): (64, 128, 8, 2), (16, 89): (64, 128, 8, 2), (16, 90): (64, 128, 8, 3),
    **{(32, arch): (16, 64, 4, 3) for arch in launch.TARGETS},
}
_REDUCE_BLOCKS = (1024, 512, 256, 128)  # elements per program of the split-K sum: the largest filling a wave
# The interpreter runs small fixed tiles (no tuning: it gains nothing from it).
_INTERPRET_GEMM = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})
_INTERPRET_PROJECT = (16, 32, 4, 1)  # (BLOCK_M, BLOCK_K, num_warps, num_stages)
_INTERPRET_GRAD = (16, 32, 4, 1)  # (BLOCK_M, BLOCK_N, num_warps, num_stages)


def _table_key(dtype: torch.dtype, arch: int) -> tuple[int, int]:
    """(element bits, the tabulated target whose limits `arch` shares)."""
    bits = 32 if dtype == torch.float32 else 16
    if arch not in launch.TARGETS:  # e.g. sm_120 (99 KB) -> sm_86's table, sm_100 (227 KB) -> sm_90's
        fits = [t for t in launch.TARGETS if launch.smem_limit(t) <= launch.smem_limit(arch)]
        arch = max(fits, key=lambda t: (launch.smem_limit(t), t), default=86)
    return bits, arch


def _gemm_config(bm, bn, bk, warps, stages) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


def gemm_configs(dtype: torch.dtype, arch: int) -> list[triton.Config]:
    """The autotune candidates of the GEMM kernel for `dtype` operands on sm_`arch`."""
    return [_gemm_config(*c) for c in _GEMM_TABLE[_table_key(dtype, arch)]]


def _project_meta(dtype: torch.dtype, arch: int, tokens: int | None, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) of the projection over `tokens` rows on `sms` SMs."""
    bk, warps, stages = _PROJECT_TABLE[_table_key(dtype, arch)]
    if tokens is None:
        return _PROJECT_BLOCK_M[0], bk, warps, stages
    bm = next((bm for bm in _PROJECT_BLOCK_M if launch.cdiv(tokens, bm) >= sms), _PROJECT_BLOCK_M[-1])
    return bm, bk, warps, stages


def project_config(dtype: torch.dtype, arch: int, tokens: int | None = None, sms: int = 1) -> triton.Config:
    """The projection's config for `tokens` rows on a GPU of `sms` SMs (tokens None: the largest tile)."""
    bm, bk, w, s = _project_meta(dtype, arch, tokens, sms)
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)


def grad_config(dtype: torch.dtype, arch: int) -> triton.Config:
    bm, bn, w, s = _GRAD_TABLE[_table_key(dtype, arch)]
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


def _prune_gemm_configs(configs, named_args, **kwargs):
    # Only the launching device's table: a config sized for an H100 never runs on a 99 KB card.
    p = named_args["p_ptr"]
    return gemm_configs(p.dtype, launch.arch(p.device))


# Autotuned per (power-of-two bucket of M, N, K, R_PAD, dtypes); a varying token count does not re-tune.
# `configs` lists every table's configs; the pruning keeps those of the launching device's table.
_ALL_GEMM = sorted({c for table in _GEMM_TABLE.values() for c in table})
_lora_linear_fwd_tuned = triton.autotune(
    configs=[_INTERPRET_GEMM] if launch.INTERPRET else [_gemm_config(*c) for c in _ALL_GEMM],
    key=["M_BUCKET", "N", "K", "R_PAD"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)(_lora_linear_fwd_kernel)


# ----------------------------------------------------------------------------------------------
# Host launchers (2-D operands, any strides)


def _rank_pad(r: int) -> int:
    return max(16, launch.next_pow2(r))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands


# Host code below uses launch.cdiv / launch.next_pow2, not triton.cdiv: those cost ~5 us per host call.


def _gemm(p, q, out, lo=None, up=None, bias=None, scale: float = 0.0):
    """out (M, N) = p (M, K) @ q (K, N) [+ scale * lo (M, R) @ up (R, N)] [+ bias (N,)].

    `out` is any contiguous tensor of M * N elements (e.g. y (..., out)), written as row-major (M, N):
    passing the tensor itself rather than a 2-D view keeps compile's functionalization of the kernel's
    writes simple (no mutated views)."""
    M, K = p.shape
    N = q.shape[1]
    assert q.shape[0] == K and out.is_contiguous() and out.numel() == M * N, (p.shape, q.shape, out.shape)
    if M == 0 or N == 0:
        return out
    has_lora = lo is not None
    if has_lora:
        assert lo.shape[0] == M and lo.shape[1] == up.shape[0] and up.shape[1] == N and lo.dtype == torch.float32
    R = up.shape[0] if has_lora else 0
    lo_t, up_t = (lo, up) if has_lora else (p, q)  # unused placeholders when there is no seed
    cdiv = launch.cdiv
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    launch.wrap(_lora_linear_fwd_tuned)[grid](
        p, q, lo_t, up_t, bias if bias is not None else out, out,
        M, N, K, R, min(launch.next_pow2(M), 1 << 16),
        *p.stride(), *q.stride(), *lo_t.stride(), *up_t.stride(), N, 1,
        scale,
        HAS_LORA=has_lora, HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(p.dtype),
        R_PAD=_rank_pad(R) if has_lora else 16,
    )  # fmt: skip
    return out


def _project(p, q):
    """(M, R) fp32 = p (M, K) @ q (K, R), R <= MAX_RANK."""
    M, K = p.shape
    R = q.shape[1]
    z = torch.empty((M, R), dtype=torch.float32, device=p.device)
    if M == 0:
        return z
    if launch.INTERPRET:
        bm, bk, warps, stages = _INTERPRET_PROJECT
    else:
        bm, bk, warps, stages = _project_meta(p.dtype, launch.arch(p.device), M, launch.num_sms(p.device))
    launch.wrap(_lora_project_kernel)[(launch.cdiv(M, bm),)](
        p, q, z, M, K, R, *p.stride(), *q.stride(), *z.stride(),
        DOT_PRECISION=_dot_precision(p.dtype), R_PAD=_rank_pad(R), BLOCK_M=bm, BLOCK_K=bk,
        num_warps=warps, num_stages=stages,  # no num_ctas: wrap_triton refuses it
    )  # fmt: skip
    return z


def _adapter_grad(lo, p, scale: float, dtype: torch.dtype, transposed: bool = False):
    """scale * lo (M, R)^T @ p (M, N) as an (R, N) tensor of `dtype` ((N, R) if transposed), reduced over M in
    deterministic split-K: one launch when a single split fills the GPU, else a second one sums the splits."""
    M, R = lo.shape
    N = p.shape[1]
    device = p.device
    shape = (N, R) if transposed else (R, N)
    if M == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    out = torch.empty(shape, dtype=dtype, device=device)
    if N == 0:
        return out
    cdiv = launch.cdiv
    block_m, block_n, warps, stages = _INTERPRET_GRAD if launch.INTERPRET else _GRAD_TABLE[
        _table_key(p.dtype, launch.arch(device))]
    n_col = cdiv(N, block_n)
    sms = launch.num_sms(device)
    split = max(1, min(cdiv(M, block_m), cdiv(2 * sms, n_col)))  # enough (column, split) programs
    rows_per_split = cdiv(cdiv(M, split), block_m) * block_m
    split = cdiv(M, rows_per_split)
    # Every element of `part` is stored (each split writes its columns' R rows): empty, not zeros.
    part = out if split == 1 else torch.empty((split, *shape), dtype=torch.float32, device=device)
    stride_r, stride_n = (part.stride(-1), part.stride(-2)) if transposed else (part.stride(-2), part.stride(-1))
    launch.wrap(_lora_adapter_grad_kernel)[(n_col, split)](
        lo, p, part, M, N, R, rows_per_split, *lo.stride(), *p.stride(),
        part.stride(0) if split > 1 else 0, stride_r, stride_n, scale,
        DOT_PRECISION=_dot_precision(p.dtype), R_PAD=_rank_pad(R), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages,  # no num_ctas: wrap_triton refuses it
    )  # fmt: skip
    if split > 1:
        numel = R * N
        block = next((b for b in _REDUCE_BLOCKS if cdiv(numel, b) >= sms), _REDUCE_BLOCKS[-1])
        launch.wrap(_lora_grad_reduce_kernel)[(cdiv(numel, block),)](
            part, out, split, numel, BLOCK=block, num_warps=4
        )
    return out


def _check_inputs(x, weight, bias, lora_a, lora_b):
    """Checks for direct calls of the torch ops (the public dispatch has validated most of this)."""
    name = "lora_linear (triton)"
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b}
    for arg, t in tensors.items():
        if t is None:
            continue
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name}: {arg} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: {arg} has dtype {t.dtype} but x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but x is on {x.device}")
    launch.require_launchable(x.device, name)
    if launch.INTERPRET and x.dtype == torch.bfloat16:
        raise TypeError(f"{name}: the Triton interpreter has no bfloat16; use float32/float16 or a GPU")
    if weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2 or x.dim() < 1:
        raise ValueError(
            f"{name}: weight, lora_a, lora_b must be 2-D and x at least 1-D, got x "
            f"{tuple(x.shape)}, weight {tuple(weight.shape)}, lora_a {tuple(lora_a.shape)}, "
            f"lora_b {tuple(lora_b.shape)}"
        )
    out_f, in_f = weight.shape
    r = lora_a.shape[0]
    if x.shape[-1] != in_f or lora_a.shape[1] != in_f or tuple(lora_b.shape) != (out_f, r):
        raise ValueError(
            f"{name}: shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"lora_a {tuple(lora_a.shape)} (want (r, {in_f})), lora_b {tuple(lora_b.shape)} "
            f"(want ({out_f}, r))"
        )
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"{name}: bias must be ({out_f},), got {tuple(bias.shape)}")
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"{name}: rank {r} outside 1..{MAX_RANK}; use backend='torch' for larger ranks")


# ----------------------------------------------------------------------------------------------
# torch.library ops + autograd


def _lora_linear_fwd_fake(x, weight, bias, lora_a, lora_b, scale):
    _check_inputs(x, weight, bias, lora_a, lora_b)
    n = x.numel() // x.shape[-1]
    return (
        x.new_empty((*x.shape[:-1], weight.shape[0])),
        x.new_empty((n, lora_a.shape[0]), dtype=torch.float32),
    )


def _lora_linear_bwd_fake(grad_y, x, weight, lora_a, lora_b, xa, scale, need_grad_x, need_grad_adapter):
    # A fresh tensor per output, even for unneeded (empty) ones: outputs of an op may not alias.
    return (
        x.new_empty(x.shape if need_grad_x else (0,)),
        lora_a.new_empty(lora_a.shape if need_grad_adapter else (0,)),
        lora_b.new_empty(lora_b.shape if need_grad_adapter else (0,)),
    )


def _lora_linear_bwd_weight_fake(grad_y, x):
    return x.new_empty((grad_y.shape[-1], x.shape[-1]))


@launch.register_op("rlhf_fast::lora_linear_fwd", _lora_linear_fwd_fake)
def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y (..., out), xa (N, r) fp32 = x A^T): xa is the activation saved for backward."""
    _check_inputs(x, weight, bias, lora_a, lora_b)
    out_f, in_f = weight.shape
    x2 = x.reshape(-1, in_f)  # (N, in)
    xa = _project(x2, lora_a.t())  # (N, r) fp32
    y = torch.empty((*x.shape[:-1], out_f), dtype=x.dtype, device=x.device)
    _gemm(x2, weight.t(), y, lo=xa, up=lora_b.t(), bias=bias, scale=scale)
    return y, xa


@launch.register_op("rlhf_fast::lora_linear_bwd", _lora_linear_bwd_fake)
def lora_linear_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    xa: torch.Tensor,
    scale: float,
    need_grad_x: bool,
    need_grad_adapter: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (..., in), dA (r, in), dB (out, r)); an unneeded gradient comes back as a fresh empty tensor
    (one per output: outputs of an op may not alias each other)."""
    out_f, in_f = weight.shape
    dy = grad_y.reshape(-1, out_f)  # (N, out)
    dyb = _project(dy, lora_b)  # (N, r) fp32 = dY B
    dx = x.new_empty(x.shape if need_grad_x else (0,))
    if need_grad_x:
        _gemm(dy, weight, dx, lo=dyb, up=lora_a, scale=scale)
    if need_grad_adapter:
        x2 = x.reshape(-1, in_f)
        da = _adapter_grad(dyb, x2, scale, x.dtype)  # (r, in) = s dyb^T x
        db = _adapter_grad(xa, dy, scale, x.dtype, transposed=True)  # (out, r) = s dY^T xa
    else:
        da, db = x.new_empty(0), x.new_empty(0)
    return dx, da, db


@launch.register_op("rlhf_fast::lora_linear_bwd_weight", _lora_linear_bwd_weight_fake)
def lora_linear_bwd_weight(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW (out, in) = dY^T x over all tokens; only used when the base weight is trainable."""
    out_f, in_f = grad_y.shape[-1], x.shape[-1]
    dy, x2 = grad_y.reshape(-1, out_f), x.reshape(-1, in_f)
    dw = torch.empty((out_f, in_f), dtype=x.dtype, device=x.device)
    return _gemm(dy.t(), x2, dw)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale = inputs
    _, xa = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
    ctx.scale = scale
    ctx.mark_non_differentiable(xa)
    ctx.set_materialize_grads(False)  # xa's gradient stays None: no (N, r) zeros made per backward


def _backward(ctx, grad_y, _grad_xa):
    x, weight, lora_a, lora_b, xa = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    dx, da, db = lora_linear_bwd(grad_y, x, weight, lora_a, lora_b, xa, ctx.scale, need_x, need_a or need_bb)
    dw = lora_linear_bwd_weight(grad_y, x) if need_w else None
    dbias = grad_y.reshape(-1, weight.shape[0]).sum(0, dtype=torch.float32).to(grad_y.dtype) if need_b else None
    return (dx if need_x else None, dw, dbias, da if need_a else None, db if need_bb else None, None)


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(x, weight, bias, lora_a, lora_b, scale: float):
    """x @ weight.T + bias + scale * (x @ lora_a.T) @ lora_b.T through the fused Triton kernels."""
    return lora_linear_fwd(x, weight, bias, lora_a, lora_b, float(scale))[0]
