"""What every kernel launcher asks about the GPU it launches on, and how its launches and ops are called.

Launch configs are chosen per dtype and per target architecture (`arch`: 80, 86, 89, 90, ...), so a
config that fits an H100 is never launched on a 99 KB-shared-memory consumer card. The cross-compile
test tier (tests/kernels/cross_compile.py) replaces `arch`, `num_sms`, `wrap` and `require_launchable`
here to capture every launch the launchers make for each target on a machine without a GPU, so
launchers must call them through this module (`launch.arch(...)`), never bind them by name.

Host cost (benchmarks/bench_host_overhead.py): an eager call must cost the host no more than the torch
path it replaces, so `wrap` hands back the kernel itself unless the launch is being traced, `cdiv` and
`next_pow2` replace triton's constexpr helpers (~5 us per host call), and `register_op`'s ops skip the
dispatcher's custom-op layer on eager calls that need nothing from it (see `Op`).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

try:  # how torch's own wrap_triton tells a traced launch from an eager one (see `wrap`)
    from torch._library.triton import is_wrap_triton_enabled as _wrap_triton_enabled
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # a torch without them: always wrap (correct; only the eager host cost is higher)

    def _wrap_triton_enabled() -> bool:
        return True

    def _set_wrap_triton_enabled(enabled: bool):
        return contextlib.nullcontext()

# Read once: the interpreter runs kernels on CPU tensors; it has fixed small tiles and no autotuning.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

TARGETS = (80, 86, 89, 90)  # A100; RTX 30xx / A-series; RTX 40xx / L4; H100 / H200
# Opt-in shared memory per block (bytes), from the CUDA programming guide's compute-capability table.
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
INTERPRET_ARCH = 86  # the interpreter picks the configs of the most constrained consumer target


@functools.cache
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def arch(device: torch.device) -> int:
    """Compute capability as an int (86 for sm_86) of the device a kernel is launched on."""
    if device.type != "cuda":
        return INTERPRET_ARCH
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


def smem_limit(target: int) -> int:
    """Shared memory one block may use on `target` (the 99 KB of sm_86 when the target is unknown)."""
    return SMEM_LIMIT.get(target, SMEM_LIMIT[86])


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors; 4 under the interpreter, so tests exercise split/reduce paths."""
    if device.type != "cuda":
        return 4
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def wrap(kernel):
    """The launchable form of `kernel` inside a `triton_op`: `kernel` itself when the launch runs eagerly,
    `torch.library.wrap_triton(kernel)` while torch.compile / make_fx traces the op (so the launch is
    traced into the graph instead of run on fake tensors).

    Eager or traced is decided as `wrap_triton` itself decides it, by `is_wrap_triton_enabled()`: a
    triton_op turns it off around its eager body, tracing (the op's functional decomposition) leaves it on.
    In eager mode `wrap_triton` would return the kernel too, after ~5 us of checks per launch (an
    autotuned kernel outside an op costs ~70 us: its traceable wrapper inspects `Autotuner.__init__`);
    here it costs one thread-local read. The traced form is built afresh per launch, not cached: it
    holds the kernel's index in dynamo's side table, which `torch._dynamo.reset()` clears, and tracing
    runs once per graph anyway. Under the interpreter the kernel is plain Python: always itself."""
    if INTERPRET or not _wrap_triton_enabled():
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code: `triton.cdiv` is a constexpr_function costing ~5 us per host call."""
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1): `triton.next_power_of_2` without its ~5 us host cost."""
    if isinstance(n, int):
        return 1 << (n - 1).bit_length()
    import triton  # a symbolic size under torch.compile: triton's bit arithmetic works on SymInts

    return triton.next_power_of_2(n)


def require_launchable(device: torch.device, name: str) -> None:
    """Raise unless a Triton kernel can run on tensors of `device` here (CUDA, or any under the
    interpreter). The cross-compile tier replaces this to run launchers on CPU tensors."""
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{name}: needs CUDA tensors, got {device.type} (or set TRITON_INTERPRET=1 "
                         "before importing triton)")


# Tensor types an op's body may launch kernels on directly; any other (FakeTensor, FunctionalTensor, DTensor,
# ...) goes through the dispatcher, where its subclass or mode handles the op.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _dispatcher_needed(args) -> bool:
    """True when a call of an op must go through the dispatcher: torch.compile (dynamo folds
    is_compiling() to True, so the op lands in its graph), make_fx / export / fake tensors / any other
    TorchDispatchMode (on the dispatch-mode stack), torch.func transforms, or a tensor subclass among the
    arguments."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return True
    if torch._C._are_functorch_transforms_active():
        return True
    return any(type(a) not in _PLAIN_TENSORS for a in args if isinstance(a, torch.Tensor))


class Op:
    """A kernel's torch.library op (`.op`; also `torch.ops.<name>`) with a cheaper way in for eager calls.

    The dispatcher's custom-op layer costs ~13 us of Python per call, and a forward op with a registered
    autograd formula plus its backward op ~50 us more per step than an autograd.Function doing the same:
    more than the launches themselves, and in eager mode nothing needs it. So a call goes through the op
    only when something does (`_dispatcher_needed`: compile, tracing, modes, subclasses); otherwise it runs
    the op's function directly, as the op's eager kernel would (launches unwrapped), inside an
    autograd.Function made of the same `setup_context` and `backward` that `register_autograd` registers
    on the op. One body, one autograd formula: both ways in run them.
    """

    def __init__(self, name: str, op, fn):
        namespace, opname = name.split("::")
        self.name, self.op, self.fn = name, op, fn
        self._packet = getattr(getattr(torch.ops, namespace), opname)  # what compiled graphs call
        self._function = None

    def register_autograd(self, backward, *, setup_context) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)

        def forward(ctx, *args):  # ctx-style: a `setup_context` staticmethod costs an inspect.signature per call
            out = self._eager(*args)
            setup_context(ctx, args, out)
            return out

        members = dict(forward=staticmethod(forward), backward=staticmethod(backward))
        self._function = type(self.name.replace("::", "_"), (torch.autograd.Function,), members)

    def _eager(self, *args):
        with _set_wrap_triton_enabled(False):  # what a triton_op's eager kernel does around its body
            return self.fn(*args)

    def __call__(self, *args):
        if _dispatcher_needed(args):
            return self._packet(*args)
        if self._function is None or not torch.is_grad_enabled():
            return self._eager(*args)
        return self._function.apply(*args)


def register_op(name: str, fake=None):
    """Decorator: an `Op` around a torch.library op named `name`. On GPUs a `triton_op` (torch.compile
    traces into its kernels); under the interpreter, when `fake` is given, an opaque custom_op with the
    `fake` impl instead, because compile would trace through the body and silently drop interpreted
    kernel launches (they are plain Python calls, invisible to tracing)."""

    def register(fn):
        if INTERPRET and fake is not None:
            op = torch.library.custom_op(name, fn, mutates_args=())
            op.register_fake(fake)
        else:
            from torch.library import triton_op

            op = triton_op(name, fn, mutates_args=())
        return Op(name, op, fn)

    return register
