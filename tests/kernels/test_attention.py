"""Triton masked attention (training forward/backward and split-KV decode) against the torch reference.

Interpreter tier: CPU tensors through TRITON_INTERPRET=1, fp32 and fp16, small odd shapes, left padding
with a one-token row and an all-padding row, garbage in every padded position. GPU tier (marked):
bf16 at GPT-2 shapes, deterministic backward, torch.compile.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_testing import (  # noqa: E402
    INTERPRET_DEVICE,
    assert_close_verbose,
    assert_within_eager_error,
    fill_masked,
    interpreter,
)

from rlhf_fast import kernels  # noqa: E402
from rlhf_fast.kernels import reference  # noqa: E402

GARBAGE = 1e4


def left_padding_mask(T: int, pads: list[int], device) -> torch.Tensor:
    """(B, T) bool, row b has pads[b] padding tokens on the left (pads[b] == T: no real token)."""
    idx = torch.arange(T, device=device)
    return torch.stack([idx >= p for p in pads])


def make_qkv(B, H, T, D, dtype, device, kpm, *, Tq=None, seed=0, garbage=GARBAGE, garbage_q=False):
    """q (B, H, Tq, D), k, v (B, H, T, D) leaf tensors with `garbage` in padded key/value slots.

    garbage_q: padded query positions get garbage too (only for causal left padding, where those
    rows see no key; elsewhere they are real queries and 1e4 would just make the softmax ill-conditioned).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    Tq = T if Tq is None else Tq
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, H, T, D, generator=g)
    v = torch.randn(B, H, T, D, generator=g)
    if kpm is not None:
        keep = kpm[:, None, :, None].cpu()
        k, v = fill_masked(k, keep, garbage), fill_masked(v, keep, -garbage)
        if garbage_q:
            q = fill_masked(q, keep, garbage)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def eager_attention(q, k, v, kpm, causal, sm_scale):
    """Plain PyTorch attention in the inputs' own precision: the error yardstick for fp16/bf16."""
    s = torch.matmul(q, k.transpose(-2, -1)) * sm_scale
    visible = reference.attention_visibility(q.shape[2], k.shape[2], kpm, causal, q.device)
    s = s.masked_fill(~visible, float("-inf"))
    has_key = visible.any(dim=-1, keepdim=True)
    return torch.matmul(torch.where(has_key, torch.softmax(s, dim=-1), 0.0), v)


def assert_normwise_within_eager_error(
    kernel_out, eager_out, ref, *, factor=2.0, rel_slack=1e-4, rms_slack=1e-5, name=""
):
    """The 2x-eager rule on the Frobenius norm of the error: catches small systematic errors (a 0.2%
    misscaled gradient) that the elementwise max rule's absolute slack lets through."""
    k, e, r = (t.detach().double() for t in (kernel_out, eager_out, ref))
    kernel_err, eager_err = (k - r).norm().item(), (e - r).norm().item()
    bound = factor * eager_err + rel_slack * r.norm().item() + rms_slack * r.numel() ** 0.5
    assert kernel_err <= bound, (
        f"{name}: normwise error {kernel_err:.3g} > {bound:.3g} (eager {eager_err:.3g})"
    )


def fwd_bwd(fn, q, k, v, do):
    out = fn(q, k, v)
    return [out.detach(), *(g.detach() for g in torch.autograd.grad(out, (q, k, v), do))]


