"""Triton fused LoRA linear vs `kernels.reference.lora_linear`.

Interpreter tier (default run, CPU): small odd shapes, fp32 and fp16, outputs and every gradient,
non-contiguous inputs with NaN in the gaps, scale 0, bias None, bad input, torch.compile, the model.
GPU tier (`gpu`): GPT-2 shapes in bf16 under the "2x eager-bf16 error" rule, fp32, compile.
"""

import pytest
import torch
from kernel_testing import (
    assert_close_verbose,
    assert_within_eager_error,
    interpreter,
    noncontiguous_with_garbage,
)

from rlhf_fast import kernels
from rlhf_fast.kernels import reference


def _kernel_module():
    from rlhf_fast.kernels import lora  # lazily: importing it imports triton

    return lora


def _inputs(lead, in_f, out_f, r, dtype, device, *, bias=True, train_base=False, seed=0):
    """x (*lead, in), weight (out, in), bias (out,), lora_a (r, in), lora_b (out, r), all O(1) outputs.

    lora_b is random, not PEFT's zeros: a zero B would hide dA bugs (dA = s (dY B)^T x = 0).
    """
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(dtype).to(device)  # noqa: E731
    x = rand(*lead, in_f).requires_grad_()
    weight = rand(out_f, in_f, std=in_f**-0.5).requires_grad_(train_base)
    b = rand(out_f).requires_grad_(train_base) if bias else None
    lora_a = rand(r, in_f, std=in_f**-0.5).requires_grad_()
    lora_b = rand(out_f, r, std=r**-0.5).requires_grad_()
    return x, weight, b, lora_a, lora_b


def _run(fn, x, weight, bias, lora_a, lora_b, scale, grad_y=None):
    """Output and gradients {name: grad} of every input that requires grad (missing grad -> zeros)."""
    y = fn(x, weight, bias, lora_a, lora_b, scale)
    if grad_y is None:
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    named = {"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b}
    named = {k: t for k, t in named.items() if t is not None and t.requires_grad}
    grads = torch.autograd.grad(y, list(named.values()), grad_y, allow_unused=True)
    grads = {
        k: torch.zeros_like(t) if gr is None else gr for (k, t), gr in zip(named.items(), grads, strict=True)
    }
    return y, grads, grad_y


def _reference_fp64(x, weight, bias, lora_a, lora_b, scale, grad_y):
    up = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)  # noqa: E731
    return _run(
        reference.lora_linear,
        *(up(t) for t in (x, weight, bias, lora_a, lora_b)),
        scale,
        grad_y=grad_y.double(),
    )


def _triton(x, weight, bias, lora_a, lora_b, scale):
    return kernels.lora_linear(x, weight, bias, lora_a, lora_b, scale, backend="triton")


def _check_against_reference(inputs, scale, dtype):
    y, grads, grad_y = _run(_triton, *inputs, scale)
    y_ref, grads_ref, _ = _reference_fp64(*inputs, scale, grad_y)
    # Gradients sum up to 130 x 768 products with heavy cancellation, so the absolute tolerance is
    # relative to the tensor's largest entry: a few ulps (eager torch in the same dtype needs ~1/3 of it).
    tol = {torch.float32: 1e-6, torch.float16: 2e-3}[dtype]
    assert set(grads) == set(grads_ref)
    for k, got, want in [("y", y, y_ref), *((f"d{k}", grads[k], grads_ref[k]) for k in grads)]:
        assert got.dtype == dtype and got.shape == want.shape, k
        assert_close_verbose(got, want, atol=tol * want.abs().max().item(), rtol=tol, name=k)


