"""Public functional API of the kernels: `lora_linear`, `masked_attention`, `gae`, `ppo_loss`,
`linear_logprobs`.

Every function takes `backend=`:
  "torch"  - the best PyTorch arrangement, any device: for `lora_linear` the cuBLAS-first autograd
             Function and for `masked_attention` SDPA (`library.py`); for the others the formulas of
             `reference.py`, which is also every kernel's correctness oracle;
  "triton" - the Triton kernel (CUDA tensors; CPU tensors too when TRITON_INTERPRET=1 was set
             before triton was imported, which is how kernel tests run without a GPU);
  "auto"   - `lora_linear` and `masked_attention`: the backend a recorded GPU run measured fastest for
             this device, dtype and shape bucket (`dispatch.py`), else torch; `gae`, `ppo_loss` and
             `linear_logprobs`: triton on CUDA when built, torch elsewhere.

Inputs are validated here, once, so every backend sees the same checked shapes and dtypes and a bad
call fails with a message naming the argument. This package imports only torch (triton lazily).

Precision (docs/precision.md): under `torch.autocast` the matmul kernels (`lora_linear`,
`masked_attention`, `linear_logprobs`) take every floating input in the autocast dtype, cast here for both backends, so
fp32 master weights, bf16 weights and CUDA autocast's fp32 layer_norm outputs all meet in one dtype;
gradients flow back through the casts to the masters. The RL kernels (`gae`, `ppo_loss`) and the
log-probs of `linear_logprobs` always compute in fp32 whatever their inputs' dtype.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from . import dispatch, library, reference
from .reference import LOGPROB_CHUNK_BYTES, LinearLogprobsOutput, PPOLossOutput

__all__ = [
    "BACKENDS",
    "LOGPROB_CHUNK_BYTES",
    "LinearLogprobsOutput",
    "PPOLossOutput",
    "gae",
    "linear_logprobs",
    "lora_linear",
    "masked_attention",
    "ppo_loss",
    "resolve_backend",
    "triton_available",
    "triton_implemented",
]

BACKENDS = ("auto", "torch", "triton")

# kernel name -> module holding its Triton implementation (a function of the same name, same
# signature minus `backend`). A kernel whose module is absent has only the torch backend.
_TRITON_MODULES = {
    "lora_linear": "rlhf_fast.kernels.lora",
    "masked_attention": "rlhf_fast.kernels.attention",
    "gae": "rlhf_fast.kernels.ppo",
    "ppo_loss": "rlhf_fast.kernels.ppo",
    "linear_logprobs": "rlhf_fast.kernels.logprobs",
}


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when the triton package is installed (it is imported only when a kernel runs)."""
    return importlib.util.find_spec("triton") is not None


