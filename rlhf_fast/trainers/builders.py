"""Model and tokenizer I/O of the trainers: build a GPT (+ LoRA adapter) from the model settings, export
one as an HF GPT-2 directory, and find the tokenizer that belongs to an export.

An export of a byte-tokenizer model carries `TOKENIZER_MARKER` (HF tokenizers save their own files), so
`export_tokenizer_name(directory)` names what `load_tokenizer` needs for any export.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from rlhf_fast.data import load_tokenizer
from rlhf_fast.distributed import Strategy, build_strategy
from rlhf_fast.model import GPT, add_lora

from .config import TrainConfig

TOKENIZER_MARKER = "rlhf_fast_tokenizer.json"  # written into exports of byte-tokenizer models


def build_model(config: TrainConfig, adapter: str) -> tuple[GPT, object]:
    """(model, tokenizer) from the model settings, with LoRA adapter `adapter` added in LoRA mode."""
    m = config.model
    overrides = dict(attn_backend=m.attn_backend, kernel_backend=m.kernel_backend, grad_checkpoint=m.grad_checkpoint)
    torch.manual_seed(config.run.seed)  # random init of presets, LoRA A matrices and heads
    if m.model is not None:
        model = GPT.from_pretrained(m.model, **overrides)
    else:
        model = GPT.from_preset(m.preset, **overrides)
    tokenizer = load_tokenizer(resolve_tokenizer_name(config))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model's vocab_size is only "
                         f"{model.config.vocab_size}: pick a matching --tokenizer")
    if config.lora.enabled:
        lc = config.lora
        add_lora(model, adapter, rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout)
    return model, tokenizer


def resolve_tokenizer_name(config: TrainConfig) -> str:
    """--tokenizer, else the one of the --model export, else the preset's (byte for tiny/demo, gpt2)."""
    m = config.model
    if m.tokenizer is not None:
        return m.tokenizer
    if m.model is None:
        return "byte" if m.preset in ("tiny", "demo") else "gpt2"
    marker = Path(m.model) / TOKENIZER_MARKER
    if marker.is_file():
        return json.loads(marker.read_text())["tokenizer"]
    return m.model


def export_tokenizer_name(directory: Path) -> str:
    """What `load_tokenizer` needs for the export in `directory` (its marker's name, else the directory)."""
    marker = Path(directory) / TOKENIZER_MARKER
    return json.loads(marker.read_text())["tokenizer"] if marker.is_file() else str(directory)


def tokenizer_signature(tokenizer) -> str:
    """A digest of the token -> id mapping (what must agree between policy and reward model)."""
    if hasattr(tokenizer, "tok"):
        items = sorted(tokenizer.tok.get_vocab().items())
    else:
        items = [("byte", tokenizer.vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id)]
    return hashlib.sha256(repr(items).encode()).hexdigest()


def export_model(model: GPT, tokenizer, tokenizer_name: str, directory, merge_adapter: str | None) -> Path:
    """HF GPT-2 directory with the adapter merged in, plus what is needed to load its tokenizer."""
    directory = Path(directory)
    model.save_pretrained(directory, merge_adapter=merge_adapter)
    if hasattr(tokenizer, "tok"):
        tokenizer.tok.save_pretrained(directory)
    else:
        (directory / TOKENIZER_MARKER).write_text(json.dumps({"tokenizer": tokenizer_name}))
    return directory


def train_strategy(config) -> Strategy:
    """The strategy of any training config: run.strategy on run.device with run.precision and optim's clipping
    (the deepspeed section is read only with run.strategy='deepspeed'). The batch layout is optim's, or for an RL
    config one optimizer step per minibatch (micro-batch = rl.mini_batch_size, no accumulation)."""
    run, optim, rl = config.run, config.optim, getattr(config, "rl", None)
    micro, accum = (rl.mini_batch_size, 1) if rl is not None else (optim.micro_batch_size, optim.grad_accum_steps)
    return build_strategy(run.strategy, device=run.device, precision=run.precision, max_grad_norm=optim.max_grad_norm,
                          deepspeed=config.deepspeed if run.strategy == "deepspeed" else None,
                          micro_batch_size=micro, grad_accum_steps=accum)
