import pytest
import torch

from rlhf_fast.rl import kl_k1, kl_k3, last_token_index, shape_rewards


def test_shape_rewards_puts_score_on_last_response_token():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    lp, ref = -torch.rand(3, 6, generator=gen), -torch.rand(3, 6, generator=gen)
    lp = torch.where(mask, lp, torch.tensor(float("nan")))  # garbage in masked positions
    scores = torch.tensor([2.0, 5.0, -1.0])
    rewards, kl = shape_rewards(scores, lp, ref, mask, kl_coef=0.1)
    last, has = last_token_index(mask)
    assert last[0].item() == 4 and last[2].item() == 5 and has.tolist() == [True, False, True]
    want_kl = torch.where(mask, kl_k1(lp, ref), 0.0)
    want = -0.1 * want_kl
    want[0, 4] += 2.0
    want[2, 5] += -1.0
    torch.testing.assert_close(kl, want_kl)
    torch.testing.assert_close(rewards, want)
    assert rewards[1].abs().sum().item() == 0  # nothing for a row without response tokens
    _, kl3 = shape_rewards(scores, lp, ref, mask, kl_coef=0.1, kl_estimator_name="k3")
    torch.testing.assert_close(kl3, torch.where(mask, kl_k3(lp, ref), 0.0))


def test_shape_rewards_bad_shapes():
    x, m = torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="scores must be"):
        shape_rewards(torch.zeros(3), x, x, m, 0.1)
    with pytest.raises(ValueError, match="share a"):
        shape_rewards(torch.zeros(2), x, torch.zeros(2, 5), m, 0.1)
