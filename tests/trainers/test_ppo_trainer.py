import json
import shutil

import pytest
import torch
from ppo_testing import stage_config, tiny_models, tiny_trainer

from rlhf_fast.cli import main
from rlhf_fast.config import from_flat
from rlhf_fast.data import load_prompts, synthetic_prompts
from rlhf_fast.data.tokenizer import TOKENIZER_MARKER
from rlhf_fast.model import GPT, ScalarHead
from rlhf_fast.model.lora import adapter_names
from rlhf_fast.trainers import build_reward_trainer, build_sft_trainer, load_reward_model
from rlhf_fast.trainers.models import use_adapter
from rlhf_fast.trainers.ppo import PPOConfig, PPOTrainer, load_ppo_models, prompt_batches
from rlhf_fast.trainers.reward import REWARD_HEAD_FILE


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny SFT export and a LoRA reward model trained on it (the demo pipeline, scaled down)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ppo_exports")
    sft = build_sft_trainer(stage_config(root / "sft", "sft", steps=100))
    sft.train()
    sft_dir = sft.export(root / "sft" / "export")
    rm = build_reward_trainer(stage_config(root / "rm", "rm", steps=60, model=str(sft_dir)))
    rm.train()
    accuracy = rm.evaluate()["accuracy"]
    rm_dir = rm.export(root / "rm" / "export")
    torch.set_num_threads(threads)
    return sft_dir, rm_dir, accuracy


def _ppo_on_exports(tmp_path, exports, **overrides):
    sft_dir, rm_dir, _ = exports
    models, tok = load_ppo_models(sft_dir, rm_dir, lora_rank=4, attn_backend="sdpa",
                                  lora=overrides.pop("lora", True),
                                  critic=overrides.get("estimator", "gae") == "gae")
    config = dict(iterations=16, rollout_batch_size=32, mini_batch_size=16, max_new_tokens=40, lr=3e-3,
                  init_kl_coef=0.02, device="cpu", output_dir=str(tmp_path), progress=False)
    config = from_flat(PPOConfig, **{**config, **overrides})
    prompts = prompt_batches(synthetic_prompts(256, 0), tok, config.rl.rollout_batch_size, 48, 0)
    held_out = [tok.encode(p) for p in synthetic_prompts(64, 99)]
    return PPOTrainer(config, models, tok, prompts, held_out)


def test_ppo_raises_the_heldout_reward_above_the_sft_policy(tmp_path, exports):
    assert exports[2] > 0.7  # the reward model learned the task (so the reward means something)
    trainer = _ppo_on_exports(tmp_path, exports)
    assert trainer.models.reward_model is None  # RM adapter on the SFT base: one frozen base
    before = trainer.evaluate()
    trainer.train()
    after = trainer.eval_history[-1]
    assert after["reward"] > before["reward"] + 1.0, (before, after)  # score std of the SFT policy is ~3
    assert max(h["gen_logprob_gap_max"] for h in trainer.history) < 1e-4
    assert before["kl"] == pytest.approx(0.0, abs=1e-4) and after["kl"] > 0
    assert (tmp_path / "checkpoints").is_dir() and (tmp_path / "metrics.jsonl").is_file()


@pytest.mark.parametrize("options", [dict(estimator="rloo", group_size=4, rollout_batch_size=8),
                                     dict(estimator="reinforce_pp")], ids=["rloo", "reinforce_pp"])
def test_critic_free_estimators_raise_the_heldout_reward(tmp_path, exports, options):
    """RLOO and REINFORCE++ on PPO's models without the critic (no value adapter or head): same task,
    same budget of 32 rows per rollout (benchmarks/rl_algorithms.py has the numbers)."""
    trainer = _ppo_on_exports(tmp_path, exports, **options)
    assert not trainer.models.has_critic and "value" not in adapter_names(trainer.models.policy)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.eval_history[-1]
    assert after["reward"] > before["reward"] + 1.0, (before, after)
    assert max(h["gen_logprob_gap_max"] for h in trainer.history) < 1e-4


