"""Prompts for RL (PPO, GRPO, evaluation) from any source `sources.load_splits` reads: TRL prompt-only
({"prompt": text or messages}), conversational ({"messages"}: up to the last user turn, with the generation
prompt), prompt-completion and preference records (their prompts), or the built-in synthetic task.

Bad lines raise DataError naming the file and line, or with `skip_bad_examples` are skipped and counted in a
one-line warning.
"""

from __future__ import annotations

from .formats import PROMPTS
from .sources import load_preference_splits, load_splits


def load_prompts(source: str, *, subset: str | None = None, eval_size: int = 128, synthetic_size: int = 4000,
                 seed: int = 0, skip_bad_examples: bool = False,
                 chat_template: str | None = None) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts: a single file's last `eval_size` are held out, a directory's or hub dataset's
    test split when it has one (see `sources`)."""
    if eval_size < 1:
        raise ValueError(f"eval_size must be >= 1, got {eval_size}")
    if source == "synthetic":
        train, held_out, _ = load_preference_splits(source, eval_size=eval_size, synthetic_size=synthetic_size,
                                                    seed=seed, chat_template=chat_template)
        return [ex.prompt for ex in train], [ex.prompt for ex in held_out]
    train, held_out, _ = load_splits(source, PROMPTS, subset=subset, eval_size=eval_size,
                                     skip_bad_examples=skip_bad_examples, chat_template=chat_template)
    return train, held_out
