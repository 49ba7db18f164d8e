"""Pairwise win-rate of one policy's scores over another's, with a seeded bootstrap confidence interval.

Rows are paired: row i of both score vectors answers the same prompt (with `group_size` > 1, rows
g*G .. g*G + G - 1 are G samples for prompt g). A win counts 1, a tie 1/2. The interval is the percentile
bootstrap over prompts (a prompt's G samples are resampled together: they are not independent), so it
reflects how much the rate would move on another draw of prompts from the same distribution. With a rate
of exactly 0 or 1 every resample agrees and the interval collapses to that point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class WinRate:
    rate: float  # mean over prompts of P(score > baseline), ties 1/2
    low: float  # bootstrap interval of `confidence`
    high: float
    n: int  # prompts (the resampled units)
    confidence: float = 0.95

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.rate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def win_rate(scores, baseline, *, group_size: int = 1, confidence: float = 0.95, n_boot: int = 2000,
             seed: int = 0) -> WinRate:
    """Win-rate of `scores` over `baseline` (paired (B,) scores, B = prompts * group_size)."""
    a = torch.as_tensor(scores, dtype=torch.float64).flatten().cpu()
    b = torch.as_tensor(baseline, dtype=torch.float64).flatten().cpu()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"win_rate: need two non-empty score vectors of one length, got {a.numel()} and "
                         f"{b.numel()}")
    if group_size < 1 or a.numel() % group_size:
        raise ValueError(f"win_rate: {a.numel()} rows are not whole groups of group_size={group_size}")
    if not 0 < confidence < 1 or n_boot < 1:
        raise ValueError(f"win_rate: need 0 < confidence < 1 and n_boot >= 1, got {confidence}, {n_boot}")
    wins = (a > b).double() + 0.5 * (a == b).double()
    per_prompt = wins.view(-1, group_size).mean(dim=1)  # (N,)
    n = per_prompt.numel()
    gen = torch.Generator().manual_seed(seed)
    boot = per_prompt[torch.randint(n, (n_boot, n), generator=gen)].mean(dim=1)  # (n_boot,)
    alpha = (1.0 - confidence) / 2
    low, high = torch.quantile(boot, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    return WinRate(float(per_prompt.mean()), low, high, n, confidence)
