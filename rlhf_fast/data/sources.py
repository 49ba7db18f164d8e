"""One entry point per kind of data — SFT examples, preference pairs, RL prompts — over every source:

- "synthetic": the built-in task (its held-out part drawn apart by construction);
- a .jsonl / .jsonl.gz file: its last `eval_size` examples are held out;
- a directory of them: with `subset`, only the files whose name starts with "<subset>-". When some file
  names hold the word "train" and some "test" (e.g. harmless-base-train.jsonl.gz, test.jsonl), those are
  the two splits (other files ignored); else every file is training data and the tail is held out, as for
  one file (the offline HH sample, holding only harmless-base-test.jsonl.gz, is such a directory);
- a hub dataset name (`datasets.load_dataset`): "name" reads its "train" split and holds out its "test"
  split (the tail of "train" when it has none); "name:split" reads that one split and holds out its tail.
  `subset` is the data directory for Anthropic/hh-rlhf (e.g. harmless-base), the config name otherwise.

Each file or hub split may be in any of TRL's formats that the kind reads (`formats.py`); conversational
records go through `chat_template` (`chat.py`: None is the HH-format default).
"""

from __future__ import annotations

import re
from pathlib import Path

from rlhf_fast.errors import DataError

from .chat import ChatTemplate, load_chat_template
from .formats import PREFERENCES, PROMPTS, SFT, parser_for, read_examples
from .hh import HUB_NAME, HUB_SUBSETS
from .jsonl import BadExampleError, LoadReport, MissingDataError, warn_skipped
from .synthetic import synthetic_split

DATA_SUFFIXES = (".jsonl", ".jsonl.gz")


def load_preference_splits(source: str, *, subset: str | None = None, eval_size: int = 200,
                           synthetic_size: int = 4000, seed: int = 0, skip_bad_examples: bool = False,
                           chat_template: str | None = None):
    """(train, held-out, LoadReport) of PreferenceExamples; see the module docstring for the sources."""
    if eval_size < 1:
        raise ValueError(f"eval_size must be >= 1, got {eval_size}")
    load_chat_template(chat_template)  # a bad template is an error with any data
    if source == "synthetic":
        train, held_out = synthetic_split(synthetic_size, eval_size, seed)
        return train, held_out, LoadReport("synthetic", kept=len(train) + len(held_out))
    return load_splits(source, PREFERENCES, subset=subset, eval_size=eval_size, skip_bad_examples=skip_bad_examples,
                       chat_template=chat_template)


def load_sft_splits(source: str, *, subset: str | None = None, eval_size: int = 200, synthetic_size: int = 4000,
                    seed: int = 0, skip_bad_examples: bool = False, chat_template: str | None = None):
    """(train, held-out, LoadReport) of SFTExamples: prompt-completion, conversational and language-modelling
    data (prompt ""), or the chosen side of preference pairs (the synthetic task's too)."""
    if source == "synthetic":
        train, held_out, report = load_preference_splits(source, eval_size=eval_size, synthetic_size=synthetic_size,
                                                         seed=seed, chat_template=chat_template)
        return [ex.to_sft() for ex in train], [ex.to_sft() for ex in held_out], report
    if eval_size < 1:
        raise ValueError(f"eval_size must be >= 1, got {eval_size}")
    return load_splits(source, SFT, subset=subset, eval_size=eval_size, skip_bad_examples=skip_bad_examples,
                       chat_template=chat_template)


def load_splits(source: str, kind: str, *, subset: str | None, eval_size: int, skip_bad_examples: bool,
                chat_template: str | None):
    """(train, held-out, LoadReport) of a file, directory or hub name (`kind`: formats.SFT, PREFERENCES or
    PROMPTS)."""
    template = load_chat_template(chat_template)
    report = LoadReport(source)
    path = Path(source).expanduser()
    if path.is_file():
        train, held_out = read_examples(path, kind, template, skip_bad_examples=skip_bad_examples, report=report), None
    elif path.is_dir():
        train, held_out = _directory(path, kind, template, subset, skip_bad_examples, report)
    elif source.endswith((*DATA_SUFFIXES, ".json", ".gz")) or source.startswith(("/", ".", "~")):
        raise MissingDataError("data file or directory not found", source)
    else:
        train, held_out = _hub(source, kind, template, subset, skip_bad_examples, report)
    warn_skipped(report)
    noun = "prompts" if kind == PROMPTS else "examples"
    if held_out is None:  # one pool: hold out its tail
        if len(train) <= eval_size:
            raise DataError(f"{len(train)} {noun}, need more than eval_size={eval_size}", source)
        train, held_out = train[:-eval_size], train[-eval_size:]
    if not train or not held_out:
        raise DataError(f"no usable {noun} in the {'train' if not train else 'held-out'} split", source)
    return train, held_out[:eval_size], report


def _directory(path: Path, kind: str, template: ChatTemplate, subset: str | None, skip_bad_examples: bool,
               report: LoadReport):
    prefix = f"{subset}-" if subset else ""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith(prefix)
                   and p.name.endswith(DATA_SUFFIXES))
    if not files:
        raise MissingDataError(f"no {prefix}*.jsonl[.gz] files", str(path))
    train_files, test_files = _named(files, "train"), _named(files, "test")

    def read(fs):
        out = []
        for f in fs:
            out += read_examples(f, kind, template, skip_bad_examples=skip_bad_examples, report=report)
        return out

    if train_files and test_files:
        return read(train_files), read(test_files)
    return read(files), None


def _named(files: list[Path], word: str) -> list[Path]:
    """The files whose name holds `word` as a word (harmless-base-train.jsonl.gz, train-00000.jsonl)."""
    return [f for f in files if word in re.split(r"[^a-z0-9]+", f.name.lower())]


def _hub(source: str, kind: str, template: ChatTemplate, subset: str | None, skip_bad_examples: bool,
         report: LoadReport):
    from .hub import load_hub_dataset

    name, _, split = source.partition(":")
    if name == HUB_NAME:
        if subset is not None and subset not in HUB_SUBSETS:
            raise DataError(f"unknown HH-RLHF subset {subset!r}; known: {', '.join(HUB_SUBSETS)}", name)
        kwargs = {"data_dir": subset}
    else:
        kwargs = {"name": subset} if subset else {}
    label = f"{name} [{subset or 'default'}/{{}}]"
    if split:
        rows = load_hub_dataset(name, split=split, **kwargs)
        return _rows(rows, kind, template, label.format(split), skip_bad_examples, report), None
    splits = load_hub_dataset(name, **kwargs)
    if "train" not in splits:
        raise DataError(f"no 'train' split (it has: {', '.join(splits)}); name one as {name}:SPLIT", name)
    train = _rows(splits["train"], kind, template, label.format("train"), skip_bad_examples, report)
    if "test" not in splits:
        return train, None
    return train, _rows(splits["test"], kind, template, label.format("test"), skip_bad_examples, report)


def _rows(rows, kind: str, template: ChatTemplate, where: str, skip_bad_examples: bool, report: LoadReport) -> list:
    """The examples of one hub split; errors name the split and row."""
    out, parse = [], None
    for i, record in enumerate(rows):
        if parse is None:
            if not isinstance(record, dict):
                raise DataError(f"expected records with named fields, got {type(record).__name__}", f"{where} row {i}")
            parse = parser_for(record, kind, template, f"{where} row {i}")
        try:
            out.append(parse(record))
        except ValueError as e:
            if not skip_bad_examples:
                raise BadExampleError(f"{e}; pass --skip-bad-examples to skip such rows", f"{where} row {i}") from None
            report.skipped += 1
    report.kept += len(out)
    return out
