"""Fused lm-head log-probs (`kernels.linear_logprobs`): Triton kernel and chunked torch reference vs an
unchunked fp64 log-softmax written out here.

Every case checks log-prob, entropy and logsumexp and the gradients of hidden and (when trained) weight
under uneven per-token upstream gradients on all three outputs, with ignored targets (< 0) whose hidden
rows hold NaN. Interpreter tier: odd N, V = 50257 (a partial last vocabulary tile), temperature != 1,
several backward chunks, fp32/fp16. GPU tier (`gpu`): GPT-2 shapes in bf16 under the 2x-eager rule.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import assert_close_verbose, assert_within_eager_error, interpreter

from rlhf_fast import kernels
from rlhf_fast.kernels import reference

IGNORE = -100
pytestmark = pytest.mark.filterwarnings("ignore:.*(All-NaN|invalid value):RuntimeWarning")  # NaN rows on purpose


def _kernel_module():
    from rlhf_fast.kernels import logprobs  # lazily: importing it imports triton

    return logprobs


def _inputs(lead, C, V, dtype, device="cpu", *, train_weight=False, seed=0, garbage=float("nan")):
    """hidden (*lead, C), weight (V, C) with logits of O(3), targets (*lead) with every 5th ignored (its
    hidden row set to `garbage`)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, C, generator=g)
    weight = torch.randn(V, C, generator=g) * 3 * C**-0.5
    targets = torch.randint(0, V, lead, generator=g)
    targets.view(-1)[::5] = IGNORE
    targets.view(-1)[1] = V - 1  # the last vocabulary column, in the partial tile
    hidden[targets == IGNORE] = garbage
    return (hidden.to(dtype).to(device).requires_grad_(), weight.to(dtype).to(device).requires_grad_(train_weight),
            targets.to(device))


def _upstream(lead, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*lead, generator=g) * s).to(device) for s in (1.0, 0.5, 0.25)]  # garbage where ignored too


def _run(fn, hidden, weight, targets, temperature, with_entropy, grads, **kw):
    out = fn(hidden, weight, targets, temperature=temperature, with_entropy=with_entropy, **kw)
    loss = (out.logprobs * grads[0]).sum() + (out.logsumexp * grads[2]).sum()
    if with_entropy:
        loss = loss + (out.entropy * grads[1]).sum()
    wrt = [t for t in (hidden, weight) if t.requires_grad]
    return out, torch.autograd.grad(loss, wrt)


def _truth(hidden, weight, targets, temperature, with_entropy, grads):
    """Unchunked fp64 log-softmax over the full (N, V) logits: the ground truth."""
    use = targets != IGNORE
    h = torch.where(use.unsqueeze(-1), hidden.detach().double(), 0.0).requires_grad_()
    w = weight.detach().double().requires_grad_(weight.requires_grad)
    z = F.linear(h, w) / temperature
    logp = torch.log_softmax(z, dim=-1)
    lp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    lse = torch.logsumexp(z, dim=-1)
    lp, ent, lse = (torch.where(use, t, 0.0) for t in (lp, ent, lse))
    loss = (lp * grads[0].double()).sum() + (lse * grads[2].double()).sum()
    if with_entropy:
        loss = loss + (ent * grads[1].double()).sum()
    wrt = [t for t in (h, w) if t.requires_grad]
    return reference.LinearLogprobsOutput(lp, ent if with_entropy else None, lse), torch.autograd.grad(loss, wrt)


