"""Masked reductions over (B, T) token tensors.

Masks are applied by select (`torch.where`), never by multiplication, so NaN/inf sitting in masked
positions (padding, prompt tokens) cannot leak into a result or its gradient. `mask` may be bool or
numeric; nonzero means "counts".
"""

from __future__ import annotations

import torch


def _bool(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the tensor has {tuple(like.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    m = _bool(mask, x)
    selected = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim)


def masked_count(mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    m = mask if mask.dtype == torch.bool else mask != 0
    return m.sum() if dim is None else m.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over mask != 0 (along `dim`, or over everything); 0 where nothing is selected."""
    n = masked_count(mask, dim).clamp(min=1).to(x.dtype)
    return masked_sum(x, mask, dim) / n


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over all mask != 0 elements (Bessel-corrected by default); 0 for fewer than 2 elements."""
    m = _bool(mask, x)
    n = masked_count(m)
    centered = torch.where(m, x - masked_mean(x, m), torch.zeros((), dtype=x.dtype, device=x.device))
    denom = (n - 1 if unbiased else n).clamp(min=1).to(x.dtype)
    var = (centered * centered).sum() / denom
    return torch.where(n >= 2, var, torch.zeros_like(var))


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, all_reduce=None
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over mask != 0; masked positions come out 0.

    With `shift_mean=False` the mean is added back (scale-only whitening, as for value targets).
    `all_reduce` (a tensor -> its sum over data-parallel ranks): the mean and variance are those of every
    rank's selected elements, so each rank whitens its share of the batch exactly as one process would.
    """
    m = _bool(mask, x)
    # select first: garbage times the (finite) gradient of rsqrt(var) would otherwise be NaN
    x = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    mean, var = (masked_mean(x, m), masked_var(x, m)) if all_reduce is None else _global_mean_var(x, m, all_reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros((), dtype=x.dtype, device=x.device))


def _global_mean_var(x: torch.Tensor, m: torch.Tensor, all_reduce) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and Bessel-corrected variance of the selected elements of every rank (two passes, as masked_var)."""
    n = all_reduce(masked_count(m).to(x.dtype))
    mean = all_reduce(x.sum()) / n.clamp(min=1)  # x is already 0 where unselected
    centered = torch.where(m, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    var = all_reduce((centered * centered).sum()) / (n - 1).clamp(min=1)
    return mean, torch.where(n >= 2, var, torch.zeros_like(var))
