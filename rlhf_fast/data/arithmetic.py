"""Verifiable-reward example task for GRPO: small integer arithmetic with an answer format.

In the style of the DeepSeek-R1 recipes (a rule-based *accuracy* reward plus a *format* reward, no
reward model), scaled down to the byte tokenizer (1 token per byte), so prompts and answers are short:

    prompt      "12+7="
    completion  "<a>19</a>"          format: exactly one integer inside <a>...</a>, nothing else

`format_reward` is 1 when a completion has that shape; `correctness_reward` is 1 when, in addition, the
integer equals the value of the expression in the prompt (parsed from the prompt itself, so any prompt
of the form "<int><op><int>=" can be checked); `arithmetic_reward` is their weighted sum. Rewards are
pure functions of (prompts, completions) text: the `RewardFunction` interface of the GRPO trainer.

Problems are a deterministic function of the seed; the held-out problems never occur in the training
set (the split is over distinct problems, not draws).
"""

from __future__ import annotations

import operator
import random
import re
from dataclasses import dataclass

from .examples import SFTExample

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_PROMPT_RE = re.compile(r"^(\d+)([+\-*])(\d+)=$")
_ANSWER_RE = re.compile(r"^<a>(-?\d+)</a>$")
MAX_OPERAND_LIMIT = 999  # the problem set is enumerated; 3-digit operands keep it ~1M problems at most


@dataclass(frozen=True)
class ArithmeticProblem:
    a: int
    op: str
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> int:
        return OPS[self.op](self.a, self.b)

    def to_sft(self) -> SFTExample:
        """The problem with a correctly formatted answer (for a cold-start SFT warm-up)."""
        return SFTExample(self.prompt, format_answer(self.answer))


def format_answer(value: int) -> str:
    return f"<a>{value}</a>"


def all_problems(max_operand: int = 9, ops: str = "+-") -> list[ArithmeticProblem]:
    """Every problem with operands in [0, max_operand]; subtraction only with a >= b (no negatives)."""
    if not isinstance(max_operand, int) or not 1 <= max_operand <= MAX_OPERAND_LIMIT:
        raise ValueError(f"max_operand must be an int in [1, {MAX_OPERAND_LIMIT}], got {max_operand!r}")
    bad = sorted(set(ops) - set(OPS))
    if not ops or bad:
        raise ValueError(f"ops must be a non-empty string of {sorted(OPS)}, got {ops!r}")
    out = []
    for op in dict.fromkeys(ops):  # de-duplicated, order kept
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                if op != "-" or a >= b:
                    out.append(ArithmeticProblem(a, op, b))
    return out


def arithmetic_split(n_eval: int, seed: int = 0, max_operand: int = 9, ops: str = "+-"):
    """(train, eval) problem lists: a seeded shuffle of every problem, the first `n_eval` held out."""
    problems = all_problems(max_operand, ops)
    if not 1 <= n_eval < len(problems):
        raise ValueError(
            f"n_eval must be in [1, {len(problems) - 1}] for {len(problems)} problems "
            f"(max_operand={max_operand}, ops={ops!r}), got {n_eval}"
        )
    random.Random(seed).shuffle(problems)
    return problems[n_eval:], problems[:n_eval]


# --- rewards: RewardFunction = (prompts: list[str], completions: list[str]) -> list[float] --------------


def parse_answer(completion: str) -> int | None:
    """The integer of a well-formatted completion ("<a>19</a>", surrounding whitespace allowed), else None."""
    m = _ANSWER_RE.match(completion.strip())
    return int(m.group(1)) if m else None


def solve_prompt(prompt: str) -> int:
    """The value of an arithmetic prompt "<int><op><int>="."""
    m = _PROMPT_RE.match(prompt.strip())
    if m is None:
        raise ValueError(f"not an arithmetic prompt of the form '<int><op><int>=': {prompt!r}")
    return OPS[m.group(2)](int(m.group(1)), int(m.group(3)))


def _check_lengths(prompts, completions) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")


def format_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 for a completion that is exactly one integer inside <a>...</a>, else 0.0."""
    _check_lengths(prompts, completions)
    return [float(parse_answer(c) is not None) for c in completions]


def correctness_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 for a well-formatted completion whose integer is the prompt's value, else 0.0."""
    _check_lengths(prompts, completions)
    return [float(parse_answer(c) == solve_prompt(p)) for p, c in zip(prompts, completions)]


def arithmetic_reward(
    prompts: list[str], completions: list[str], format_weight: float = 0.5, correctness_weight: float = 1.0
) -> list[float]:
    """format_weight * format + correctness_weight * correctness: in [0, 1.5] with the defaults."""
    fmt = format_reward(prompts, completions)
    acc = correctness_reward(prompts, completions)
    return [format_weight * f + correctness_weight * c for f, c in zip(fmt, acc)]