def _check(got, want, tol, grad_tol):
    (out, grads), (ref_out, ref_grads) = got, want
    for name in ("logprobs", "entropy", "logsumexp"):
        a, b = getattr(out, name), getattr(ref_out, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == torch.float32 or a.dtype == torch.float64, (name, a.dtype)
            assert_close_verbose(a, b, atol=tol, rtol=tol, name=name)
    for name, a, b in zip(("d_hidden", "d_weight"), grads, ref_grads):
        assert torch.isfinite(a).all(), f"{name} has NaN/inf (leaked from an ignored row?)"
        assert_close_verbose(a, b, atol=grad_tol, rtol=grad_tol, name=name)


def _triton(*args, **kw):
    return kernels.linear_logprobs(*args, backend="triton", **kw)


def _torch(*args, **kw):
    return kernels.linear_logprobs(*args, backend="torch", **kw)


# lead, C, V, dtype, temperature, with_entropy, train_weight, chunk_tokens
CASES = [
    ((3, 7), 40, 50257, torch.float32, 0.7, True, False, None),  # GPT-2's vocabulary: partial last tile
    ((37,), 24, 1001, torch.float32, 1.0, True, True, 16),  # three backward chunks, the last partial
    ((2, 9), 48, 333, torch.float16, 1.3, True, True, 16),
    ((5, 3), 32, 517, torch.float32, 0.5, False, True, None),
]
TOL = {torch.float32: (2e-5, 5e-5), torch.float16: (2e-5, 3e-3)}  # (outputs: fp32 maths; grads stored in dtype)


@interpreter
@pytest.mark.parametrize("lead,C,V,dtype,tau,ent,train_w,chunk", CASES)
@pytest.mark.parametrize("fn", [_triton, _torch], ids=["triton", "torch"])
def test_matches_fp64_log_softmax(fn, lead, C, V, dtype, tau, ent, train_w, chunk):
    hidden, weight, targets = _inputs(lead, C, V, dtype, train_weight=train_w)
    grads = _upstream(lead, "cpu")
    got = _run(fn, hidden, weight, targets, tau, ent, grads, chunk_tokens=chunk)
    tol, grad_tol = TOL[dtype]
    _check(got, _truth(hidden, weight, targets, tau, ent, grads), tol, grad_tol)
    out, (d_hidden, *_) = got
    ignored = targets == IGNORE
    assert (out.logprobs[ignored] == 0).all() and (d_hidden[ignored] == 0).all()
    assert (out.logprobs[~ignored] < 0).all()


@pytest.mark.parametrize("shift", [-300.0, 300.0])
@pytest.mark.parametrize("fn", [pytest.param(_triton, marks=interpreter), _torch], ids=["triton", "torch"])
def test_extreme_logits_do_not_overflow_or_underflow(fn, shift):
    # A column shared by every vocabulary row moves all logits by `shift`: log-probs and entropy must not
    # change, and exp() of them must neither overflow nor underflow to log(0).
    hidden, weight, targets = _inputs((11,), 16, 300, torch.float32, train_weight=True, garbage=0.0)
    hidden = torch.cat([hidden.detach(), torch.full((11, 1), shift)], dim=1).requires_grad_()
    weight = torch.cat([weight.detach(), torch.ones(300, 1)], dim=1).requires_grad_()
    grads = _upstream((11,), "cpu")
    got = _run(fn, hidden, weight, targets, 1.0, True, grads)
    _check(got, _truth(hidden, weight, targets, 1.0, True, grads), 5e-5, 5e-4)


@interpreter
@pytest.mark.parametrize("used", ["logprobs", "entropy", "logsumexp", "logprobs+entropy"])
def test_gradient_through_some_outputs_only(used):
    """A loss on some outputs leaves the others' gradients None (the Triton backward's HAS_LSE / no-g_lp paths):
    both backends still match the fp64 truth, whose loss uses the same outputs."""
    hidden, weight, targets = _inputs((4, 5), 24, 517, torch.float32, train_weight=True)
    grads = _upstream((4, 5), "cpu")
    keep = [name in used for name in ("logprobs", "entropy", "logsumexp")]
    grads = [g if k else torch.zeros_like(g) for g, k in zip(grads, keep)]
    want = _truth(hidden, weight, targets, 0.8, True, grads)[1]
    for fn in (_triton, _torch):
        out = fn(hidden, weight, targets, temperature=0.8, with_entropy=True)
        loss = sum((t * g).sum() for t, g, k in zip((out.logprobs, out.entropy, out.logsumexp), grads, keep) if k)
        got = torch.autograd.grad(loss, (hidden, weight))
        for name, a, b in zip(("d_hidden", "d_weight"), got, want):
            assert torch.isfinite(a).all(), name
            assert_close_verbose(a, b, atol=5e-5, rtol=5e-5, name=f"{fn.__name__} {name}")


def test_reference_is_exact_in_fp64():
    hidden, weight, targets = _inputs((4, 5), 12, 97, torch.float64, train_weight=True)
    grads = _upstream((4, 5), "cpu")
    got = _run(_torch, hidden, weight, targets, 0.8, True, grads, chunk_tokens=3)
    _check(got, _truth(hidden, weight, targets, 0.8, True, grads), 1e-12, 1e-12)


@interpreter
@pytest.mark.parametrize("fn", [_triton, _torch], ids=["triton", "torch"])
def test_chunk_size_does_not_change_the_result(fn):
    hidden, weight, targets = _inputs((23,), 32, 300, torch.float32, train_weight=True)
    grads = _upstream((23,), "cpu")
    base = _run(fn, hidden, weight, targets, 1.0, True, grads)
    for chunk in (1, 7, 16):
        _check(_run(fn, hidden, weight, targets, 1.0, True, grads, chunk_tokens=chunk), base, 1e-6, 1e-5)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=interpreter), "torch"])
