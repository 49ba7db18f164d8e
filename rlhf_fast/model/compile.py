"""Regional compilation: the one way trainers, scorers and benchmarks compile a model.

`compile_model(module)` marks every transformer `Block` inside `module` to run its full-sequence forward
through one `torch.compile`d function, shared by every block of every model. Dynamo caches compiled code
per code object, so gpt2-xl's 48 blocks cost what one block costs (whole-model compilation unrolls all
of them), and the graphs are reused by the policy, the critic, the reference and the reward model, which
are one base with LoRA adapters. This is PyTorch's documented remedy for repeated blocks ("regional
compilation").

- `dynamic=True` (the default): the batch and sequence dims are marked dynamic before the first compile,
  so new prompt/response lengths reuse the graph instead of recompiling (whole-model automatic-dynamic
  compiles once static, then again dynamic at the second length). Sizes 0 and 1 still specialize.
- The LoRA adapters are inputs of the region (`LoRALinear.region_adapter`: the active adapter's A, B,
  scale; zeros when the base runs), so the policy, the critic, the reward model and the reference share
  one graph. What still compiles separately, by dynamo's guards: grad mode (training vs scoring), and
  with grad on, which tensors require grad (e.g. a reference pass with grad). A LoRA PPO run meets two;
  `REGION_RECOMPILE_LIMIT` leaves room for more, and `region_graphs()` counts them (the trainers log it).
- KV-cache calls (prefill, decode) stay eager here: generation captures its own decode step as a CUDA
  graph (`rlhf_fast.generation`).

The compile cache (`load_compile_cache` / `save_compile_cache`, or `RLHF_FAST_COMPILE_CACHE=<dir>`) is
PyTorch's mega-cache: inductor, AOTAutograd, Triton and autotuning artifacts, reloaded on a machine with
the same GPU, torch and triton. It does not skip dynamo tracing, which regional compilation keeps short.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

CACHE_ENV = "RLHF_FAST_COMPILE_CACHE"
CACHE_FILE, CACHE_META = "compile_cache.bin", "compile_cache.json"
REGION_RECOMPILE_LIMIT = 32  # per-region variants: grad mode x which inputs require grad (LoRA PPO: 2)
BACKENDS = ("inductor", "aot_eager", "eager")  # aot_eager: dynamo + AOTAutograd; eager: dynamo (tests, CPU)


@dataclass(frozen=True)
class CompileOptions:
    backend: str = "inductor"
    mode: str | None = None  # torch.compile's mode; None = default (no CUDA graphs inside a training step)
    dynamic: bool = True  # symbolic batch and sequence sizes from the first compile

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"compile backend must be one of {BACKENDS}, got {self.backend!r}")


def block_region(block, x, key_padding_mask, adapters):
    """The compiled region: a Block's full-sequence forward (no KV cache), its LoRA adapters as inputs."""
    return block.forward_eager(x, key_padding_mask, adapters=adapters)


@functools.cache
def _compiled(options: CompileOptions):
    # dynamic=None + marked dims: batch and sequence symbolic, the width static. dynamic=True would make the
    # width symbolic too, and duck sizing would then tie a sequence length equal to the width to it.
    return torch.compile(block_region, backend=options.backend, mode=options.mode,
                         dynamic=None if options.dynamic else False)


def run_region(options: CompileOptions, block, x, key_padding_mask, adapters: dict):
    """`block_region` through its compiled function: one function (one dynamo cache) for all blocks."""
    if options.dynamic:
        for t in (x, key_padding_mask):
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, 1)
    return _compiled(options)(block, x, key_padding_mask, adapters)


def compile_model(module: nn.Module, *, backend: str = "inductor", mode: str | None = None,
                  dynamic: bool = True) -> nn.Module:
    """Compile every transformer Block inside `module` (a GPT, or anything holding GPTs) in place; returns it.

    Idempotent; `uncompile_model` undoes it. Raises dynamo's recompile limit to REGION_RECOMPILE_LIMIT
    (a process-wide setting) so the region's variants never fall back to eager.
    """
    from .gpt2 import Block

    options = CompileOptions(backend=backend, mode=mode, dynamic=dynamic)
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"compile_model: {type(module).__name__} holds no GPT-2 Block to compile")
    for b in blocks:
        b.compile_options = options
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, REGION_RECOMPILE_LIMIT)
    return module


def uncompile_model(module: nn.Module) -> nn.Module:
    from .gpt2 import Block

    for m in module.modules():
        if isinstance(m, Block):
            m.compile_options = None
    return module


def region_graphs() -> int:
    """Graphs dynamo holds for the block region (every option set, every variant): the trainers log it as
    `compile_graphs`, and its growth per step / iteration as `compiles`."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(block_region.__code__))


# ----------------------------------------------------------------------------------------------
# The compile cache (PyTorch mega-cache)


def cache_dir(flag: str | None = None) -> Path | None:
    """The compile-cache directory: the flag's, else $RLHF_FAST_COMPILE_CACHE, else None."""
    value = flag or os.environ.get(CACHE_ENV)
    return Path(value) if value else None


def _where() -> dict:
    """What a cache is only valid for: the same torch, triton, GPU and Python."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.machine()
    return {"torch": torch.__version__, "triton": triton_version, "device": device,
            "python": platform.python_version()}


def _paths(path) -> tuple[Path, Path]:
    path = Path(path)
    directory = path.parent if path.suffix == ".bin" else path
    return directory / CACHE_FILE, directory / CACHE_META


def load_compile_cache(path) -> bool:
    """Load the mega-cache saved under `path` (a directory, or its compile_cache.bin). False, with a
    warning, when there is none or it was saved for another torch / triton / GPU."""
    data_path, meta_path = _paths(path)
    if not data_path.exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        warnings.warn(f"compile cache {meta_path}: unreadable ({e}); compiling from scratch", stacklevel=2)
        return False
    if meta.get("where") != _where():
        warnings.warn(f"compile cache {data_path} was saved for {meta.get('where')}, this is {_where()}; "
                      "compiling from scratch", stacklevel=2)
        return False
    try:
        torch.compiler.load_cache_artifacts(data_path.read_bytes())
    except Exception as e:  # a corrupt or truncated file: compile from scratch, never fail the run
        warnings.warn(f"compile cache {data_path}: could not be loaded ({type(e).__name__}: {e}); "
                      "compiling from scratch", stacklevel=2)
        return False
    return True


def save_compile_cache(path) -> int:
    """Save this process's compile artifacts under `path` (a directory, or its compile_cache.bin); the
    bytes written (0 when nothing was compiled)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return 0
    data, info = saved
    data_path, meta_path = _paths(path)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = data_path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(data_path)  # never a half-written cache
    counts = {k: len(v) for k, v in getattr(info, "artifacts", {}).items()}  # e.g. {"inductor": 12}
    meta_path.write_text(json.dumps({"where": _where(), "bytes": len(data), "artifacts": counts}, indent=1))
    return len(data)