def check_against_reference(q, k, v, kpm, *, causal=True, sm_scale=None, seed=1):
    """Run the triton kernel fwd+bwd and compare output, dq, dk, dv with the reference; returns them."""
    D = q.shape[-1]
    scale = sm_scale if sm_scale is not None else D**-0.5
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(q)
    got = fwd_bwd(
        lambda *a: kernels.masked_attention(*a, kpm, causal, sm_scale, backend="triton"), q, k, v, do
    )
    names = ("out", "dq", "dk", "dv")
    for name, t in zip(names, got, strict=True):
        assert torch.isfinite(t).all(), f"{name} has NaN/inf"
    if q.dtype == torch.float32:
        want = fwd_bwd(lambda *a: reference.masked_attention(*a, kpm, causal, sm_scale), q, k, v, do)
        for name, a, e in zip(names, got, want, strict=True):
            assert_close_verbose(a, e, name=name)
    else:
        # fp32 reference from the same low-precision inputs; eager low precision on garbage-free
        # copies (its own fp16 overflow on garbage would be NaN, which says nothing about rounding).
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        want = fwd_bwd(lambda *a: reference.masked_attention(*a, kpm, causal, sm_scale), *leaves, do.float())
        keep = kpm[:, None, :, None] if kpm is not None else torch.ones((), dtype=torch.bool)
        clean = [q.detach().clone().requires_grad_()] + [
            fill_masked(t.detach(), keep, 0.0).requires_grad_() for t in (k, v)
        ]
        eager = fwd_bwd(lambda *a: eager_attention(*a, kpm, causal, scale), *clean, do)
        for name, a, e, r in zip(names, got, eager, want, strict=True):
            assert_within_eager_error(a, e, r, factor=2.0, atol=1e-3, name=name)
            assert_normwise_within_eager_error(a, e, r, name=name)
    return got


def empty_rows(Tq, Tk, kpm, causal, device):
    """(B, Tq) bool: query rows that see no key."""
    return ~reference.attention_visibility(Tq, Tk, kpm, causal, device).any(dim=-1)[:, 0]


# ----------------------------------------------------------------------------------------------
# Interpreter tier


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("T", [1, 5, 97, 130])
def test_forward_backward_match_reference(T, D, dtype):
    """Left padding incl. a one-token row and an all-padding row; garbage in every padded slot."""
    dev = INTERPRET_DEVICE
    g = torch.Generator().manual_seed(T * 1000 + D)
    pads = [0, T - 1, T, int(torch.randint(0, T, (1,), generator=g))]  # full, one token, none, random
    if T >= 97:
        pads.append(T - 70)  # > one 64-key block of padding: exercises block skipping
    kpm = left_padding_mask(T, pads, dev)
    q, k, v = make_qkv(len(pads), 2, T, D, dtype, dev, kpm, seed=T + D, garbage_q=True)
    out, dq, dk, dv = check_against_reference(q, k, v, kpm)

    empty = empty_rows(T, T, kpm, True, dev)  # (B, T)
    assert empty[2].all() and not empty[0].any()
    sel = empty[:, None, :, None].expand_as(out)
    assert (out[sel] == 0).all(), "rows that see no key must be exactly 0"
    assert (dq[sel] == 0).all(), "rows that see no key must pass no gradient to q"
    padded = ~kpm[:, None, :, None].expand_as(dk)
    assert (dk[padded] == 0).all() and (dv[padded] == 0).all(), "padded keys must get zero gradient"


@interpreter
@pytest.mark.parametrize(
    "arch, dtype, D",
    [(90, torch.float16, 64), (80, torch.float16, 64), (86, torch.float32, 128)],
    ids=["sm90-fp16", "sm80-fp16", "fp32-D128"],
)
def test_launch_configs_of_other_targets(arch, dtype, D, monkeypatch):
    """The interpreter takes sm_86's tiles; the other targets' differ (sm_90's 128-row backward blocks,
    sm_80's forward key block, fp32's 16-query dK/dV step at D = 128): run those tiles too, over more
    than one 128-block of queries and keys, with left padding and a one-token row."""
    from rlhf_fast.kernels import launch

    monkeypatch.setattr(launch, "arch", lambda device: arch)
    T = 150
    kpm = left_padding_mask(T, [0, T - 1, 37, 130], INTERPRET_DEVICE)
    q, k, v = make_qkv(4, 1, T, D, dtype, INTERPRET_DEVICE, kpm, seed=arch, garbage_q=True)
    check_against_reference(q, k, v, kpm)


