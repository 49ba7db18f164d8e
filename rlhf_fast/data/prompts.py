"""Prompts for RL (PPO, GRPO, evaluation): a .jsonl(.gz) file of {"prompt": ...} lines, or the prompts of
any preference source (`load_preference_splits`: synthetic, HH-RLHF files, hub names).

A .jsonl(.gz) file whose first JSON object has a "prompt" and no "chosen" is a prompt file; any other
file is read as preference pairs. Bad lines raise DataError naming the file and line, or with
`skip_bad_examples` are skipped and counted in a one-line warning.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_fast.errors import DataError

from .jsonl import LoadReport, as_object, first_record, read_jsonl, warn_skipped
from .sources import load_preference_splits


def load_prompts(source: str, *, subset: str | None = None, eval_size: int = 128, synthetic_size: int = 4000,
                 seed: int = 0, skip_bad_examples: bool = False) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts: a prompt file's last `eval_size` are held out; a preference source's
    held-out pairs give the held-out prompts."""
    path = Path(source)
    if path.is_file() and path.name.endswith((".jsonl", ".jsonl.gz")):
        first = first_record(path, skip_bad_examples=skip_bad_examples)
        if first is not None and "prompt" in first and "chosen" not in first:
            return _prompt_file(path, eval_size, skip_bad_examples)
    train, held_out, _ = load_preference_splits(source, subset=subset, eval_size=eval_size,
                                                synthetic_size=synthetic_size, seed=seed,
                                                skip_bad_examples=skip_bad_examples)
    return [ex.prompt for ex in train], [ex.prompt for ex in held_out]


def parse_prompt_record(record) -> str:
    prompt = as_object(record).get("prompt")
    if not isinstance(prompt, str):
        raise ValueError(f"expected a string 'prompt', got {type(prompt).__name__}")
    return prompt


def _prompt_file(path: Path, eval_size: int, skip_bad_examples: bool) -> tuple[list[str], list[str]]:
    report = LoadReport(str(path))
    prompts = read_jsonl(path, parse_prompt_record, skip_bad_examples=skip_bad_examples, report=report)
    warn_skipped(report)
    if len(prompts) <= eval_size:
        raise DataError(f"{len(prompts)} prompts, need more than eval_size={eval_size}", str(path))
    return prompts[:-eval_size], prompts[-eval_size:]
