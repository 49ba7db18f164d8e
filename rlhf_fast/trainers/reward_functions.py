"""What scores a rollout: Python reward functions behind a registry, reward models, weighted sums.

A `RewardFunction` is any callable `(prompts: list[str], completions: list[str]) -> list[float] | (B,)
tensor`, one score per completion (decoded response text, EOS not included). Named ones live in
`REWARD_FUNCTIONS` so the CLI and configs pick them by name. A `Scorer` is what the experience maker
calls: `scorer(rollout) -> (B,) fp32 scores`. `FunctionScorer` wraps a reward function, `ModelScorer` a
reward model (token ids in, no decode/re-encode; a truncated response gets its EOS appended, the
length/EOS rule of docs/lengths.md), `WeightedScorer` a weighted list of scorers.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from rlhf_fast.data import arithmetic, load_tokenizer
from rlhf_fast.model import GPT, ScalarHead, reward_scores

from .models import use_adapter

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


class Scorer:
    """What the experience maker calls: `scorer(rollout) -> (B,) fp32 scores` (a marker base class)."""

    def __call__(self, rollout) -> torch.Tensor:
        raise NotImplementedError


def as_scorer(reward, tokenizer) -> Scorer:
    """A Scorer as is; any other callable is a RewardFunction of texts (wrapped in a FunctionScorer)."""
    return reward if isinstance(reward, Scorer) else FunctionScorer(reward, tokenizer)


class FunctionScorer(Scorer):
    """A RewardFunction of (prompt texts, completion texts) as a Scorer."""

    def __init__(self, fn: RewardFunction, tokenizer):
        self.fn, self.tokenizer = fn, tokenizer

    def __call__(self, rollout) -> torch.Tensor:
        if rollout.prompts is None:
            raise ValueError("a reward function needs the prompt texts: the rollout has none")
        return score_completions(self.fn, rollout.prompts, rollout.completions(self.tokenizer),
                                 rollout.prompt_ids.device)


class ModelScorer(Scorer):
    """A reward model (GPT + reward head, scored at the last token), or the shared base with its `reward`
    adapter, as a Scorer. It must share the policy's tokenizer: the builders check that."""

    def __init__(self, model: GPT, head: ScalarHead, *, eos_token_id: int | None, pad_token_id: int | None = None,
                 adapter: str | None = None, placement=None):
        self.model, self.head, self.adapter = model, head, adapter
        self.eos, self.pad = eos_token_id, pad_token_id if pad_token_id is not None else (eos_token_id or 0)
        self.placement = placement or (lambda model: contextlib.nullcontext())  # offloading between uses

    @torch.no_grad()
    def __call__(self, rollout) -> torch.Tensor:
        ids, mask = rollout.scoring_inputs(self.eos, self.pad)
        with self.placement(self.model if self.adapter is None else None), use_adapter(self.model, self.adapter) as m:
            return reward_scores(m, self.head, ids, mask).float()


class WeightedScorer(Scorer):
    """sum_i weight_i * scorer_i (e.g. a reward model plus a format reward)."""

    def __init__(self, parts: Sequence[tuple[Callable, float]]):
        if not parts:
            raise ValueError("WeightedScorer needs at least one (scorer, weight)")
        self.parts = [(scorer, float(w)) for scorer, w in parts]

    def __call__(self, rollout) -> torch.Tensor:
        return sum(w * scorer(rollout).float() for scorer, w in self.parts)


def load_reward_model_scorer(
    directory,
    policy_tokenizer,
    policy_vocab_size: int,
    device: torch.device | str = "cpu",
    **config_overrides,
) -> ModelScorer:
    """A ModelScorer from an `rlhf-fast rm` export; clear errors for a missing directory or an RM whose
    tokenizer/vocabulary differs from the policy's."""
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
    if model.config.vocab_size != policy_vocab_size:
        raise ValueError(
            f"the reward model has vocab_size {model.config.vocab_size}, the policy "
            f"{policy_vocab_size}: it was trained with a different tokenizer/vocabulary"
        )
    model.to(device).eval().requires_grad_(False)
    head.to(device).eval().requires_grad_(False)
    return ModelScorer(model, head, eos_token_id=policy_tokenizer.eos_token_id,
                       pad_token_id=policy_tokenizer.pad_token_id)
