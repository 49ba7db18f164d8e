"""Where data comes from: files, directories (split by file name, or one pool), hub names with a split, and
the hub failing fast when it cannot be reached."""

import gzip
import json
import socket
import time

import pytest

from rlhf_fast.data import BadExampleError, MissingDataError, hub, load_preference_splits, load_prompts, load_sft_splits
from rlhf_fast.errors import DataError


def _pair(i):
    return {"chosen": f"\n\nHuman: q{i}\n\nAssistant: a{i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: b"}


def _write(path, records):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def test_directory_with_train_and_test_files_uses_them_as_splits(tmp_path):
    _write(tmp_path / "harmless-base-train.jsonl.gz", [_pair(i) for i in range(4)])
    _write(tmp_path / "harmless-base-test.jsonl.gz", [_pair(i) for i in range(10, 13)])
    _write(tmp_path / "helpful-base-train.jsonl", [_pair(20)])
    _write(tmp_path / "helpful-base-test.jsonl", [{"prompt": "p", "completion": "c"}])  # SFT data, another format
    (tmp_path / "notes.txt").write_text("not data")
    train, held_out, report = load_preference_splits(str(tmp_path), subset="harmless-base", eval_size=2)
    assert [ex.chosen for ex in train] == [" a0", " a1", " a2", " a3"] and [ex.chosen for ex in held_out] == \
        [" a10", " a11"]
    assert report.kept == 7
    train, held_out, _ = load_sft_splits(str(tmp_path), eval_size=5)  # every subset; formats per file
    assert len(train) == 5 and [ex.response for ex in held_out] == [" a10", " a11", " a12", "c"]
    with pytest.raises(DataError, match=r"prompt-completion records .* are not preference data") as info:
        load_preference_splits(str(tmp_path), eval_size=2)
    assert info.value.where == f"{tmp_path / 'helpful-base-test.jsonl'}:1"
    with pytest.raises(MissingDataError, match=r"no red-team-\*.jsonl\[.gz\] files") as info:
        load_preference_splits(str(tmp_path), subset="red-team")
    assert info.value.where == str(tmp_path)


def test_directory_without_both_splits_is_one_pool_with_its_tail_held_out(tmp_path):
    # the offline HH sample's layout: one harmless-base-test.jsonl.gz
    _write(tmp_path / "harmless-base-test.jsonl.gz", [_pair(i) for i in range(5)])
    for loader in (load_preference_splits, load_sft_splits):
        train, held_out, _ = loader(str(tmp_path) + "/", subset="harmless-base", eval_size=2)
        assert len(train) == 3 and held_out[-1].prompt == "\n\nHuman: q4\n\nAssistant:"
    train, held_out = load_prompts(str(tmp_path), eval_size=2)
    assert train == [f"\n\nHuman: q{i}\n\nAssistant:" for i in range(3)] and len(held_out) == 2
    with pytest.raises(DataError, match="5 examples, need more than eval_size=5"):
        load_sft_splits(str(tmp_path), eval_size=5)
    _write(tmp_path / "train_extra.jsonl", [_pair(9)] * 3)  # now both names: the splits
    train, held_out, _ = load_preference_splits(str(tmp_path), eval_size=5)
    assert (len(train), len(held_out)) == (3, 5)


def test_missing_local_paths_are_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "load_hub_dataset", lambda *a, **k: pytest.fail("went to the hub"))
    for missing in (str(tmp_path / "nope"), "./data", "pairs.json", "x/pairs.jsonl.gz"):
        with pytest.raises(MissingDataError, match="data file or directory not found") as info:
            load_sft_splits(missing)
        assert info.value.where == missing


class FakeHub:
    """datasets.load_dataset stand-in: {split: rows}; records its calls."""

    def __init__(self, splits):
        self.splits, self.calls = splits, []

    def __call__(self, path, split=None, **kwargs):
        self.calls.append((path, split, kwargs))
        if split is None:
            return dict(self.splits)
        if split not in self.splits:
            raise ValueError(f'Unknown split "{split}"')
        return self.splits[split]


