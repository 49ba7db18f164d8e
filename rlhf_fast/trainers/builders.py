"""Model and tokenizer I/O of the trainers: build a GPT (+ LoRA adapter) from the model settings, export
one as an HF GPT-2 directory (with its tokenizer as HF files and its token ids in config.json), and, with
--export-adapter, its LoRA adapter as a PEFT directory.

`load_tokenizer(directory)` (rlhf_fast.data.tokenizer) is the one way to load an export's tokenizer: a
byte-tokenizer export carries `TOKENIZER_MARKER` besides its HF tokenizer files, so it comes back as the
`ByteTokenizer` it was trained with.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from rlhf_fast.data.tokenizer import load_tokenizer, save_tokenizer, tokenizer_name
from rlhf_fast.distributed import Strategy, build_strategy
from rlhf_fast.model import GPT, add_lora
from rlhf_fast.model.hf import save_hf_gpt2

from .config import TrainConfig

ADAPTER_EXPORT_DIR = "adapter"  # --export-adapter: <export>/adapter/, a PEFT adapter directory


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
    return tokenizer_name(m.model)


def tokenizer_signature(tokenizer) -> str:
    """A digest of the token -> id mapping (what must agree between policy and reward model)."""
    if hasattr(tokenizer, "tok"):
        items = sorted(tokenizer.tok.get_vocab().items())
    else:
        items = [("byte", tokenizer.vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id)]
    return hashlib.sha256(repr(items).encode()).hexdigest()


def export_token_ids(tokenizer, *, scores: bool = False) -> dict:
    """config.json's token ids for an export with `tokenizer` (HF `generate` stops at eos_token_id).

    scores=True (a reward model, also a GPT2ForSequenceClassification): HF scores the rightmost token that is not
    pad_token_id, rlhf_fast the last real token, which is the EOS a response ends in. Where pad == EOS (GPT-2) HF
    would skip that EOS, so pad_token_id is then the vocabulary size: an id no sequence holds."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if scores and pad == eos:
        pad = tokenizer.vocab_size
    return {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad}


def export_model(model: GPT, tokenizer, directory, merge_adapter: str | None, *, score_head=None) -> Path:
    """HF GPT-2 directory with the adapter merged in, its tokenizer as HF files and its token ids in config.json.
    score_head: a reward model's head, written as GPT2ForSequenceClassification's score (`hf.save_hf_gpt2`)."""
    directory = Path(directory)
    head = None if score_head is None else (score_head.proj.weight, score_head.proj.bias)
    save_hf_gpt2(model, directory, merge_adapter=merge_adapter, score_head=head,
                 token_ids=export_token_ids(tokenizer, scores=score_head is not None))
    save_tokenizer(tokenizer, directory)
    return directory


def export_peft_adapter(config, model: GPT, adapter: str | None, tokenizer, directory, *, score_head=None):
    """--export-adapter: `adapter` as a PEFT directory <directory>/adapter/ (None without the option). Its base is
    the --model the run started from, else (a random-init preset) the unmerged base written to adapter/base/."""
    if not config.run.export_adapter:
        return None
    from rlhf_fast.model.peft_export import save_peft_adapter

    if adapter is None:  # resolve_defaults refuses --export-adapter without LoRA before step 1
        raise ValueError("--export-adapter needs a LoRA run")
    out = Path(directory) / ADAPTER_EXPORT_DIR
    if config.model.model is not None:
        local = Path(config.model.model).expanduser()
        base = str(local.resolve()) if local.is_dir() else config.model.model  # a directory, else a hub name
    else:
        base_dir = out / "base"
        save_hf_gpt2(model, base_dir, token_ids=export_token_ids(tokenizer))
        save_tokenizer(tokenizer, base_dir)
        base = str(base_dir.resolve())
    head = None if score_head is None else (score_head.proj.weight, score_head.proj.bias)
    return save_peft_adapter(model, adapter, out, base_model_name_or_path=base, score_head=head)


def train_strategy(config) -> Strategy:
    """The strategy of any training config: run.strategy on run.device with run.precision and optim's clipping
    (the deepspeed section is read only with run.strategy='deepspeed'). The batch layout is optim's, or for an RL
    config one optimizer step per minibatch (micro-batch = rl.mini_batch_size, no accumulation)."""
    run, optim, rl = config.run, config.optim, getattr(config, "rl", None)
    micro, accum = (rl.mini_batch_size, 1) if rl is not None else (optim.micro_batch_size, optim.grad_accum_steps)
    return build_strategy(run.strategy, device=run.device, precision=run.precision, max_grad_norm=optim.max_grad_norm,
                          deepspeed=config.deepspeed if run.strategy == "deepspeed" else None,
                          micro_batch_size=micro, grad_accum_steps=accum)
