"""The torch backend's library paths (`rlhf_fast/kernels/library.py`) against the fp64 references:
the cuBLAS-first LoRA-linear (outputs and every gradient, odd shapes, non-contiguous inputs with NaN in
the gaps, uneven upstream gradients, compile fullgraph, autocast, no (tokens, out) temporaries) and SDPA
masked attention (zeros for rows without keys, no gradient from them)."""

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import assert_close_verbose, noncontiguous_with_garbage
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_fast import kernels
from rlhf_fast.kernels import library, reference


def _inputs(lead, in_f, out_f, r, dtype, *, bias=True, train_base=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(dtype)  # noqa: E731
    x = rand(*lead, in_f).requires_grad_()
    weight = rand(out_f, in_f, std=in_f**-0.5).requires_grad_(train_base)
    b = rand(out_f).requires_grad_(train_base) if bias else None
    lora_a = rand(r, in_f, std=in_f**-0.5).requires_grad_()
    lora_b = rand(out_f, r, std=r**-0.5).requires_grad_()  # random B: a zero B would hide dA bugs
    return x, weight, b, lora_a, lora_b


def _out_and_grads(fn, args, scale, grad_y=None):
    y = fn(*args, scale)
    if grad_y is None:  # uneven upstream gradient: rows of very different size
        g = torch.Generator().manual_seed(7)
        rows = torch.logspace(-2, 2, y.numel() // y.shape[-1], dtype=torch.float64).view(*y.shape[:-1], 1)
        grad_y = (torch.randn(y.shape, generator=g, dtype=torch.float64) * rows).to(y.dtype)
    leaves = [t for t in args if t is not None and t.requires_grad]
    return [y, *torch.autograd.grad(y, leaves, grad_y)], grad_y


def _fp64(args):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in args]


def _torch_backend(*a):
    return kernels.lora_linear(*a, backend="torch")


@pytest.mark.parametrize("lead,in_f,out_f,r,dtype,train_base,bias", [
    ((1,), 48, 100, 1, torch.float32, True, True),
    ((2, 5, 13), 100, 48, 33, torch.float32, False, False),
    ((130,), 768, 100, 16, torch.float32, True, False),
    ((7, 3), 100, 768, 4, torch.float64, False, True),
    ((10, 13), 100, 48, 16, torch.float16, True, True),
])
def test_lora_linear_cublas_matches_fp64_reference(lead, in_f, out_f, r, dtype, train_base, bias):
    args = _inputs(lead, in_f, out_f, r, dtype, train_base=train_base, bias=bias)
    got, grad_y = _out_and_grads(_torch_backend, args, 0.7)
    want, _ = _out_and_grads(reference.lora_linear, _fp64(args), 0.7, grad_y.double())
    # flash-attention's rule: no worse than twice PEFT's chain in the same dtype (+ a few ulps of the scale)
    peft, _ = _out_and_grads(reference.lora_linear, args, 0.7, grad_y)
    assert len(got) == len(want) == 4 + train_base + (train_base and bias)
    for i, (a, w, p) in enumerate(zip(got, want, peft)):
        assert a.dtype == dtype and a.shape == w.shape, i
        eps = torch.finfo(dtype).eps * w.abs().max().item()  # fp64: PEFT's chain is the reference itself
        peft_err = (p.double() - w).abs().max().item()
        assert_close_verbose(a, w, atol=2 * peft_err + 64 * eps, rtol=0, name=f"output/grad {i}")


def test_lora_linear_cublas_noncontiguous_inputs_with_nan_gaps():
    x, w, b, a, bb = _inputs((5, 9), 48, 100, 4, torch.float32)
    views = [noncontiguous_with_garbage(t) for t in (x, w, a, bb)]
    views.insert(2, b)  # a 1-D slice would be contiguous
    got, grad_y = _out_and_grads(_torch_backend, views, 2.0)
    want, _ = _out_and_grads(reference.lora_linear, _fp64(views), 2.0, grad_y.double())
    for a_, w_ in zip(got, want):
        assert torch.isfinite(a_).all()
        assert_close_verbose(a_, w_, atol=1e-5 * w_.abs().max().item(), rtol=1e-5)


def test_lora_linear_cublas_gradcheck_fp64():
    args = _inputs((3,), 4, 5, 2, torch.float64, train_base=True)
    assert torch.autograd.gradcheck(lambda *t: library.lora_linear_cublas(*t, 0.3), args)


class _Shapes(TorchDispatchMode):
    """Every ATen op's name and output shapes (what a call allocates)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        shapes = [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]
        self.ops.append((str(func.overloadpacket.__name__), shapes))
        return out


def test_lora_linear_cublas_makes_no_tokens_by_out_temporaries_and_no_side_ops():
    """Forward: addmm, mm, addmm_ (+ views); backward: five GEMMs, dX's low-rank term added in place, the
    scale applied to (N, r) / (r, out) tensors only. PEFT's chain allocates (N, out) three times."""
    N, IN, OUT = 37, 48, 100
    args = _inputs((N,), IN, OUT, 4, torch.float32)
    grad_y = torch.randn(N, OUT)
    with _Shapes() as ours:
        torch.autograd.grad(_torch_backend(*args, 2.0), [args[0], args[3], args[4]], grad_y)
    with _Shapes() as peft:
        torch.autograd.grad(reference.lora_linear(*args, 2.0), [args[0], args[3], args[4]], grad_y)
    compute = [name for name, _ in ours.ops if name not in ("view", "t", "reshape", "_unsafe_view", "transpose")]
    assert compute == ["addmm", "mm", "addmm_", "mm", "mul_", "mm", "addmm_", "mm", "mm", "mul_"], compute
    views = ("view", "t", "_unsafe_view", "reshape")
    big = lambda ops: sum((N, OUT) in shapes for name, shapes in ops  # noqa: E731
                          if name not in views and not name.endswith("_"))  # allocations, not in-place ops
    assert big(ours.ops) == 1  # y itself
    assert big(peft.ops) >= 3


def test_lora_linear_cublas_compiles_fullgraph_and_under_autocast():
    args = _inputs((3, 7), 48, 100, 4, torch.float32)
    compiled = torch.compile(lambda *t: kernels.lora_linear(*t, 0.5, backend="auto"), backend="aot_eager",
                             fullgraph=True)
    got, grad_y = _out_and_grads(lambda *t: compiled(*t[:-1]), args, 0.5)
    want, _ = _out_and_grads(reference.lora_linear, _fp64(args), 0.5, grad_y.double())
    for a_, w_ in zip(got, want):
        assert_close_verbose(a_, w_, atol=1e-5 * w_.abs().max().item(), rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # docs/precision.md: one dtype in, gradients to the masters
        y = kernels.lora_linear(*args, 0.5, backend="torch")
    assert y.dtype == torch.bfloat16
    torch.autograd.grad(y.float().sum(), [args[0], args[3], args[4]])


# ----------------------------------------------------------------------------------------------
# SDPA masked attention


@pytest.mark.parametrize("tq,tk,causal,masked", [(13, 13, True, True), (13, 13, True, False), (1, 29, True, True),
                                                 (5, 29, True, False), (13, 13, False, True), (13, 17, False, False)])
def test_sdpa_attention_matches_fp64_reference(tq, tk, causal, masked):
    g = torch.Generator().manual_seed(0)
    B, H, D = 3, 2, 16
    q, k, v = (torch.randn(B, H, t, D, generator=g).requires_grad_() for t in (tq, tk, tk))
    kpm = None
    if masked:  # left padding; row 2 has no real key at all (its rows must come out 0, with no gradient)
        kpm = torch.arange(tk)[None, :] >= torch.tensor([0, tk // 3, tk])[:, None]
    out = kernels.masked_attention(q, k, v, kpm, causal, backend="torch")
    do = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.masked_attention(*ref_in, kpm, causal)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    for a_, w_ in zip((out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(a_).all()
        assert_close_verbose(a_, w_, atol=2e-5, rtol=2e-5)
    if masked:
        assert (out[2] == 0).all() and (grads[0][2] == 0).all()


def test_lora_linear_cublas_with_a_separate_adapter_input_matches_peft_dropout():
    """PEFT's training path: the adapter sees dropout(x), the base x; gradients reach x through both."""
    x, w, b, a, bb = _inputs((4, 9), 48, 100, 4, torch.float64, train_base=True)
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) > 0.3

    def peft(x, w, b, a, bb, scale):
        u = torch.where(keep, x / 0.7, 0.0)
        return F.linear(x, w, b) + scale * F.linear(F.linear(u, a), bb)

    def ours(x, w, b, a, bb, scale):
        return kernels.lora_linear(x, w, b, a, bb, scale, lora_input=torch.where(keep, x / 0.7, 0.0))

    got, grad_y = _out_and_grads(ours, (x, w, b, a, bb), 1.5)
    want, _ = _out_and_grads(peft, (x, w, b, a, bb), 1.5, grad_y)
    for g_, w_ in zip(got, want):
        assert_close_verbose(g_, w_, atol=1e-12 * w_.abs().max().item(), rtol=1e-10)
    with pytest.raises(ValueError, match="no separate lora_input"):
        kernels.lora_linear(x, w, b, a, bb, 1.0, lora_input=x, backend="triton")
    with pytest.raises(ValueError, match="shaped like x"):
        kernels.lora_linear(x, w, b, a, bb, 1.0, lora_input=x[:1])
