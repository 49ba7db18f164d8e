"""Next-token selection with no device->host sync: greedy argmax, or temperature / top-k / top-p
sampling by an exponential race (Gumbel-max), seeded through a `torch.Generator`.

`torch.multinomial` would also work on the GPU, but the race is one elementwise op plus an argmax,
and the same code path serves greedy (no noise), so both fit in the step without a sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (do_sample=False is greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (B, V) with the tokens outside the top-k / nucleus set to -inf (the best token always kept)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Nucleus = the smallest prefix of the sorted tokens whose mass reaches top_p: drop a token once
        # the tokens ranked above it already cover top_p (the best token is never dropped: top_p > 0).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None):
    """Token ids (B,) long from logits (B, V)."""
    logits = logits.float()
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    # argmax_i p_i / E_i with E_i ~ Exp(1) is a draw from p; in log space: logit_i - log E_i. E is
    # clamped away from 0 so -inf logits stay -inf (never inf - inf = nan).
    race = torch.empty_like(logits).exponential_(generator=generator)
    race.clamp_(min=torch.finfo(torch.float32).tiny)
    return (logits - race.log()).argmax(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) (B,) fp32 under softmax(logits (B, V) / temperature): the sampled distribution, as
    RL training recomputes it (`trainers.rollout.action_logprobs` with the same temperature)."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
