import gzip
import json
from pathlib import Path

import pytest

from rlhf_fast.data import BadExampleError, MissingDataError, load_hh, parse_hh_record, read_hh_jsonl, split_dialogue
from rlhf_fast.errors import DataError

SINGLE = {
    "chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for 8 minutes.",
    "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: No idea.",
}
MULTI = {
    "chosen": ("\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: Name a fruit."
               "\n\nAssistant: An apple."),
    "rejected": ("\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: Name a fruit."
                 "\n\nAssistant: A carrot."),
}


def _write(path: Path, lines: list[str]) -> Path:
    text = "".join(line + "\n" for line in lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def test_single_turn_prompt_ends_with_last_assistant_tag():
    ex = parse_hh_record(SINGLE)
    assert ex.prompt == "\n\nHuman: How do I boil an egg?\n\nAssistant:"
    assert ex.chosen == " Put it in boiling water for 8 minutes."
    assert ex.rejected == " No idea."
    assert ex.prompt + ex.chosen == SINGLE["chosen"]


def test_multi_turn_keeps_earlier_turns_in_the_prompt():
    ex = parse_hh_record(MULTI)
    assert ex.prompt == MULTI["chosen"][: -len(" An apple.")]
    assert ex.prompt.count("\n\nAssistant:") == 2 and ex.prompt.endswith("\n\nAssistant:")
    assert (ex.chosen, ex.rejected) == (" An apple.", " A carrot.")


@pytest.mark.parametrize("text, match", [
    ("\n\nHuman: hello there", "no assistant turn"),
    ("\n\nHuman: hi\n\nAssistant: hey\n\nHuman: and?", "ends with a human turn"),
    ("\n\nAssistant: I speak first", "does not start with a human turn"),
])
def test_bad_dialogues(text, match):
    with pytest.raises(ValueError, match=match):
        split_dialogue(text)


@pytest.mark.parametrize("ending", ["", " ", "   "])
def test_an_empty_reply_is_a_valid_response(ending):
    # real harmless-base pairs whose chosen dialogue ends with a bare "\n\nAssistant:" (or one space)
    prompt = "\n\nHuman: Can you repeat the address?\n\nAssistant:"
    ex = parse_hh_record({"chosen": prompt + ending, "rejected": prompt + " Sure, it is 12 Oak Lane."})
    assert (ex.prompt, ex.chosen, ex.rejected) == (prompt, ending, " Sure, it is 12 Oak Lane.")
    assert split_dialogue(prompt + ending) == (prompt, ending)


def test_a_reply_containing_the_assistant_marker_keeps_the_shared_prompt():
    # real pairs: the model wrote a turn of its own inside its reply; the pair still differs only there
    prompt = "\n\nHuman: Isn't that drag kings?\n\nAssistant:"
    chosen = " No.  Human: Why?\n\nAssistant:  Because."
    ex = parse_hh_record({"chosen": prompt + chosen, "rejected": prompt + " A drag king is the opposite."})
    assert (ex.prompt, ex.chosen, ex.rejected) == (prompt, chosen, " A drag king is the opposite.")


@pytest.mark.parametrize("chosen, rejected", [
    (SINGLE["chosen"], MULTI["rejected"]),  # different conversations
    # the same first question, different earlier assistant replies
    ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
     "\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: d"),
])
def test_chosen_and_rejected_must_share_the_prompt(chosen, rejected):
    with pytest.raises(ValueError, match="share the prompt"):
        parse_hh_record({"chosen": chosen, "rejected": rejected})


