"""LoRA linear: the fused Triton kernel vs eager PEFT-style LoRA (the baseline) vs the plain linear
without LoRA (the floor), forward / backward / forward+backward, all timed in the same run.

    python -m pytest benchmarks/bench_lora_linear.py                 # GPU: GPT-2 shapes, bf16
    python -m pytest benchmarks/bench_lora_linear.py -k smoke        # CPU smoke (interpreter)

GPU shapes: tokens {8k, 32k} x d in {768, 1024, 1600} (in = out = d) x r in {8, 16, 64}, bf16. The
base weight is frozen and x requires grad (an inner layer of a LoRA fine-tune), so backward computes
dx, dA, dB. Targets (GPT-2 XL, d = 1600, r = 16): fwd+bwd >= 1.3x faster than eager; fwd <= 1.15x plain.
"""

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast import kernels

IMPLS = ("triton", "eager_peft", "plain_linear")
PASSES = ("fwd", "bwd", "fwdbwd")

GPU_SHAPES = [(n, d, r) for n in (8192, 32768) for d in (768, 1024, 1600) for r in (8, 16, 64)]
SMOKE_SHAPE = (64, 48, 8)


def eager_peft(x, weight, bias, lora_a, lora_b, scale):
    # What PEFT's lora.Linear does: base linear, then dropout(identity) -> A -> B, scale, add.
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a), lora_b) * scale


def triton_lora(x, weight, bias, lora_a, lora_b, scale):
    return kernels.lora_linear(x, weight, bias, lora_a, lora_b, scale, backend="triton")


def plain_linear(x, weight, bias, lora_a, lora_b, scale):
    return F.linear(x, weight, bias)


FNS = {"triton": triton_lora, "eager_peft": eager_peft, "plain_linear": plain_linear}


def _setup(n, d, r, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)  # noqa: E731
    x = rand(n, d).requires_grad_()
    weight, bias = rand(d, d, std=d**-0.5), rand(d)
    lora_a = rand(r, d, std=d**-0.5).requires_grad_()
    lora_b = rand(d, r, std=r**-0.5).requires_grad_()
    return x, weight, bias, lora_a, lora_b


def _bench(benchmark, impl, pass_, n, d, r, device, dtype, rounds):
    fn = FNS[impl]
    x, weight, bias, lora_a, lora_b = args = _setup(n, d, r, device, dtype)
    grad_inputs = [x] if impl == "plain_linear" else [x, lora_a, lora_b]
    grad_y = torch.randn(n, d, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if pass_ == "fwd":

        def run():
            with torch.no_grad():
                fn(*args, 2.0)
            sync()
    elif pass_ == "bwd":
        y = fn(*args, 2.0)

        def run():
            torch.autograd.grad(y, grad_inputs, grad_y, retain_graph=True)
            sync()
    else:

        def run():
            torch.autograd.grad(fn(*args, 2.0), grad_inputs, grad_y)
            sync()

    run()  # compile / autotune outside the timed rounds
    benchmark.group = f"{pass_} n={n} d={d} r={r} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info.update(
        impl=impl, pass_=pass_, n=n, d=d, r=r, baseline=impl == "eager_peft", floor=impl == "plain_linear"
    )
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=min(3, rounds))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("n,d,r", GPU_SHAPES, ids=[f"n{n}-d{d}-r{r}" for n, d, r in GPU_SHAPES])
def test_lora_linear_gpu(benchmark, impl, pass_, n, d, r):
    _bench(benchmark, impl, pass_, n, d, r, "cuda", torch.bfloat16, rounds=30)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", PASSES)
def test_lora_linear_smoke(benchmark, impl, pass_):
    # Correctness of the plumbing at a tiny size; on CPU the Triton kernel runs interpreted (fp32).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _bench(benchmark, impl, pass_, *SMOKE_SHAPE, device, dtype, rounds=3)
