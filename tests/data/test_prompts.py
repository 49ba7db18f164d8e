import gzip
import json

import pytest

from rlhf_fast.data import BadExampleError, MissingDataError, load_prompts
from rlhf_fast.errors import DataError

PAIR = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}


def _write(path, lines):
    text = "".join(line + "\n" for line in lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def _prompts(n):
    return [json.dumps({"prompt": f"q{i}"}) for i in range(n)]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_prompt_file_holds_out_its_tail(tmp_path, suffix):
    path = _write(tmp_path / f"p{suffix}", _prompts(3) + [""] + _prompts(7)[3:])  # a blank line is ignored
    assert load_prompts(str(path), eval_size=2) == (["q0", "q1", "q2", "q3", "q4"], ["q5", "q6"])
    with pytest.raises(DataError, match="7 prompts, need more than eval_size=7") as info:
        load_prompts(str(path), eval_size=7)
    assert info.value.where == str(path)


@pytest.mark.parametrize("bad, match", [
    ("{broken", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"prompt": 3}), "expected a string 'prompt', got int"),
    (json.dumps({"text": "q"}), "expected a string 'prompt', got NoneType"),
])
def test_bad_line_names_file_and_line(tmp_path, bad, match):
    path = _write(tmp_path / "p.jsonl", _prompts(2) + ["", bad] + _prompts(3))
    with pytest.raises(BadExampleError, match=match) as info:
        load_prompts(str(path), eval_size=1)
    assert info.value.where == f"{path}:4" and "--skip-bad-examples" in info.value.what


@pytest.mark.parametrize("bad", ["{broken", "[1, 2]"])
def test_a_bad_first_line_names_file_and_line(tmp_path, bad):
    # the format is told from the first record: a bad one is still an error at its line
    path = _write(tmp_path / "p.jsonl", ["", bad] + _prompts(3))
    with pytest.raises(BadExampleError) as info:
        load_prompts(str(path), eval_size=1)
    assert info.value.where == f"{path}:2"


def test_skip_bad_examples_skips_and_counts(tmp_path, caplog):
    path = _write(tmp_path / "p.jsonl", ["{broken"] + _prompts(3) + [json.dumps({"prompt": None})] + _prompts(5)[3:])
    with caplog.at_level("WARNING"):
        train, held_out = load_prompts(str(path), eval_size=2, skip_bad_examples=True)
    assert (train, held_out) == (["q0", "q1", "q2"], ["q3", "q4"])
    assert f"{path}: skipped 2 bad example(s), kept 5" in caplog.text


def test_preference_sources_give_their_prompts(tmp_path):
    train, held_out = load_prompts("synthetic", eval_size=3, synthetic_size=10)
    assert len(train) == 10 and len(held_out) == 3 and all(p.endswith("\n\nAssistant:") for p in train)
    pairs = _write(tmp_path / "pairs.jsonl", [json.dumps(PAIR)] * 4 + ["{broken"])
    with pytest.raises(BadExampleError) as info:
        load_prompts(str(pairs), eval_size=1)
    assert info.value.where == f"{pairs}:5"
    train, held_out = load_prompts(str(pairs), eval_size=1, skip_bad_examples=True)
    assert train == ["\n\nHuman: q\n\nAssistant:"] * 3 and len(held_out) == 1


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(MissingDataError, match="not found") as info:
        load_prompts(str(missing))
    assert info.value.where == str(missing)