@interpreter
@pytest.mark.parametrize(
    "Tq, Tk, causal, sm_scale",
    [(37, 100, True, None), (100, 37, True, 0.3), (45, 45, False, None), (3, 70, True, None)],
    ids=["cross-causal", "more-queries-than-keys", "non-causal", "few-rows-with-grad"],
)
def test_general_masks_and_shapes(Tq, Tk, causal, sm_scale):
    """Tq != Tk (bottom-right causal), no causality, a custom scale, and a mask with holes."""
    dev = INTERPRET_DEVICE
    g = torch.Generator().manual_seed(Tq + Tk)
    kpm = torch.rand(3, Tk, generator=g) > 0.3  # holes anywhere, not only left padding
    kpm[1] = False
    kpm[2, :-1] = False  # only the last key is real
    q, k, v = make_qkv(3, 2, Tk, 24, torch.float32, dev, kpm, Tq=Tq, seed=Tq)  # D = 24: not a power of 2
    out, dq, *_ = check_against_reference(q, k, v, kpm, causal=causal, sm_scale=sm_scale)
    assert (out[1] == 0).all() and (dq[1] == 0).all()


@interpreter
def test_no_padding_mask():
    q, k, v = make_qkv(2, 3, 77, 32, torch.float32, INTERPRET_DEVICE, None)
    check_against_reference(q, k, v, None)


