"""GPT-2 in one file, nanoGPT style: LayerNorm -> attention -> MLP -> Block -> config -> GPT.

Differences from nanoGPT that RLHF needs:
- left padding everywhere: position ids come from the attention mask (cumsum - 1), and attention is
  causal *and* key-padding masked, so a left-padded batch gives each row the logits it would get alone;
- attention goes through a backend switch (`GPTConfig.attn_backend`), the linears of LoRA layers
  through `rlhf_fast.kernels.lora_linear` (`GPTConfig.kernel_backend`);
- `hidden_states()` exposes the final hidden states (B, T, C) for value/reward heads;
- optional activation checkpointing per block (`GPTConfig.grad_checkpoint`), adapter-switch safe;
- an optional static KV cache (`kv_cache.py`) for generation: prefill writes the prompt's keys/values,
  decode steps attend one query over the whole cache through the same attention backends;
- HF GPT-2 checkpoints import/export (`from_pretrained` / `save_pretrained`, in `hf.py`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rlhf_fast import kernels

from .compile import run_region
from .lora import LoRALinear

ATTN_BACKENDS = ("auto", "torch", "sdpa", "triton", "flash")


# ----------------------------------------------------------------------------------------------
# Attention backends. All take q, k, v (B, H, Tq|Tk, D) and key_padding_mask (B, Tk) bool or None,
# apply bottom-right causal masking, and return (B, H, Tq, D) with zeros for rows that see no key.


def _flash_attention(q, k, v, key_padding_mask):
    """flash-attn (CUDA, fp16/bf16). Padded batches go through the varlen kernel on unpadded tokens."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    B, H, T, D = q.shape
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, H, D)
    if k.shape[2] != T:
        return _flash_decode(qt, kt, vt, key_padding_mask).transpose(1, 2)
    if key_padding_mask is None:
        return flash_attn_func(qt, kt, vt, causal=True).transpose(1, 2)
    # Left padding: each row's real tokens are contiguous, so causal within them is bottom-right.
    idx = key_padding_mask.flatten().nonzero(as_tuple=True)[0]
    seqlens = key_padding_mask.sum(dim=1, dtype=torch.int32)
    cu = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    max_len = int(seqlens.max())
    flat = lambda t: t.reshape(B * T, H, D).index_select(0, idx)  # noqa: E731
    out = flash_attn_varlen_func(flat(qt), flat(kt), flat(vt), cu, cu, max_len, max_len, causal=True)
    full = torch.zeros(B * T, H, D, dtype=q.dtype, device=q.device).index_copy(0, idx, out)
    return full.view(B, T, H, D).transpose(1, 2)


def _flash_decode(qt, kt, vt, key_padding_mask):
    """Decode over a static KV cache with flash-attn's kv-cache kernel (flash-attn >= 2.6 for leftpad).

    The generation engine's cache keeps each row's valid slots contiguous — left padding, then the
    prompt, then generated tokens — so the (B, T_max) mask becomes a per-row [start, end) range,
    computed on the device (no host sync).
    """
    from flash_attn import flash_attn_with_kvcache

    if key_padding_mask is None:
        raise ValueError("attn_backend='flash': a KV-cache decode step needs the cache's key_padding_mask")
    slots = torch.arange(kt.shape[1], device=qt.device)
    start = torch.where(key_padding_mask, slots, kt.shape[1]).amin(dim=1).to(torch.int32)
    end = torch.where(key_padding_mask, slots + 1, 0).amax(dim=1).to(torch.int32)
    return flash_attn_with_kvcache(qt, kt, vt, cache_seqlens=end, cache_leftpad=start, causal=True)


def attention(q, k, v, key_padding_mask, backend: str):
    if backend in ("auto", "torch", "sdpa", "triton"):  # "sdpa" is the kernels' torch backend
        kernel_backend = "torch" if backend == "sdpa" else backend
        return kernels.masked_attention(q, k, v, key_padding_mask, causal=True, backend=kernel_backend)
    if backend == "flash":
        return _flash_attention(q, k, v, key_padding_mask)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTN_BACKENDS}")


