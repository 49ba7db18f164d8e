"""The one length/EOS rule: how a (prompt, response) pair is cut to fit `max_len` (docs/lengths.md).

The prompt keeps its last `max_prompt_len` tokens; the response gets the rest of `max_len`, its *budget*,
which also holds its EOS. A response whose tokens + EOS fit is unchanged and ends in EOS. One that does not
fit is *truncated*, and then what ends it depends on what the tokens are for:

- scoring (preference / reward-model data, `force_eos=True`): the first budget - 1 tokens, then a forced
  EOS (as OpenRLHF does). Every scored sequence ends in EOS, so "has an EOS at the end" cannot tell a
  truncated side from a complete one. Dropping the EOS instead taught an HH-RLHF reward model "kept its EOS
  => chosen". RL scoring follows the same rule: a rollout cut at max_new_tokens is scored with an EOS
  appended (budget = max_new_tokens + 1).
- imitation (SFT data, `force_eos=False`): the first `budget` tokens and no EOS, so the policy is never
  taught to stop mid-sentence; the loss covers only the tokens that fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: list[int]
    response_ids: list[int]  # ends in EOS unless truncated under the SFT rule
    truncated: bool  # the response (+ EOS) did not fit its budget


def fit_response(response_ids: list[int], budget: int, eos_token_id: int, *,
                 force_eos: bool) -> tuple[list[int], bool]:
    """(response ids cut to `budget` tokens, truncated) under the rule above.

    `response_ids` are the response's tokens; a trailing EOS is taken as its end marker (so a generated
    response that stopped on its own may be passed as is, and the rule is idempotent).
    """
    if budget < 1:
        raise ValueError(f"a response needs a budget of at least 1 token (its EOS), got {budget}")
    tokens = list(response_ids)
    if tokens and tokens[-1] == eos_token_id:
        tokens.pop()
    if len(tokens) < budget:
        return tokens + [eos_token_id], False
    if force_eos:
        return tokens[: budget - 1] + [eos_token_id], True
    return tokens[:budget], True


def encode_pair(prompt_ids: list[int], response_ids: list[int], *, eos_token_id: int, max_prompt_len: int,
                max_len: int, force_eos: bool) -> EncodedPair:
    """Prompt cut to its last `max_prompt_len` tokens, response fitted to the rest of `max_len`."""
    check_lengths(max_prompt_len, max_len)
    prompt = list(prompt_ids)[-max_prompt_len:]
    response, truncated = fit_response(response_ids, max_len - len(prompt), eos_token_id, force_eos=force_eos)
    return EncodedPair(prompt, response, truncated)


def check_lengths(max_prompt_len: int, max_len: int) -> None:
    if not 0 < max_prompt_len < max_len:
        raise ValueError(f"need 0 < max_prompt_len < max_len, got max_prompt_len={max_prompt_len}, "
                         f"max_len={max_len}")


def append_eos(ids: torch.Tensor, mask: torch.Tensor, truncated: torch.Tensor, eos_token_id: int,
               pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scoring rule on a right-ended batch (B, S) of prompt + response rows: a truncated row (no EOS
    sampled before max_new_tokens) gets an EOS appended in one extra column, the others a pad there, so
    every scored row ends in EOS; `fit_response(.., max_new_tokens + 1, .., force_eos=True)` row by row."""
    extra = torch.where(truncated, eos_token_id, pad_token_id).to(ids.dtype).unsqueeze(1)
    return torch.cat([ids, extra], dim=1), torch.cat([mask, truncated.to(mask.dtype).unsqueeze(1)], dim=1)
