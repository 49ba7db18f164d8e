"""One entry point for preference data: "synthetic", an HH-RLHF hub name, or local .jsonl(.gz) files."""

from __future__ import annotations

from rlhf_fast.errors import DataError

from .hh import LoadReport, load_hh
from .synthetic import synthetic_split


def load_preference_splits(source: str, *, subset: str | None = None, eval_size: int = 200,
                           synthetic_size: int = 4000, seed: int = 0, skip_bad_examples: bool = False):
    """(train, eval, LoadReport) of PreferenceExamples.

    "synthetic": the built-in task (eval pairs held out by construction). HH data: the "train" and
    "test" splits when both exist, else the last `eval_size` examples of the one file are held out.
    """
    if eval_size < 1:
        raise ValueError(f"eval_size must be >= 1, got {eval_size}")
    if source == "synthetic":
        train, held_out = synthetic_split(synthetic_size, eval_size, seed)
        return train, held_out, LoadReport("synthetic", kept=len(train) + len(held_out))
    examples, report = load_hh(source, "train", subset=subset, skip_bad_examples=skip_bad_examples)
    if source.endswith((".jsonl", ".jsonl.gz")):  # a single file: hold out its tail
        if len(examples) <= eval_size:
            raise DataError(f"{len(examples)} examples, need more than eval_size={eval_size}", source)
        return examples[:-eval_size], examples[-eval_size:], report
    held_out, eval_report = load_hh(source, "test", subset=subset, skip_bad_examples=skip_bad_examples)
    report.kept += eval_report.kept
    report.skipped += eval_report.skipped
    return examples, held_out[:eval_size], report
