"""Gold rewards: the synthetic task's preference rule, arithmetic's exact answer, sentiment via the registry."""

import pytest

from rlhf_fast.data.synthetic import (
    POLITE,
    RUDE,
    SUBJECTS,
    gold_components,
    prompt_subject,
    synthetic_gold_reward,
    synthetic_preferences,
)
from rlhf_fast.evaluation import gold_reward
from rlhf_fast.trainers import reward_functions

PROMPT = "\n\nHuman: Tell me about Dogs.\n\nAssistant:"


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_gold_rule_ranks_every_generated_pair_correctly(seed):
    """The rule is the task's: chosen 2, rejected 0 (off-topic or rude) or -2 (both), on 100% of pairs."""
    pairs = synthetic_preferences(3000, seed)
    chosen = synthetic_gold_reward([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = synthetic_gold_reward([p.prompt for p in pairs], [p.rejected for p in pairs])
    assert all(c > r for c, r in zip(chosen, rejected))
    assert set(chosen) == {2.0} and set(rejected) == {0.0, -2.0}


def test_gold_rule_on_generated_style_responses():
    cases = {
        " Dogs wag their tails. Happy to help!": (1, 1),
        " Dogs wag their tails. Happy to help! Happy to help!": (1, 0),  # polite salad is not gold
        " Dogs guard the home. Go away.": (1, -1),
        " Owls hoot softly. Thanks for asking!": (-1, 1),  # off-topic
        " Dogs love long walks. Owls hunt at night.": (-1, 0),  # names another subject
        " Dogs wag their homes. Happy to help!": (0, 1),  # not one of the task's facts
        " Happy to help!": (0, 0),
        "": (0, 0),
        " Dogs wag their tails.  Hope that helps!\n": (1, 1),  # whitespace around the parts is fine
    }
    for response, expected in cases.items():
        assert gold_components(PROMPT, response) == expected, response
    assert all(r in {"Go away.", "Stop asking.", "Whatever."} for r in RUDE) and len(POLITE) == 3
    assert prompt_subject(PROMPT) == "Dogs" and set(SUBJECTS) >= {"Dogs", "Owls"}
    with pytest.raises(ValueError, match="not a prompt of the synthetic task"):
        prompt_subject("\n\nHuman: hello\n\nAssistant:")
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        synthetic_gold_reward([PROMPT, PROMPT], ["x"])


def test_gold_reward_per_task(monkeypatch):
    assert gold_reward("synthetic") is synthetic_gold_reward
    assert gold_reward("arithmetic")(["12+7=", "3-1="], ["<a>19</a>", "<a>3</a>"]) == [1.0, 0.0]
    assert gold_reward("none") is None
    with pytest.raises(ValueError, match="unknown task"):
        gold_reward("chess")
    monkeypatch.setattr(reward_functions, "REWARD_FUNCTIONS", {})
    assert gold_reward("sentiment") is None  # looked up at run time: not registered here

    def fake_sentiment(prompts, completions):
        return [1.0 for _ in completions]

    reward_functions.register_reward_function("sentiment")(fake_sentiment)
    assert gold_reward("sentiment") is fake_sentiment
