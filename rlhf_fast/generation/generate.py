"""Batched generation over a static KV cache: prefill the left-padded prompts once, then decode one
token per step (gpt-fast style), with no device->host sync per token.

- The cache is (B, H, T_max, D) per layer, T_max = P + max_new_tokens rounded up to a bucket, and is
  kept per model and shape: an RL loop calling `generate` with prompts of varying length reuses the
  same buffers and the same decode engine instead of allocating and recapturing.
- The decode step is a `DecodeEngine` (decode_graph.py): on CUDA one CUDA graph per (batch, bucket,
  sampling settings), replayed each token, optionally with the model step through inductor
  (compile=True); elsewhere, or when capture fails, the same step runs eagerly.
- Rows finish at their EOS (which is part of the response: it is an action); after it they get pad
  and mask 0. Whether every row has finished is read back only every `EOS_CHECK_EVERY` tokens.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf_fast.model.kv_cache import KVCache

from .decode_graph import DecodeEngine, DecodeSpec
from .sampling import SamplingConfig

CACHE_BUCKET = 128  # T_max granularity: few distinct shapes to compile, at most 127 idle slots per row
EOS_CHECK_EVERY = 8  # tokens between "all finished?" host reads: early stop without a sync per token
ENGINES_PER_MODEL = 16  # decode engines (and their graphs) kept per model: a server meets few sampling settings


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, P+N) long: left-padded prompt, then response (pad after EOS)
    attention_mask: torch.Tensor  # (B, P+N) long: 1 = real token (prompt or response)
    response_mask: torch.Tensor  # (B, N) long: 1 = generated token, EOS included
    # (B, N) fp32 log p(token) under softmax(logits / temperature), the distribution sampled from (before
    # top-k / top-p, which RL training refuses); 0 where masked
    logprobs: torch.Tensor | None = None


def cache_length(total_len: int, n_positions: int, bucket: int = CACHE_BUCKET) -> int:
    """T_max for total_len = prompt + new tokens: rounded up to a multiple of `bucket`, <= n_positions."""
    return min(-(-total_len // bucket) * bucket, n_positions)


# Caches per model, keyed by shape, and decode engines per (cache, DecodeSpec), so repeated calls reuse
# buffers and CUDA graphs. Neither holds the model; both are freed with it or by release_kv_caches.
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kv_cache_for(model, batch_size: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
    """The model's persistent KVCache for this shape (allocated on first use)."""
    caches = _CACHES.setdefault(model, {})
    key = (batch_size, max_len, dtype, torch.device(device))
    if key not in caches:
        caches[key] = KVCache.for_model(model.config, batch_size, max_len, dtype, device)
    return caches[key]


def decode_engine_for(model, kv_cache: KVCache, spec: DecodeSpec) -> DecodeEngine:
    """The model's DecodeEngine for this cache and spec (least recently used ones beyond ENGINES_PER_MODEL go)."""
    engines = _ENGINES.setdefault(model, OrderedDict())
    key = (id(kv_cache), spec)
    engine = engines.get(key)
    if engine is None or engine.kv_cache is not kv_cache:
        engine = engines[key] = DecodeEngine(kv_cache, spec)
    engines.move_to_end(key)
    while len(engines) > ENGINES_PER_MODEL:
        engines.popitem(last=False)
    return engine


def cache_dtype(model, device: torch.device) -> torch.dtype:
    """The dtype k and v are computed in: autocast's when it is on (fp32 master weights), else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.transformer.wte.weight.dtype


def release_kv_caches(model) -> None:
    """Free the KV caches and decode engines kept for `model` (e.g. before a memory-hungry training phase)."""
    _CACHES.pop(model, None)
    _ENGINES.pop(model, None)


# ----------------------------------------------------------------------------------------------
# Prefill


def prefill(model, input_ids, attention_mask, kv_cache: KVCache) -> torch.Tensor:
    """Write the prompts (B, P) into cache slots 0..P-1; logits (B, V) for each row's next token."""
    h = model.hidden_states(input_ids, attention_mask, kv_cache=kv_cache)  # (B, P, C)
    return model.lm_head(h[:, -1])  # left padding: the last column is every row's last real token


# ----------------------------------------------------------------------------------------------
# generate