def test_nothing_of_size_tokens_times_vocab_is_saved_for_backward(backend):
    N, C, V = 64, 16, 4099
    hidden, weight, targets = _inputs((N,), C, V, torch.float32, train_weight=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = kernels.linear_logprobs(hidden, weight, targets, with_entropy=True, backend=backend)
    assert saved and max(saved) <= V * C  # the weight itself; logits would be N * V = 16 x that
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert weight.grad is not None and hidden.grad is not None


def test_autocast_feeds_the_autocast_dtype_and_keeps_fp32_masters():
    hidden, weight, targets = _inputs((6,), 16, 50, torch.float32, train_weight=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.linear_logprobs(hidden, weight, targets, with_entropy=True, backend="torch")
    assert out.logprobs.dtype == torch.float32
    out.logprobs.sum().backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    want, _ = _truth(hidden.bfloat16(), weight.bfloat16(), targets, 1.0, True, _upstream((6,), "cpu"))
    assert_close_verbose(out.logprobs, want.logprobs, atol=1e-4, rtol=1e-4, name="logprobs")


@interpreter
@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(targets=torch.zeros(5, dtype=torch.float32)), TypeError, "targets must be an integer"),
        (dict(targets=torch.zeros(4, dtype=torch.long)), ValueError, r"targets must be \(5,\)"),
        (dict(targets=torch.full((5,), 40)), ValueError, "target id 40 is out of range for a vocabulary of 40"),
        (dict(weight=torch.randn(40, 9)), ValueError, "need hidden"),
        (dict(weight=torch.randn(40, 8, dtype=torch.float16)), TypeError, "weight has dtype"),
        (dict(temperature=0.0), ValueError, "temperature must be a positive"),
        (dict(chunk_tokens=0), ValueError, "chunk_tokens"),
        (dict(hidden=torch.randn(5, 8).bfloat16(), weight=torch.randn(40, 8).bfloat16()), TypeError, "bfloat16"),
    ],
)
def test_bad_input_raises_clear_error(change, exc, match):
    args = dict(hidden=torch.randn(5, 8), weight=torch.randn(40, 8), targets=torch.zeros(5, dtype=torch.long))
    args.update(change)
    with pytest.raises(exc, match=match):
        kernels.linear_logprobs(**args, backend="triton")


