"""DPO and its family on a `tiny` SFT export: learning, every loss, micro-batch invariance, exact resume, the
full-parameter reference, precision, and bad input (one-line errors from the CLI)."""

import dataclasses
import json

import pytest
import torch
from ppo_testing import stage_config

from rlhf_fast.cli import main
from rlhf_fast.data import PreferenceCollator
from rlhf_fast.model import GPT
from rlhf_fast.trainers import DPOSettings, build_dpo_trainer, build_sft_trainer
from rlhf_fast.trainers.config import LoRASettings, OptimSettings


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dpo_sft")
    sft = build_sft_trainer(stage_config(root / "sft", "sft", steps=100))
    sft.train()
    torch.set_num_threads(threads)
    return sft.export(root / "sft" / "export")


def dpo_config(out, sft_dir, *, steps=40, micro=16, accum=1, lr=3e-3, lora=True, **dpo):
    config = stage_config(out, "dpo", steps=steps, model=str(sft_dir))
    return dataclasses.replace(
        config, lora=LoRASettings(enabled=lora, rank=4), dpo=DPOSettings(**dpo),
        optim=OptimSettings(lr=lr, max_steps=steps, warmup_steps=1, micro_batch_size=micro, grad_accum_steps=accum),
        run=dataclasses.replace(config.run, log_every=1))


@torch.no_grad()
def prefers_chosen(trainer) -> float:
    """Held-out rate at which the policy gives the chosen response the higher per-token log-prob."""
    from rlhf_fast.trainers.dpo import sequence_logprobs

    collate, ds, wins = PreferenceCollator(trainer.tokenizer), trainer.eval_dataset, 0
    for i in range(0, len(ds), 32):
        b = collate([ds[j] for j in range(i, min(i + 32, len(ds)))])
        logps, lengths = sequence_logprobs(trainer.model, b["input_ids"], b["attention_mask"], b["loss_mask"])
        per_token = (logps / lengths).view(2, -1)
        wins += int((per_token[0] > per_token[1]).sum())
    return wins / len(ds)


def test_dpo_learns_the_synthetic_preferences_with_bounded_drift(tmp_path, sft_dir):
    trainer = build_dpo_trainer(dpo_config(tmp_path, sft_dir))
    before, rate_before = trainer.evaluate(), prefers_chosen(trainer)
    assert before["ties"] == 1.0 and before["accuracy"] == 0.0  # policy == reference: every reward is 0
    history = trainer.train()
    after, rate_after = trainer.evaluate(), prefers_chosen(trainer)
    assert after["accuracy"] > 0.75 and after["rewards/margins"] > 0.5, after  # 40 steps: 0.81, 0.86
    assert rate_after >= rate_before, (rate_before, rate_after)  # the SFT policy already prefers chosen (0.86)
    assert history[-1]["loss"] < history[0]["loss"] - 0.15
    assert after["logps/chosen_drift"] > -1.0, after  # per token: the chosen side is not pushed far down
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in records if "train/loss" in r)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "accuracy", "ties", "logps/chosen",
                "logps/rejected", "logps/chosen_drift"):
        assert f"train/{key}" in logged, key


@pytest.mark.parametrize("loss, knobs", [("ipo", dict(beta=0.5)), ("robust", dict(label_smoothing=0.1)),
                                         ("dpo", dict(label_smoothing=0.1)), ("simpo", dict(beta=2.0, gamma=0.5)),
                                         ("orpo", dict(beta=0.5))])
def test_every_loss_trains(tmp_path, sft_dir, loss, knobs):
    trainer = build_dpo_trainer(dpo_config(tmp_path, sft_dir, steps=20, loss=loss, **knobs))
    assert trainer.needs_reference == (loss not in ("simpo", "orpo"))
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert history[-1]["loss"] < history[0]["loss"], (history[0], history[-1])
    assert trainer.evaluate()["accuracy"] > 0.6


