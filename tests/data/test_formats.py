"""TRL's dataset formats read from .jsonl files: what each becomes for SFT, RM/DPO and RL prompts, and the
one-line errors for bad records and unknown formats."""

import json

import pytest

from rlhf_fast.data import (
    BadExampleError,
    ByteTokenizer,
    PreferenceExample,
    SFTCollator,
    SFTDataset,
    SFTExample,
    detect_format,
    load_preference_splits,
    load_prompts,
    load_sft_splits,
)
from rlhf_fast.errors import DataError


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _first(loader, tmp_path, record, **kwargs):
    """What `loader` makes of `record` (the file holds it, then a second copy held out)."""
    train, _, *_ = loader(_write(tmp_path / "d.jsonl", [record, record]), eval_size=1, **kwargs)
    return train[0]


HH = {"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"}
RECORDS = {  # format name → (record, SFT example or None, preference example or None, RL prompt or None)
    "language-modelling": ({"text": "The sky is blue."}, SFTExample("", "The sky is blue."), None, None),
    "conversational": ({"messages": [U("Sky?"), A("Blue."), U("Sure?"), A("Yes.")]},
                       SFTExample("\n\nHuman: Sky?\n\nAssistant: Blue.\n\nHuman: Sure?\n\nAssistant:", " Yes."), None,
                       "\n\nHuman: Sky?\n\nAssistant: Blue.\n\nHuman: Sure?\n\nAssistant:"),
    "prompt-completion": ({"prompt": "The sky is", "completion": " blue."}, SFTExample("The sky is", " blue."), None,
                          "The sky is"),
    "prompt-only": ({"prompt": "The sky is"}, None, None, "The sky is"),
    "preference": ({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
                   SFTExample("The sky is", " blue."), PreferenceExample("The sky is", " blue.", " green."),
                   "The sky is"),
    "implicit-prompt preference": (HH, SFTExample("\n\nHuman: q\n\nAssistant:", " yes"),
                                   PreferenceExample("\n\nHuman: q\n\nAssistant:", " yes", " no"),
                                   "\n\nHuman: q\n\nAssistant:"),
}


@pytest.mark.parametrize("name", list(RECORDS))
def test_each_standard_format_reads_as_expected(tmp_path, name):
    record, sft, pref, prompt = RECORDS[name]
    assert detect_format(record) == name
    for loader, want in ((load_sft_splits, sft), (load_preference_splits, pref), (load_prompts, prompt)):
        if want is None:
            with pytest.raises(DataError, match=f"^{name} records .* are not .*; it takes ") as info:
                _first(loader, tmp_path, record)
            assert info.value.where.endswith("d.jsonl:1")
        else:
            assert _first(loader, tmp_path, record) == want


def test_conversational_formats_render_through_the_chat_template(tmp_path):
    p = "\n\nHuman: Sky?\n\nAssistant:"
    conv_pref = {"prompt": [U("Sky?")], "chosen": [A("Blue.")], "rejected": [A("Green.")]}
    assert _first(load_preference_splits, tmp_path, conv_pref) == PreferenceExample(p, " Blue.", " Green.")
    assert _first(load_sft_splits, tmp_path, conv_pref) == SFTExample(p, " Blue.")
    implicit = {"chosen": [U("Hi"), A("Hey."), U("Sky?"), A("Blue.")], "rejected": [U("Hi"), A("Hey."), U("Sky?"),
                                                                                  A("Green."), U("ok")]}
    want = PreferenceExample("\n\nHuman: Hi\n\nAssistant: Hey." + p, " Blue.", " Green.\n\nHuman: ok")
    assert _first(load_preference_splits, tmp_path, implicit) == want
    completion = {"prompt": [U("Sky?")], "completion": [A("Blue.")]}
    assert _first(load_sft_splits, tmp_path, completion) == SFTExample(p, " Blue.")
    assert _first(load_prompts, tmp_path, completion) == p
    assert _first(load_prompts, tmp_path, {"prompt": [{"role": "system", "content": "Be kind."}, U("Sky?")]}) == \
        "Be kind." + p
    # RL prompt of a conversation: up to its last user turn, whatever follows
    assert _first(load_prompts, tmp_path, {"messages": [U("Sky?"), A("Blue.")]}) == p
    # an override template applies to every conversational field
    tmpl = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>" \
           "{% endif %}"
    assert _first(load_preference_splits, tmp_path, conv_pref, chat_template=tmpl) == \
        PreferenceExample("<user>Sky?<assistant>", "Blue.", "Green.")
    assert _first(load_sft_splits, tmp_path, {"messages": [U("a"), A("b")]}, chat_template=tmpl) == \
        SFTExample("<user>a<assistant>", "b")


@pytest.mark.parametrize("loader, good, bad, match", [
    (load_sft_splits, {"messages": [U("a"), A("b")]}, {"messages": [U("a"), {"role": "assistant"}]},
     "'messages' message 1 must be an object"),
    (load_sft_splits, {"messages": [U("a"), A("b")]}, {"messages": [U("a"), A("b"), U("c")]},
     "the last message must be the assistant's reply"),
    (load_sft_splits, {"messages": [U("a"), A("b")]}, {"messages": [{"role": "tool", "content": "x"}, A("b")]},
     "unknown role tool"),
    (load_sft_splits, {"prompt": "a", "completion": "b"}, {"prompt": "a"}, r"missing field\(s\) \['completion'\]"),
    (load_sft_splits, {"prompt": "a", "completion": "b"}, {"prompt": [U("a")], "completion": "b"},
     "fields must be all strings or all lists of messages, got 'prompt': list, 'completion': str"),
    (load_sft_splits, {"text": "a"}, {"text": 3}, "expected a string 'text', got int"),
    (load_preference_splits, {"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"},
     r"missing field\(s\) \['rejected'\]"),
    (load_preference_splits, {"chosen": [U("a"), A("b")], "rejected": [U("a"), A("c")]},
     {"chosen": [U("a"), A("b")], "rejected": [U("x"), A("c")]}, "share no leading message"),
    (load_preference_splits, {"chosen": [U("a"), A("b")], "rejected": [U("a"), A("c")]},
     {"chosen": [U("a"), A("b")], "rejected": [U("a"), A("b")]}, "differ by no message"),
    (load_preference_splits, {"chosen": [U("a"), A("b")], "rejected": [U("a"), A("c")]},
     {"chosen": [U("a"), U("b")], "rejected": [U("a"), U("c")]}, "must each go on with an assistant message"),
    (load_preference_splits, HH, {"chosen": "no dialogue", "rejected": "\n\nHuman: q\n\nAssistant: no"},
     "no assistant turn"),
    (load_prompts, {"prompt": "a"}, {"prompt": [U("a"), A("b")]}, "must not end with an assistant message"),
    (load_prompts, {"messages": [U("a")]}, {"messages": [A("b")]}, "no user message"),
])
def test_bad_records_name_file_and_line(tmp_path, loader, good, bad, match):
    path = _write(tmp_path / "d.jsonl", [good, good, "", bad, good, good])
    with pytest.raises(BadExampleError, match=match) as info:
        loader(path, eval_size=1)
    assert info.value.where == f"{path}:4" and "--skip-bad-examples" in info.value.what
    train, held_out, *_ = loader(path, eval_size=1, skip_bad_examples=True)
    assert len(train) + len(held_out) == 4


@pytest.mark.parametrize("loader, takes", [
    (load_sft_splits, '{"prompt", "completion"} (prompt-completion); {"messages"} (conversational); {"text"}'),
    (load_preference_splits, '{"prompt", "chosen", "rejected"} (preference); {"chosen", "rejected"} (implicit-prompt'),
    (load_prompts, '{"prompt"} (prompt-only); {"messages"} (conversational)'),
])
def test_unknown_format_is_one_line_listing_the_formats(tmp_path, loader, takes):
    path = _write(tmp_path / "d.jsonl", ["", {"question": "q", "answer": "a"}] * 3)
    with pytest.raises(DataError, match="^no known dataset format") as info:
        loader(path, eval_size=1)
    e = info.value
    assert e.where == f"{path}:2" and "keys: answer, question" in e.what and takes in e.what
    assert "\n" not in str(e)


def test_language_modelling_loss_covers_every_text_token():
    tok = ByteTokenizer()
    ds = SFTDataset([SFTExample("", "abc"), SFTExample("q", "abc")], tok, max_prompt_len=4, max_len=16)
    eos = tok.eos_token_id
    assert ds[0] == {"input_ids": [eos, 97, 98, 99, eos], "loss_mask": [0, 1, 1, 1, 1]}
    assert ds[1] == {"input_ids": [113, 97, 98, 99, eos], "loss_mask": [0, 1, 1, 1, 1]}
    batch = SFTCollator(tok)([ds[0]])
    # the SFT loss weighs targets input_ids[:, 1:] by loss_mask[:, 1:]: every text token and the EOS
    assert batch["input_ids"][0, 1:][batch["loss_mask"][0, 1:].bool()].tolist() == [97, 98, 99, eos]


def test_half_a_pair_is_a_preference_record_missing_its_other_side(tmp_path):
    assert detect_format({"chosen": "x"}) == "implicit-prompt preference"
    assert detect_format({"prompt": "p", "rejected": "x"}) == "preference"
    path = _write(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "x"}] * 3)
    with pytest.raises(BadExampleError, match=r"missing field\(s\) \['rejected'\]") as info:
        load_sft_splits(path, eval_size=1)
    assert info.value.where == f"{path}:1"
