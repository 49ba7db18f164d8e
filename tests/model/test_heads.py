import pytest
import torch

from rlhf_fast.model import GPT, RewardHead, last_token_index, reward_scores, sequence_scores


def test_last_token_index_any_padding_side():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [4, 2, 4, 1]
    scores = torch.arange(20.0).view(4, 5)
    assert sequence_scores(scores, mask).tolist() == [4.0, 7.0, 14.0, 16.0]
    with pytest.raises(ValueError, match="same shape"):
        sequence_scores(scores, mask[:, :4])


def test_head_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"\(B, T, 16\)"):
        RewardHead(16)(torch.zeros(2, 3, 8))


def _pad(rows, T, side, pad_id):
    ids = torch.full((len(rows), T), pad_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, cols], mask[i, cols] = torch.tensor(r), 1
    return ids, mask


@torch.no_grad()
def test_reward_score_independent_of_padding_side_and_amount():
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", attn_backend="torch")
    head = RewardHead(model.config.n_embd)
    rows = [torch.randint(0, 256, (n,)).tolist() for n in (7, 13, 1, 10)]
    alone = torch.cat([reward_scores(model, head, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
                       for r in rows])
    for side in ("left", "right"):
        for T in (13, 21):
            for pad_id in (257, 3):  # garbage in padded positions must not matter
                ids, mask = _pad(rows, T, side, pad_id)
                torch.testing.assert_close(reward_scores(model, head, ids, mask), alone, atol=1e-5, rtol=1e-5)
