"""The demo's data design on the synthetic task: mixed-quality demonstrations and gold-labelled pairs."""

from collections import Counter

import pytest

from rlhf_fast.data.synthetic import (
    CURT,
    DEMO_MIX,
    SUBJECTS,
    gold_labelled_pairs,
    prompt_subject,
    synthetic_demonstrations,
    synthetic_gold_reward,
    synthetic_prompts,
    synthetic_reply_pairs,
)


def test_demonstrations_are_mixed_and_mostly_curt():
    demos = synthetic_demonstrations(4000, seed=1)
    assert demos == synthetic_demonstrations(4000, seed=1) and demos != synthetic_demonstrations(4000, seed=2)
    gold = Counter(synthetic_gold_reward([d.prompt for d in demos], [d.response for d in demos]))
    assert set(gold) == {0.0, 1.0, 2.0}  # rude or off-topic 0; curt, bare or vague 1; good 2
    assert 0.15 < gold[2.0] / 4000 < 0.25  # imitation alone cannot reach the optimum
    curt = sum(d.response.endswith(CURT) for d in demos) / 4000
    assert curt == pytest.approx(dict(DEMO_MIX)["terse"], abs=0.03)  # the most common closing: greedy picks it


def test_reply_pairs_prefer_the_higher_gold_reply():
    pairs = synthetic_reply_pairs(300, seed=0)
    assert len(pairs) == 300
    chosen = synthetic_gold_reward([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = synthetic_gold_reward([p.prompt for p in pairs], [p.rejected for p in pairs])
    assert all(c > r for c, r in zip(chosen, rejected))


def test_gold_labelled_pairs_from_groups_of_samples():
    prompt = synthetic_prompts(1, seed=0)[0]
    fact = SUBJECTS[prompt_subject(prompt)][0]
    group = [f" {fact} Happy to help!", f" {fact} Noted.", f" {fact} Noted!", " garble"]  # gold 2, 1, 1, 0
    pairs = gold_labelled_pairs([prompt], group, 4)
    # 6 pairs minus the tie (both curt ones score 1)
    assert {(p.chosen, p.rejected) for p in pairs} == {(group[0], group[1]), (group[0], group[2]),
                                                      (group[0], group[3]), (group[1], group[3]),
                                                      (group[2], group[3])}
    with pytest.raises(ValueError, match="group_size"):
        gold_labelled_pairs([prompt], group, 3)
    with pytest.raises(ValueError, match="mix"):
        synthetic_demonstrations(3, mix=(("great", 1.0),))
