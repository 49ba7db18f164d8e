"""What every kernel launcher asks about the GPU it launches on, in one place.

Launch configs are chosen per dtype and per target architecture (`arch`: 80, 86, 89, 90, ...), so a
config that fits an H100 is never launched on a 99 KB-shared-memory consumer card. The cross-compile
test tier (tests/kernels/test_cross_compile.py) replaces `arch`, `num_sms` and `wrap` here to capture
every launch the launchers make for each target on a machine without a GPU, so launchers must call
them through this module (`launch.arch(...)`), never bind them by name.
"""

from __future__ import annotations

import functools
import os

import torch

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
    """The launchable form of a kernel inside a `triton_op`: `wrap_triton(kernel)` on GPUs, so
    torch.compile traces the launch; the kernel itself under the interpreter (plain Python there)."""
    if INTERPRET:
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def require_launchable(device: torch.device, name: str) -> None:
    """Raise unless a Triton kernel can run on tensors of `device` here (CUDA, or any under the
    interpreter). The cross-compile tier replaces this to run launchers on CPU tensors."""
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{name}: needs CUDA tensors, got {device.type} (or set TRITON_INTERPRET=1 "
                         "before importing triton)")


def register_op(name: str, fake):
    """Decorator: a torch.library op named `name`. On GPUs a `triton_op` (torch.compile traces into its
    kernels); under the interpreter an opaque custom_op with the `fake` impl instead, because compile
    would trace through the body and silently drop interpreted kernel launches (they are plain Python
    calls, invisible to tracing)."""

    def register(fn):
        if not INTERPRET:
            from torch.library import triton_op

            return triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
        return op

    return register
