"""Batched KV-cached generation: prefill + decode loop and sampling. Depends on model/."""

from .decode_graph import DecodeEngine, DecodeSpec, decode_one_token
from .generate import (
    CACHE_BUCKET,
    EOS_CHECK_EVERY,
    GenerationOutput,
    cache_length,
    decode_engine_for,
    generate,
    kv_cache_for,
    prefill,
    release_kv_caches,
)
from .sampling import SamplingConfig, filter_logits, sample_next_token, token_logprobs

__all__ = [
    "CACHE_BUCKET",
    "EOS_CHECK_EVERY",
    "DecodeEngine",
    "DecodeSpec",
    "GenerationOutput",
    "SamplingConfig",
    "cache_length",
    "decode_engine_for",
    "decode_one_token",
    "filter_logits",
    "generate",
    "kv_cache_for",
    "prefill",
    "release_kv_caches",
    "sample_next_token",
    "token_logprobs",
]
