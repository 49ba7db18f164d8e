"""Rewards for critic-free RL (GRPO): Python reward functions behind a registry, and a reward model.

A `RewardFunction` is any callable `(prompts: list[str], completions: list[str]) -> list[float] | (B,)
tensor`, one score per completion (completions are decoded response text, EOS not included). Named
ones live in `REWARD_FUNCTIONS` so the CLI and configs pick them by name; `RewardModelScorer` wraps a
trained reward model (+ head) in the same interface, so the trainer never branches on the reward source.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from rlhf_fast.data import arithmetic, load_tokenizer
from rlhf_fast.model import GPT, ScalarHead, reward_scores

RewardFunction = Callable[[list[str], list[str]], "Sequence[float] | torch.Tensor"]
REWARD_FUNCTIONS: dict[str, RewardFunction] = {}


def register_reward_function(name: str):
    def register(fn: RewardFunction) -> RewardFunction:
        if name in REWARD_FUNCTIONS:
            raise ValueError(f"reward function {name!r} is already registered")
        REWARD_FUNCTIONS[name] = fn
        return fn

    return register


def reward_function(name: str) -> RewardFunction:
    try:
        return REWARD_FUNCTIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown reward function {name!r}; choose one of {sorted(REWARD_FUNCTIONS)}"
        ) from None


register_reward_function("arithmetic")(arithmetic.arithmetic_reward)
register_reward_function("arithmetic_format")(arithmetic.format_reward)
register_reward_function("arithmetic_correct")(arithmetic.correctness_reward)


def weighted_sum(functions: dict[str, float]) -> RewardFunction:
    """A reward function = sum of weight * registered function, e.g. {"arithmetic_correct": 1.0, ...}."""
    parts = [(reward_function(name), float(w)) for name, w in functions.items()]
    if not parts:
        raise ValueError("weighted_sum needs at least one reward function")

    def total(prompts: list[str], completions: list[str]) -> torch.Tensor:
        return sum(w * score_completions(fn, prompts, completions) for fn, w in parts)

    return total


def score_completions(
    fn: RewardFunction, prompts: list[str], completions: list[str], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """fn's scores as a finite (B,) fp32 tensor on `device`; a clear error for anything else."""
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    out = fn(prompts, completions)
    scores = torch.as_tensor(out if torch.is_tensor(out) else list(out), dtype=torch.float32)
    name = getattr(fn, "__name__", type(fn).__name__)
    if scores.shape != (len(completions),):
        raise ValueError(
            f"reward function {name} returned shape {tuple(scores.shape)}, expected "
            f"({len(completions)},): one score per completion"
        )
    if not torch.isfinite(scores).all():
        raise ValueError(f"reward function {name} returned a non-finite score")
    return scores.to(device)


class RewardModelScorer:
    """A reward model (GPT + reward head, scored at the last token) as a RewardFunction.

    Each text is scored as prompt + completion + EOS, token for token what the RM stage trained on, with
    the policy's tokenizer: the RM must share it (checked here), or its scores would be of other tokens.
    """

    def __init__(self, model: GPT, head: ScalarHead, tokenizer, policy_vocab_size: int, batch_size: int = 32):
        if model.config.vocab_size != policy_vocab_size:
            raise ValueError(
                f"the reward model has vocab_size {model.config.vocab_size}, the policy "
                f"{policy_vocab_size}: it was trained with a different tokenizer/vocabulary"
            )
        self.model, self.head, self.tokenizer = model.eval().requires_grad_(False), head.eval(), tokenizer
        self.head.requires_grad_(False)
        self.batch_size = batch_size
        self.max_len = model.config.n_positions

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        tok, device = self.tokenizer, self.model.transformer.wte.weight.device
        ids = [
            (tok.encode(p) + tok.encode(c) + [tok.eos_token_id])[-self.max_len :]
            for p, c in zip(prompts, completions)
        ]
        scores = []
        for i in range(0, len(ids), self.batch_size):
            input_ids, mask = tok.pad(ids[i : i + self.batch_size], side="left")
            scores.append(reward_scores(self.model, self.head, input_ids.to(device), mask.to(device)))
        return torch.cat(scores).float().cpu()


def load_reward_model_scorer(
    directory,
    policy_tokenizer,
    policy_vocab_size: int,
    device: torch.device | str = "cpu",
    **config_overrides,
) -> RewardModelScorer:
    """A RewardModelScorer from an `rlhf-fast rm` export; clear errors for a missing directory or an RM
    whose tokenizer/vocabulary differs from the policy's."""
    from .common import TOKENIZER_MARKER
    from .reward import load_reward_model

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"reward model directory not found: {directory}")
    model, head = load_reward_model(directory, **config_overrides)
    marker = directory / TOKENIZER_MARKER
    if marker.is_file():
        rm_tokenizer = load_tokenizer(json.loads(marker.read_text())["tokenizer"])
    else:
        rm_tokenizer = load_tokenizer(str(directory))
    mismatch = (
        rm_tokenizer.vocab_size != policy_tokenizer.vocab_size
        or rm_tokenizer.eos_token_id != policy_tokenizer.eos_token_id
        or type(rm_tokenizer) is not type(policy_tokenizer)
    )
    if mismatch:
        raise ValueError(
            f"the reward model in {directory} uses a {type(rm_tokenizer).__name__} with "
            f"{rm_tokenizer.vocab_size} tokens, the policy a {type(policy_tokenizer).__name__} "
            f"with {policy_tokenizer.vocab_size}: a different tokenizer/vocabulary"
        )
    return RewardModelScorer(model.to(device), head.to(device), policy_tokenizer, policy_vocab_size)