def _constant_under_compile(fn):
    """What torch.compiler.assume_constant_result does (torch.compile runs `fn` at trace time and keeps
    its result as a constant instead of tracing it), without that call's import of torch._dynamo and
    triton at package import. Covered by the compiled-model tests in tests/kernels/test_lora_linear.py."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile  # importlib.util.find_spec would break the graph
def triton_implemented(name: str) -> bool:
    """True when kernel `name` has a Triton implementation in this build."""
    module = _TRITON_MODULES.get(name)
    return module is not None and importlib.util.find_spec(module) is not None and triton_available()


# What the Triton kernels cover; "auto" falls back to torch outside it, "triton" raises there.
MAX_LORA_RANK = 128  # R_PAD = 128 keeps the LoRA seed tiles in registers (kernels/lora.py)
HEAD_DIM_RANGE = (16, 128)  # attention tiles hold one head (kernels/attention.py)


def resolve_backend(name: str, backend: str, device: torch.device, supported: bool = True, recorded=None) -> str:
    """Turn `backend` ("auto" | "torch" | "triton") into the concrete backend for kernel `name`.

    supported=False: these shapes are outside the Triton kernel's range, so "auto" picks torch.
    recorded: a thunk giving the dispatch table's winner for this call (kernels whose "auto" follows
    the records); without it "auto" means triton on CUDA."""
    if backend not in BACKENDS:
        raise ValueError(f"{name}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda" or not supported or not triton_implemented(name):
            return "torch"
        return "triton" if recorded is None else recorded()
    if backend == "triton":
        if not triton_implemented(name):
            raise ValueError(f"{name}: backend='triton' is not available (no Triton implementation "
                             "in this build, or triton is not installed); use backend='torch'")
        if device.type != "cuda" and not interpreter_enabled():
            raise ValueError(f"{name}: backend='triton' needs CUDA tensors, got {device.type} tensors "
                             "(set TRITON_INTERPRET=1 before importing triton to run on CPU)")
    return backend


_TRITON_FNS: dict = {}  # kernel name -> its Triton implementation, filled on first use


@_constant_under_compile
def _load_triton() -> bool:
    """Import every Triton kernel module (registering its torch ops) and cache the functions.

    torch.compile runs this at trace time instead of tracing it (an import would break the graph). All
    at once: dynamo snapshots `_TRITON_FNS` at its first lookup in a frame, so a kernel added to it
    later in the same trace would be missing from that snapshot (a graph break, seen on an H200).
    """
    if not _TRITON_FNS:
        for name, module in _TRITON_MODULES.items():
            _TRITON_FNS[name] = getattr(importlib.import_module(module), name)
    return True


def _triton_fn(name: str):
    _load_triton()
    return _TRITON_FNS[name]


def _check_float(name: str, arg: str, t: torch.Tensor):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: {arg} must be a floating-point tensor, got {t.dtype}")


def _autocast(device: torch.device, *tensors):
    """The tensors in the autocast dtype when autocast is on for their device type, else unchanged."""
    if not torch.is_autocast_enabled(device.type):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(t if t is None else t.to(dtype) for t in tensors)


def _check_same(name: str, ref_arg: str, ref: torch.Tensor, dtypes: bool = True, **others):
    for arg, t in others.items():
        if t is None:
            continue
        _check_float(name, arg, t)
        if t.device != ref.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but {ref_arg} is on {ref.device}")
        if dtypes and t.dtype != ref.dtype:
            raise TypeError(f"{name}: {arg} has dtype {t.dtype} but {ref_arg} has {ref.dtype}")


def lora_linear(x, weight, bias, lora_a, lora_b, scale: float, *, lora_input=None, backend: str = "auto"):
    """x @ weight.T + bias + scale * (u @ lora_a.T) @ lora_b.T with u = lora_input, else x.

    x (..., in); weight (out, in); bias (out,) or None; lora_a (r, in); lora_b (out, r); lora_input: the
    adapter's input when it differs from x (PEFT's dropout(x) while training), shaped like x; the torch
    backend only.
    """
    name = "lora_linear"
    _check_float(name, "x", x)
    _check_same(name, "x", x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, lora_input=lora_input,
                dtypes=False)
    x, weight, bias, lora_a, lora_b, lora_input = _autocast(x.device, x, weight, bias, lora_a, lora_b, lora_input)
    _check_same(name, "x", x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, lora_input=lora_input)
    if lora_input is not None and lora_input.shape != x.shape:
        raise ValueError(f"{name}: lora_input must be shaped like x {tuple(x.shape)}, got {tuple(lora_input.shape)}")
    if lora_input is not None and backend == "triton":
        raise ValueError(f"{name}: backend='triton' has no separate lora_input (adapter dropout); "
                         "use 'torch' or 'auto'")
    if weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(f"{name}: weight, lora_a and lora_b must be 2-D, got {tuple(weight.shape)}, "
                         f"{tuple(lora_a.shape)}, {tuple(lora_b.shape)}")
    out_f, in_f = weight.shape
    r = lora_a.shape[0]
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"{name}: x has {tuple(x.shape)}, its last dim must be in_features={in_f}")
    if lora_a.shape[1] != in_f:
        raise ValueError(f"{name}: lora_a must be (r, {in_f}), got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (out_f, r):
        raise ValueError(f"{name}: lora_b must be ({out_f}, {r}), got {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"{name}: bias must be ({out_f},), got {tuple(bias.shape)}")
    scale = float(scale)
    recorded = lambda: dispatch.lora_backend(x, weight, r)  # noqa: E731
    supported = r <= MAX_LORA_RANK and lora_input is None
    if resolve_backend(name, backend, x.device, supported=supported, recorded=recorded) == "triton":
        return _triton_fn(name)(x, weight, bias, lora_a, lora_b, scale)
    return library.lora_linear_cublas(x, weight, bias, lora_a, lora_b, scale, lora_input)


def masked_attention(q, k, v, key_padding_mask=None, causal: bool = True, sm_scale: float | None = None,
                     *, backend: str = "auto"):
    """Causal (bottom-right) + key-padding attention; (B, H, Tq, D). Rows with no visible key are 0.

    q (B, H, Tq, D); k, v (B, H, Tk, D); key_padding_mask (B, Tk) bool, True = real token.
    """
    name = "masked_attention"
    _check_float(name, "q", q)
    _check_same(name, "q", q, k=k, v=v, dtypes=False)
    q, k, v = _autocast(q.device, q, k, v)
    _check_same(name, "q", q, k=k, v=v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: q, k, v must be 4-D (B, H, T, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, _, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"{name}: k and v must be ({B}, {H}, Tk, {D}), got {tuple(k.shape)} and {tuple(v.shape)}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"{name}: key_padding_mask must be bool (True = real token), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"{name}: key_padding_mask must be ({B}, {k.shape[2]}), "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"{name}: key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    lo, hi = HEAD_DIM_RANGE
    recorded = lambda: dispatch.attention_backend(q, k, key_padding_mask is not None)  # noqa: E731
    if resolve_backend(name, backend, q.device, supported=lo <= D <= hi, recorded=recorded) == "triton":
        return _triton_fn(name)(q, k, v, key_padding_mask, causal, sm_scale)
    return library.masked_attention_sdpa(q, k, v, key_padding_mask, causal, sm_scale)


def _check_bt(name: str, **tensors):
    shape = device = None
    for arg, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: {arg} must be (B, T), got shape {tuple(t.shape)}")
        if shape is None:
            shape, device, first = t.shape, t.device, arg
        elif t.shape != shape:
            raise ValueError(f"{name}: {arg} has shape {tuple(t.shape)} but {first} has {tuple(shape)}")
        elif t.device != device:
            raise ValueError(f"{name}: {arg} is on {t.device} but {first} is on {device}")
        if arg != "mask" and not t.is_floating_point():
            raise TypeError(f"{name}: {arg} must be floating point, got {t.dtype}")


def _fp32(*tensors):
    """RL maths runs in fp32 whatever the training precision (gradients flow back through the cast)."""
    return tuple(t if t is None else t.float() for t in tensors)


def gae(rewards, values, mask, gamma: float, lam: float, *, backend: str = "auto"):
    """Masked GAE: (advantages, returns), both (B, T) fp32, no gradient. See DESIGN.md."""
    name = "gae"
    _check_bt(name, rewards=rewards, values=values, mask=mask)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"{name}: gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    rewards, values = _fp32(rewards, values)
    if resolve_backend(name, backend, rewards.device) == "triton":
        return _triton_fn(name)(rewards, values, mask, float(gamma), float(lam))
    return reference.gae(rewards, values, mask, gamma, lam)


def ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, mask, *,
             clip_eps: float = 0.2, value_clip_eps: float = 0.2, vf_coef: float = 0.5,
             ref_logprobs=None, kl_coef: float = 0.0, backend: str = "auto") -> PPOLossOutput:
    """Clipped PPO policy + value (+ k3 KL) loss, token mean over mask == 1. See DESIGN.md."""
    name = "ppo_loss"
    _check_bt(name, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, values=values,
              old_values=old_values, returns=returns, mask=mask, ref_logprobs=ref_logprobs)
    if clip_eps < 0 or value_clip_eps < 0:
        raise ValueError(f"{name}: clip_eps and value_clip_eps must be >= 0")
    *floats, ref_logprobs = _fp32(logprobs, old_logprobs, advantages, values, old_values, returns, ref_logprobs)
    kwargs = dict(clip_eps=float(clip_eps), value_clip_eps=float(value_clip_eps), vf_coef=float(vf_coef),
                  ref_logprobs=ref_logprobs, kl_coef=float(kl_coef))
    args = (*floats, mask)
    if resolve_backend(name, backend, logprobs.device) == "triton":
        return _triton_fn(name)(*args, **kwargs)
    return reference.ppo_loss(*args, **kwargs)



def linear_logprobs(hidden, weight, targets, *, temperature: float = 1.0, with_entropy: bool = False,
                    chunk_tokens: int | None = None, backend: str = "auto") -> LinearLogprobsOutput:
    """log softmax(hidden @ weight.T / temperature)[targets], fp32, without materialising (N, V) logits.

    hidden (..., C); weight (V, C) (the lm-head, nn.Linear layout); targets (...) integer, negative =
    ignored (0 out, no gradient). Returns `LinearLogprobsOutput(logprobs, entropy, logsumexp)`, each
    (...) fp32, entropy None unless `with_entropy`; all differentiable, to hidden and (when it requires
    grad) weight. `chunk_tokens` bounds the tokens whose (chunk, V) scratch exists at once (default:
    LOGPROB_CHUNK_BYTES of it).
    """
    name = "linear_logprobs"
    _check_float(name, "hidden", hidden)
    _check_same(name, "hidden", hidden, weight=weight, dtypes=False)
    hidden, weight = _autocast(hidden.device, hidden, weight)
    _check_same(name, "hidden", hidden, weight=weight)
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: need hidden (..., C) and weight (V, C), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"{name}: targets must be an integer tensor, got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")
    if targets.shape != hidden.shape[:-1] or targets.device != hidden.device:
        raise ValueError(f"{name}: targets must be {tuple(hidden.shape[:-1])} on {hidden.device}, got "
                         f"{tuple(targets.shape)} on {targets.device}")
    if not (temperature > 0 and temperature != float("inf")):
        raise ValueError(f"{name}: temperature must be a positive finite number, got {temperature}")
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"{name}: chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    # A value check is a device->host sync, so only eagerly (compiled graphs skip it, like GPT's ids check).
    if not torch.compiler.is_compiling() and targets.numel() and int(targets.max()) >= weight.shape[0]:
        raise ValueError(f"{name}: target id {int(targets.max())} is out of range for a vocabulary of "
                         f"{weight.shape[0]}")
    args = (hidden, weight, targets, float(temperature), bool(with_entropy), chunk_tokens)
    if resolve_backend(name, backend, hidden.device) == "triton":
        return _triton_fn(name)(*args)
    return reference.linear_logprobs(*args)
