"""Fused GAE + PPO-loss kernels (rlhf_fast.kernels.ppo) against a float64 loop and reference.py.

Interpreter tier: CPU tensors through TRITON_INTERPRET=1, fp32 (and fp16 inputs), small odd shapes.
GPU tier (marked gpu): benchmark-sized shapes, bf16 inputs, determinism, torch.compile with inductor.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import INTERPRET_DEVICE, assert_close_verbose, fill_masked, interpreter

from rlhf_fast import kernels
from rlhf_fast.kernels import reference

# ----------------------------------------------------------------------------------------------
# helpers


def make_mask(B: int, T: int, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """Left padding of random length, interior holes, one all-masked row, one full row."""
    pad = torch.randint(0, max(1, T // 3), (B,), generator=gen)
    mask = torch.arange(T).unsqueeze(0) >= pad.unsqueeze(1)
    mask &= torch.rand(B, T, generator=gen) > 0.2  # interior holes
    if B > 1:
        mask[1] = False
    if B > 2:
        mask[2] = True
    return mask.to(device)


def gae_loop_f64(rewards, values, mask, gamma, lam):
    """The DESIGN.md recursion, literally, one scalar at a time in float64."""
    r, v, m = rewards.double().tolist(), values.double().tolist(), mask.bool().tolist()
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    ret = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        a = v_next = 0.0
        for t in reversed(range(T)):
            if m[b][t]:
                delta = r[b][t] + gamma * v_next - v[b][t]
                a = delta + gamma * lam * a
                v_next = v[b][t]
                adv[b, t] = a
                ret[b, t] = a + v[b][t]
    return adv, ret


def gae_tol(T: int, gamma: float, lam: float) -> tuple[float, float]:
    # fp32 kernel vs float64 loop: rounding grows with the effective horizon of the sum.
    horizon = T if gamma * lam == 1.0 else min(T, 1.0 / (1.0 - gamma * lam))
    return 2e-6 * horizon, 1e-5


def ppo_inputs(B, T, gen, *, dtype=torch.float32, with_ref=True, garbage=float("nan")):
    """Random PPO inputs that keep ratios and value deltas >= 1e-3 away from every clip boundary."""
    mask = make_mask(B, T, gen)
    old_lp = -torch.rand(B, T, generator=gen) * 3
    log_ratio = torch.randn(B, T, generator=gen) * 0.3
    for edge in (math.log(0.8), math.log(1.2)):  # push log-ratios off the clip edges (eps = 0.2)
        near = (log_ratio - edge).abs() < 2e-3
        log_ratio = torch.where(near, log_ratio + 4e-3 * torch.sign(log_ratio - edge + 1e-9), log_ratio)
    lp = old_lp + log_ratio
    old_v = torch.randn(B, T, generator=gen)
    dv = torch.randn(B, T, generator=gen) * 0.3
    dv = torch.where((dv.abs() - 0.2).abs() < 2e-3, dv * 1.05, dv)  # off the value-clip edge
    values = old_v + dv
    inputs = dict(
        logprobs=lp,
        old_logprobs=old_lp,
        advantages=torch.randn(B, T, generator=gen),
        values=values,
        old_values=old_v,
        returns=old_v + torch.randn(B, T, generator=gen),
        ref_logprobs=(lp + 0.2 * torch.randn(B, T, generator=gen)) if with_ref else None,
    )
    inputs = {k: None if t is None else fill_masked(t, mask, garbage).to(dtype) for k, t in inputs.items()}
    return inputs, mask


def run_ppo(backend, inputs, mask, grad_of="loss", **hparams):
    """Forward + backward of one output; returns (outputs, d/dlogprobs, d/dvalues)."""
    lp = inputs["logprobs"].detach().clone().requires_grad_(True)
    v = inputs["values"].detach().clone().requires_grad_(True)
    args = {**inputs, "logprobs": lp, "values": v}
    out = kernels.ppo_loss(
        args["logprobs"],
        args["old_logprobs"],
        args["advantages"],
        args["values"],
        args["old_values"],
        args["returns"],
        mask,
        ref_logprobs=args["ref_logprobs"],
        backend=backend,
        **hparams,
    )
    getattr(out, grad_of).backward()
    # the reference leaves .grad None where an output does not depend on a leaf (e.g. policy_loss on values)
    return out, *(torch.zeros_like(t) if t.grad is None else t.grad for t in (lp, v))


def assert_ppo_matches(
    inputs, mask, *, grad_of="loss", atol=1e-6, rtol=1e-5, grad_atol=None, grad_rtol=None, **hparams
):
    """Every output and both gradients vs the reference. Gradients scale as 1/n_tokens, so their
    default atol does too (else a large batch's gradients would all sit inside atol)."""
    grad_atol = atol / max(1, int(mask.sum())) if grad_atol is None else grad_atol
    grad_rtol = rtol if grad_rtol is None else grad_rtol
    out, dlp, dv = run_ppo("triton", inputs, mask, grad_of, **hparams)
    ref_out, ref_dlp, ref_dv = run_ppo("torch", inputs, mask, grad_of, **hparams)
    for field in out._fields:
        got, want = getattr(out, field), getattr(ref_out, field)
        assert got.dtype == torch.float32 and got.shape == ()
        assert_close_verbose(got, want.float(), atol=atol, rtol=rtol, name=field)
    assert not out.clip_frac.requires_grad and not out.approx_kl.requires_grad
    assert dlp.dtype == inputs["logprobs"].dtype and dv.dtype == inputs["values"].dtype
    tol = dict(atol=grad_atol, rtol=grad_rtol)
    assert_close_verbose(dlp.float(), ref_dlp.float(), **tol, name=f"d{grad_of}/dlogprobs")
    assert_close_verbose(dv.float(), ref_dv.float(), **tol, name=f"d{grad_of}/dvalues")
    # select, not multiply: exact zeros (never NaN) wherever the mask is 0
    assert (dlp[~mask] == 0).all() and (dv[~mask] == 0).all()
    return out


# ----------------------------------------------------------------------------------------------
# GAE, interpreter tier


@interpreter
@pytest.mark.parametrize(
    "B,T,block_t",
    [(5, 37, 0), (4, 70, 16), (3, 1, 0), (1, 17, 16)],
    ids=["one-tile", "five-tiles", "T1", "B1-two-tiles"],
)
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0)])
def test_gae_matches_f64_loop(B, T, block_t, gamma, lam):
    from rlhf_fast.kernels import ppo

    gen = torch.Generator().manual_seed(B * 1000 + T)
    mask = make_mask(B, T, gen, INTERPRET_DEVICE)
    rewards = torch.randn(B, T, generator=gen)
    values = torch.randn(B, T, generator=gen)
    want_adv, want_ret = gae_loop_f64(rewards, values, mask, gamma, lam)
    atol, rtol = gae_tol(T, gamma, lam)
    for garbage in (1e4, float("nan"), float("-inf")):
        r, v = fill_masked(rewards, mask, garbage), fill_masked(values, mask, garbage)
        adv, ret = ppo.gae(r, v, mask, gamma, lam, block_t=block_t)
        assert adv.dtype == ret.dtype == torch.float32 and adv.shape == ret.shape == (B, T)
        assert_close_verbose(adv, want_adv.float(), atol=atol, rtol=rtol, name=f"advantages ({garbage})")
        assert_close_verbose(ret, want_ret.float(), atol=atol, rtol=rtol, name=f"returns ({garbage})")
        assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
        if garbage == 1e4:
            clean = (adv, ret)
        else:  # whatever sits in masked positions, the outputs are bitwise the same
            assert torch.equal(adv, clean[0]) and torch.equal(ret, clean[1])
    # the torch reference agrees too (it is the backend="torch" path of the same dispatch)
    ref_adv, ref_ret = reference.gae(rewards, values, mask, gamma, lam)
    assert_close_verbose(clean[0], ref_adv, atol=atol, rtol=rtol, name="advantages vs reference")


