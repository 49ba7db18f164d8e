import json
import random

import pytest
import torch

from rlhf_fast.data import (
    ByteTokenizer,
    PreferenceCollator,
    PreferenceDataset,
    PreferenceExample,
    ResumableBatches,
    synthetic_split,
)
from rlhf_fast.model import RewardHead
from rlhf_fast.trainers import build_reward_trainer, load_reward_model
from rlhf_fast.trainers.builders import build_model, train_strategy
from rlhf_fast.trainers.loop import TrainModule
from rlhf_fast.trainers.reward import RewardTrainer, pairwise_loss_terms


def test_pairwise_loss_terms():
    chosen, rejected = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    loss, correct, margin = pairwise_loss_terms(chosen, rejected)
    torch.testing.assert_close(loss, torch.log1p(torch.exp(-(chosen - rejected))))
    assert correct.tolist() == [1.0, 0.0, 0.0] and margin.tolist() == [2.0, -2.0, 0.0]


def test_reward_model_learns_synthetic_preferences(tmp_path, make_config):
    cfg = make_config(tmp_path, "rm", steps=500, micro=8, lr=3e-3, synthetic_size=2000, eval_size=200)
    trainer = build_reward_trainer(cfg)
    assert not trainer.config.lora.enabled  # random-init preset: full fine-tuning + head
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    # chance is 0.5; this CPU build reaches 0.895 (0.90+ on others: float summation order moves it)
    assert after["accuracy"] >= 0.85, (before, after)
    assert after["margin"] > before["margin"] + 1.0
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # the final eval is logged just before the final checkpoint event
    assert evals[-2]["eval/accuracy"] == pytest.approx(after["accuracy"])


def test_lora_reward_model_export_round_trip(tmp_path, make_config):
    trainer = build_reward_trainer(make_config(tmp_path, "rm", steps=3, lr=1e-2, lora=True))
    trainer.train()
    assert set(trainer.trainable) == {n for n in trainer.trainable if "lora_" in n or n.startswith("head.")}
    assert any(n.startswith("head.") for n in trainer.trainable)
    out = trainer.export(tmp_path / "export")
    model, head = load_reward_model(out, attn_backend="sdpa")
    tok = ByteTokenizer()
    _, held_out = synthetic_split(8, 6, seed=2)
    # right padding here, left padding in training: the score is read at the last real token either way
    batch = PreferenceCollator(tok, side="right")([PreferenceDataset(held_out, tok)[i] for i in range(6)])
    with torch.no_grad():
        exported = torch.cat([s for s in trainer.scores(batch)])
        from rlhf_fast.model import reward_scores

        reloaded = reward_scores(model, head, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(reloaded, exported, atol=1e-4, rtol=1e-4)
    with pytest.raises(FileNotFoundError, match="reward_head.pt"):
        load_reward_model(tmp_path)


def test_max_len_beyond_the_context_fails_before_step_1(tmp_path, make_config, user_error):
    with pytest.raises(ValueError, match=r"^--max-len 200 exceeds the model's n_positions=128 \(tiny\)"):
        build_reward_trainer(make_config(tmp_path, "rm", max_len=200))
    line = user_error(["rm", "--preset", "tiny", "--device", "cpu", "--max-len", "2048", "--no-progress",
                       "--output-dir", str(tmp_path)])
    assert line == "rlhf-fast: error: --max-len 2048 exceeds the model's n_positions=128 (tiny): lower --max-len"


# --- a reward model must not learn "kept its EOS => chosen" from truncation alone ----------------------

PROMPT_LEN, MAX_LEN = 6, 38  # response budget 32: 31 text tokens + EOS


def truncation_only_pairs(n: int, seed: int) -> list[PreferenceExample]:
    """Pairs that differ only in truncation: the chosen response fits exactly (31 random characters, then its
    EOS at the limit), the rejected one is the same kind of random text, longer than the budget."""
    rng = random.Random(seed)
    text = lambda k: "".join(rng.choice("abcdefgh ") for _ in range(k))  # noqa: E731
    budget = MAX_LEN - PROMPT_LEN
    return [PreferenceExample(text(PROMPT_LEN), text(budget - 1), text(budget + rng.randint(1, 24)))
            for _ in range(n)]


def old_rule_items(pairs, tok) -> list[dict]:
    """The rule this replaced: response + EOS cut to the budget, so a cut response lost its EOS."""
    def encode(prompt, response):
        p = tok.encode(prompt)[-PROMPT_LEN:]
        return p + (tok.encode(response) + [tok.eos_token_id])[: MAX_LEN - len(p)]

    return [{"chosen_ids": encode(ex.prompt, ex.chosen), "rejected_ids": encode(ex.prompt, ex.rejected),
             "chosen_prompt_len": len(tok.encode(ex.prompt)[-PROMPT_LEN:]),
             "rejected_prompt_len": len(tok.encode(ex.prompt)[-PROMPT_LEN:])}
            for ex in pairs]


def held_out_accuracy(tmp_path, make_config, train_items, eval_items) -> float:
    cfg = make_config(tmp_path, "rm", steps=120, micro=16, lr=3e-3, max_prompt_len=PROMPT_LEN, max_len=MAX_LEN)
    model, tok = build_model(cfg, adapter="reward")
    batches = ResumableBatches(train_items, 16, PreferenceCollator(tok), seed=0)
    trainer = RewardTrainer(cfg, TrainModule(model, RewardHead(model.config.n_embd)), tok, batches, eval_items,
                            train_strategy(cfg))
    trainer.train()
    return trainer.evaluate()["accuracy"]


def test_truncation_alone_does_not_separate_pairs(tmp_path, make_config):
    tok = ByteTokenizer()
    train, held_out = truncation_only_pairs(640, seed=0), truncation_only_pairs(200, seed=1)
    train_ds, eval_ds = (PreferenceDataset(x, tok, PROMPT_LEN, MAX_LEN) for x in (train, held_out))
    assert train_ds.n_one_side_truncated == len(train) and eval_ds.truncated[0] == (False, True)
    for it in eval_ds.items:  # same length, both ending in EOS: only the text differs
        assert len(it["chosen_ids"]) == len(it["rejected_ids"]) == MAX_LEN
        assert it["chosen_ids"][-1] == it["rejected_ids"][-1] == tok.eos_token_id
    forced_eos = held_out_accuracy(tmp_path / "forced", make_config, train_ds, eval_ds)
    # the check can fail: under the old rule (EOS dropped from the cut side) the same RM separates the pairs
    old = held_out_accuracy(tmp_path / "old", make_config, old_rule_items(train, tok), old_rule_items(held_out, tok))
    assert abs(forced_eos - 0.5) <= 0.15 and old > 0.9, (forced_eos, old)
