"""Per-action quantities of a batch of prompt + response sequences, shared by every RL algorithm.

Positions follow `rlhf_fast.rl.Experience`: S = sequence length, T = S - 1 action positions, and the
action at position t is token t + 1. Only positions >= `first_action` (the last prompt column, for a
left-padded batch with prompt length P: first_action = P - 1) are computed; earlier ones are 0. The
(B, T, V) logits never exist: `kernels.linear_logprobs` works through them a tile at a time.

Log-probs are those of the distribution the rollout sampled from: softmax(logits / temperature). Old,
new and reference log-probs all use the rollout temperature, so the importance ratio and the KL compare
the behaviour policy with itself (TRL and OpenRLHF do the same).
"""

from __future__ import annotations

import torch.nn.functional as F


def _response_hidden(model, sequences, attention_mask, first_action: int):
    if not 0 <= first_action < sequences.shape[1] - 1:
        raise ValueError(f"first_action must lie in [0, {sequences.shape[1] - 2}], got {first_action}")
    return model.hidden_states(sequences, attention_mask)[:, first_action:-1]  # (B, T', C)


def action_logprobs(model, sequences, attention_mask, *, first_action: int = 0, with_entropy: bool = False,
                    temperature: float = 1.0):
    """log p(token t+1 | tokens <= t) under softmax(logits / temperature) for each action position t:
    (B, T) fp32 (and the entropy (B, T) of that distribution at t when asked). The lm-head's fused
    log-prob kernel computes them without the (B, T, V) logits."""
    h = _response_hidden(model, sequences, attention_mask, first_action)
    out = model.lm_head(h, sequences[:, first_action + 1 :], temperature=temperature, with_entropy=with_entropy)
    lp = F.pad(out.logprobs, (first_action, 0))
    if not with_entropy:
        return lp
    return lp, F.pad(out.entropy, (first_action, 0))


def action_values(model, head, sequences, attention_mask, *, first_action: int = 0):
    """Critic values V(prefix up to t) for each action position t: (B, T) fp32 from a scalar head."""
    return F.pad(head(_response_hidden(model, sequences, attention_mask, first_action)), (first_action, 0))
