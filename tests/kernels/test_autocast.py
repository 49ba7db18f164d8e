"""Mixed precision through the kernel dispatch: under torch.autocast every matmul kernel takes its inputs
in the autocast dtype (both backends, fp32 master weights or low-precision weights, and the fp32
activations CUDA autocast's layer_norm produces); the RL kernels compute in fp32 whatever they get.

CPU autocast stands in for CUDA's: bf16 for the torch backend, fp16 for the Triton interpreter (which
has no bf16).
"""

import pytest
import torch
from kernel_testing import interpreter

from rlhf_fast import kernels
from rlhf_fast.kernels import reference

BACKENDS = [("torch", torch.bfloat16), pytest.param("triton", torch.float16, marks=interpreter)]


def _leaf(t, dtype):
    return t.to(dtype).detach().requires_grad_(True)


@pytest.mark.parametrize("backend,amp", BACKENDS)
@pytest.mark.parametrize("weights", ["fp32", "amp"])
@pytest.mark.parametrize("x_dtype", ["fp32", "amp"])  # fp32 x: CUDA autocast's layer_norm output
def test_lora_linear_takes_the_autocast_dtype(backend, amp, weights, x_dtype):
    g = torch.Generator().manual_seed(0)
    x0, w0, b0 = torch.randn(3, 7, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    a0, bb0 = torch.randn(5, 40, generator=g) * 0.3, torch.randn(24, 5, generator=g) * 0.3
    wd = torch.float32 if weights == "fp32" else amp
    x = _leaf(x0, torch.float32 if x_dtype == "fp32" else amp)
    w, b, a, bb = (_leaf(t, wd) for t in (w0, b0, a0, bb0))
    grad = torch.randn(3, 7, 24, generator=g).to(amp)
    with torch.autocast("cpu", dtype=amp):
        y = kernels.lora_linear(x, w, b, a, bb, 0.5, backend=backend)
    assert y.dtype == amp
    y.backward(grad)
    # Reference: the same maths in fp64 on the amp-rounded inputs; tolerance = a few amp ulps of |y|.
    r = [_leaf(t.to(amp), torch.float64) for t in (x0, w0, b0, a0, bb0)]
    y_ref = reference.lora_linear(*r, 0.5)
    y_ref.backward(grad.double())
    tol = dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    for got, want in zip((x, w, b, a, bb), r):
        assert got.grad.dtype == got.dtype  # gradients land on the masters in their own dtype
        torch.testing.assert_close(got.grad.double(), want.grad, atol=0.1, rtol=0.03)


@pytest.mark.parametrize("backend,amp", BACKENDS)
def test_masked_attention_takes_the_autocast_dtype(backend, amp):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 5, 16, generator=g).to(amp)  # from an autocast linear
    k, v = torch.randn(2, 3, 9, 16, generator=g), torch.randn(2, 3, 9, 16, generator=g)  # fp32 cache
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False
    with torch.autocast("cpu", dtype=amp):
        o = kernels.masked_attention(q, k, v, mask, backend=backend)
    assert o.dtype == amp
    want = reference.masked_attention(q.double(), k.to(amp).double(), v.to(amp).double(), mask)
    torch.testing.assert_close(o.double(), want, atol=0.03, rtol=0.02)


def test_mismatched_dtypes_without_autocast_are_named():
    x, w = torch.randn(2, 8), torch.randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="weight has dtype torch.bfloat16 but x has torch.float32"):
        kernels.lora_linear(x, w, None, torch.randn(2, 8), torch.randn(4, 2), 1.0, backend="torch")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter)])
def test_rl_kernels_compute_in_fp32(backend):
    g = torch.Generator().manual_seed(2)
    B, T = 3, 11
    rand = lambda: torch.randn(B, T, generator=g)  # noqa: E731
    mask = torch.rand(B, T, generator=g) > 0.3
    adv, ret = kernels.gae(rand().half(), rand().bfloat16(), mask, 0.99, 0.95, backend=backend)
    assert adv.dtype == ret.dtype == torch.float32
    lp = rand().bfloat16().requires_grad_(True)
    values = rand().half().requires_grad_(True)
    args = [rand() for _ in range(4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.ppo_loss(lp, args[0], args[1], values, args[2], args[3], mask, backend=backend)
    assert out.loss.dtype == torch.float32
    want = reference.ppo_loss(lp.float(), args[0], args[1], values.float(), args[2], args[3], mask)
    torch.testing.assert_close(out.loss, want.loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert lp.grad.dtype == torch.bfloat16 and values.grad.dtype == torch.float16
