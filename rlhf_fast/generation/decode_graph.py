"""The decode step as one replayable unit: model step, sampling, EOS bookkeeping, all on static buffers.

Eager decoding is host-bound (gpt2 at B=32: ~21 ms/step, ~100x the memory floor): every step launches
hundreds of small kernels from Python. So a `DecodeEngine` keeps all per-step state in preallocated device
tensors and captures one step as a CUDA graph (gpt-fast's idea, without `mode="reduce-overhead"`, whose
compile took > 35 s); each later step is one `graph.replay()`.

- State: the current token (B, 1), its position ids (B, 1) and cache slot input_pos (1,), finished (B,)
  bool, and the outputs tokens / response_mask / logprobs (B, T_max), written in place at column = the
  token's cache slot (so one graph serves every prompt length and max_new_tokens of a cache bucket; the
  slot doubles as the device-side step index). No step reads anything back to the host.
- One step (`_step`): decode the current token -> logits (B, V) -> sample (greedy or the Gumbel race on
  `generator`) -> pad for finished rows -> write column input_pos + 1 -> EOS updates finished -> advance.
  The first token, from the prefill's logits, goes through the same `_emit` eagerly (`start`).
- Without a graph (CPU, RLHF_FAST_NO_CUDA_GRAPH=1, or a failed capture) the very same `_step` runs eagerly,
  so the CPU tests run the code the graph captures.
- Sampling in the graph draws from a generator the engine owns and registers with the graph; `start`
  copies the caller's generator state into it and `finish` copies it back, so a graph run draws exactly
  what an eager run with the same generator state draws, and leaves the generator where eager would.
- A graph bakes in Python-level decisions (LoRA adapter state, train/eval, kernel backends, autocast) and
  raw pointers (weights, cache). `prepare` keys the graph on all of them and recaptures when they change.
- compile=True: the model part of the step (`decode_one_token`) goes through torch.compile (inductor,
  fullgraph, static shapes; not reduce-overhead: the graph is ours) before it is captured. Sampling stays
  eager ops in the graph: dynamo cannot trace a torch.Generator, and the draws then match eager exactly.
- Any failure to compile, warm up or capture warns once per reason and runs the step eagerly.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import torch

from rlhf_fast.model.kv_cache import KVCache
from rlhf_fast.model.lora import lora_modules

from .sampling import SamplingConfig, sample_next_token, token_logprobs

NO_CUDA_GRAPH_ENV = "RLHF_FAST_NO_CUDA_GRAPH"  # =1: decode eagerly even on CUDA
WARMUP_STEPS = 2  # eager steps on a side stream before capture (lazy inits, Triton/inductor compiles)
# compile=True: one inductor compile per KV cache (its buffers are static-address guarded) and LoRA state;
# dynamo's default limit (8) would turn a server's batch x bucket mix into a hard fullgraph failure
DECODE_RECOMPILE_LIMIT = 64

_WARNED: set[str] = set()  # failure reasons already warned about: one warning per reason per process
_POOLS: dict[torch.device, object] = {}  # one CUDA-graph memory pool per device, shared by all decode graphs


def decode_one_token(model, kv_cache: KVCache, token, position_ids, input_pos) -> torch.Tensor:
    """token (B, 1) at positions position_ids (B, 1) into slot input_pos (1,); logits (B, V)."""
    h = model.hidden_states(token, position_ids=position_ids, kv_cache=kv_cache, input_pos=input_pos)
    return model.lm_head(h[:, -1])


_COMPILED: list[Callable] = []


def _compiled_decode() -> Callable:
    """`decode_one_token` through inductor, made once: static shapes, so each (B, T_max) compiles once."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(decode_one_token, fullgraph=True, dynamic=False))
    return _COMPILED[0]


@dataclass(frozen=True)
class DecodeSpec:
    """What a step does besides the model: how it samples, what ends a row, what it records."""

    sampling: SamplingConfig
    eos_token_id: int | None = None
    pad_token_id: int = 0  # written for rows finished before the step
    return_logprobs: bool = False