@interpreter
def test_gae_dispatch_strided_dtypes_and_no_grad():
    """Through kernels.gae: non-contiguous views, fp16 rewards, float mask; fp32 out, no graph."""
    gen = torch.Generator().manual_seed(7)
    B, T = 3, 29
    mask = make_mask(B, T + 1, gen)[:, 1:]  # strided view
    rewards = torch.randn(T, B, generator=gen).t().half()  # transposed: stride (1, B)
    values = torch.randn(B, T + 1, generator=gen)[:, :-1].requires_grad_(True)
    adv, ret = kernels.gae(rewards, values, mask.float(), 0.95, 0.9, backend="triton")
    want_adv, want_ret = gae_loop_f64(rewards.float(), values.detach(), mask, 0.95, 0.9)
    assert not adv.requires_grad and not ret.requires_grad
    assert adv.is_contiguous() and adv.dtype == torch.float32
    assert_close_verbose(adv, want_adv.float(), atol=1e-5, rtol=1e-5, name="advantages")
    assert_close_verbose(ret, want_ret.float(), atol=1e-5, rtol=1e-5, name="returns")


@interpreter
def test_gae_empty_and_bad_input():
    from rlhf_fast.kernels import ppo

    adv, ret = kernels.gae(
        torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool), 1.0, 1.0, backend="triton"
    )
    assert adv.shape == ret.shape == (0, 5)
    x, m = torch.zeros(2, 5), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="block_t"):
        ppo.gae(x, x, m, 0.9, 0.9, block_t=24)
    with pytest.raises(ValueError, match="values has shape"):
        kernels.gae(x, torch.zeros(2, 6), m, 0.9, 0.9, backend="triton")
    with pytest.raises(ValueError, match="gamma and lam"):
        kernels.gae(x, x, m, 1.5, 0.9, backend="triton")
    with pytest.raises(ValueError, match=r"must be \(B, T\)"):
        kernels.gae(x[0], x[0], m[0], 0.9, 0.9, backend="triton")