@interpreter
def test_registered_op_passes_opcheck():
    _kernel_module()
    hidden, weight, targets = _inputs((9,), 16, 70, torch.float32, train_weight=True)
    torch.library.opcheck(
        torch.ops.rlhf_fast.linear_logprobs_fwd.default,
        (hidden, weight, targets, 0.9, True, 4),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@interpreter
def test_torch_compile_fullgraph_keeps_the_op():
    fn = _kernel_module().linear_logprobs
    hidden, weight, targets = _inputs((2, 5), 16, 70, torch.float32, train_weight=True)
    grads = _upstream((2, 5), "cpu")
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    _check(_run(compiled, hidden, weight, targets, 0.9, True, grads),
           _run(fn, hidden, weight, targets, 0.9, True, grads), 1e-6, 1e-6)


def test_lm_head_logprobs_match_the_model_logits():
    from rlhf_fast.model import GPT

    torch.manual_seed(0)
    model = GPT.from_preset("tiny", kernel_backend="torch", attn_backend="torch").double()
    ids = torch.randint(0, 320, (2, 9))
    h = model.hidden_states(ids)
    out = model.lm_head(h[:, :-1], ids[:, 1:], temperature=0.9, with_entropy=True)
    logp = torch.log_softmax(model(ids)[:, :-1] / 0.9, dim=-1)
    torch.testing.assert_close(out.logprobs, logp.gather(-1, ids[:, 1:, None]).squeeze(-1))
    torch.testing.assert_close(out.entropy, -(logp.exp() * logp).sum(-1))


# ----------------------------------------------------------------------------------------------
# GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("lead,C,train_w", [((4, 129), 768, False), ((2, 384), 1600, True)])
def test_gpu_bf16_within_eager_error(lead, C, train_w):
    hidden, weight, targets = _inputs(lead, C, 50257, torch.bfloat16, "cuda", train_weight=train_w)
    grads = _upstream(lead, "cuda")
    got, got_g = _run(_triton, hidden, weight, targets, 0.7, True, grads)

    def eager(h, w, t, temperature, with_entropy):  # what the model did before: bf16 logits, fp32 softmax
        logp = torch.log_softmax(F.linear(torch.where((t >= 0).unsqueeze(-1), h, 0.0), w).float() / temperature, -1)
        use = t >= 0
        lp = torch.where(use, logp.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
        ent = torch.where(use, -(logp.exp() * logp).sum(-1), 0.0)
        lse = torch.where(use, torch.logsumexp(F.linear(h, w).float() / temperature, -1), 0.0)
        return reference.LinearLogprobsOutput(lp, ent, lse)

    eag, eag_g = _run(eager, hidden, weight, targets, 0.7, True, grads)
    up = [t.detach().float().requires_grad_(t.requires_grad) for t in (hidden, weight)]
    ref, ref_g = _run(_torch, *up, targets, 0.7, True, grads)
    for name in ("logprobs", "entropy", "logsumexp"):
        assert_within_eager_error(getattr(got, name), getattr(eag, name), getattr(ref, name), atol=1e-2, name=name)
    for name, a, b, c in zip(("d_hidden", "d_weight"), got_g, eag_g, ref_g):
        assert_within_eager_error(a, b, c, atol=1e-3, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_odd_shapes_match_fp64(dtype):
    hidden, weight, targets = _inputs((3, 37), 100, 50257, dtype, "cuda", train_weight=True)
    grads = _upstream((3, 37), "cuda")
    got = _run(_triton, hidden, weight, targets, 0.7, True, grads, chunk_tokens=128)
    tol, grad_tol = TOL[dtype]
    _check(got, _truth(hidden, weight, targets, 0.7, True, grads), 1e-4, max(grad_tol, 1e-4))


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    fn = _kernel_module().linear_logprobs
    hidden, weight, targets = _inputs((4, 129), 768, 50257, torch.bfloat16, "cuda")
    grads = _upstream((4, 129), "cuda")
    compiled = torch.compile(fn, fullgraph=True)
    _check(_run(compiled, hidden, weight, targets, 1.0, True, grads),
           _run(fn, hidden, weight, targets, 1.0, True, grads), 1e-5, 1e-5)
