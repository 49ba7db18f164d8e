"""The torch backend: the best library arrangement of each matmul kernel (any device).

- `lora_linear_cublas`: the base GEMM stays one cuBLAS call and the low-rank term is added into its
  output in place (LoRAFusion's and unsloth's arrangement), forward and backward; no (tokens, out)
  temporaries, no side ops. PEFT's chain (`reference.lora_linear`) computes the same thing with an extra
  (tokens, out) product, scale and add, and stays as the oracle and the benchmarks' baseline.
- `masked_attention_sdpa`: PyTorch's scaled_dot_product_attention (flash / memory-efficient / cuDNN
  backends on GPUs) with the causal + key-padding rule of DESIGN.md; rows with no visible key are 0.

`kernels/__init__.py` validates inputs and applies autocast before either is called.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import attention_visibility

# ----------------------------------------------------------------------------------------------
# LoRA linear


class _LoRALinear(torch.autograd.Function):
    """y = addmm(b, x, W^T); y += s (u A^T) B^T in place, u = the adapter's input (x, or dropout(x) while
    training). Saves x (and u when it differs) and xa = u A^T (N, r), like PEFT.

    Backward: dyb = s dY B (s folded into the (N, r) tensor once); dx = dY W, then dx += dyb A in place
    when u is x (else dyb A is u's gradient, which flows back through the dropout); dA = dyb^T u;
    dB = s dY^T xa; dW = dY^T x and db = sum dY only when the base trains.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, lora_input):
        out_f, in_f = weight.shape
        x2 = x.reshape(-1, in_f)  # (N, in)
        u2 = x2 if lora_input is None else lora_input.reshape(-1, in_f)
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())  # (N, out)
        xa = torch.mm(u2, lora_a.t())  # (N, r)
        y.addmm_(xa, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x2, None if lora_input is None else u2, weight, lora_a, lora_b, xa)
        ctx.scale, ctx.x_shape = scale, x.shape
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, grad_y):
        x2, u2, weight, lora_a, lora_b, xa = ctx.saved_tensors
        separate = u2 is not None  # the adapter saw dropout(x), not x
        u2 = x2 if u2 is None else u2
        need_x, need_w, need_bias, need_a, need_b, _, need_u = ctx.needs_input_grad
        dy = grad_y.reshape(-1, weight.shape[0])  # (N, out)
        dx = dw = dbias = da = db = du = None
        if need_x or need_a or need_u:
            dyb = torch.mm(dy, lora_b).mul_(ctx.scale)  # (N, r) = s dY B
            if need_x:
                dx = torch.mm(dy, weight)
                if not separate:
                    dx.addmm_(dyb, lora_a)
                dx = dx.view(ctx.x_shape)
            if need_u and separate:
                du = torch.mm(dyb, lora_a).view(ctx.x_shape)
            if need_a:
                da = torch.mm(dyb.t(), u2)  # (r, in)
        if need_b:
            db = torch.mm(xa.t(), dy).mul_(ctx.scale).t()  # (out, r); xa^T dY is the faster layout on CPU
        if need_w:
            dw = torch.mm(dy.t(), x2)
        if need_bias:
            dbias = dy.sum(0)
        return dx, dw, dbias, da, db, None, du


def lora_linear_cublas(x, weight, bias, lora_a, lora_b, scale: float, lora_input=None):
    """x @ weight.T + bias + scale * (u @ lora_a.T) @ lora_b.T, cuBLAS-first (see the module docstring);
    u = lora_input (the adapter's input, e.g. dropout(x) while training) or x."""
    return _LoRALinear.apply(x, weight, bias, lora_a, lora_b, scale, lora_input)


# ----------------------------------------------------------------------------------------------
# Masked attention


def masked_attention_sdpa(q, k, v, key_padding_mask=None, causal: bool = True, sm_scale: float | None = None):
    """SDPA in the inputs' dtype with bottom-right causal + key-padding masking; (B, H, Tq, D).

    Without padding a square causal call takes SDPA's is_causal path (flash on GPUs). Otherwise the
    boolean mask goes in; a row that sees no key is given every key (so its softmax is finite and, with
    a zero output gradient, passes no gradient) and its output is then set to 0.
    """
    tq, tk = q.shape[2], k.shape[2]
    if key_padding_mask is None and (not causal or tq == tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale)
    visible = attention_visibility(tq, tk, key_padding_mask, causal, q.device)
    has_key = visible.any(dim=-1, keepdim=True)  # (B|1, 1, Tq, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~has_key, scale=sm_scale)
    return torch.where(has_key, out, 0.0)