# ----------------------------------------------------------------------------------------------
# PPO loss, interpreter tier


@interpreter
@pytest.mark.parametrize(
    "grad_of,with_ref",
    # without ref_logprobs the reference's kl is a constant with no graph, so there is no d kl to compare
    [(g, True) for g in ("loss", "policy_loss", "value_loss", "kl")]
    + [("loss", False), ("value_loss", False)],
)
def test_ppo_loss_matches_reference(grad_of, with_ref):
    gen = torch.Generator().manual_seed(3)
    inputs, mask = ppo_inputs(6, 45, gen, with_ref=with_ref)  # N = 270 tokens: one program
    out = assert_ppo_matches(
        inputs, mask, grad_of=grad_of, clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.7, kl_coef=0.13
    )
    assert 0.0 < out.clip_frac.item() < 1.0  # both clipped and unclipped tokens were exercised
    if not with_ref:
        assert out.kl.item() == 0.0


@interpreter
def test_ppo_loss_multi_program_garbage_and_fp16():
    """N = 2 * 1031 tokens spans three programs (partial sums + fixed-order reduction); inf garbage; fp16."""
    gen = torch.Generator().manual_seed(11)
    inputs, mask = ppo_inputs(2, 1031, gen, garbage=float("inf"))
    hp = dict(clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.5, kl_coef=0.05)
    assert_ppo_matches(inputs, mask, **hp)
    half = {k: v.half() for k, v in inputs.items()}
    # both sides round the same fp32 gradient to fp16: allow one fp16 ulp (also in the subnormal range)
    assert_ppo_matches(
        half, mask, atol=1e-4, rtol=2e-3, grad_atol=1e-7, **hp
    )  # same fp16 inputs; fp32 maths on both sides


