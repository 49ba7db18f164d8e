import gzip
import json
from pathlib import Path

import pytest

from rlhf_fast.data import BadExampleError, load_hh, parse_hh_record, read_hh_jsonl, split_dialogue

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
    ("\n\nHuman: hi\n\nAssistant:   ", "empty assistant response"),
    ("\n\nHuman: hi\n\nAssistant: hey\n\nHuman: and?", "ends with a human turn"),
    ("\n\nAssistant: I speak first", "does not start with a human turn"),
])
def test_bad_dialogues(text, match):
    with pytest.raises(ValueError, match=match):
        split_dialogue(text)


def test_chosen_and_rejected_must_share_the_prompt():
    bad = {"chosen": SINGLE["chosen"], "rejected": MULTI["rejected"]}
    with pytest.raises(ValueError, match="share the prompt"):
        parse_hh_record(bad)


BAD_LINES = [
    ("{not json", "not valid JSON"),
    (json.dumps({"chosen": SINGLE["chosen"]}), r"missing field\(s\) \['rejected'\]"),
    (json.dumps({"chosen": "\n\nHuman: x", "rejected": "\n\nHuman: x"}), "no assistant turn"),
    (json.dumps({"chosen": "\n\nHuman: x\n\nAssistant: ", "rejected": "\n\nHuman: x\n\nAssistant: y"}),
     "empty assistant response"),
    (json.dumps([1, 2]), "expected a JSON object"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("bad, match", BAD_LINES)
def test_bad_line_error_names_file_and_line(tmp_path, suffix, bad, match):
    # line 3 is blank (ignored but counted), so the bad line is line 4
    lines = [json.dumps(SINGLE), json.dumps(MULTI), "", bad, json.dumps(SINGLE)]
    path = _write(tmp_path / f"data{suffix}", lines)
    with pytest.raises(BadExampleError, match=match) as info:
        read_hh_jsonl(path)
    assert f"{path}:4:" in str(info.value)
    assert "--skip-bad-examples" in str(info.value)


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
    with pytest.raises(FileNotFoundError, match="no red-team-"):
        load_hh(str(tmp_path), "train", subset="red-team")


def test_missing_file_and_unknown_hub_subset(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_hh(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="unknown HH-RLHF subset"):
        load_hh("Anthropic/hh-rlhf", subset="harmful-base")


SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@pytest.mark.skipif(not SHARED.is_file(), reason="shared HH-RLHF sample not present")
def test_real_hh_sample_parses():
    examples, report = load_hh(str(SHARED), skip_bad_examples=True)
    assert report.kept > 2000 and report.skipped < 0.01 * report.kept
    assert all(ex.prompt.endswith("\n\nAssistant:") and ex.chosen.strip() for ex in examples)


def test_hub_loading_goes_through_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, data_dir=None, split=None):
        calls.append((name, data_dir, split))
        return [SINGLE, {"chosen": "\n\nHuman: no answer"}, MULTI]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    where = r"Anthropic/hh-rlhf \[helpful-base/test\] row 1"
    with pytest.raises(BadExampleError, match=where + ": missing field"):
        load_hh("Anthropic/hh-rlhf", "test", subset="helpful-base")
    examples, report = load_hh("Anthropic/hh-rlhf", "test", subset="helpful-base", skip_bad_examples=True)
    assert len(examples) == 2 and report.skipped == 1
    assert calls[-1] == ("Anthropic/hh-rlhf", "helpful-base", "test")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="could not be loaded from the dataset hub"):
        load_hh("Anthropic/hh-rlhf")
