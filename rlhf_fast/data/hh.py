"""Anthropic HH-RLHF: dialogue parsing and loading (hub name or local .jsonl / .jsonl.gz files).

Each record is {"chosen": dialogue, "rejected": dialogue}, a dialogue being "\\n\\nHuman: ...\\n\\nAssistant:
..." turns that differ only in the last assistant reply. The prompt is everything up to and including the
last "\\n\\nAssistant:" the two share; each response is the text after it (its leading space kept, as the
model will generate it), possibly empty.

Local files are read line by line (`jsonl.read_jsonl`: an error names the file and line); hub data goes
through `datasets.load_dataset` (errors name the split and row). Bad records raise BadExampleError, a
DataError, unless `skip_bad_examples` skips and counts them.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_fast.errors import DataError

from .examples import PreferenceExample
from .jsonl import BadExampleError, LoadReport, MissingDataError, read_jsonl, warn_skipped

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
HUB_NAME = "Anthropic/hh-rlhf"
HUB_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled",
               "red-team-attempts")


def split_dialogue(text: str) -> tuple[str, str]:
    """(prompt, response) of one HH dialogue, cut after its last "\\n\\nAssistant:"; raises ValueError when
    the dialogue has no assistant turn, ends with a human turn or does not start with one. The response may
    be empty: a few real HH dialogues end with a bare "\\n\\nAssistant:"."""
    if not isinstance(text, str):
        raise ValueError(f"dialogue must be a string, got {type(text).__name__}")
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("no assistant turn ('\\n\\nAssistant:') in the dialogue")
    if text.rfind(HUMAN) > cut:  # the dialogue ends with a human turn: there is no response to score
        raise ValueError("the dialogue ends with a human turn, not an assistant response")
    if not text.lstrip().startswith("Human:"):
        raise ValueError("the dialogue does not start with a human turn")
    return text[: cut + len(ASSISTANT)], text[cut + len(ASSISTANT):]


def parse_hh_record(record) -> PreferenceExample:
    """A PreferenceExample from one {"chosen", "rejected"} record; ValueError says what is wrong.

    The prompt is the dialogues' common text up to its last "\\n\\nAssistant:", not each dialogue's own last
    one: a few real HH replies contain the marker themselves (the model wrote a turn of its own), and the
    pair still differs only in the last reply.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    chosen, rejected = record["chosen"], record["rejected"]
    for text in (chosen, rejected):
        split_dialogue(text)  # each must be a dialogue on its own
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT) + len(ASSISTANT)
    prompt = chosen[:cut]
    if cut < len(ASSISTANT) or HUMAN in chosen[cut:] or HUMAN in rejected[cut:]:
        raise ValueError("chosen and rejected dialogues do not share the prompt (they differ before the last "
                         "assistant reply)")
    return PreferenceExample(prompt=prompt, chosen=chosen[cut:], rejected=rejected[cut:])


def read_hh_jsonl(path, *, skip_bad_examples: bool = False, report: LoadReport | None = None):
    """PreferenceExamples from a local .jsonl / .jsonl.gz file. Blank lines are ignored."""
    return read_jsonl(path, parse_hh_record, skip_bad_examples=skip_bad_examples, report=report)


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
            raise MissingDataError(f"no {prefix}*{split}.jsonl[.gz] files", str(path))
        examples = []
        for f in files:
            examples += read_hh_jsonl(f, skip_bad_examples=skip_bad_examples, report=report)
    elif source.endswith((".jsonl", ".jsonl.gz", ".json")):
        raise MissingDataError("HH-RLHF data file not found", source)
    else:
        examples = _load_hh_hub(source, split, subset, skip_bad_examples, report)
    warn_skipped(report)
    if not examples:
        raise DataError("no usable examples", source)
    return examples, report


def _load_hh_hub(name: str, split: str, subset: str | None, skip_bad_examples: bool, report: LoadReport):
    if subset is not None and name == HUB_NAME and subset not in HUB_SUBSETS:
        raise DataError(f"unknown HH-RLHF subset {subset!r}; known: {', '.join(HUB_SUBSETS)}", name)
    from .hub import load_hub_dataset

    rows = load_hub_dataset(name, data_dir=subset, split=split)
    examples = []
    for i, record in enumerate(rows):
        try:
            examples.append(parse_hh_record(record))
        except ValueError as e:
            if not skip_bad_examples:
                raise BadExampleError(f"{e}; pass --skip-bad-examples to skip such rows",
                                      f"{name} [{subset or 'default'}/{split}] row {i}") from None
            report.skipped += 1
    report.kept += len(examples)
    return examples