def test_micro_batches_give_the_same_update(tmp_path, sft_dir):
    runs = {}
    for micro, accum in ((4, 4), (16, 1)):
        trainer = build_dpo_trainer(dpo_config(tmp_path / f"{micro}", sft_dir, steps=3, micro=micro, accum=accum))
        history = trainer.train()
        runs[micro] = (history, {n: p.detach().clone() for n, p in trainer.trainable.items()})
    (h_small, p_small), (h_big, p_big) = runs[4], runs[16]
    for a, b in zip(h_small, h_big):
        for k in ("loss", "accuracy", "rewards/margins", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    for n in p_big:
        torch.testing.assert_close(p_small[n], p_big[n], atol=2e-5, rtol=1e-4, msg=n)
    assert any(p.abs().max() > 0 for n, p in p_big.items() if "lora_B" in n)


def test_resume_continues_exactly(tmp_path, sft_dir):
    def run(out, until=None, resume=False):
        config = dpo_config(out, sft_dir, steps=4, micro=8)
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, save_every=2, resume=resume))
        trainer = build_dpo_trainer(config)
        trainer.train(until_step=until)
        return trainer

    straight = run(tmp_path / "a")
    run(tmp_path / "b", until=2)
    resumed = run(tmp_path / "b", resume=True)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[2:]]
    for n, p in straight.trainable.items():
        assert torch.equal(p, resumed.trainable[n]), n


def test_full_parameter_dpo_keeps_a_frozen_offloadable_reference(tmp_path, sft_dir):
    trainer = build_dpo_trainer(dpo_config(tmp_path, sft_dir, steps=3, lr=1e-4, lora=False, offload_reference=True))
    ref = trainer.reference
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    before = {n: p.clone() for n, p in ref.named_parameters()}
    trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in ref.named_parameters())
    assert any(not torch.equal(p, ref.get_parameter(n)) for n, p in trainer.model.named_parameters())
    assert trainer.history[0]["rewards/margins"] == pytest.approx(0.0)  # the copy starts as the policy
    assert trainer.history[-1]["rewards/margins"] != 0.0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_runs_with_fp32_losses(tmp_path, sft_dir, precision):
    config = dpo_config(tmp_path, sft_dir, steps=2, micro=8)
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, precision=precision))
    history = build_dpo_trainer(config).train()
    assert all(torch.isfinite(torch.tensor([h["loss"], h["rewards/margins"]])).all() for h in history)


def test_bad_input_is_named(tmp_path, sft_dir, user_error):
    with pytest.raises(ValueError, match=r"must be > 0, got 0.0 \(beta\)"):
        DPOSettings(beta=0.0)
    with pytest.raises(ValueError, match=r"must be one of .* \(loss\)"):
        DPOSettings(loss="kto")
    config = dpo_config(tmp_path, sft_dir)
    with pytest.raises(ValueError, match="dpo starts from an SFT export: give --model"):
        no_model = dataclasses.replace(config.model, model=None, preset="tiny")
        build_dpo_trainer(dataclasses.replace(config, model=no_model))
    other = tmp_path / "other_vocab"
    GPT.from_preset("tiny", vocab_size=384).save_pretrained(other)
    with pytest.raises(ValueError, match="--reference-model .* vocab_size 384, the policy .* 320"):
        build_dpo_trainer(dpo_config(tmp_path, sft_dir, reference_model=str(other)))
    common = ["dpo", "--model", str(sft_dir), "--max-steps", "1", "--micro-batch-size", "2", "--device", "cpu",
              "--no-progress", "--attn-backend", "sdpa", "--lora-rank", "2"]
    line = user_error([*common, "--beta", "-1", "--output-dir", str(tmp_path / "c")])
    assert line == "rlhf-fast: error: must be > 0, got -1.0 (--beta)"
    assert "not found" in user_error(["dpo", "--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "d")])


def test_identical_pairs_are_counted_and_skipped_and_the_cli_runs(tmp_path, sft_dir, capsys):
    data = tmp_path / "pairs.jsonl"
    lines = []
    for i in range(12):
        prompt = f"\n\nHuman: Tell me about dogs {i}.\n\nAssistant:"
        same = i % 3 == 0  # 4 pairs whose two sides are the very same response
        lines.append({"chosen": prompt + " Dogs wag their tails. Thank you!",
                      "rejected": prompt + (" Dogs wag their tails. Thank you!" if same else " Go away.")})
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "run"
    assert main(["dpo", "--model", str(sft_dir), "--data", str(data), "--eval-size", "3", "--max-steps", "2",
                 "--micro-batch-size", "2", "--device", "cpu", "--no-progress", "--attn-backend", "sdpa",
                 "--lora-rank", "2", "--output-dir", str(out)]) == 0
    assert "exported merged model" in capsys.readouterr().out
    event = next(json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()
                 if "event" in json.loads(line) and "train_pairs" in json.loads(line)["event"])
    assert event["identical_pairs_dropped"] == 4 and event["train_pairs"] + event["eval_pairs"] == 8
    assert json.loads((out / "config.json").read_text())["dpo"]["loss"] == "dpo"
    assert GPT.from_pretrained(str(out / "export")).config.vocab_size == 320
