import pytest

from rlhf_fast.data import ArithmeticProblem, all_problems, arithmetic_reward, arithmetic_split
from rlhf_fast.data.arithmetic import correctness_reward, format_reward, parse_answer, solve_prompt


def test_problem_set_and_split_are_deterministic_and_disjoint():
    problems = all_problems(max_operand=9, ops="+-")
    assert len(problems) == 100 + 55  # a + b for all pairs, a - b for a >= b
    assert all(p.answer >= 0 for p in problems)
    train, held_out = arithmetic_split(20, seed=3, max_operand=9)
    assert len(held_out) == 20 and len(train) == len(problems) - 20
    assert not set(train) & set(held_out)
    assert arithmetic_split(20, seed=3, max_operand=9) == (train, held_out)
    assert arithmetic_split(20, seed=4, max_operand=9)[1] != held_out
    assert ArithmeticProblem(12, "+", 7).prompt == "12+7=" and ArithmeticProblem(3, "*", 4).answer == 12
    assert ArithmeticProblem(12, "-", 7).to_sft().response == "<a>5</a>"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_eval=0), "n_eval"),
        (dict(n_eval=155), "n_eval"),
        (dict(n_eval=5, max_operand=0), "max_operand"),
        (dict(n_eval=5, ops="+/"), "ops"),
    ],
)
def test_bad_split_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        arithmetic_split(**{"max_operand": 9, **kwargs})


def test_rewards_check_format_and_value():
    prompts = ["12+7=", "12+7=", "12+7=", "9-4=", "9-4=", "3*5=", "3*5=", "2+2="]
    completions = [
        "<a>19</a>",
        " <a>19</a>\n",
        "<a>18</a>",
        "<a>5</a>",
        "5",
        "<a>15</a> ok",
        "<a>-15</a>",
        "<a>4</a><a>4</a>",
    ]
    assert format_reward(prompts, completions) == [1, 1, 1, 1, 0, 0, 1, 0]
    assert correctness_reward(prompts, completions) == [1, 1, 0, 1, 0, 0, 0, 0]
    assert arithmetic_reward(prompts, completions) == [1.5, 1.5, 0.5, 1.5, 0, 0, 0.5, 0]
    assert arithmetic_reward(prompts[:1], completions[:1], format_weight=0.0, correctness_weight=2.0) == [2.0]
    assert parse_answer("<a>-3</a>") == -3 and parse_answer("<a>3") is None
    assert solve_prompt("99-100=") == -1


def test_bad_reward_input_is_named():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        format_reward(["1+1=", "2+2="], ["<a>2</a>"])
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        correctness_reward(["what is 1+1?"], ["<a>2</a>"])
