"""`rlhf-fast grpo` end to end on tiny runs; the reward-model path; missing/mismatched checkpoints."""

import json

import pytest
import torch

from rlhf_fast.cli import build_parser, main
from rlhf_fast.data import ByteTokenizer
from rlhf_fast.model import GPT, RewardHead, reward_scores
from rlhf_fast.trainers.experience import Rollout
from rlhf_fast.trainers.reward import REWARD_HEAD_FILE
from rlhf_fast.trainers.reward_functions import load_reward_model_scorer

COMMON = [
    "--preset",
    "tiny",
    "--attn-backend",
    "sdpa",
    "--device",
    "cpu",
    "--group-size",
    "4",
    "--rollout-batch-size",
    "4",
    "--mini-batch-size",
    "8",
    "--eval-prompts",
    "8",
    "--max-new-tokens",
    "10",
    "--no-progress",
]


def fake_rm_export(directory, vocab_size=320, seed=0):
    """What `rlhf-fast rm` exports (merged GPT-2 dir + reward head + tokenizer marker), random weights."""
    torch.manual_seed(seed)
    model = GPT.from_preset("tiny", vocab_size=vocab_size, attn_backend="sdpa")
    model.save_pretrained(directory)
    head = RewardHead(model.config.n_embd)
    torch.nn.init.normal_(head.proj.weight, std=1.0)  # scores that differ between completions
    torch.save(head.state_dict(), directory / REWARD_HEAD_FILE)
    (directory / "rlhf_fast_tokenizer.json").write_text(json.dumps({"tokenizer": "byte"}))
    return directory


def test_every_grpo_flag_has_help():
    parser, flags = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    actions = [a for a in sub.choices["grpo"]._actions if a.dest != "help"]
    assert len(actions) == len(flags["grpo"]) + 1  # + --config
    for a in actions:
        assert a.help and len(a.help) > 10, a.option_strings


def test_grpo_cli_cold_start_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["grpo", *COMMON, "--cold-start-steps", "30", "--output-dir", str(out), "--save-every", "2"]
    assert main([*args, "--iterations", "3"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["task"]["task"] == "arithmetic" and saved["rl"]["group_size"] == 4
    assert saved["lora"]["enabled"] is False and saved["optim"]["max_steps"] == 3 * 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert (out / "cold_start.pt").is_file() and (out / "export" / "config.json").is_file()
    assert "held-out reward:" in capsys.readouterr().out
    cold = torch.load(out / "cold_start.pt", weights_only=True)

    assert main([*args, "--iterations", "5", "--resume", "--no-export"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "score" in r]
    assert train_steps == [1, 2, 3, 4, 5]  # continued at 4, nothing repeated
    assert all(
        "gen_logprob_gap_max" in r and "time/generate" in r for r in records if "score" in r
    )
    for k, v in torch.load(out / "cold_start.pt", weights_only=True).items():  # reloaded, not re-trained
        assert torch.equal(v, cold[k])


def test_reward_model_scorer_scores_prompt_completion_eos(tmp_path):
    """Token ids in (no decode/re-encode); a response that ended with EOS and one cut at the length limit
    are both scored as prompt + completion + EOS (the length/EOS rule)."""
    rm_dir = fake_rm_export(tmp_path / "rm")
    tok = ByteTokenizer()
    scorer = load_reward_model_scorer(rm_dir, tok, 320, attn_backend="sdpa")
    prompts, completions = ["\n\nHuman: Hi\n\nAssistant:", "ab"], [" Dogs wag their tails.", "c"]
    prompt_ids, prompt_mask = tok.pad([tok.encode(p) for p in prompts], side="left")
    N = max(len(c) for c in completions) + 1
    response = torch.full((2, N), tok.pad_token_id)
    response_mask = torch.zeros(2, N, dtype=torch.bool)
    ended = tok.encode(completions[0]) + [tok.eos_token_id]  # ended with EOS within N tokens
    response[0, : len(ended)], response_mask[0, : len(ended)] = torch.tensor(ended), True
    response[1, :1], response_mask[1, :1] = torch.tensor(tok.encode(completions[1])), True
    rollout = Rollout(prompt_ids, prompt_mask.bool(), response, response_mask, torch.zeros(2, N),
                      truncated=torch.tensor([False, True]), prompts=prompts)
    got = scorer(rollout)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids = torch.tensor([tok.encode(p) + tok.encode(c) + [tok.eos_token_id]])
        want = reward_scores(scorer.model, scorer.head, ids, torch.ones_like(ids))
        torch.testing.assert_close(got[i], want[0], atol=1e-5, rtol=1e-5)
    assert got[0] != got[1]


def test_grpo_cli_with_a_reward_model(tmp_path):
    rm_dir = fake_rm_export(tmp_path / "rm")
    out = tmp_path / "run"
    assert (
        main(
            [
                "grpo",
                *COMMON,
                "--reward-model",
                str(rm_dir),
                "--data",
                "synthetic",
                "--iterations",
                "2",
                "--kl-loss-coef",
                "0.05",
                "--output-dir",
                str(out),
                "--no-export",
            ]
        )
        == 0
    )
    saved = json.loads((out / "config.json").read_text())
    assert saved["task"]["task"] is None and saved["model"]["reward_model"] == str(rm_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["score"] for r in records if "score" in r]
    assert len(rewards) == 2 and all(r not in (0.0, 0.5, 1.5) for r in rewards)  # RM scores, not the task's


def test_missing_and_mismatched_checkpoints_are_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        main(["--debug", "grpo", *COMMON, "--model", str(missing), "--output-dir", str(tmp_path / "a")])
    with pytest.raises(FileNotFoundError, match="reward model directory not found"):
        main(["--debug", "grpo", *COMMON, "--reward-model", str(missing), "--output-dir", str(tmp_path / "b")])
    not_rm = tmp_path / "sft_export"
    GPT.from_preset("tiny").save_pretrained(not_rm)
    with pytest.raises(FileNotFoundError, match="no reward_head.pt: not an exported reward model"):
        main(["--debug", "grpo", *COMMON, "--reward-model", str(not_rm), "--output-dir", str(tmp_path / "c")])
    other_vocab = fake_rm_export(tmp_path / "rm_400", vocab_size=400)
    with pytest.raises(ValueError, match="vocab_size 400, the policy 320: it was trained with a different"):
        main(["--debug", "grpo", *COMMON, "--reward-model", str(other_vocab), "--output-dir", str(tmp_path / "d")])


def test_reward_model_with_another_tokenizer_is_rejected(tmp_path, monkeypatch):
    rm_dir = fake_rm_export(tmp_path / "rm")

    class OtherTokenizer(ByteTokenizer):
        vocab_size = 300

    (rm_dir / "rlhf_fast_tokenizer.json").write_text(json.dumps({"tokenizer": "other"}))
    import rlhf_fast.trainers.reward_functions as rf

    monkeypatch.setattr(rf, "load_tokenizer", lambda path: OtherTokenizer())
    with pytest.raises(
        ValueError, match="OtherTokenizer with 300 tokens, the policy a ByteTokenizer with 258"
    ):
        load_reward_model_scorer(rm_dir, ByteTokenizer(), 320, attn_backend="sdpa")