@torch.no_grad()
def test_shared_reward_adapter_scores_like_the_merged_reward_model(exports):
    sft_dir, rm_dir, _ = exports
    models, tok = load_ppo_models(sft_dir, rm_dir, lora_rank=4, attn_backend="sdpa")
    merged, head = load_reward_model(rm_dir, attn_backend="sdpa")
    ids, mask = tok.pad([tok.encode(p + " Dogs wag their tails. Go away.") for p in synthetic_prompts(5, 3)])
    with use_adapter(models.policy, "reward"):
        shared = models.scores(ids, mask.bool())
    from rlhf_fast.model import reward_scores

    torch.testing.assert_close(shared, reward_scores(merged, head, ids, mask), atol=1e-4, rtol=1e-4)


def test_full_parameter_mode_trains_the_policy_and_a_separate_critic(tmp_path, exports):
    trainer = _ppo_on_exports(tmp_path, exports, lora=False, iterations=1, rollout_batch_size=8,
                              mini_batch_size=8, max_new_tokens=6, lr=1e-4)
    m = trainer.models
    assert not m.lora and m.critic is not None and m.reward_model is not None
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainer.train()
    changed = {n.split(".")[0] for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"policy", "critic", "value_head"}


def _run(tmp_path, until=None, resume=False):
    trainer = tiny_trainer(tmp_path, models=tiny_models(), iterations=4, save_every=2, kl_target=0.05,
                           kl_horizon=20, resume=resume)
    trainer.train(until_iteration=until)
    return trainer


def test_resume_in_the_middle_of_ppo_continues_exactly(tmp_path):
    straight = _run(tmp_path / "a")
    first_half = _run(tmp_path / "b", until=2)
    assert first_half.iteration == 2
    resumed = _run(tmp_path / "b", resume=True)
    assert resumed.iteration == 4 and len(resumed.history) == 2
    for key in ("score", "kl", "kl_coef", "train/loss", "train/value_loss", "gen_logprob_gap_max"):
        assert [h[key] for h in resumed.history] == [h[key] for h in straight.history[2:]], key
    assert straight.history[2]["kl_coef"] != straight.history[0]["kl_coef"]  # the adaptive controller moved
    for n, p in straight.trainable.items():
        assert torch.equal(p, resumed.trainable[n]), n
    assert resumed.eval_history == straight.eval_history


def test_bad_paths_and_mismatched_reward_models_give_clear_errors(tmp_path, exports, user_error):
    sft_dir, rm_dir, _ = exports
    with pytest.raises(FileNotFoundError, match="SFT model directory not found.*--sft-model"):
        load_ppo_models(tmp_path / "nope", rm_dir)
    with pytest.raises(FileNotFoundError, match="reward model directory not found.*--reward-model"):
        load_ppo_models(sft_dir, tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=REWARD_HEAD_FILE):
        load_ppo_models(sft_dir, sft_dir)  # an SFT export is not a reward model
    # a reward model over another vocabulary (same byte tokenizer marker, different embedding table)
    other = tmp_path / "rm_other_vocab"
    GPT.from_preset("tiny", vocab_size=384).save_pretrained(other)
    shutil.copy(rm_dir / TOKENIZER_MARKER, other / TOKENIZER_MARKER)
    torch.save(ScalarHead(32).state_dict(), other / REWARD_HEAD_FILE)
    with pytest.raises(ValueError, match="vocab_size 384.*same tokenizer"):
        load_ppo_models(sft_dir, other)
    # a reward model trained with another tokenizer (a minimal local GPT-2 BPE tokenizer)
    bpe = tmp_path / "bpe"
    bpe.mkdir()
    vocab = {chr(c): i for i, c in enumerate(range(ord("a"), ord("z") + 1))} | {"<|endoftext|>": 26}
    (bpe / "vocab.json").write_text(json.dumps(vocab))
    (bpe / "merges.txt").write_text("#version: 0.2\n")
    from transformers import GPT2TokenizerFast

    GPT2TokenizerFast(vocab_file=str(bpe / "vocab.json"), merges_file=str(bpe / "merges.txt")).save_pretrained(bpe)
    (other / TOKENIZER_MARKER).write_text(json.dumps({"tokenizer": str(bpe)}))
    mismatch = r"different tokenizer \(.*bpe, \d+ tokens\) than the SFT policy .* \(byte, 258 tokens\)"
    with pytest.raises(ValueError, match=mismatch):
        load_ppo_models(sft_dir, other)
    assert "SFT model directory not found" in user_error(["ppo", "--sft-model", str(tmp_path / "nope"),
                                                          "--reward-model", str(rm_dir)])


