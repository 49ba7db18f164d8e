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
The kernels are in `attention_kernels.py`; this module holds their configs, launchers and ops.
All three are `torch.library.triton_op`s (forward with a registered autograd formula) through
`launch.register_op`, so `torch.compile` keeps them in its graph instead of breaking around them, and
an eager call skips the dispatcher's custom-op layer (host cost, benchmarks/bench_host_overhead.py).
"""

import math
from typing import Optional

import torch

from . import launch
from .attention_kernels import (
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_decode_combine_kernel,
    _attn_decode_split_kernel,
    _attn_fwd_kernel,
)

LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DECODE_MAX_TQ = 4  # up to this many query rows over a longer KV cache take the split-KV decode path
_SCAN_BLOCK = 256  # mask elements read per step when a program finds its row's real-key range


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
