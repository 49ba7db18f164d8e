import json

import pytest
import torch

from rlhf_fast.data import ByteTokenizer, PreferenceCollator, PreferenceDataset, synthetic_split
from rlhf_fast.trainers import build_reward_trainer, load_reward_model
from rlhf_fast.trainers.reward import pairwise_loss_terms


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
