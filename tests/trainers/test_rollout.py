import pytest
import torch

from rlhf_fast.model import GPT
from rlhf_fast.model.heads import ScalarHead
from rlhf_fast.trainers.rollout import action_logprobs, action_values


def _batch():
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", attn_backend="torch").eval()
    seq = torch.randint(0, 256, (3, 12))
    mask = torch.ones_like(seq)
    mask[0, :4] = 0
    mask[2, :6] = 0
    return model, seq, mask


@torch.no_grad()
def test_action_logprobs_match_full_log_softmax():
    model, seq, mask = _batch()
    full = torch.log_softmax(model(seq, mask).float(), dim=-1)  # (B, S, V)
    want = full[:, :-1].gather(-1, seq[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, S-1)
    for first in (0, 5, 10):
        lp, ent = action_logprobs(model, seq, mask, first_action=first, with_entropy=True)
        assert lp.shape == ent.shape == (3, 11)
        torch.testing.assert_close(lp[:, first:], want[:, first:], atol=1e-5, rtol=1e-5)
        assert (lp[:, :first] == 0).all() and (ent[:, :first] == 0).all()
        want_ent = -(full[:, first:-1].exp() * full[:, first:-1]).sum(-1)
        torch.testing.assert_close(ent[:, first:], want_ent, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_action_values_read_the_prefix_state():
    model, seq, mask = _batch()
    head = ScalarHead(model.config.n_embd)
    v = action_values(model, head, seq, mask, first_action=3)
    want = head(model.hidden_states(seq, mask))[:, :-1]
    torch.testing.assert_close(v[:, 3:], want[:, 3:])
    assert (v[:, :3] == 0).all()
    with pytest.raises(ValueError, match="first_action"):
        action_values(model, head, seq, mask, first_action=11)