def _warn_once(reason: str, message: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _describe(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def graph_wanted(device: torch.device, cuda_graph: bool | None) -> bool:
    """cuda_graph None = on for CUDA, off elsewhere; the environment variable turns it off everywhere."""
    if os.environ.get(NO_CUDA_GRAPH_ENV, "") not in ("", "0"):
        return False
    return device.type == "cuda" if cuda_graph is None else bool(cuda_graph)


def _has_hooks(model) -> bool:
    """Module hooks run in Python, so a replayed graph would skip them (DeepSpeed ZeRO-3 gathers weights in them)."""
    nn_module = torch.nn.modules.module
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def model_state(model, device: torch.device) -> tuple:
    """What a captured step depends on besides its own buffers: weight addresses and the Python-level state
    a forward branches on (train/eval, kernel backends, LoRA adapters, autocast)."""
    pointers = tuple(t.data_ptr() for t in chain(model.parameters(), model.buffers()))
    modules = tuple((m.training, vars(m).get("kernel_backend"), vars(m).get("attn_backend")) for m in model.modules())
    adapters = tuple((m.active_adapter, m.adapters_disabled, m.merged_adapter) for _, m in lora_modules(model))
    autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
    return pointers, modules, adapters, autocast


def _graph_pool(device: torch.device):
    if device not in _POOLS:  # graphs replay one at a time on one stream: their scratch memory can be shared
        _POOLS[device] = torch.cuda.graph_pool_handle()
    return _POOLS[device]


def capture_graph(step: Callable[[], None], device: torch.device, generator: torch.Generator | None):
    """Warm `step` up on a side stream, then capture one call of it as a CUDA graph (PyTorch's recipe). The
    sampling generator is registered so that each replay draws fresh numbers from its current state."""
    if device.type != "cuda":
        raise RuntimeError(f"CUDA graphs need a CUDA device, not {device}")
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            if generator is not None:
                graph.register_generator_state(generator)
            # thread_local: a server's other threads may allocate while the worker thread captures
            with torch.cuda.graph(graph, pool=_graph_pool(device), capture_error_mode="thread_local"):
                step()
        except BaseException:
            graph.reset()  # releases the pool blocks and the generators' capture state
            raise
    return graph


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class DecodeEngine:
    """One decode step over a KV cache, on static buffers; replayed as a CUDA graph when `prepare` made one.

    Per call: `prepare(model, ...)` (before the prefill: warm-up steps scribble on the cache),
    `start(logits, position_ids, input_pos, generator)` (emits the first token), `step(model)` per further
    token, `finish()` (hands the generator state back). Between steps, read `token` (B, 1) and `finished` (B,);
    the outputs are `tokens`, `response_mask`, `logprobs` (B, T_max), columns = cache slots.
    """

    def __init__(self, kv_cache: KVCache, spec: DecodeSpec):
        B, T = kv_cache.batch_size, kv_cache.max_len
        device = kv_cache.valid.device
        self.kv_cache, self.spec, self.device = kv_cache, spec, device
        long = dict(dtype=torch.long, device=device)
        self.token = torch.zeros(B, 1, **long)  # the last emitted token, pad for finished rows
        self.position_ids = torch.zeros(B, 1, **long)  # position of `token` in its row
        self.input_pos = torch.zeros(1, **long)  # cache slot of `token` (and its output column)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)  # rows that emitted EOS
        self.tokens = torch.full((B, T), spec.pad_token_id, **long)
        self.response_mask = torch.zeros(B, T, **long)
        self.logprobs = torch.zeros(B, T, dtype=torch.float32, device=device) if spec.return_logprobs else None
        self.generator: torch.Generator | None = None  # what `_emit` samples with
        self._caller_generator: torch.Generator | None = None  # graph runs: where `finish` copies the state
        self._decode: Callable = decode_one_token
        self._compile = False
        self._graph = None
        self._graph_key = None  # model_state + compile of the graph (or of the failed capture)
        self._graph_generator: torch.Generator | None = None
        self._use_graph = False

    @property
    def graphed(self) -> bool:
        """Whether this call's steps replay a CUDA graph."""
        return self._use_graph

    # --- the step ---------------------------------------------------------------------------------------

    def _logits(self, model) -> torch.Tensor:
        args = (model, self.kv_cache, self.token, self.position_ids, self.input_pos)
        if self._decode is not decode_one_token:
            limit = max(torch._dynamo.config.recompile_limit, DECODE_RECOMPILE_LIMIT)
            try:
                with torch._dynamo.config.patch(recompile_limit=limit):
                    return self._decode(*args)
            except Exception as e:
                if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                    raise
                # nothing advanced yet: the eager call below redoes the same step (same cache slot)
                _warn_once("compile", f"torch.compile of the decode step failed ({_describe(e)}); "
                                      "decoding without it")
                self._decode = decode_one_token
        return decode_one_token(*args)

    def _emit(self, logits: torch.Tensor) -> None:
        """Sample from logits (B, V) the token at slot input_pos + 1 and record it there."""
        spec = self.spec
        token = sample_next_token(logits, spec.sampling, self.generator).masked_fill(self.finished, spec.pad_token_id)
        column = self.input_pos + 1
        self.tokens.index_copy_(1, column, token.unsqueeze(1))
        self.response_mask.index_copy_(1, column, (~self.finished).long().unsqueeze(1))
        if self.logprobs is not None:
            lp = token_logprobs(logits, token, spec.sampling.temperature).masked_fill(self.finished, 0.0)
            self.logprobs.index_copy_(1, column, lp.unsqueeze(1))
        if spec.eos_token_id is not None:
            self.finished |= token == spec.eos_token_id
        self.token.copy_(token.unsqueeze(1))
        self.position_ids += 1
        self.input_pos += 1

    def _step(self, model) -> None:
        self._emit(self._logits(model))

    # --- per call ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, model, *, cuda_graph: bool | None = None, compile: bool | None = False) -> bool:
        """Pick how this call's steps run; (re)capture the graph when wanted and stale. compile: inductor on
        the model step (None counts as off). True when it ran warm-up steps: the cache's contents are garbage."""
        if bool(compile) != self._compile:
            self._compile = bool(compile)
            self._decode = _compiled_decode() if self._compile else decode_one_token
        self._use_graph = False
        if not graph_wanted(self.device, cuda_graph) or self.kv_cache.max_len <= WARMUP_STEPS:
            return False
        if _has_hooks(model):
            _warn_once("hooks", "the model has forward hooks, which a CUDA graph would skip: decoding eagerly")
            return False
        key = (model_state(model, self.device), self._compile)
        if key == self._graph_key:
            self._use_graph = self._graph is not None
            return False
        self._graph, self._graph_key = None, key
        self._graph_generator = torch.Generator(self.device) if self.spec.sampling.do_sample else None
        self.generator = self._graph_generator
        self.input_pos.zero_()  # warm-up writes slots 0, 1, ...: harmless before a prefill
        self.position_ids.zero_()
        try:
            self._graph = capture_graph(lambda: self._step(model), self.device, self._graph_generator)
        except Exception as e:
            _warn_once("capture", f"CUDA graph capture of the decode step failed ({_describe(e)}); "
                                  "decoding eagerly")
            self._graph_generator = None
        self._use_graph = self._graph is not None
        return True

    @torch.no_grad()
    def start(self, logits: torch.Tensor, position_ids: torch.Tensor, input_pos: int,
              generator: torch.Generator | None = None) -> None:
        """Emit the first token from logits (B, V) into slot input_pos, at positions position_ids (B, 1)."""
        self.tokens.fill_(self.spec.pad_token_id)
        self.response_mask.zero_()
        if self.logprobs is not None:
            self.logprobs.zero_()
        self.finished.zero_()
        self.position_ids.copy_(position_ids - 1)  # _emit advances to the new token's position and slot
        self.input_pos.fill_(input_pos - 1)
        if self._use_graph and self._graph_generator is not None:
            self._caller_generator = generator if generator is not None else _default_generator(self.device)
            self.generator = self._graph_generator
            self.generator.set_state(self._caller_generator.get_state())
        else:
            self._caller_generator, self.generator = None, generator
        self._emit(logits)

    @torch.no_grad()
    def step(self, model) -> None:
        """Decode the current token and emit the next one."""
        if self._use_graph:
            self._graph.replay()
        else:
            self._step(model)

    def finish(self) -> None:
        """Leave the caller's generator where an eager run would have left it."""
        if self._caller_generator is not None:
            self._caller_generator.set_state(self.generator.get_state())
            self._caller_generator = None