@interpreter
def test_fully_padded_key_blocks_are_never_read():
    """NaN in key blocks that hold only padding: had any kernel loaded them, 0 * NaN would surface."""
    from rlhf_fast.kernels import attention, launch

    dev, T, D = INTERPRET_DEVICE, 150, 64
    arch = launch.arch(torch.device(dev))
    configs = (attention._fwd_config(D, torch.float32, arch), *attention._bwd_configs(D, torch.float32, arch),
               attention._decode_config(D, torch.float32, arch))
    block = max(cfg["BLOCK_N"] for cfg in configs)
    pads = [block + 7, 0, 2 * block + 3]
    kpm = left_padding_mask(T, pads, dev)
    never_read = torch.arange(T)[None, :] < torch.tensor([(p // block) * block for p in pads])[:, None]
    assert never_read.any()
    q, k, v = make_qkv(3, 2, T, D, torch.float32, dev, kpm, seed=11, garbage=0.0)
    nan_k, nan_v = (
        fill_masked(t.detach(), ~never_read[:, None, :, None], float("nan")).requires_grad_() for t in (k, v)
    )
    do = torch.randn_like(q)
    got = fwd_bwd(lambda *a: kernels.masked_attention(*a, kpm, backend="triton"), q, nan_k, nan_v, do)
    want = fwd_bwd(lambda *a: reference.masked_attention(*a, kpm), q, k, v, do)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close_verbose(a, e, name=name)
    with torch.no_grad():  # decode path: same cache, NaN prefix blocks, last query row
        step = attention.masked_attention(q[:, :, -1:], nan_k, nan_v, kpm, num_splits=2)
    assert_close_verbose(step, want[0][:, :, -1:], name="decode")


@interpreter
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
@pytest.mark.parametrize(
    "k_garbage, v_garbage", [(float("nan"), float("inf")), (float("inf"), float("nan")), (-float("inf"), -float("inf"))]
)
def test_nonfinite_garbage_in_live_key_blocks(k_garbage, v_garbage, causal):
    """NaN/inf in the padded K/V slots of key blocks that also hold real keys (left padding inside a
    block, holes, unwritten cache slots after the last real key): such blocks are loaded, so a 0 * NaN
    in P @ V, dS @ K or P^T @ dO would leak. Reference: the same inputs with the garbage replaced by
    zeros, where padded keys are never visible, so their dk and dv are exactly 0 (the kernel's too)."""
    from rlhf_fast.kernels import attention

    dev, B, H, T, D = INTERPRET_DEVICE, 3, 2, 97, 32
    kpm = left_padding_mask(T, [5, 0, 40], dev)
    kpm[1, 20:23] = False  # holes
    kpm[1, 90:] = False  # unwritten slots after the last real key
    kpm[2, 60] = False
    q, k, v = make_qkv(B, H, T, D, torch.float32, dev, kpm, seed=5, garbage=0.0)
    keep = kpm[:, None, :, None]
    dirty_k, dirty_v = (fill_masked(t.detach(), keep, g).requires_grad_() for t, g in ((k, k_garbage), (v, v_garbage)))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    got = fwd_bwd(lambda *a: kernels.masked_attention(*a, kpm, causal, backend="triton"), q, dirty_k, dirty_v, do)
    want = fwd_bwd(lambda *a: reference.masked_attention(*a, kpm, causal), q, k, v, do)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close_verbose(a, e, name=name)
    padded = ~keep.expand_as(got[2])
    assert (got[2][padded] == 0).all() and (got[3][padded] == 0).all(), "padded keys must get zero gradient"
    with torch.no_grad():  # split-KV decode over the same garbage-filled cache
        for Tq in (1, 3):
            step = attention.masked_attention(q[:, :, -Tq:], dirty_k, dirty_v, kpm, causal, num_splits=3)
            clean = reference.masked_attention(q[:, :, -Tq:], k, v, kpm, causal)
            assert_close_verbose(step, clean, name=f"decode Tq={Tq}")


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_equals_full_attention(num_splits, dtype):
    """One query row over a static cache (left padding + unwritten slots) = that row of full attention."""
    from rlhf_fast.kernels.attention import masked_attention as triton_attention

    dev, B, H, L, T_max, D = INTERPRET_DEVICE, 4, 3, 90, 200, 64
    pads = [0, L - 1, L, 13]  # full, one real token, no real token, some
    kpm_seq = left_padding_mask(L, pads, dev)
    q, k, v = (t.detach() for t in make_qkv(B, H, L, D, dtype, dev, kpm_seq, seed=7))
    full = kernels.masked_attention(q, k, v, kpm_seq, backend="triton")  # (B, H, L, D) prefill kernel

    k_cache = torch.full((B, H, T_max, D), GARBAGE, dtype=dtype, device=dev)  # unwritten slots
    v_cache = torch.full((B, H, T_max, D), -GARBAGE, dtype=dtype, device=dev)
    k_cache[:, :, :L], v_cache[:, :, :L] = k, v
    kpm_cache = torch.zeros(B, T_max, dtype=torch.bool, device=dev)
    kpm_cache[:, :L] = kpm_seq
    with torch.no_grad():
        step = triton_attention(q[:, :, L - 1 :], k_cache, v_cache, kpm_cache, num_splits=num_splits)
    assert torch.isfinite(step).all()
    assert (step[2] == 0).all(), "a row with no valid cache slot must be 0"
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    assert_close_verbose(step, full[:, :, L - 1 :], name="decode vs full attention", **tol)


@interpreter
@pytest.mark.parametrize("Tq", [1, 3])
def test_decode_matches_reference(Tq):
    """The decode kernel against the reference, with several query rows and a mask with holes."""
    from rlhf_fast.kernels.attention import masked_attention as triton_attention

    dev, B, H, T, D = INTERPRET_DEVICE, 3, 2, 300, 16  # T > 256: the mask-row scan takes 2 steps
    kpm = torch.zeros(B, T, dtype=torch.bool, device=dev)
    kpm[0, 10:280] = True
    kpm[0, 50:60] = False
    kpm[1, 299] = True
    kpm[2, :] = True
    q, k, v = (t.detach() for t in make_qkv(B, H, T, D, torch.float32, dev, kpm, Tq=Tq, seed=Tq))
    want = reference.masked_attention(q, k, v, kpm)
    for num_splits in (1, 4):
        with torch.no_grad():
            got = triton_attention(q, k, v, kpm, num_splits=num_splits)
        assert_close_verbose(got, want, name=f"decode Tq={Tq} splits={num_splits}")


@interpreter
def test_decode_path_is_taken_only_without_grad(monkeypatch):
    from rlhf_fast.kernels import attention

    calls = []
    monkeypatch.setattr(
        attention, "_decode_op", lambda *a: calls.append(a) or reference.masked_attention(*a[:4], a[5], a[6])
    )
    q, k, v = make_qkv(2, 2, 40, 16, torch.float32, INTERPRET_DEVICE, None, Tq=1)
    out = kernels.masked_attention(q, k, v, backend="triton")
    assert not calls and out.requires_grad, "with grad required the training kernel must run"
    with torch.no_grad():
        kernels.masked_attention(q, k, v, backend="triton")
    assert len(calls) == 1


@interpreter
def test_model_triton_backend_equals_torch_backend():
    from rlhf_fast.model.gpt2 import GPT

    torch.manual_seed(0)
    models = {b: GPT.from_preset("tiny", attn_backend=b) for b in ("torch", "triton")}
    models["triton"].load_state_dict(models["torch"].state_dict())
    ids = torch.randint(0, 320, (3, 23))
    attention_mask = left_padding_mask(23, [0, 9, 22], "cpu").long()
    results = {}
    for name, model in models.items():
        logits = model(ids, attention_mask)
        logits.float().pow(2).mean().backward()
        results[name] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    assert_close_verbose(results["triton"][0], results["torch"][0], atol=1e-4, rtol=1e-4, name="logits")
    for n, g in results["torch"][1].items():
        assert_close_verbose(results["triton"][1][n], g, atol=1e-5, rtol=1e-4, name=f"grad {n}")


@interpreter
@pytest.mark.parametrize(
    "D, dtype, match",
    [
        (8, torch.float32, "head dim"),
        (160, torch.float32, "head dim"),
        (16, torch.float64, "fp16, bf16 or fp32"),
    ],
)
def test_bad_inputs_are_rejected(D, dtype, match):
    q = torch.randn(1, 1, 4, D, dtype=dtype)
    exc = ValueError if match == "head dim" else TypeError
    with pytest.raises(exc, match=match):
        kernels.masked_attention(q, q, q, backend="triton")


# ----------------------------------------------------------------------------------------------
# GPU tier


def _gpt2_batch(B, H, T, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    pads = [int(x) for x in torch.randint(0, int(0.4 * T), (B,), generator=g)]
    pads[0] = 0
    kpm = left_padding_mask(T, pads, "cuda")
    return kpm, make_qkv(B, H, T, 64, dtype, "cuda", kpm, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("T, H", [(1024, 12), (512, 25), (97, 12)])
def test_gpu_bf16_within_eager_error(T, H):
    kpm, (q, k, v) = _gpt2_batch(4, H, T, torch.bfloat16)
    check_against_reference(q, k, v, kpm)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    kpm, (q, k, v) = _gpt2_batch(4, 12, 1024, torch.bfloat16, seed=3)
    do = torch.randn_like(q)
    runs = [
        fwd_bwd(lambda *a: kernels.masked_attention(*a, kpm, backend="triton"), q, k, v, do) for _ in range(2)
    ]
    for name, a, b in zip(("out", "dq", "dk", "dv"), *runs, strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.gpu
def test_gpu_decode_gpt2_shapes():
    from rlhf_fast.kernels.attention import masked_attention as triton_attention

    B, H, T_max, D = 64, 12, 1024, 64
    lengths = torch.randint(200, 512, (B,), device="cuda")
    pads = torch.randint(0, 100, (B,), device="cuda")
    idx = torch.arange(T_max, device="cuda")
    kpm = (idx >= pads[:, None]) & (idx < lengths[:, None])
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, H, T_max, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    want = reference.masked_attention(q, k, v, kpm)
    for num_splits in (None, 1, 7):
        with torch.no_grad():
            got = triton_attention(q, k, v, kpm, num_splits=num_splits)
        assert_close_verbose(got, want, name=f"decode splits={num_splits}")


@pytest.mark.gpu
def test_gpu_compiled_forward_backward_keeps_kernel():
    kpm, (q, k, v) = _gpt2_batch(2, 12, 256, torch.bfloat16, seed=5)
    fn = lambda q, k, v: kernels.masked_attention(q, k, v, kpm, backend="triton")  # noqa: E731
    do = torch.randn_like(q)
    eager = fwd_bwd(fn, q, k, v, do)
    compiled = fwd_bwd(torch.compile(fn, fullgraph=True), q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), eager, compiled, strict=True):
        assert_close_verbose(b, a, name=f"compiled {name}")