@interpreter
def test_ppo_reduce_kernel_many_partials():
    """The second stage alone, over more partial rows than one tile (P = 2.3 tiles): every row counts."""
    from rlhf_fast.kernels import ppo

    gen = torch.Generator().manual_seed(23)
    P = 2 * ppo._REDUCE_BLOCK + 77
    partial = torch.rand(P, ppo.NUM_STATS, generator=gen, dtype=torch.float64)
    partial[:, 5] = torch.randint(0, 1025, (P,), generator=gen)  # token counts
    stats = torch.empty(ppo.NUM_STATS)
    ppo._ppo_loss_reduce_kernel[(1,)](
        partial.float(), stats, P, 0.5, 0.1, NUM_STATS=ppo.NUM_STATS, BLOCK_P=ppo._REDUCE_BLOCK
    )
    pg, vsq, kl, clipped, approx_kl, n = partial[:, :6].sum(0).tolist()
    want = [
        pg / n + 0.5 * (0.5 * vsq / n) + 0.1 * kl / n,
        pg / n,
        0.5 * vsq / n,
        kl / n,
        clipped / n,
        approx_kl / n,
        n,
    ]
    assert_close_verbose(stats[:7], torch.tensor(want), atol=0, rtol=1e-5, name="reduced stats")


@interpreter
def test_ppo_loss_deliberate_ties():
    """Exact ties the reference resolves by autograd's rules: clamp passes its closed range, max() splits."""
    T = 9
    mask = torch.ones(1, T, dtype=torch.bool)
    mask[0, -1] = False
    old_lp = torch.zeros(1, T)
    # ratio == 1 == both clip bounds (clip_eps = 0); log-ratio exactly at +-20 (clamp passes) and past it
    lp = torch.tensor([[0.0, 0.0, 20.0, -20.0, 25.0, -25.0, 0.0, 0.0, float("nan")]])
    # signs chosen so the unclipped term wins at +-20 (gradient passes) and at +-25 (clamped: none)
    adv = torch.tensor([[1.0, -2.0, -0.5, 0.5, -1.0, 1.0, 0.0, 0.0, 3.0]])
    old_v = torch.zeros(1, T)
    # value deltas exactly at +-value_clip_eps (0.25 is exact in binary) and inside/outside it
    values = torch.tensor([[0.25, -0.25, 0.25, -0.25, 0.5, -0.5, 0.0, 0.125, 7.0]])
    returns = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 0.0, 2.0, 0.0]])
    inputs = dict(
        logprobs=lp,
        old_logprobs=old_lp,
        advantages=adv,
        values=values,
        old_values=old_v,
        returns=returns,
        ref_logprobs=torch.zeros(1, T),
    )
    out = assert_ppo_matches(inputs, mask, clip_eps=0.0, value_clip_eps=0.25, vf_coef=0.5, kl_coef=0.1)
    ref_out, _, _ = run_ppo(
        "torch", inputs, mask, clip_eps=0.0, value_clip_eps=0.25, vf_coef=0.5, kl_coef=0.1
    )
    assert out.clip_frac.item() == ref_out.clip_frac.item()  # 4 of 8 tokens: |ratio - 1| > 0 strictly
    # ratio inside [1-eps, 1+eps] makes the two policy terms tie: half the gradient through each, sum = full
    assert_ppo_matches(
        inputs, mask, grad_of="policy_loss", clip_eps=0.5, value_clip_eps=0.25, vf_coef=0.5, kl_coef=0.1
    )