def _check_inputs(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, generator):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a (B, P) long tensor, got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    B, P = input_ids.shape
    if B == 0 or P == 0:
        raise ValueError(f"input_ids must hold at least one prompt token per row, got shape {(B, P)}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    n_positions = model.config.n_positions
    if P + max_new_tokens > n_positions:
        raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} = {P + max_new_tokens} "
                         f"exceeds the model's n_positions={n_positions}")
    device = model.transformer.wte.weight.device
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"input_ids {tuple(input_ids.shape)}")
        if attention_mask.device != device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but the model is on {device}")
        m = attention_mask.long()
        if ((m != 0) & (m != 1)).any():
            raise ValueError("attention_mask must hold only 0 (pad) and 1 (real token)")
        if (m[:, 1:] < m[:, :-1]).any():
            row = int((m[:, 1:] < m[:, :-1]).any(dim=1).nonzero()[0])
            raise ValueError(f"prompt row {row} has padding after a real token: prompts must be left-padded")
        if (m.sum(dim=1) == 0).any():
            raise ValueError("every prompt needs at least one real token (a row of attention_mask is all 0)")
    vocab = model.config.vocab_size
    for name, tid in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if tid is not None and not (isinstance(tid, int) and 0 <= tid < vocab):
            raise ValueError(f"{name} must be an int in [0, {vocab}), got {tid!r}")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the model is on {device}")


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, do_sample: bool = True,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None,
             return_logprobs: bool = False, compile: bool | None = False, cuda_graph: bool | None = None,
             on_step: Callable[[int, torch.Tensor, torch.Tensor], bool | None] | None = None) -> GenerationOutput:
    """Generate up to max_new_tokens for a left-padded batch of prompts (B, P).

    N in the output is the longest response (< max_new_tokens only when every row hit EOS or on_step stopped
    it). pad_token_id defaults to eos_token_id (GPT-2 has no pad token), else 0. The model's train/eval mode
    is left as is (dropout is 0 for RLHF).

    cuda_graph: replay the decode step as a CUDA graph (None = on CUDA, off elsewhere; RLHF_FAST_NO_CUDA_GRAPH=1
    turns it off). compile: torch.compile (inductor) the model step first; opt-in, as it costs a long compile
    (None counts as off, so callers can pass an auto-default setting through). The graph replays the eager
    step's own kernels: the same tokens, and for the same generator state the same draws, as eager decoding
    (inductor's fused kernels may differ from eager in the last bits). A failed compile or capture warns once
    and decodes eagerly.

    on_step(t, token, finished), for streaming: called after each step t with that step's tokens (B,) (pad
    for rows finished before t) and the rows finished by EOS so far (B,) bool, on the model's device; a true
    return value stops generation after step t. Reading them costs a device->host sync per step, which is
    why it is optional; the decode step is untouched (the callback runs between steps).
    """
    sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    _check_inputs(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, generator)
    B, P = input_ids.shape
    N, device = max_new_tokens, input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    kv_cache = kv_cache_for(model, B, cache_length(P + N, model.config.n_positions), cache_dtype(model, device),
                            device)
    engine = decode_engine_for(model, kv_cache, DecodeSpec(sampling, eos_token_id, pad, return_logprobs))
    engine.prepare(model, cuda_graph=cuda_graph, compile=compile)  # before the prefill: warm-up uses the cache

    logits = prefill(model, input_ids, attention_mask, kv_cache)  # (B, V)
    # first token: position = the row's length, cache slot P
    engine.start(logits, attention_mask.long().sum(dim=1, keepdim=True), P, generator)
    try:
        for t in range(N):
            if t:
                engine.step(model)
            if on_step is not None and on_step(t, engine.token[:, 0].clone(), engine.finished.clone()):
                break
            if eos_token_id is not None and (t + 1) % EOS_CHECK_EVERY == 0 and bool(engine.finished.all()):
                break
    finally:
        engine.finish()

    # Trim columns in which every row had already finished or that on_step cut off (one host read).
    response_mask = engine.response_mask[:, P:P + N]
    n = int(response_mask.sum(dim=1).max()) if eos_token_id is not None or on_step is not None else N
    response_mask = response_mask[:, :n].clone()  # copies: the engine's buffers serve the next call
    return GenerationOutput(
        sequences=torch.cat([input_ids, engine.tokens[:, P:P + n]], dim=1),
        attention_mask=torch.cat([attention_mask.long(), response_mask], dim=1),
        response_mask=response_mask,
        logprobs=None if engine.logprobs is None else engine.logprobs[:, P:P + n].clone(),
    )
