"""Batched KV-cached generation: prefill + decode loop and sampling. Depends on model/."""

from .generate import (
    CACHE_BUCKET,
    EOS_CHECK_EVERY,
    GenerationOutput,
    cache_length,
    compiled_decode_step,
    decode_one_token,
    generate,
    kv_cache_for,
    prefill,
    release_kv_caches,
)
from .sampling import SamplingConfig, filter_logits, sample_next_token, token_logprobs

__all__ = [
    "CACHE_BUCKET",
    "EOS_CHECK_EVERY",
    "GenerationOutput",
    "SamplingConfig",
    "cache_length",
    "compiled_decode_step",
    "decode_one_token",
    "filter_logits",
    "generate",
    "kv_cache_for",
    "prefill",
    "release_kv_caches",
    "sample_next_token",
    "token_logprobs",
]
