"""Kernel test infrastructure shared by every kernel's tests (import as `from kernel_testing import ...`).

Two tiers:
- interpreter tier (default run, no GPU): backend="triton" on CPU tensors under TRITON_INTERPRET=1
  (set by tests/conftest.py), fp32/fp16, small odd shapes, fixed launch configs. Marked `interpreter`.
- GPU tier (marked `gpu`): GPT-2 shapes in bf16, judged by `assert_within_eager_error`: the kernel's
  error against an fp32 reference must be at most 2x the error of eager PyTorch in the same low
  precision, plus a small atol.
"""

from __future__ import annotations

import os

import pytest
import torch

interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="interpreter tier: needs TRITON_INTERPRET=1 (set automatically when there is no GPU)",
)

# Launch the interpreter tier's triton kernels on these tensors.
INTERPRET_DEVICE = "cpu"

DEFAULT_TOL = {  # (atol, rtol) for kernel vs reference at the same precision
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def _describe_mismatch(actual, expected, bad, name, atol, rtol, extra=""):
    diff = (actual - expected).abs()
    diff = torch.where(torch.isfinite(diff), diff, torch.full_like(diff, float("inf")))
    flat_idx = bad.flatten().nonzero().flatten()[:5]
    positions = [tuple(int(i) for i in torch.unravel_index(j, bad.shape)) for j in flat_idx]
    examples = ", ".join(f"{p}: got {actual[p].item():.6g}, want {expected[p].item():.6g}" for p in positions)
    return (f"{name}: {int(bad.sum())}/{bad.numel()} elements mismatch "
            f"(atol={atol:g}, rtol={rtol:g}{extra}); max abs err {diff.max().item():.3g}; "
            f"first at {examples}")


def assert_close_verbose(actual, expected, *, atol=None, rtol=None, name="output"):
    """assert_close with a report of max error and mismatch positions; NaN/inf must match exactly."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    d_atol, d_rtol = DEFAULT_TOL.get(actual.dtype, (1e-5, 1e-5))
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    nonfinite = ~torch.isfinite(a) | ~torch.isfinite(e)
    has_inf = nonfinite & ~torch.isnan(a) & ~torch.isnan(e)
    nan_mismatch = (torch.isnan(a) != torch.isnan(e)) | (has_inf & (a != e))
    if nan_mismatch.any():
        raise AssertionError(_describe_mismatch(a, e, nan_mismatch, name, atol, rtol, ", NaN/inf mismatch"))
    ok = torch.isclose(a, e, atol=atol, rtol=rtol) | (nonfinite & ~nan_mismatch)
    if not ok.all():
        raise AssertionError(_describe_mismatch(a, e, ~ok, name, atol, rtol))


def assert_within_eager_error(kernel_out, eager_out, ref_fp32, *, factor=2.0, atol=1e-3, name="output"):
    """flash-attention's rule: |kernel - ref| <= factor * |eager_lowprec - ref| + atol, elementwise max.

    `ref_fp32` is the reference computed in fp32 from the same (low-precision) inputs; `eager_out` is
    plain PyTorch run in the kernel's precision.
    """
    k, e, r = (t.detach().double().cpu() for t in (kernel_out, eager_out, ref_fp32))
    assert torch.isfinite(k).all(), f"{name}: kernel output has NaN/inf"
    kernel_err = (k - r).abs().max().item()
    eager_err = (e - r).abs().max().item()
    assert kernel_err <= factor * eager_err + atol, (
        f"{name}: kernel max error {kernel_err:.3g} > {factor} x eager error {eager_err:.3g} + {atol:g}")


def fill_masked(t: torch.Tensor, keep: torch.Tensor, value: float) -> torch.Tensor:
    """Copy of t with `value` (garbage: 1e4, nan, ...) wherever `keep` (broadcastable) is False."""
    return torch.where(keep, t, torch.full_like(t, value))


def noncontiguous_with_garbage(t: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    """A non-contiguous view equal to `t`, inside a buffer whose other elements are `value`.

    The last dim is padded by 3 garbage columns, so a kernel that ignores strides or reads past a row
    picks up `value` (NaN by default) and fails the comparison. A leaf, requiring grad like `t`.
    """
    buf = torch.full((*t.shape[:-1], t.shape[-1] + 3), value, dtype=t.dtype, device=t.device)
    buf[..., : t.shape[-1]] = t.detach()
    view = buf[..., : t.shape[-1]]
    assert not view.is_contiguous() or t.numel() <= 1
    return view.requires_grad_(t.requires_grad)