# (leading shape of x, in, out, r, dtype, weight/bias trainable): every N in {1, 7, 130}, in/out in
# {48, 100, 768} and r in {1, 4, 16, 33, 128} appears; N = 130 runs the split-K adapter reduction;
# r = 33 and 128 seed the GEMM in several BLOCK_K-rank chunks.
CASES = [
    ((1, 1), 48, 100, 1, torch.float32, True),
    ((7,), 100, 48, 4, torch.float32, False),
    ((2, 5, 13), 100, 100, 33, torch.float32, True),
    ((7,), 768, 48, 16, torch.float32, False),
    ((130,), 48, 768, 4, torch.float32, False),
    ((7,), 48, 100, 33, torch.float16, True),
    ((10, 13), 100, 48, 16, torch.float16, False),
    ((1,), 768, 100, 1, torch.float16, False),
    ((7,), 48, 100, 128, torch.float32, False),
]


@interpreter
@pytest.mark.parametrize("lead,in_f,out_f,r,dtype,train_base", CASES)
def test_matches_reference(lead, in_f, out_f, r, dtype, train_base):
    inputs = _inputs(lead, in_f, out_f, r, dtype, "cpu", train_base=train_base)
    _check_against_reference(inputs, 1.7, dtype)


@interpreter
def test_noncontiguous_inputs_with_nan_gaps():
    x, weight, bias, lora_a, lora_b = _inputs((3, 7), 48, 100, 4, torch.float32, "cpu", train_base=True)
    # Strided views over NaN-filled buffers; lora_b as the transpose of an (r, out) tensor.
    x, weight, lora_a = (noncontiguous_with_garbage(t) for t in (x, weight, lora_a))
    lora_b = lora_b.detach().t().contiguous().t().requires_grad_()
    assert not any(t.is_contiguous() for t in (x, weight, lora_a, lora_b))
    _check_against_reference((x, weight, bias, lora_a, lora_b), 0.5, torch.float32)


@interpreter
def test_scale_zero_and_bias_none():
    inputs = _inputs((7,), 100, 48, 4, torch.float32, "cpu", bias=False)
    y, grads, grad_y = _run(_triton, *inputs, 0.0)
    x, weight = inputs[0].detach(), inputs[1].detach()
    assert_close_verbose(y, x @ weight.T, name="y")
    assert_close_verbose(grads["x"], grad_y @ weight, name="dx")
    assert torch.count_nonzero(grads["lora_a"]) == 0 and torch.count_nonzero(grads["lora_b"]) == 0


@interpreter
def test_frozen_inputs_get_no_grad_and_grads_are_deterministic():
    x, weight, bias, lora_a, lora_b = _inputs((130,), 100, 48, 16, torch.float32, "cpu")
    x.requires_grad_(False)  # e.g. the first adapted layer: its input needs no gradient
    y = _triton(x, weight, bias, lora_a, lora_b, 2.0)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert x.grad is None and weight.grad is None and bias.grad is None
    first = (lora_a.grad.clone(), lora_b.grad.clone())
    lora_a.grad = lora_b.grad = None
    _triton(x, weight, bias, lora_a, lora_b, 2.0).backward(grad_y)
    assert torch.equal(first[0], lora_a.grad) and torch.equal(first[1], lora_b.grad)  # bitwise