# ----------------------------------------------------------------------------------------------
# Modules


def _linear(module: nn.Module, x, adapters: dict | None, name: str):
    """module(x); a LoRA linear inside the compiled block region gets its adapter from `adapters`."""
    if adapters is None or name not in adapters:
        return module(x)
    return module(x, adapters[name])


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.attn_backend = config.attn_backend
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, key_padding_mask, layer_cache=None, input_pos=None, adapters=None):
        B, T, C = x.shape
        q, k, v = _linear(self.c_attn, x, adapters, "attn.c_attn").split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if layer_cache is not None:  # decode: k, v become the whole cache (B, nh, T_max, hs)
            k, v = layer_cache.update(k, v, input_pos)
        y = attention(q, k, v, key_padding_mask, self.attn_backend)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(_linear(self.c_proj, y, adapters, "attn.c_proj"))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, adapters=None):
        h = F.gelu(_linear(self.c_fc, x, adapters, "mlp.c_fc"), approximate="tanh")
        return self.dropout(_linear(self.c_proj, h, adapters, "mlp.c_proj"))


class LMHead(nn.Linear):
    """The (tied) lm-head: logits, or with `targets` the fused log-probs of `kernels.linear_logprobs`.

    Log-probs go through this module's forward, not its weight directly, so that whatever wraps modules
    (DeepSpeed ZeRO-3 gathers a module's parameters around its forward) sees the call."""

    def __init__(self, config: GPTConfig):
        super().__init__(config.n_embd, config.vocab_size, bias=False)
        self.kernel_backend = config.kernel_backend

    def forward(self, hidden, targets=None, *, temperature: float = 1.0, with_entropy: bool = False):
        """Logits (..., V) without targets; else `LinearLogprobsOutput` (log p(targets), entropy,
        logsumexp; each (...) fp32) under softmax(logits / temperature), without the (..., V) logits."""
        if targets is None:
            return super().forward(hidden)
        return kernels.linear_logprobs(hidden, self.weight, targets, temperature=temperature,
                                       with_entropy=with_entropy, backend=self.kernel_backend)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)
        self.compile_options = None  # set by `compile_model`: full-sequence calls run the compiled region

    def forward(self, x, key_padding_mask, layer_cache=None, input_pos=None):
        if layer_cache is None and self.compile_options is not None and not torch.compiler.is_compiling():
            adapters = {n: m.region_adapter() for n, m in self.named_modules() if isinstance(m, LoRALinear)}
            return run_region(self.compile_options, self, x, key_padding_mask, adapters)
        return self.forward_eager(x, key_padding_mask, layer_cache, input_pos)

    def forward_eager(self, x, key_padding_mask, layer_cache=None, input_pos=None, adapters=None):
        """The block itself; `compile_model` compiles its full-sequence (no KV cache) calls, which pass each
        LoRA linear's active adapter in `adapters` ({name in the block: LoRALinear.region_adapter()})."""
        x = x + self.attn(self.ln_1(x), key_padding_mask, layer_cache, input_pos, adapters)
        return x + self.mlp(self.ln_2(x), adapters)


# ----------------------------------------------------------------------------------------------
# Activation checkpointing: a block keeps only its input; backward runs it again to get the rest.


def _adapter_state(block: Block) -> list[tuple[LoRALinear, str | None, bool]]:
    return [(m, m.active_adapter, m.adapters_disabled) for m in block.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def _adapters_as(state):
    """Set the adapter state captured by `_adapter_state` inside the block; restore the current one after."""
    current = [(m, m.active_adapter, m.adapters_disabled) for m, _, _ in state]
    try:
        for m, active, disabled in state:
            m.active_adapter, m.adapters_disabled = active, disabled
        yield
    finally:
        for m, active, disabled in current:
            m.active_adapter, m.adapters_disabled = active, disabled


def _checkpointed_block(block: Block, x, key_padding_mask):
    """block(x, key_padding_mask) with its activations recomputed in backward instead of stored.

    Eager recomputation runs at backward time, when the caller may have switched adapters since the
    forward (the RL update runs the policy adapter, then the value adapter, then one backward): it
    recomputes with the forward's adapter state. A compiled backward recomputes from the traced graph,
    which already holds that state.
    """
    if torch.compiler.is_compiling():
        return checkpoint(block, x, key_padding_mask, use_reentrant=False)
    state = _adapter_state(block)
    return checkpoint(block, x, key_padding_mask, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _adapters_as(state)))


