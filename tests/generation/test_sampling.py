"""Sampling: the exponential race draws from softmax(logits / T) restricted to the top-k / nucleus."""

import pytest
import torch

from rlhf_fast.generation import SamplingConfig, filter_logits, sample_next_token, token_logprobs


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]).log()
    inf = float("-inf")
    kept = lambda x: (x > inf).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [[True, True, False, False], [False, False, True, True]]
    # Smallest set reaching top_p: 0.5 + 0.3 >= 0.7 (and >= 0.8); 0.5 + 0.3 + 0.15 >= 0.81.
    assert kept(filter_logits(logits, top_p=0.7))[0] == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.81))[1] == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=0.4))[0] == [True, False, False, False]
    assert kept(filter_logits(logits, top_k=3, top_p=0.99))[0] == [True, True, True, False]
    torch.testing.assert_close(filter_logits(logits), logits)


@pytest.mark.parametrize("cfg", [SamplingConfig(), SamplingConfig(temperature=0.5),
                                 SamplingConfig(temperature=1.5, top_k=3), SamplingConfig(top_p=0.6)])
def test_sampled_frequencies_match_distribution(cfg):
    logits = torch.tensor([1.0, 0.2, -0.5, 0.7, -2.0, 0.0, -1.0])
    n = 40_000
    draws = sample_next_token(logits.expand(n, -1), cfg, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=7).float() / n
    expected = filter_logits((logits / cfg.temperature)[None], cfg.top_k, cfg.top_p)[0].softmax(-1)
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


def test_greedy_and_logprobs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=g)
    tokens = sample_next_token(logits, SamplingConfig(do_sample=False))
    assert torch.equal(tokens, logits.argmax(-1))
    lp = token_logprobs(logits.half(), tokens)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, logits.half().float().log_softmax(-1).gather(-1, tokens[:, None])[:, 0])