@interpreter
@pytest.mark.parametrize("frozen_x", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_frozen_adapters(frozen_x, compiled):
    # Adapters frozen (e.g. the reference pass, or training only the base): the backward op returns
    # empty placeholders for dA/dB (and dx); torch.library rejects outputs that alias each other, in the
    # real op and in its fake (compile). With frozen_x, only the weight is trainable: all three are empty.
    x, weight, bias, lora_a, lora_b = _inputs((2, 5), 48, 40, 4, torch.float32, "cpu", train_base=frozen_x)
    x.requires_grad_(not frozen_x)
    lora_a.requires_grad_(False)
    lora_b.requires_grad_(False)
    fn = torch.compile(_kernel_module().lora_linear, fullgraph=True, dynamic=False) if compiled else _triton
    y, grads, grad_y = _run(fn, x, weight, bias, lora_a, lora_b, 0.5)
    y_ref, grads_ref, _ = _reference_fp64(x, weight, bias, lora_a, lora_b, 0.5, grad_y)
    assert set(grads) == set(grads_ref) == ({"weight", "bias"} if frozen_x else {"x"})
    assert_close_verbose(y, y_ref.float(), atol=1e-5, rtol=1e-5, name="y")
    for k in grads:
        assert_close_verbose(grads[k], grads_ref[k].float(), atol=1e-5, rtol=1e-5, name=f"d{k}")


@interpreter
def test_launch_configs_follow_the_launching_device(monkeypatch):
    # The autotuner only ever sees the table of the device it launches on (launch.arch at call time).
    lora = _kernel_module()
    from rlhf_fast.kernels import launch

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for arch in launch.TARGETS:
            monkeypatch.setattr(launch, "arch", lambda device, arch=arch: arch)
            pruned = lora._prune_gemm_configs([], {"p_ptr": torch.empty(0, dtype=dtype)})
            assert [str(c) for c in pruned] == [str(c) for c in lora.gemm_configs(dtype, arch)]
            assert 1 <= len(pruned) <= 4
            for cfg in (*pruned, lora.project_config(dtype, arch), lora.grad_config(dtype, arch)):
                assert cfg.num_warps in (2, 4, 8) and cfg.num_stages >= 1
    # targets outside the table share the table of one whose shared memory they have
    assert lora._table_key(torch.bfloat16, 120) == (16, 89) and lora._table_key(torch.float32, 100) == (32, 90)


@interpreter
def test_kernel_module_does_not_shadow_the_public_function():
    # The module is `lora`, so importing it (as the triton backend does) cannot replace the package
    # attribute `lora_linear`, the public function.
    import rlhf_fast.kernels.lora  # noqa: F401

    x, weight, bias, lora_a, lora_b = _inputs((3,), 48, 40, 4, torch.float32, "cpu")
    _triton(x, weight, bias, lora_a, lora_b, 0.5)
    assert kernels.lora_linear.__module__ == "rlhf_fast.kernels" and callable(kernels.lora_linear)
    assert kernels.lora is _kernel_module() and kernels.lora.lora_linear is not kernels.lora_linear


@interpreter
@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(x=torch.randn(5, 47)), ValueError, "in_features=48|shapes do not fit"),
        (dict(lora_a=torch.randn(4, 47)), ValueError, "lora_a"),
        (dict(lora_b=torch.randn(40, 5)), ValueError, "lora_b"),
        (dict(bias=torch.randn(41)), ValueError, "bias"),
        (dict(weight=torch.randn(40, 48, 1)), ValueError, "2-D"),
        (dict(x=torch.randn(5, 48, dtype=torch.float64)), TypeError, "dtype|float64"),
        (dict(lora_b=torch.randn(40, 4, dtype=torch.float16)), TypeError, "lora_b"),
        (dict(x=torch.randint(0, 3, (5, 48))), TypeError, "x must .*int64"),
        (dict(lora_a=torch.randn(4, 48, device="meta")), ValueError, "lora_a is on meta"),
        (dict(lora_a=torch.randn(129, 48), lora_b=torch.randn(40, 129)), ValueError, "rank 129"),
        (
            dict(
                x=torch.randn(5, 48).bfloat16(),
                weight=torch.randn(40, 48).bfloat16(),
                bias=None,
                lora_a=torch.randn(4, 48).bfloat16(),
                lora_b=torch.randn(40, 4).bfloat16(),
            ),
            TypeError,
            "bfloat16",
        ),
    ],
)
@pytest.mark.parametrize("entry", ["dispatch", "op"])
def test_bad_input_raises_clear_error(change, exc, match, entry):
    args = dict(
        x=torch.randn(5, 48),
        weight=torch.randn(40, 48),
        bias=torch.randn(40),
        lora_a=torch.randn(4, 48),
        lora_b=torch.randn(40, 4),
    )
    args.update(change)
    if entry == "dispatch":
        call = lambda: kernels.lora_linear(**args, scale=1.0, backend="triton")  # noqa: E731
    else:  # the registered op must validate by itself when called directly
        call = lambda: torch.ops.rlhf_fast.lora_linear_fwd(*args.values(), 1.0)  # noqa: E731
        _kernel_module()  # registers the op
    with pytest.raises(exc, match=match):
        call()


