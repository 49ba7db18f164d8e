import pytest
import torch

from rlhf_fast.rl import masked_count, masked_mean, masked_sum, masked_var, masked_whiten


def _data(seed=0, B=4, T=13):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, generator=gen) * 3 + 1
    mask = torch.rand(B, T, generator=gen) > 0.4
    mask[0] = False  # an empty row
    return torch.where(mask, x, torch.tensor(float("nan"))), mask


def test_masked_stats_match_selection_and_ignore_nan_garbage():
    x, mask = _data()
    sel = x[mask].double()
    assert masked_count(mask).item() == mask.sum().item()
    torch.testing.assert_close(masked_sum(x, mask).double(), sel.sum(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(masked_mean(x, mask).double(), sel.mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(masked_var(x, mask).double(), sel.var(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        masked_var(x, mask, unbiased=False).double(), sel.var(unbiased=False), rtol=1e-5, atol=1e-6
    )
    row_means = masked_mean(x, mask, dim=1)
    assert row_means[0].item() == 0.0  # empty row: 0, not NaN
    for b in range(1, x.shape[0]):
        torch.testing.assert_close(row_means[b], x[b][mask[b]].mean())


def test_masked_whiten_and_gradients_stay_finite():
    x, mask = _data(1)
    x = x.requires_grad_(True)
    w = masked_whiten(x, mask)
    assert (w[~mask] == 0).all()
    torch.testing.assert_close(masked_mean(w, mask), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(masked_var(w, mask), torch.tensor(1.0), atol=1e-4, rtol=0)
    w.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
    kept = masked_whiten(x.detach(), mask, shift_mean=False)
    torch.testing.assert_close(masked_mean(kept, mask), masked_mean(x.detach(), mask), atol=1e-5, rtol=1e-5)


def test_masked_degenerate_and_bad_input():
    x = torch.randn(2, 3)
    none = torch.zeros(2, 3, dtype=torch.bool)
    assert masked_mean(x, none).item() == 0.0 and masked_var(x, none).item() == 0.0
    one = none.clone()
    one[1, 2] = True
    assert masked_var(x, one).item() == 0.0  # a single element has no spread
    assert masked_mean(x, one.float()).item() == x[1, 2].item()  # numeric masks work too
    with pytest.raises(ValueError, match="mask has shape"):
        masked_mean(x, torch.ones(3, 2, dtype=torch.bool))
