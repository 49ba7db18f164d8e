"""Anthropic HH-RLHF: dialogue parsing and loading (hub name or local .jsonl / .jsonl.gz files).

Each record is {"chosen": dialogue, "rejected": dialogue}, a dialogue being "\\n\\nHuman: ...\\n\\nAssistant:
..." turns. The prompt is everything up to and including the last "\\n\\nAssistant:"; the response is
the text after it (its leading space kept, as the model will generate it). Chosen and rejected must
share the prompt.

Local files are read line by line here (so an error can name the file and line); hub data goes through
`datasets.load_dataset` (errors name the split and row).
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .examples import PreferenceExample

log = logging.getLogger(__name__)

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
HUB_NAME = "Anthropic/hh-rlhf"
HUB_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled",
               "red-team-attempts")


class BadExampleError(ValueError):
    """A record that cannot become an example; the message names where it came from."""


@dataclass
class LoadReport:
    """What a load kept and skipped (skipped only with skip_bad_examples)."""

    source: str
    kept: int = 0
    skipped: int = 0


def split_dialogue(text: str) -> tuple[str, str]:
    """(prompt, response) of an HH dialogue; raises ValueError when it has no usable last assistant turn."""
    if not isinstance(text, str):
        raise ValueError(f"dialogue must be a string, got {type(text).__name__}")
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("no assistant turn ('\\n\\nAssistant:') in the dialogue")
    prompt, response = text[: cut + len(ASSISTANT)], text[cut + len(ASSISTANT):]
    if HUMAN in response:  # the dialogue ends with a human turn: there is no response to score
        raise ValueError("the dialogue ends with a human turn, not an assistant response")
    if not prompt.lstrip().startswith("Human:"):
        raise ValueError("the dialogue does not start with a human turn")
    if not response.strip():
        raise ValueError("empty assistant response")
    return prompt, response


def parse_hh_record(record) -> PreferenceExample:
    """A PreferenceExample from one {"chosen", "rejected"} record; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    prompt, chosen = split_dialogue(record["chosen"])
    rejected_prompt, rejected = split_dialogue(record["rejected"])
    if rejected_prompt != prompt:
        raise ValueError("chosen and rejected dialogues do not share the prompt")
    return PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected)


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_hh_jsonl(path, *, skip_bad_examples: bool = False, report: LoadReport | None = None):
    """PreferenceExamples from a local .jsonl / .jsonl.gz file. Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HH-RLHF data file not found: {path}")
    report = report if report is not None else LoadReport(str(path))
    examples = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not valid JSON ({e.msg})") from None
                examples.append(parse_hh_record(record))
            except ValueError as e:
                if not skip_bad_examples:
                    raise BadExampleError(f"{path}:{lineno}: {e} "
                                          "(pass --skip-bad-examples to skip such lines)") from None
                report.skipped += 1
                log.debug("skipping %s:%d: %s", path, lineno, e)
    report.kept += len(examples)
    return examples


def load_hh(source: str, split: str = "train", *, subset: str | None = None, skip_bad_examples: bool = False):
    """(examples, LoadReport) from a local file/directory of .jsonl(.gz) files or a hub dataset name.

    `subset` picks an HH data directory on the hub (e.g. "harmless-base"); for a local directory it is
    the file-name prefix (e.g. "harmless-base" matches harmless-base-train.jsonl.gz).
    """
    path = Path(source).expanduser()
    report = LoadReport(source)
    if path.is_file():
        examples = read_hh_jsonl(path, skip_bad_examples=skip_bad_examples, report=report)
    elif path.is_dir():
        prefix = f"{subset}-" if subset else ""
        suffixes = (f"{split}.jsonl", f"{split}.jsonl.gz")
        files = sorted(p for p in path.iterdir() if p.name.startswith(prefix) and p.name.endswith(suffixes))
        if not files:
            raise FileNotFoundError(f"no {prefix}*{split}.jsonl[.gz] files in {path}")
        examples = []
        for f in files:
            examples += read_hh_jsonl(f, skip_bad_examples=skip_bad_examples, report=report)
    elif source.endswith((".jsonl", ".jsonl.gz", ".json")):
        raise FileNotFoundError(f"HH-RLHF data file not found: {source}")
    else:
        examples = _load_hh_hub(source, split, subset, skip_bad_examples, report)
    if skip_bad_examples and report.skipped:
        log.warning("%s: skipped %d bad example(s), kept %d", source, report.skipped, report.kept)
    if not examples:
        raise ValueError(f"{source}: no usable examples")
    return examples, report


def _load_hh_hub(name: str, split: str, subset: str | None, skip_bad_examples: bool, report: LoadReport):
    if subset is not None and name == HUB_NAME and subset not in HUB_SUBSETS:
        raise ValueError(f"unknown HH-RLHF subset {subset!r}; known: {', '.join(HUB_SUBSETS)}")
    import datasets

    try:
        rows = datasets.load_dataset(name, data_dir=subset, split=split)
    except Exception as e:  # offline, unknown name, ...: say what was tried
        raise FileNotFoundError(f"{name!r} is not a local file or directory and could not be loaded from the "
                                f"dataset hub ({type(e).__name__}: {e})") from e
    examples = []
    for i, record in enumerate(rows):
        try:
            examples.append(parse_hh_record(record))
        except ValueError as e:
            if not skip_bad_examples:
                raise BadExampleError(f"{name} [{subset or 'default'}/{split}] row {i}: {e} "
                                      "(pass --skip-bad-examples to skip such rows)") from None
            report.skipped += 1
    report.kept += len(examples)
    return examples
