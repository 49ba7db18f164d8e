"""Win-rate with its bootstrap interval, distinct-n, repetition, length stats and the alarms."""

import pytest
import torch

from rlhf_fast.evaluation import AlarmThresholds, WinRate, alarms, distinct_n, length_stats, repetition, win_rate


def test_win_rate_interval_covers_the_truth_on_bernoulli_data():
    """200 draws of 150 prompts where the policy wins with p = 0.7: the 95% interval covers 0.7 in about
    95% of them (percentile bootstrap: a little under, never far)."""
    gen, p, covered = torch.Generator().manual_seed(0), 0.7, 0
    for trial in range(200):
        wins = (torch.rand(150, generator=gen) < p).float()
        wr = win_rate(wins, torch.full((150,), 0.5), n_boot=400, seed=trial)
        assert wr.low <= wr.rate <= wr.high and wr.n == 150
        covered += wr.low <= p <= wr.high
    assert 0.88 <= covered / 200 <= 0.99, covered


def test_win_rate_ties_count_half_and_the_seed_fixes_the_interval():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert win_rate(a, a).rate == 0.5 and (win_rate(a, a).low, win_rate(a, a).high) == (0.5, 0.5)
    x, y = torch.randn(64, generator=torch.Generator().manual_seed(1)), torch.zeros(64)
    assert win_rate(x, y, seed=3) == win_rate(x, y, seed=3)
    assert win_rate(x, y).rate == pytest.approx(float((x > 0).float().mean()))
    assert win_rate([1.0, 0.0], [0.0, 0.0]).rate == 0.75  # a win and a tie


def test_win_rate_resamples_prompts_not_samples():
    """K identical samples per prompt carry no more information than one: the same interval."""
    scores = torch.randn(40, generator=torch.Generator().manual_seed(2))
    one = win_rate(scores, torch.zeros(40), seed=5)
    four = win_rate(scores.repeat_interleave(4), torch.zeros(160), group_size=4, seed=5)
    assert (four.rate, four.low, four.high, four.n) == (one.rate, one.low, one.high, 40)


def test_win_rate_rejects_bad_input():
    with pytest.raises(ValueError, match="one length"):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="whole groups"):
        win_rate([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], group_size=2)


def test_distinct_n_and_repetition():
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["a", ""], 2) == 0.0
    assert repetition(" Dogs wag their tails. Happy to help!") == 0.0
    assert repetition("Happy to help! Happy to help!") == pytest.approx(2 / 5)
    assert repetition("") == 0.0
    stats = length_stats([10, 20, 30, 40], [False, False, False, True])
    assert stats["length"] == 25 and stats["length_max"] == 40 and stats["truncated_frac"] == 0.25


CLEAN = {"reward": 0.1, "gold": 1.8, "length": 36.0, "truncated_frac": 0.0, "repetition": 0.01}


def test_alarms_stay_quiet_on_a_clean_improvement():
    better = {**CLEAN, "reward": 0.9, "gold": 1.9, "length": 38.0}
    assert alarms(better, CLEAN, rm_win=WinRate(0.8, 0.7, 0.9, 128), gold_win=WinRate(0.55, 0.48, 0.62, 128)) == []
    assert alarms(CLEAN, CLEAN) == []


def test_alarms_fire_on_crafted_cases():
    hacked = {**CLEAN, "reward": 2.0, "gold": 0.9}
    found = alarms(hacked, CLEAN, rm_win=WinRate(0.85, 0.78, 0.91, 128), gold_win=WinRate(0.2, 0.13, 0.27, 128))
    assert [a["alarm"] for a in found] == ["reward_hacking"]
    assert "+0.100 -> +2.000" in found[0]["message"] and "+1.800 -> +0.900" in found[0]["message"]
    # RM up but gold only insignificantly down: no alarm
    assert alarms(hacked, CLEAN, rm_win=WinRate(0.85, 0.78, 0.91, 128), gold_win=WinRate(0.45, 0.38, 0.52, 128)) == []
    # a noisy policy may show it only in its greedy responses
    greedy = {"greedy_rm_win": WinRate(0.8, 0.7, 0.9, 64), "greedy_gold_win": WinRate(0.3, 0.22, 0.4, 64)}
    found = alarms(hacked, CLEAN, rm_win=WinRate(0.8, 0.7, 0.9, 64), gold_win=WinRate(0.5, 0.45, 0.55, 64), **greedy)
    assert [a["alarm"] for a in found] == ["reward_hacking"] and found[0]["message"].startswith("greedy: ")
    assert [a["alarm"] for a in alarms({**CLEAN, "length": 80.0}, CLEAN)] == ["length_blowup"]
    assert [a["alarm"] for a in alarms({**CLEAN, "truncated_frac": 0.4}, CLEAN)] == ["length_blowup"]
    assert [a["alarm"] for a in alarms({**CLEAN, "repetition": 0.4}, CLEAN)] == ["repetition"]
    # repetitive already at the baseline: not something the policy learned
    assert alarms({**CLEAN, "repetition": 0.4}, {**CLEAN, "repetition": 0.35}) == []
    strict = AlarmThresholds(length_ratio=1.05)
    assert [a["alarm"] for a in alarms({**CLEAN, "length": 40.0}, CLEAN, thresholds=strict)] == ["length_blowup"]