@interpreter
def test_ppo_loss_all_masked_and_bad_input():
    gen = torch.Generator().manual_seed(5)
    inputs, mask = ppo_inputs(3, 7, gen)
    mask = torch.zeros_like(mask)
    inputs = {k: fill_masked(v, mask, float("nan")) for k, v in inputs.items()}
    out, dlp, dv = run_ppo("triton", inputs, mask, clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.5, kl_coef=0.1)
    assert all(getattr(out, f).item() == 0.0 for f in out._fields)
    assert (dlp == 0).all() and (dv == 0).all()
    x, m = torch.zeros(2, 5), torch.ones(2, 5)
    with pytest.raises(ValueError, match="returns has shape"):
        kernels.ppo_loss(x, x, x, x, x, torch.zeros(2, 4), m, backend="triton")
    with pytest.raises(TypeError, match="advantages must be floating point"):
        kernels.ppo_loss(x, x, x.long(), x, x, x, m, backend="triton")
    with pytest.raises(ValueError, match="clip_eps"):
        kernels.ppo_loss(x, x, x, x, x, x, m, clip_eps=-0.1, backend="triton")


@interpreter
def test_ops_registration_opcheck():
    """triton_op schemas (no aliasing/mutation) and the registered autograd formula are well-formed.

    Fake-tensor tracing (what torch.compile does) needs real JIT kernels, so it is checked in the GPU tier:
    under TRITON_INTERPRET, launch.wrap hands back the raw interpreted kernel, which cannot take fakes.
    """
    from rlhf_fast.kernels import ppo  # noqa: F401  (registers the ops)

    gen = torch.Generator().manual_seed(13)
    inputs, mask = ppo_inputs(3, 21, gen)
    lp = inputs["logprobs"].clone().requires_grad_(True)
    v = inputs["values"].clone().requires_grad_(True)
    args = (
        lp,
        inputs["old_logprobs"],
        inputs["advantages"],
        v,
        inputs["old_values"],
        inputs["returns"],
        mask,
        inputs["ref_logprobs"],
        0.2,
        0.2,
        0.5,
        0.1,
    )
    checks = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(torch.ops.rlhf_fast.ppo_loss_fwd.default, args, test_utils=checks)
    torch.library.opcheck(
        torch.ops.rlhf_fast.gae.default,
        (inputs["advantages"], inputs["values"], mask, 0.9, 0.8, 0),
        test_utils=("test_schema",),
    )


_FP64_SCALARS = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlhf_fast.kernels import ppo

def ttir(fn, floats, **constexprs):
    sig = {p.name: "constexpr" if p.is_constexpr else "*u8" if p.name == "mask_ptr" else "*fp32"
           if p.name.endswith("_ptr") else "fp64" if p.name in floats else "i32" for p in fn.params}
    return triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 86, 32)).asm["ttir"]

hp = ("clip_eps", "clip_lo", "clip_hi", "value_clip")
for fn, floats, consts in [
    (ppo._gae_fwd_kernel, ("gamma", "gamma_lam"), dict(BLOCK_T=128)),
    (ppo._ppo_loss_fwd_kernel, hp, dict(HAS_REF=True, NUM_STATS=8, BLOCK=1024)),
    (ppo._ppo_loss_reduce_kernel, ("vf_coef", "kl_coef"), dict(NUM_STATS=8, BLOCK_P=256)),
    (ppo._ppo_loss_bwd_kernel, hp + ("vf_coef", "kl_coef"), dict(HAS_REF=True, BLOCK=1024)),
]:
    ir = ttir(fn, floats, **consts)
    f64 = [line for line in ir.splitlines() if "f64" in line and "tt.func" not in line and "arith.truncf" not in line]
    assert not f64, (fn.__name__, f64[:3])
