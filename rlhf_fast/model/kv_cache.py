"""Static, preallocated KV cache (gpt-fast style): one (B, H, T_max, D) buffer pair per layer, written in
place, plus a (B, T_max) bool mask of the slots that hold a real token.

Fixed shapes and fixed storage are what let the decode step be captured once as a CUDA graph: every
step reads and writes the same tensors, and the step's only changing inputs are small index tensors.

Slot layout for a left-padded batch with padded prompt length P: slots 0..P-1 hold the prompt (left
padding marked invalid), slot P + t holds the t-th generated token, slots not yet written are invalid.
Attention over the whole cache with bottom-right causal alignment then lets a single query (Tq = 1)
see exactly the valid slots.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class LayerKVCache(nn.Module):
    """Keys and values of one attention layer."""

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor | None):
        """Write k, v (B, H, Tq, D); return the keys/values attention should read.

        input_pos None: prefill of slots 0..Tq-1; returns the prompt's own k, v (Tq == Tk, so bottom-right
        causal is plain causal). input_pos (1,) long: one decode token at that slot; returns the whole
        cache (B, H, T_max, D), whose unwritten slots the caller masks out.
        """
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)  # the cache stores in its own dtype (autocast)
        if input_pos is None:
            T = k.shape[2]
            self.k[:, :, :T].copy_(k)
            self.v[:, :, :T].copy_(v)
            return k, v
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class KVCache(nn.Module):
    """The whole model's cache: `layers[i]` for block i and `valid` (B, T_max) bool, True = real token."""

    def __init__(self, batch_size: int, max_len: int, n_layer: int, n_head: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        super().__init__()
        for name, v in dict(batch_size=batch_size, max_len=max_len, n_layer=n_layer, n_head=n_head,
                            head_dim=head_dim).items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {v!r}")
        if not torch.empty((), dtype=dtype).is_floating_point():
            raise TypeError(f"KVCache: dtype must be floating point, got {dtype}")
        self.batch_size, self.max_len = batch_size, max_len
        self.layers = nn.ModuleList(
            LayerKVCache(batch_size, n_head, max_len, head_dim, dtype, device) for _ in range(n_layer)
        )
        self.register_buffer("valid", torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
                             persistent=False)

    @classmethod
    def for_model(cls, config, batch_size: int, max_len: int, dtype, device) -> KVCache:
        if max_len > config.n_positions:
            raise ValueError(f"KVCache: max_len {max_len} exceeds the model's "
                             f"n_positions={config.n_positions}")
        return cls(batch_size, max_len, config.n_layer, config.n_head, config.head_dim, dtype, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].k.dtype

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def update_mask(self, attention_mask: torch.Tensor | None, input_pos: torch.Tensor | None, T: int):
        """Record which of the new slots are real; return the key-padding mask for this step's attention.

        Prefill (input_pos None): slots 0..T-1 get attention_mask (B, T) (None = all real), later slots
        are cleared (stale from an earlier call), and the prompt's own mask (B, T) is returned. Decode:
        slot input_pos becomes valid and the whole (B, T_max) mask is returned.
        """
        if input_pos is None:
            prompt = (torch.ones(self.batch_size, T, dtype=torch.bool, device=self.valid.device)
                      if attention_mask is None else attention_mask.bool())
            self.valid[:, :T].copy_(prompt)
            self.valid[:, T:].fill_(False)
            return prompt
        self.valid.index_fill_(1, input_pos, True)
        return self.valid