# ----------------------------------------------------------------------------------------------
# Config and presets


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024  # context length (HF name; nanoGPT's block_size)
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0  # 0 for RLHF: PPO's first-epoch ratio must be exactly 1
    bias: bool = True
    layer_norm_epsilon: float = 1e-5
    attn_backend: str = "auto"  # auto (recorded winner, else SDPA) | torch = sdpa (SDPA) | triton | flash
    kernel_backend: str = "auto"  # auto | torch | triton (LoRA linears and other fused kernels)
    grad_checkpoint: bool = False  # recompute each block's activations in backward: memory for ~1/3 more compute

    def __post_init__(self):
        for f in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"GPTConfig.{f} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"GPTConfig.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"GPTConfig.attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        if not isinstance(self.grad_checkpoint, bool):
            raise ValueError(f"GPTConfig.grad_checkpoint must be a bool, got {self.grad_checkpoint!r}")
        if self.kernel_backend not in kernels.BACKENDS:
            raise ValueError(f"GPTConfig.kernel_backend must be one of {kernels.BACKENDS}, "
                             f"got {self.kernel_backend!r}")
        if self.attn_backend == "flash" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError("GPTConfig.attn_backend='flash' needs the flash-attn package "
                             "(pip install 'rlhf_fast[flash]')")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


PRESETS: dict[str, dict] = {
    # The four OpenAI GPT-2 sizes, with the exact Hugging Face shapes.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Small random-init models for tests and the offline demo; vocab 320 holds the byte tokenizer's
    # 256 bytes + special tokens, rounded up to a multiple of 64.
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=320),
    "demo": dict(n_layer=4, n_head=4, n_embd=128, n_positions=256, vocab_size=320),
}


