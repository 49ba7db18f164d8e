import pytest
import torch

from rlhf_fast.rl import Experience


def _experience(B=5, S=8):
    T = S - 1
    return Experience(
        sequences=torch.arange(B * S).view(B, S),
        attention_mask=torch.ones(B, S, dtype=torch.bool),
        action_mask=torch.ones(B, T, dtype=torch.bool),
        logprobs=torch.randn(B, T),
        advantages=torch.randn(B, T),
        returns=torch.randn(B, T),
        values=torch.randn(B, T),
        scores=torch.arange(B, dtype=torch.float32),
    )


def test_split_select_and_to():
    exp = _experience()
    parts = exp.split(2)
    assert [len(p) for p in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([p.logprobs for p in parts]), exp.logprobs)
    assert parts[0].ref_logprobs is None and parts[2].scores.tolist() == [4.0]
    perm = torch.tensor([3, 0, 4])
    sub = exp.select(perm)
    assert torch.equal(sub.sequences, exp.sequences[perm]) and torch.equal(sub.values, exp.values[perm])
    assert exp.to("cpu").returns.data_ptr() == exp.returns.data_ptr()
    with pytest.raises(ValueError, match="micro_batch_size"):
        exp.split(0)


def test_shape_validation():
    exp = _experience()
    with pytest.raises(ValueError, match=r"advantages must be \(5, 7\)"):
        Experience(
            exp.sequences,
            exp.attention_mask,
            exp.action_mask,
            exp.logprobs,
            exp.advantages[:, :6],
            exp.returns,
        )
    with pytest.raises(ValueError, match=r"scores must be \(5,\)"):
        Experience(
            exp.sequences,
            exp.attention_mask,
            exp.action_mask,
            exp.logprobs,
            exp.advantages,
            exp.returns,
            scores=torch.zeros(4),
        )
    with pytest.raises(ValueError, match="sequences and attention_mask"):
        Experience(
            exp.sequences,
            exp.attention_mask[:, 1:],
            exp.action_mask,
            exp.logprobs,
            exp.advantages,
            exp.returns,
        )