print("ok")
"""


def test_fp64_scalar_args_compile_to_fp32_maths():
    """inductor may pass the float hyper-parameters as fp64: each kernel must cast them to fp32 once (the
    loop-carried GAE state would otherwise change type, a compile error). Cross-compiled for sm_86 in a
    process without TRITON_INTERPRET; no GPU needed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import rlhf_fast

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(rlhf_fast.__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", _FP64_SCALARS], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("B,T", [(256, 512), (64, 2049)])
def test_gae_gpu(B, T):
    gen = torch.Generator().manual_seed(B + T)
    mask = make_mask(B, T, gen)
    rewards, values = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    want_adv, want_ret = gae_loop_f64(rewards, values, mask, 0.99, 0.95)
    r, v = (fill_masked(t, mask, float("nan")).cuda() for t in (rewards, values))
    adv, ret = kernels.gae(r, v, mask.cuda(), 0.99, 0.95, backend="triton")
    atol, rtol = gae_tol(T, 0.99, 0.95)
    assert_close_verbose(adv.cpu(), want_adv.float(), atol=atol, rtol=rtol, name="advantages")
    assert_close_verbose(ret.cpu(), want_ret.float(), atol=atol, rtol=rtol, name="returns")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ppo_loss_gpu_matches_and_is_deterministic(dtype):
    gen = torch.Generator().manual_seed(17)
    inputs, mask = ppo_inputs(256, 513, gen, dtype=dtype)
    inputs, mask = {k: v.cuda() for k, v in inputs.items()}, mask.cuda()
    hp = dict(clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.5, kl_coef=0.1)
    # tl.exp on GPU is not bitwise torch.exp, so allow a few ulps of the token means; bf16 gradients are
    # the same fp32 values rounded once, so one bf16 ulp apart at most
    grad_rtol = 1e-4 if dtype == torch.float32 else 8e-3
    out = assert_ppo_matches(inputs, mask, atol=1e-5, rtol=1e-4, grad_rtol=grad_rtol, **hp)
    again, dlp, dv = run_ppo("triton", inputs, mask, **hp)
    _, dlp2, dv2 = run_ppo("triton", inputs, mask, **hp)
    assert all(torch.equal(getattr(out, f), getattr(again, f)) for f in out._fields)
    assert torch.equal(dlp, dlp2) and torch.equal(dv, dv2)


@pytest.mark.gpu
def test_ppo_loss_gpu_opcheck_and_inductor_fullgraph():
    from rlhf_fast.kernels import ppo

    gen = torch.Generator().manual_seed(19)
    inputs, mask = ppo_inputs(64, 257, gen)
    inputs, mask = {k: v.cuda() for k, v in inputs.items()}, mask.cuda()
    hp = dict(clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.5, kl_coef=0.1)
    args = (
        inputs["logprobs"].clone().requires_grad_(True),
        inputs["old_logprobs"],
        inputs["advantages"],
        inputs["values"].clone().requires_grad_(True),
        inputs["old_values"],
        inputs["returns"],
        mask,
        inputs["ref_logprobs"],
        *hp.values(),
    )
    torch.library.opcheck(torch.ops.rlhf_fast.ppo_loss_fwd.default, args)
    torch.library.opcheck(
        torch.ops.rlhf_fast.gae.default, (inputs["advantages"], inputs["values"], mask, 0.9, 0.8, 0)
    )

    def step(lp, v):  # the kernel module's function: what compiled model code calls
        out = ppo.ppo_loss(
            lp,
            inputs["old_logprobs"],
            inputs["advantages"],
            v,
            inputs["old_values"],
            inputs["returns"],
            mask,
            ref_logprobs=inputs["ref_logprobs"],
            **hp,
        )
        return out.loss * 2.0

    lp = inputs["logprobs"].clone().requires_grad_(True)
    v = inputs["values"].clone().requires_grad_(True)
    torch.compile(step, fullgraph=True)(lp, v).backward()
    _, want_dlp, want_dv = run_ppo("torch", inputs, mask, **hp)
    assert_close_verbose(lp.grad, 2 * want_dlp, atol=1e-9, rtol=1e-4, name="compiled d/dlogprobs")
    assert_close_verbose(v.grad, 2 * want_dv, atol=1e-9, rtol=1e-4, name="compiled d/dvalues")
