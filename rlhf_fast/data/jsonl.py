"""Reading .jsonl / .jsonl.gz data files line by line, so that every error names the file and line.

A bad line (not JSON, or a record its parser rejects with ValueError) raises BadExampleError with
where = "file:line", or, with `skip_bad_examples`, is skipped and counted in a LoadReport.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

from rlhf_fast.errors import DataError

log = logging.getLogger(__name__)

SKIP_HINT = "pass --skip-bad-examples to skip such lines"


class BadExampleError(DataError):
    """A record that cannot become an example; `where` is "file:line" (or the hub split and row)."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file or directory that is not there; `where` is its path. Also a FileNotFoundError."""


@dataclass
class LoadReport:
    """What a load kept and skipped (skipped only with skip_bad_examples)."""

    source: str
    kept: int = 0
    skipped: int = 0


def open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def require_file(path: Path, what: str = "data file") -> Path:
    if not path.is_file():
        raise MissingDataError(f"{what} not found", str(path))
    return path


def numbered_lines(path: Path):
    """(line number, line) of a text file, blank lines left out; a file that cannot be read as UTF-8 text (or
    gzip) raises DataError naming it and the last line read."""
    lineno = 0
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield lineno, line
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"unreadable after line {lineno} ({type(e).__name__}: {e})", str(path)) from None


def decode_line(line: str):
    """The JSON value of one line; ValueError (not JSONDecodeError's long message) when it is not JSON."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None


def read_jsonl(path, parse, *, skip_bad_examples: bool = False, report: LoadReport | None = None) -> list:
    """[parse(record) for each non-blank line of a .jsonl(.gz) file]; see the module docstring for bad lines."""
    path = require_file(Path(path))
    report = report if report is not None else LoadReport(str(path))
    out = []
    for lineno, line in numbered_lines(path):
        try:
            out.append(parse(decode_line(line)))
        except ValueError as e:
            if not skip_bad_examples:
                raise BadExampleError(f"{e}; {SKIP_HINT}", f"{path}:{lineno}") from None
            report.skipped += 1
            log.debug("skipping %s:%d: %s", path, lineno, e)
    report.kept += len(out)
    return out


def first_record_at(path, *, skip_bad_examples: bool = False) -> tuple[int, dict] | None:
    """(line number, first JSON object) of a .jsonl(.gz) file (to tell its format), None when it has none. A bad
    line before it raises BadExampleError, or is passed over with `skip_bad_examples` (the full read counts it)."""
    for lineno, line in numbered_lines(require_file(Path(path))):
        try:
            return lineno, as_object(decode_line(line))
        except ValueError as e:
            if not skip_bad_examples:
                raise BadExampleError(f"{e}; {SKIP_HINT}", f"{path}:{lineno}") from None
    return None


def as_object(record) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    return record


def warn_skipped(report: LoadReport) -> None:
    if report.skipped:
        log.warning("%s: skipped %d bad example(s), kept %d", report.source, report.skipped, report.kept)
