"""TRL-format data through the CLI: sft → dpo on prompt/completion and preference files, sft/rm on the offline
HH directory layout, conversational SFT with --chat-template and its one-line errors (a record in no known
format: tests/test_cli_errors.py)."""

import gzip
import json

import pytest

from rlhf_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--attn-backend", "sdpa", "--device", "cpu", "--max-steps", "2", "--micro-batch-size", "2",
        "--eval-size", "2", "--max-prompt-len", "16", "--max-len", "40", "--no-progress"]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _event(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["event"]


def test_sft_on_prompt_completion_then_dpo_on_explicit_preferences(tmp_path, capsys):
    sft_data = _jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Q{i}:", "completion": f" answer {i}."} for i in range(8)])
    assert main(["sft", "--preset", "tiny", *FAST, "--data", sft_data, "--output-dir", str(tmp_path / "sft")]) == 0
    assert _event(tmp_path / "sft")["train_examples"] == 6
    pairs = _jsonl(tmp_path / "pref.jsonl", [{"prompt": f"Q{i}:", "chosen": " yes, please.", "rejected": " no."}
                                             for i in range(8)])
    out = tmp_path / "dpo"
    assert main(["dpo", "--model", str(tmp_path / "sft" / "export"), *FAST, "--lora-rank", "2", "--data", pairs,
                 "--output-dir", str(out)]) == 0
    assert (_event(out)["train_pairs"], _event(out)["eval_pairs"]) == (6, 2)
    assert (out / "export" / "config.json").is_file()


def test_sft_and_rm_on_the_offline_hh_directory_layout(tmp_path):
    hh = tmp_path / "hh-rlhf"
    hh.mkdir()
    pairs = [{"chosen": f"\n\nHuman: q{i}?\n\nAssistant: Sure, {i}.", "rejected": f"\n\nHuman: q{i}?\n\nAssistant: No."}
             for i in range(8)]
    with gzip.open(hh / "harmless-base-test.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(p) + "\n" for p in pairs))
    (hh / "README.md").write_text("not data")
    sft = tmp_path / "sft"
    assert main(["sft", "--preset", "tiny", *FAST, "--data", str(hh), "--data-subset", "harmless-base",
                 "--output-dir", str(sft)]) == 0
    assert (_event(sft)["train_examples"], _event(sft)["eval_examples"]) == (6, 2)
    rm = tmp_path / "rm"
    assert main(["rm", "--model", str(sft / "export"), *FAST, "--lora-rank", "2", "--data", str(hh),
                 "--output-dir", str(rm), "--no-export"]) == 0
    assert (_event(rm)["train_pairs"], _event(rm)["eval_pairs"]) == (6, 2)


def test_conversational_sft_with_a_chat_template_file(tmp_path, user_error):
    msgs = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
            for i in range(6)]
    data = _jsonl(tmp_path / "chat.jsonl", msgs)
    tmpl = tmp_path / "chat.jinja"
    tmpl.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                    "{% if add_generation_prompt %}<assistant>{% endif %}")
    args = ["sft", "--preset", "tiny", *FAST, "--data", data, "--no-export"]
    assert main([*args, "--output-dir", str(tmp_path / "run"), "--chat-template", str(tmpl)]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["chat_template"] == str(tmpl)
    line = user_error([*args, "--output-dir", str(tmp_path / "bad"), "--chat-template", str(tmp_path / "nope.jinja")])
    assert "chat template file not found" in line and line.endswith("(--chat-template)")
    line = user_error([*args, "--output-dir", str(tmp_path / "bad2"), "--chat-template",
                       "{{ raise_exception('mine') }}"])
    assert "chat template: mine" in line and line.endswith(f"({data}:1)")  # the records went through it
