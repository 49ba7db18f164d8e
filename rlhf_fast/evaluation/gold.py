"""Gold rewards: what a task itself says about a response, independent of any learned reward model.

    synthetic   the task's preference rule (`rlhf_fast.data.synthetic.synthetic_gold_reward`): on-topic fact
                +1 / off-topic -1, polite closing +1 / rude -1; in [-2, 2], every preferred response 2
    arithmetic  the exact answer (`correctness_reward`): 1 for "<a>N</a>" with the right N, else 0
    sentiment   the registered `sentiment` reward function (a classifier), when one is registered
Prompts of other sources (HH-RLHF, prompt files) have no gold reward.
"""

from __future__ import annotations

from rlhf_fast.data import correctness_reward
from rlhf_fast.data.synthetic import synthetic_gold_reward
from rlhf_fast.trainers.reward_functions import RewardFunction, reward_function

TASKS = ("synthetic", "arithmetic", "sentiment", "none")

GOLD_DESCRIPTIONS = {
    "synthetic": "the synthetic task's preference rule (topic +-1, closing +-1; in [-2, 2])",
    "arithmetic": "exact answer (1 correct, 0 wrong or malformed)",
    "sentiment": "the registered `sentiment` classifier's score",
}


def gold_reward(task: str) -> RewardFunction | None:
    """The task's gold `RewardFunction`, or None when the task has none (or its scorer is not registered)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if task == "synthetic":
        return synthetic_gold_reward
    if task == "arithmetic":
        return correctness_reward
    if task == "sentiment":  # registered by the sentiment task's module; looked up when asked for
        try:
            return reward_function("sentiment")
        except ValueError:
            return None
    return None