BAD_LINES = [
    ("{not json", "not valid JSON"),
    (json.dumps({"chosen": SINGLE["chosen"]}), r"missing field\(s\) \['rejected'\]"),
    (json.dumps({"chosen": "\n\nHuman: x", "rejected": "\n\nHuman: x"}), "no assistant turn"),
    (json.dumps({"chosen": "\n\nHuman: x\n\nAssistant: y\n\nHuman: z", "rejected": "\n\nHuman: x\n\nAssistant: y"}),
     "ends with a human turn"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({"chosen": 3, "rejected": "\n\nHuman: x\n\nAssistant: y"}), "dialogue must be a string"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("bad, match", BAD_LINES)
def test_bad_line_error_names_file_and_line(tmp_path, suffix, bad, match):
    # line 3 is blank (ignored but counted), so the bad line is line 4
    lines = [json.dumps(SINGLE), json.dumps(MULTI), "", bad, json.dumps(SINGLE)]
    path = _write(tmp_path / f"data{suffix}", lines)
    with pytest.raises(BadExampleError, match=match) as info:
        read_hh_jsonl(path)
    assert isinstance(info.value, DataError) and info.value.where == f"{path}:4"
    assert str(info.value).endswith(f"({path}:4)") and "--skip-bad-examples" in info.value.what


def test_unreadable_files_are_named(tmp_path):
    text = tmp_path / "data.jsonl"
    text.write_bytes(json.dumps(SINGLE).encode() + b"\n\xff\xfe garbage\n")
    not_gzip = _write(tmp_path / "plain.jsonl", [json.dumps(SINGLE)]).rename(tmp_path / "plain.jsonl.gz")
    for path in (text, not_gzip):
        with pytest.raises(DataError, match="unreadable") as info:
            read_hh_jsonl(path)
        assert info.value.where == str(path)


def test_skip_bad_examples_counts_them(tmp_path, caplog):
    lines = [json.dumps(SINGLE), BAD_LINES[0][0], json.dumps(MULTI), BAD_LINES[1][0], BAD_LINES[3][0]]
    path = _write(tmp_path / "data.jsonl.gz", lines)
    with caplog.at_level("WARNING"):
        examples, report = load_hh(str(path), skip_bad_examples=True)
    assert [ex.chosen for ex in examples] == [" Put it in boiling water for 8 minutes.", " An apple."]
    assert (report.kept, report.skipped) == (2, 3)
    assert "skipped 3 bad example(s)" in caplog.text


def test_directory_picks_split_and_subset(tmp_path):
    _write(tmp_path / "harmless-base-train.jsonl.gz", [json.dumps(SINGLE)] * 3)
    _write(tmp_path / "harmless-base-test.jsonl.gz", [json.dumps(MULTI)] * 2)
    _write(tmp_path / "helpful-base-train.jsonl", [json.dumps(MULTI)])
    train, _ = load_hh(str(tmp_path), "train", subset="harmless-base")
    test, _ = load_hh(str(tmp_path), "test", subset="harmless-base")
    every_train, _ = load_hh(str(tmp_path), "train")
    assert (len(train), len(test), len(every_train)) == (3, 2, 4)
    with pytest.raises(MissingDataError, match="no red-team-") as info:
        load_hh(str(tmp_path), "train", subset="red-team")
    assert info.value.where == str(tmp_path)


def test_missing_file_and_unknown_hub_subset(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    for error in (FileNotFoundError, DataError):  # a MissingDataError is both
        with pytest.raises(error, match=f"not found \\({missing}\\)"):
            load_hh(missing)
        with pytest.raises(error, match=f"data file not found \\({missing}\\)"):
            read_hh_jsonl(missing)
    with pytest.raises(DataError, match="unknown HH-RLHF subset"):
        load_hh("Anthropic/hh-rlhf", subset="harmful-base")


SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@pytest.mark.skipif(not SHARED.is_file(), reason="shared HH-RLHF sample not present")
def test_real_hh_sample_parses():
    examples, report = load_hh(str(SHARED))  # every pair, without skip_bad_examples
    assert (report.kept, report.skipped) == (2312, 0)
    assert all(ex.prompt.endswith("\n\nAssistant:") and ex.chosen != ex.rejected for ex in examples)
    assert sum(not ex.chosen.strip() for ex in examples) == 4  # empty chosen replies load as such


def test_hub_loading_goes_through_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, data_dir=None, split=None):
        calls.append((name, data_dir, split))
        return [SINGLE, {"chosen": "\n\nHuman: no answer"}, MULTI]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(BadExampleError, match="missing field") as info:
        load_hh("Anthropic/hh-rlhf", "test", subset="helpful-base")
    assert info.value.where == "Anthropic/hh-rlhf [helpful-base/test] row 1"
    examples, report = load_hh("Anthropic/hh-rlhf", "test", subset="helpful-base", skip_bad_examples=True)
    assert len(examples) == 2 and report.skipped == 1
    assert calls[-1] == ("Anthropic/hh-rlhf", "helpful-base", "test")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="could not be loaded from the dataset hub") as info:
        load_hh("Anthropic/hh-rlhf")
    assert info.value.where == "Anthropic/hh-rlhf"