@pytest.fixture
def fake_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def install(splits):
        fake = FakeHub(splits)
        monkeypatch.setattr(datasets, "load_dataset", fake)
        return fake

    return install


def test_hub_names_and_splits(fake_hub):
    sky = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(6)]
    fake = fake_hub({"train": sky, "test": sky[:2]})
    train, held_out, _ = load_sft_splits("trl-lib/sky", eval_size=1)
    assert (len(train), [ex.prompt for ex in held_out]) == (6, ["p0"])
    assert fake.calls[-1] == ("trl-lib/sky", None, {})
    assert load_prompts("trl-lib/sky:test", subset="cfg", eval_size=1) == (["p0"], ["p1"])  # one split: tail held out
    assert fake.calls[-1] == ("trl-lib/sky", "test", {"name": "cfg"})
    with pytest.raises(MissingDataError, match='Unknown split "valid"'):
        load_sft_splits("trl-lib/sky:valid", eval_size=1)

    fake = fake_hub({"train": [_pair(i) for i in range(4)]})  # no test split: the tail of train
    train, held_out, _ = load_preference_splits("Anthropic/hh-rlhf", subset="harmless-base", eval_size=1)
    assert (len(train), held_out[0].chosen) == (3, " a3")
    assert fake.calls[-1] == ("Anthropic/hh-rlhf", None, {"data_dir": "harmless-base"})
    with pytest.raises(DataError, match="unknown HH-RLHF subset"):
        load_preference_splits("Anthropic/hh-rlhf", subset="harmful-base")

    fake_hub({"validation": sky})
    with pytest.raises(DataError, match=r"no 'train' split \(it has: validation\); name one as x/y:SPLIT"):
        load_sft_splits("x/y")


def test_hub_rows_errors_name_split_and_row(fake_hub):
    fake_hub({"train": [{"prompt": "a", "completion": "b"}, {"prompt": "a"}, {"prompt": "c", "completion": "d"}] * 2})
    with pytest.raises(BadExampleError, match=r"missing field\(s\) \['completion'\]") as info:
        load_sft_splits("o/d", eval_size=1)
    assert info.value.where == "o/d [default/train] row 1"
    train, held_out, report = load_sft_splits("o/d", eval_size=1, skip_bad_examples=True)
    assert (len(train), report.skipped) == (3, 2)
    fake_hub({"train": [{"question": "q"}] * 3})
    with pytest.raises(DataError, match="no known dataset format") as info:
        load_prompts("o/d", eval_size=1)
    assert info.value.where == "o/d [default/train] row 0"


def test_unreachable_hub_loads_in_offline_mode(fake_hub, monkeypatch):
    import datasets
    from huggingface_hub import constants

    seen = []
    fake = fake_hub({"train": [{"prompt": f"p{i}"} for i in range(3)]})
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    real_call = fake.__call__
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: seen.append((datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE))
                        or real_call(*a, **k))
    before = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    assert load_prompts("o/d", eval_size=1) == (["p0", "p1"], ["p2"])  # a cached dataset still loads
    assert seen == [(True, True)] and (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE) == before


def test_unreachable_hub_fails_fast_in_one_line(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)  # whatever this machine's network
    start = time.perf_counter()
    with pytest.raises(MissingDataError, match=r"could not be loaded from the dataset hub \(offline: .* cannot be "
                                               r"reached and the dataset is not in the local HF cache") as info:
        load_prompts("rlhf-fast-tests/no-such-dataset", eval_size=1)
    assert time.perf_counter() - start < 10  # not ~25 s of retries
    assert info.value.where == "rlhf-fast-tests/no-such-dataset" and "\n" not in info.value.what


def test_hub_probe(monkeypatch):
    pytest.importorskip("huggingface_hub")
    for var in hub._PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    monkeypatch.setattr(hub, "hub_endpoint", lambda: f"http://127.0.0.1:{port}")
    assert hub.hub_reachable(timeout=1)
    server.close()  # nothing listens there now: refused at once
    assert not hub.hub_reachable(timeout=1)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # the proxy decides: no probe
    assert hub.hub_reachable(timeout=1)