@interpreter
def test_registered_op_passes_opcheck():
    _kernel_module()
    x, weight, bias, lora_a, lora_b = _inputs((2, 3), 48, 40, 4, torch.float32, "cpu", train_base=True)
    torch.library.opcheck(
        torch.ops.rlhf_fast.lora_linear_fwd.default,
        (x, weight, bias, lora_a, lora_b, 0.5),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@interpreter
def test_torch_compile_fullgraph_keeps_the_op():
    # Under the interpreter the op is an opaque custom_op (compile cannot trace interpreted kernels);
    # this checks the registration, fake impl and autograd under torch.compile(fullgraph=True). The
    # triton_op decomposition itself is covered by the GPU tier.
    fn = _kernel_module().lora_linear
    inputs = _inputs((2, 5), 48, 40, 4, torch.float32, "cpu")
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    y, grads, grad_y = _run(compiled, *inputs, 0.5)
    y_eager, grads_eager, _ = _run(fn, *inputs, 0.5, grad_y=grad_y)
    assert_close_verbose(y, y_eager, name="y")
    for k in grads:
        assert_close_verbose(grads[k], grads_eager[k], name=f"d{k}")


@interpreter
def test_gpt_with_triton_backend_matches_torch_backend():
    from rlhf_fast.model import GPT, adapter_parameters, add_lora

    def build(backend):
        torch.manual_seed(0)
        model = GPT.from_preset("tiny", attn_backend="torch", kernel_backend=backend)
        add_lora(model, "policy", rank=4, alpha=8)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in adapter_parameters(model, "policy"):  # non-zero B: the adapter must matter
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        return model

    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    results = {}
    for backend in ("torch", "triton"):
        model = build(backend)
        logits = model(ids, mask)
        logits.float().pow(2).mean().backward()
        results[backend] = (logits, [p.grad for p in adapter_parameters(model, "policy")])
    (logits_t, grads_t), (logits_k, grads_k) = results["torch"], results["triton"]
    base_model = build("torch")
    with torch.no_grad(), base_model.disable_adapters():
        assert (logits_t - base_model(ids, mask)).abs().max() > 1e-3  # the adapter changes the logits
    assert_close_verbose(logits_k, logits_t, atol=1e-4, rtol=1e-4, name="logits")
    for i, (gk, gt) in enumerate(zip(grads_k, grads_t, strict=True)):
        assert gt is not None and gt.abs().max() > 0
        assert_close_verbose(gk, gt, atol=1e-5, rtol=1e-4, name=f"adapter grad {i}")


@interpreter
def test_compiled_gpt_keeps_every_lora_op_in_one_graph():
    from rlhf_fast.model import GPT, add_lora

    torch.manual_seed(0)
    model = GPT.from_preset("tiny", attn_backend="torch", kernel_backend="triton")
    add_lora(model, "policy", rank=4)
    graphs = []

    def capture(gm, example_inputs):  # a dynamo backend that records the graph and runs it as is
        graphs.append(gm)
        return gm.forward

    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(2))
    logits = torch.compile(model, fullgraph=True, backend=capture)(ids)
    lora_calls = [n for n in graphs[0].graph.nodes if "rlhf_fast.lora_linear_fwd" in str(n.target)]
    assert len(graphs) == 1 and len(lora_calls) == 4 * model.config.n_layer
    assert_close_verbose(logits, model(ids), atol=1e-5, rtol=1e-5, name="logits")


_COMPILE_FIRST = """
import sys, torch
from rlhf_fast import kernels
assert "triton" not in sys.modules and "torch._dynamo" not in sys.modules, "package import must stay light"
public = kernels.lora_linear
x, w, a, b = torch.randn(3, 48), torch.randn(40, 48), torch.randn(4, 48), torch.randn(40, 4)
fn = lambda x: kernels.lora_linear(x, w, None, a, b, 0.5, backend="triton")
y = torch.compile(fn, fullgraph=True, backend="eager")(x)
torch.testing.assert_close(y, kernels.lora_linear(x, w, None, a, b, 0.5, backend="torch"))
assert "rlhf_fast.kernels.lora" in sys.modules and kernels.lora_linear is public, "the kernel module shadowed it"
print("ok")
"""


