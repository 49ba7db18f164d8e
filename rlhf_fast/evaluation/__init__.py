"""`rlhf-fast eval`: policies compared on held-out prompts by a reward model, the task's gold reward, KL,
length and diversity, with pairwise win-rates and reward-hacking alarms."""

from .evaluate import EvalConfig, EvalInputError, eval_command, resolve_export, run_eval
from .gold import GOLD_DESCRIPTIONS, TASKS, gold_reward
from .metrics import AlarmThresholds, WinRate, alarms, distinct_n, length_stats, repetition, win_rate

__all__ = [
    "GOLD_DESCRIPTIONS",
    "TASKS",
    "AlarmThresholds",
    "EvalConfig",
    "EvalInputError",
    "WinRate",
    "alarms",
    "distinct_n",
    "eval_command",
    "gold_reward",
    "length_stats",
    "repetition",
    "resolve_export",
    "run_eval",
    "win_rate",
]