def preset_config(name: str, **overrides) -> GPTConfig:
    """GPTConfig for a preset name, with field overrides (e.g. attn_backend="torch")."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------
# GPT


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = LMHead(config)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPT:
        """A randomly initialised model of a preset's shape (use from_pretrained for real weights)."""
        return cls(preset_config(name, **overrides))

    @classmethod
    def from_pretrained(cls, name_or_path: str, **config_overrides) -> GPT:
        """Load an HF GPT-2 checkpoint from a local directory or a hub name (see `hf.py`)."""
        from .hf import load_hf_gpt2

        return load_hf_gpt2(cls, name_or_path, **config_overrides)

    def save_pretrained(self, directory, *, merge_adapter: str | None = None) -> None:
        """Write an HF GPT-2 directory that `transformers.GPT2LMHeadModel.from_pretrained` loads.

        LoRA adapters are not part of an HF GPT-2 checkpoint: the base weights are written, or, with
        `merge_adapter=name`, the base weights with that adapter folded in (the model is untouched).
        """
        from .hf import save_hf_gpt2

        save_hf_gpt2(self, directory, merge_adapter=merge_adapter)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _check_inputs(self, input_ids, attention_mask, check_values: bool = True):
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor (B, T), got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if T > self.config.n_positions:
            raise ValueError(f"sequence length {T} exceeds the model's n_positions={self.config.n_positions}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"input_ids {tuple(input_ids.shape)}")
        # A value check needs a device->host sync, so it is skipped inside compiled graphs; eagerly it
        # replaces an opaque CUDA device-side assert (or CPU "index out of range") with a clear error.
        # Decode steps skip it too: their ids come from the sampler, and a sync per token is what
        # generation must avoid.
        if check_values and not torch.compiler.is_compiling() and input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids out of range: found ids in [{lo}, {hi}], "
                                 f"vocab_size is {self.config.vocab_size}")

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None, input_pos=None):
        """Final (post ln_f) hidden states (B, T, C). attention_mask (B, T): 1 = real token.

        With a `KVCache`: input_pos None prefills slots 0..T-1 with this (left-padded) prompt; input_pos
        (1,) long decodes one token (T == 1, position_ids (B, 1) required) into that slot, attending
        over every valid slot of the cache.
        """
        decoding = kv_cache is not None and input_pos is not None
        self._check_inputs(input_ids, attention_mask, check_values=not decoding)
        if kv_cache is not None:
            self._check_cache(input_ids, attention_mask, kv_cache, input_pos, position_ids)
        key_padding_mask = None
        if attention_mask is not None:
            key_padding_mask = attention_mask.bool()
            if position_ids is None:  # left padding: the first real token gets position 0
                position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        if kv_cache is not None:
            key_padding_mask = kv_cache.update_mask(attention_mask, input_pos, input_ids.shape[1])
        tr = self.transformer
        x = tr.drop(tr.wte(input_ids) + tr.wpe(position_ids))  # (B, T, C)
        # grad mode, not self.training, decides: the RL update runs in eval mode (no dropout)
        checkpointing = self.config.grad_checkpoint and kv_cache is None and torch.is_grad_enabled()
        if (kv_cache is None and torch.is_grad_enabled() and not x.requires_grad and tr.h[0].compile_options
                and any(p.requires_grad for p in tr.h.parameters())):
            # Frozen embeddings (LoRA): the first block's input would be the only one not requiring grad: a
            # second compiled graph of the region. Asking for its gradient costs that block's input-gradient
            # GEMMs (~1% of gpt2's backward) and saves that compile.
            x.requires_grad_()
        for i, block in enumerate(tr.h):
            if checkpointing:
                x = _checkpointed_block(block, x, key_padding_mask)
            else:
                x = block(x, key_padding_mask, None if kv_cache is None else kv_cache.layers[i], input_pos)
        return tr.ln_f(x)

    def _check_cache(self, input_ids, attention_mask, kv_cache, input_pos, position_ids):
        B, T = input_ids.shape
        if kv_cache.batch_size != B or len(kv_cache.layers) != self.config.n_layer:
            raise ValueError(f"kv_cache is for batch {kv_cache.batch_size} and {len(kv_cache.layers)} "
                             f"layers; got batch {B} and a model with {self.config.n_layer} layers")
        if input_pos is None:
            if T > kv_cache.max_len:
                raise ValueError(f"prompt length {T} exceeds the kv_cache's max_len={kv_cache.max_len}")
            return
        if T != 1 or input_pos.shape != (1,) or input_pos.dtype != torch.long:
            raise ValueError(f"a decode step takes one token per row and input_pos (1,) long; got "
                             f"input_ids {tuple(input_ids.shape)}, input_pos {tuple(input_pos.shape)} "
                             f"{input_pos.dtype}")
        if attention_mask is not None:
            raise ValueError("a decode step takes no attention_mask: the kv_cache tracks the valid slots")
        if position_ids is None or position_ids.shape != (B, 1):
            raise ValueError(f"a decode step needs position_ids ({B}, 1) (left padding makes them per row)")

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None, input_pos=None):
        """Logits (B, T, V). See `hidden_states` for the KV-cache arguments."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, kv_cache, input_pos))

    # LoRA adapter controls (implemented in lora.py, exposed here for `model.set_adapter(...)`).
    def set_adapter(self, name: str | None) -> None:
        from .lora import set_adapter

        set_adapter(self, name)

    def disable_adapters(self):
        from .lora import disable_adapters

        return disable_adapters(self)

    def merge_adapter(self, name: str) -> None:
        from .lora import merge_adapter

        merge_adapter(self, name)

    def unmerge_adapter(self) -> None:
        from .lora import unmerge_adapter

        unmerge_adapter(self)
