import pytest
import torch

from rlhf_fast.data import (
    ByteTokenizer,
    PreferenceCollator,
    PreferenceDataset,
    PreferenceExample,
    PromptCollator,
    PromptDataset,
    ResumableBatches,
    SFTCollator,
    SFTDataset,
    SFTExample,
    load_preference_splits,
    synthetic_preferences,
    synthetic_split,
)
from rlhf_fast.data.synthetic import POLITE, RUDE, SUBJECTS
from rlhf_fast.errors import DataError

TOK = ByteTokenizer()


def test_sft_dataset_masks_prompt_and_keeps_eos():
    ds = SFTDataset([SFTExample("abc", "xy"), PreferenceExample("p", "chosen!", "no")], TOK, 8, 16)
    assert ds[0]["input_ids"] == [97, 98, 99, 120, 121, TOK.eos_token_id]
    assert ds[0]["loss_mask"] == [0, 0, 0, 1, 1, 1]
    assert TOK.decode(ds[1]["input_ids"]) == "pchosen!"  # a preference pair trains on its chosen response


def test_an_empty_response_trains_and_scores_its_eos():
    # real HH pairs can have an empty chosen reply: the target is then "stop here", the EOS alone
    sft = SFTDataset([SFTExample("abc", "")], TOK, 8, 16)
    assert sft[0]["input_ids"] == [97, 98, 99, TOK.eos_token_id] and sft[0]["loss_mask"] == [0, 0, 0, 1]
    assert sft.n_truncated == 0
    batch = SFTCollator(TOK)([sft[0], SFTDataset([SFTExample("a", "xyz")], TOK, 8, 16)[0]])
    assert batch["loss_mask"].sum(1).tolist() == [1, 4]
    pairs = PreferenceDataset([PreferenceExample("abc", "", "no")], TOK, 8, 16)
    assert pairs[0]["chosen_ids"] == [97, 98, 99, TOK.eos_token_id] and pairs.n_identical == 0
    batch = PreferenceCollator(TOK)([pairs[0]])
    assert batch["loss_mask"].sum(1).tolist() == [1, 3]


def test_truncation_keeps_prompt_end_and_response_start():
    ds = SFTDataset([SFTExample("0123456789", "abcdefghij")], TOK, max_prompt_len=4, max_len=7)
    assert TOK.decode(ds[0]["input_ids"]) == "6789abc"
    with pytest.raises(ValueError, match="max_prompt_len"):
        SFTDataset([], TOK, max_prompt_len=8, max_len=8)


@pytest.mark.parametrize("side", ["left", "right"])
def test_sft_collator_pads_consistently(side):
    ds = SFTDataset([SFTExample("ab", "c"), SFTExample("abcde", "fgh")], TOK, 8, 16)
    b = SFTCollator(TOK, side)([ds[0], ds[1]])
    assert b["input_ids"].shape == b["attention_mask"].shape == b["loss_mask"].shape == (2, 9)
    row = b["input_ids"][0]
    real = b["attention_mask"][0].bool()
    assert row[real].tolist() == ds[0]["input_ids"]
    assert (row[~real] == TOK.pad_token_id).all()
    assert b["loss_mask"][0][real].tolist() == ds[0]["loss_mask"] and b["loss_mask"][0][~real].sum() == 0
    assert real.tolist()[0 if side == "left" else -1] is False


def test_preference_collator_stacks_chosen_then_rejected():
    pairs = [PreferenceExample("q", "good", "bad!!!!"), PreferenceExample("qq", "y", "n")]
    ds = PreferenceDataset(pairs, TOK, 8, 16)
    b = PreferenceCollator(TOK)([ds[0], ds[1]])
    assert b["input_ids"].shape == (4, 9)
    texts = [TOK.decode(r[m.bool()]) for r, m in zip(b["input_ids"], b["attention_mask"])]
    assert texts == ["qgood", "qqy", "qbad!!!!", "qqn"]
    assert b["attention_mask"][:, -1].all()  # left padded: every row ends with a real token (EOS)


def test_prompt_collator_left_pads():
    ds = PromptDataset(["hello", SFTExample("hi", "x")], TOK)
    b = PromptCollator(TOK)([ds[0], ds[1]])
    assert b["prompts"] == ["hello", "hi"]
    assert b["attention_mask"].tolist() == [[1] * 5, [0, 0, 0, 1, 1]]


def test_resumable_batches_restore_exact_order():
    ds = SFTDataset([SFTExample(str(i), "x") for i in range(11)], TOK, 4, 8)
    first = lambda b: [TOK.decode(r[m.bool()])[0] for r, m in zip(b["input_ids"], b["attention_mask"])]  # noqa: E731
    a = ResumableBatches(ds, 3, SFTCollator(TOK), seed=5)
    straight = [first(next(a)) for _ in range(8)]  # 3 batches per epoch: crosses two epoch boundaries
    b = ResumableBatches(ds, 3, SFTCollator(TOK), seed=5)
    for _ in range(4):
        next(b)
    c = ResumableBatches(ds, 3, SFTCollator(TOK), seed=5)
    c.load_state_dict(b.state_dict())
    assert [first(next(c)) for _ in range(4)] == straight[4:]
    epoch0 = sum(straight[:3], [])
    assert len(set(epoch0)) == 9  # no repeats inside an epoch
    assert straight[:3] != straight[3:6]  # reshuffled each epoch
    with pytest.raises(ValueError, match="fewer than one batch"):
        ResumableBatches(ds, 12, SFTCollator(TOK))


def test_synthetic_task_is_deterministic_short_and_labelled():
    a, b = synthetic_preferences(300, seed=3), synthetic_preferences(300, seed=3)
    assert a == b and a != synthetic_preferences(300, seed=4)
    for ex in a:
        assert len(ex.prompt.encode()) <= 48 and max(len(ex.chosen.encode()), len(ex.rejected.encode())) <= 48
        subject = next(s for s in SUBJECTS if f" {s}" in ex.prompt)
        assert ex.chosen.startswith(f" {subject} ") and ex.chosen.strip().endswith(POLITE)
        on_topic, polite = ex.rejected.startswith(f" {subject} "), ex.rejected.strip().endswith(POLITE)
        assert not (on_topic and polite)
        assert polite or ex.rejected.strip().endswith(RUDE)
    train, held_out = synthetic_split(200, 50, seed=1)
    assert len(held_out) == 50 and not set(train) & set(held_out)


def test_load_preference_splits_from_single_file_holds_out_tail(tmp_path):
    import json

    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: a{i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: b"}
            for i in range(7)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held_out, report = load_preference_splits(str(path), eval_size=2)
    assert [ex.chosen for ex in held_out] == [" a5", " a6"] and len(train) == 5 and report.kept == 7
    with pytest.raises(DataError, match="need more than eval_size") as info:
        load_preference_splits(str(path), eval_size=7)
    assert info.value.where == str(path)


def test_collated_ids_fit_tiny_vocab():
    ds = SFTDataset([SFTExample("é", "ü")], TOK, 4, 8)
    b = SFTCollator(TOK)([ds[0]])
    assert int(b["input_ids"].max()) < 320 and b["input_ids"].dtype == torch.long
