"""The shared kernel-test helpers must fail when they should: a lenient helper weakens every kernel test."""

import pytest
import torch
from kernel_testing import assert_close_verbose, assert_within_eager_error, noncontiguous_with_garbage

INF, NAN = float("inf"), float("nan")


def test_assert_close_verbose_reports_position_and_max_error():
    expected = torch.zeros(3, 4)
    actual = expected.clone()
    actual[1, 2] = 0.5
    with pytest.raises(AssertionError, match=r"1/12 elements mismatch.*max abs err 0.5.*\(1, 2\)"):
        assert_close_verbose(actual, expected, name="y")
    assert_close_verbose(actual, expected, atol=0.5, rtol=0)


@pytest.mark.parametrize("got,want", [(NAN, 1.0), (1.0, NAN), (INF, 1.0), (INF, -INF), (NAN, INF)])
def test_assert_close_verbose_fails_on_nonfinite_mismatch(got, want):
    with pytest.raises(AssertionError, match="NaN/inf mismatch"):
        assert_close_verbose(torch.tensor([0.0, got]), torch.tensor([0.0, want]), atol=1e9, rtol=1e9)


def test_assert_close_verbose_accepts_matching_nonfinite():
    t = torch.tensor([NAN, INF, -INF, 1.0])
    assert_close_verbose(t, t.clone())


def test_assert_within_eager_error():
    ref = torch.zeros(10)
    eager = torch.full((10,), 0.01)
    assert_within_eager_error(torch.full((10,), 0.015), eager, ref, atol=0)
    with pytest.raises(AssertionError, match="2.0 x eager error"):
        assert_within_eager_error(torch.full((10,), 0.03), eager, ref, atol=0)
    with pytest.raises(AssertionError, match="NaN"):
        assert_within_eager_error(torch.full((10,), NAN), eager, ref)


def test_noncontiguous_with_garbage():
    t = torch.randn(2, 3, 5, requires_grad=True)
    v = noncontiguous_with_garbage(t)
    assert not v.is_contiguous() and v.requires_grad and v.is_leaf and torch.equal(v, t)
    assert torch.isnan(v.as_strided((v.untyped_storage().nbytes() // 4,), (1,))).sum() == 2 * 3 * 3