def test_ppo_config_rejects_impossible_settings():
    with pytest.raises(ValueError, match="mini_batch_size"):
        from_flat(PPOConfig, rollout_batch_size=4, mini_batch_size=8)
    with pytest.raises(ValueError, match="iterations"):
        from_flat(PPOConfig, iterations=0)
    with pytest.raises(ValueError, match="kl_estimator"):
        from_flat(PPOConfig, kl_estimator="k9")
    with pytest.raises(ValueError, match="gamma and lam"):
        from_flat(PPOConfig, lam=1.5)
    with pytest.raises(ValueError, match="kl_target"):
        from_flat(PPOConfig, kl_target=0.0)


def test_cli_ppo_runs_on_exports(tmp_path, exports, capsys):
    sft_dir, rm_dir, _ = exports
    out = tmp_path / "run"
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n\n" for p in synthetic_prompts(12, 5)))
    assert main(["ppo", "--sft-model", str(sft_dir), "--reward-model", str(rm_dir), "--iterations", "1",
                 "--rollout-batch-size", "4", "--mini-batch-size", "4", "--max-new-tokens", "5", "--data",
                 str(data), "--eval-size", "4", "--lora-rank", "2", "--device", "cpu",
                 "--output-dir", str(out), "--no-progress", "--attn-backend", "sdpa"]) == 0
    assert "exported PPO policy" in capsys.readouterr().out
    assert GPT.from_pretrained(str(out / "export")).config.vocab_size == 320
    assert json.loads((out / "config.json").read_text())["rl"]["iterations"] == 1


def test_prompt_files_split_and_reject_bad_lines(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(7)))
    assert load_prompts(str(good), eval_size=2) == (["q0", "q1", "q2", "q3", "q4"], ["q5", "q6"])
    with pytest.raises(ValueError, match="need more than eval_size=7"):
        load_prompts(str(good), eval_size=7)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(ValueError, match=r"expected a string 'prompt', got int; .*\(.*bad.jsonl:2\)$"):
        load_prompts(str(bad), eval_size=1)
    train, held_out = load_prompts("synthetic", eval_size=3, synthetic_size=10)
    assert len(train) == 10 and len(held_out) == 3 and all("Human:" in p for p in train)


def test_cli_ppo_with_a_critic_free_estimator(tmp_path, exports, user_error):
    sft_dir, rm_dir, _ = exports
    out = tmp_path / "run"
    assert main(["ppo", "--sft-model", str(sft_dir), "--reward-model", str(rm_dir), "--estimator", "rloo",
                 "--group-size", "2", "--rollout-batch-size", "2", "--mini-batch-size", "4", "--micro-batch-size",
                 "2", "--clip-eps-high", "0.28", "--iterations", "1", "--max-new-tokens", "5", "--eval-size", "4",
                 "--lora-rank", "2", "--device", "cpu", "--output-dir", str(out), "--no-progress",
                 "--attn-backend", "sdpa"]) == 0
    saved = json.loads((out / "config.json").read_text())
    rl = saved["rl"]
    assert (rl["estimator"], rl["micro_batch_size"], rl["clip_eps_high"]) == ("rloo", 2, 0.28)
    assert not (out / "export" / "value_head.pt").exists()
    assert "top_k / top_p are not allowed" in user_error(["ppo", "--sft-model", str(sft_dir), "--reward-model",
                                                          str(rm_dir), "--top-k", "5"])