@interpreter
def test_first_call_inside_compile_and_light_package_import():
    # A fresh process whose first kernel call is inside torch.compile(fullgraph=True): loading the
    # Triton module there must not break the graph (nor replace the public `lora_linear`); importing
    # rlhf_fast.kernels loads neither triton nor dynamo.
    import os
    import subprocess
    import sys
    from pathlib import Path

    import rlhf_fast

    root = str(Path(rlhf_fast.__file__).resolve().parents[1])  # this checkout, not an installed copy
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FIRST], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


_FP64_SCALE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlhf_fast.kernels import lora

fn = lora._lora_linear_fwd_kernel
sig = {p.name: "constexpr" if p.is_constexpr else "*bf16" if p.name.endswith("_ptr") else "fp64"
       if p.name == "scale" else "i32" for p in fn.params}
sig["lo_ptr"] = "*fp32"
consts = dict(HAS_LORA=True, HAS_BIAS=True, DOT_PRECISION="tf32", R_PAD=32, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16,
              GROUP_M=8)
ir = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 86, 32)).asm["ttir"]
f64 = [line for line in ir.splitlines() if "f64" in line and "tt.func" not in line and "arith.truncf" not in line]
assert not f64, f64[:3]
print("ok")
"""


def test_fp64_scale_compiles_to_fp32_maths():
    # inductor may pass `scale` as fp64: the kernel casts it to fp32 once (no fp64 maths in the seed).
    # Cross-compiled for sm_86 in a process without TRITON_INTERPRET; no GPU needed.
    import os
    import subprocess
    import sys
    from pathlib import Path

    import rlhf_fast

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(rlhf_fast.__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", _FP64_SCALE], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# GPU tier


GPU_CASES = [  # GPT-2 (small) c_attn / c_fc and GPT-2 XL attention shapes, odd token counts
    ((4, 1023), 768, 2304, 16),
    ((8, 511), 768, 3072, 8),
    ((3, 997), 1600, 1600, 64),
    ((2, 1025), 1600, 6400, 1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("lead,in_f,out_f,r", GPU_CASES)
def test_gpu_bf16_within_eager_error(lead, in_f, out_f, r):
    inputs = _inputs(lead, in_f, out_f, r, torch.bfloat16, "cuda", train_base=(r == 8))
    y, grads, grad_y = _run(_triton, *inputs, 2.0)
    y_eager, grads_eager, _ = _run(reference.lora_linear, *inputs, 2.0, grad_y=grad_y)
    up = lambda t: None if t is None else t.detach().float().requires_grad_(t.requires_grad)  # noqa: E731
    y_ref, grads_ref, _ = _run(reference.lora_linear, *(up(t) for t in inputs), 2.0, grad_y=grad_y.float())
    assert_within_eager_error(y, y_eager, y_ref, atol=1e-2, name="y")
    for k in grads_ref:
        assert_within_eager_error(grads[k], grads_eager[k], grads_ref[k], atol=1e-2, name=f"d{k}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_odd_shapes_match_reference(dtype):
    inputs = _inputs((3, 37), 100, 771, 33, dtype, "cuda", train_base=True)
    _check_against_reference(inputs, 0.5, dtype)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    inputs = _inputs((4, 129), 768, 2304, 16, torch.bfloat16, "cuda")
    fn = _kernel_module().lora_linear
    compiled = torch.compile(fn, fullgraph=True)
    y, grads, grad_y = _run(compiled, *inputs, 2.0)
    y_eager, grads_eager, _ = _run(fn, *inputs, 2.0, grad_y=grad_y)
    assert_close_verbose(y, y_eager, atol=2e-2, rtol=2e-2, name="y")
    for k in grads:
        assert_close_verbose(grads[k], grads_eager[k], atol=2e-2, rtol=2e-2, name=f"d{k}")
