"""The memory plan: hand-computed arithmetic, the fits / proposal / refusal branches, `rlhf-fast plan`, the
generated section of docs/memory.md, and the trainers' start-up check (a no-op on CPU)."""

import json
import logging
import types
from dataclasses import replace

import pytest
import torch
from ppo_testing import tiny_full_models, tiny_trainer

from rlhf_fast.cli import main
from rlhf_fast.trainers import build_reward_trainer, build_sft_trainer
from rlhf_fast.trainers import memory_plan as mp
from rlhf_fast.trainers.memory_plan import GIB, ModelShape, PlanSettings, decide, plan_memory

XL = ModelShape.from_preset("gpt2-xl")
HEADLINE = PlanSettings(algo="ppo", lora=True, precision="bf16", rollout_batch_size=64, prompt_len=256,
                        response_len=128, micro_batch_size=8)


def items(phase) -> dict[str, float]:
    return {i.label: i.nbytes for i in phase.items}


def test_parameter_counts_match_gpt2():
    assert XL.params == 1_557_611_200
    assert ModelShape.from_preset("gpt2-large").params == 774_030_080
    assert ModelShape.from_preset("gpt2").params == 124_439_808
    assert XL.lora_params(8) == 16 * 8 * 1600 * 48 == 9_830_400


def test_headline_arithmetic_by_hand():
    plan = plan_memory(XL, HEADLINE, 16.0)
    resident = items(plan.resident)
    assert resident["frozen base, fp32"] == 1_557_611_200 * 4  # fp32 masters under bf16 autocast
    assert resident["adapters policy + value + reward, fp32"] == 3 * 9_830_400 * 4
    assert resident["Adam m and v of policy + value"] == 2 * 9_830_400 * 8
    kv = resident["KV cache 64 x 384, kept after generation"]
    assert kv == 2 * 48 * 64 * 384 * 1600 * 2 and round(kv / GIB, 2) == 7.03
    update = items(plan.phases[-1])
    tokens = 8 * 384
    assert update["activations kept for backward"] == 2 * tokens * 34 * 1600 * 48  # policy + value forwards
    assert update["bf16 weight copies saved for backward"] == 2 * 12 * 1600**2 * 48 * 2
    assert [p.name for p in plan.phases] == ["generation", "scoring", "update"]
    assert plan.peak_phase.name == "update" and plan.peak_gib == pytest.approx(
        (plan.resident.nbytes + plan.phases[-1].nbytes) / GIB)


def test_checkpointing_keeps_one_block_input_per_layer():
    plan = plan_memory(XL, replace(HEADLINE, grad_checkpoint=True), 16.0)
    update = items(plan.phases[-1])
    tokens = 8 * 384
    assert update["block inputs kept (checkpointing)"] == 2 * tokens * 48 * 1600 * 4  # fp32 residual stream
    assert update["one block recomputed + its gradients"] == 2 * tokens * 34 * 1600
    assert "activations kept for backward" not in update
    assert plan.peak_gib < plan_memory(XL, HEADLINE, 16.0).peak_gib


def test_precision_and_strategy_change_the_bytes():
    ds = replace(HEADLINE, strategy="deepspeed")
    bf16, fp32 = plan_memory(XL, ds, 16.0), plan_memory(XL, replace(ds, precision="fp32"), 16.0)
    act = "activations kept for backward"
    assert items(fp32.phases[-1])[act] == 2 * items(bf16.phases[-1])[act]
    assert items(bf16.resident)["frozen base, bf16"] == XL.params * 2  # DeepSpeed casts the module
    assert "bf16 weight copies saved for backward" not in items(bf16.phases[-1])
    assert fp32.resident.nbytes > bf16.resident.nbytes


def test_a_bf16_base_on_one_device_makes_no_copies():
    plan = plan_memory(XL, replace(HEADLINE, weight_dtype="bf16"), 16.0)
    assert items(plan.resident)["frozen base, bf16"] == XL.params * 2
    assert not any("copies" in i.label or "copy" in i.label for i in plan.phases[-1].items)
    fp32 = plan_memory(XL, replace(HEADLINE, precision="fp32", weight_dtype="bf16"), 16.0)
    assert fp32.settings.activations == "bf16"  # no autocast: activations in the weights' dtype


def test_optimizer_state_and_gradients_follow_the_trained_dtype():
    bf16 = plan_memory(XL, replace(HEADLINE, precision="fp32", weight_dtype="bf16"), 16.0)
    lp = XL.lora_params(8)
    assert items(bf16.resident)["Adam m and v of policy + value"] == 2 * lp * 2 * 2  # torch's Adam: m, v in bf16
    assert items(bf16.phases[-1])["adapter gradients, bf16"] == 2 * lp * 2
    ds = plan_memory(XL, replace(HEADLINE, strategy="deepspeed"), 16.0)  # fp32 masters, m, v and gradients
    assert items(ds.resident)["Adam m and v + fp32 masters of policy + value"] == 2 * lp * 12
    assert items(ds.phases[-1])["adapter gradients, fp32"] == 2 * lp * 4


def test_scoring_in_row_chunks():
    whole = plan_memory(XL, HEADLINE, 16.0)
    chunked = plan_memory(XL, replace(HEADLINE, score_rows=13), 16.0)
    scoring = items(chunked.phases[1])
    assert scoring["log-prob pass: block temporaries"] == 13 * 384 * 10 * 1600 * 2
    assert scoring["fused log-probs: per-token vectors"] == 4 * 13 * 128 * 4
    assert chunked.phases[1].nbytes < whole.phases[1].nbytes
    assert chunked.phases[0].nbytes == whole.phases[0].nbytes and chunked.phases[2].nbytes == whole.phases[2].nbytes
    assert "scoring 13 rows at a time" in chunked.settings.layout()
    assert plan_memory(XL, replace(HEADLINE, score_rows=640), 16.0).phases[1].nbytes == whole.phases[1].nbytes
    with pytest.raises(ValueError, match="score_rows must be None or an int >= 1"):
        PlanSettings(score_rows=0)


def test_separate_updates_keep_one_forward():
    full = replace(HEADLINE, lora=False, strategy="deepspeed", micro_batch_size=4)
    large = ModelShape.from_preset("gpt2-large")
    together, apart = (plan_memory(large, replace(full, separate_updates=s), 16.0) for s in (False, True))
    act = "activations kept for backward"
    assert items(apart.phases[-1])[act] * 2 == items(together.phases[-1])[act]
    assert items(apart.phases[-1])["gradients, fp32"] == large.params * 4  # one model's at a time
    assert together.phases[:2] == apart.phases[:2] and apart.resident == together.resident
    assert "updated one after the other" in apart.settings.layout()


def test_fused_logprobs_bound_the_scoring_pass():
    fused, unfused = (plan_memory(XL, replace(HEADLINE, fused_logprobs=f), 16.0) for f in (True, False))
    n, V = 64 * 128, 50257
    assert items(unfused.phases[1])["logits + fp32 log-softmax"] == n * V * (2 + 4)
    chunk = mp.logprob_chunk_tokens(n, V)
    assert chunk == mp.LOGPROB_CHUNK_BYTES // (V * 4) and chunk * V * 4 <= mp.LOGPROB_CHUNK_BYTES
    assert fused.phases[1].nbytes < unfused.phases[1].nbytes


def test_constants_match_the_code_they_mirror():
    from rlhf_fast import kernels
    from rlhf_fast.distributed.deepspeed import BUCKET_ELEMENTS
    from rlhf_fast.generation.generate import CACHE_BUCKET, cache_length

    assert mp.CACHE_BUCKET == CACHE_BUCKET and mp.DEEPSPEED_BUCKET_ELEMENTS == BUCKET_ELEMENTS
    for total, n_positions in ((97, 1024), (384, 1024), (1000, 1024), (129, 256)):
        assert mp.kv_cache_len(total, n_positions) == cache_length(total, n_positions)
    if hasattr(kernels, "LOGPROB_CHUNK_BYTES"):
        assert mp.LOGPROB_CHUNK_BYTES == kernels.LOGPROB_CHUNK_BYTES


def test_fits_as_given():
    verdict = decide(XL, replace(HEADLINE, micro_batch_size=2, grad_checkpoint=True), 16.0)
    assert verdict.fits and verdict.proposal is None and not verdict.refused
    assert "FITS" in verdict.message()


def test_proposes_the_largest_micro_batch_with_checkpointing():
    verdict = decide(XL, HEADLINE, 16.0)
    assert not verdict.fits and verdict.proposal is not None and verdict.proposal.fits
    m = verdict.proposal.settings.micro_batch_size
    assert verdict.proposal.settings.grad_checkpoint and 1 <= m < 8
    assert not plan_memory(XL, replace(HEADLINE, grad_checkpoint=True, micro_batch_size=m + 1), 16.0).fits
    assert verdict.flags() == f"--micro-batch-size {m} --grad-checkpoint"
    assert verdict.flags(mini_batch=True) == f"--mini-batch-size {m} --grad-checkpoint"


def test_proposes_a_smaller_rollout_when_the_kv_cache_does_not_fit():
    verdict = decide(XL, HEADLINE, 12.0)  # the 64-row cache + the fp32 base alone exceed 12 GiB
    assert verdict.proposal is not None and verdict.proposal.fits
    assert verdict.proposal.settings.rollout_batch_size < 64
    assert "--rollout-batch-size" in verdict.flags()
    bigger = replace(verdict.proposal.settings, rollout_batch_size=verdict.proposal.settings.rollout_batch_size + 1)
    assert not plan_memory(XL, bigger, 12.0).fits


def test_refuses_with_the_arithmetic():
    verdict = decide(ModelShape.from_preset("gpt2-large"), replace(HEADLINE, lora=False, micro_batch_size=4), 16.0)
    assert verdict.refused
    message = verdict.message()
    assert message.startswith("does not fit: resident") and "\n" not in message
    assert "micro-batch 1 with checkpointing and rollout 1" in message and "--lora" in message


def test_settings_are_validated():
    with pytest.raises(ValueError, match="algo must be one of"):
        PlanSettings(algo="ppo2")
    with pytest.raises(ValueError, match="offload_optimizer needs strategy='deepspeed'"):
        PlanSettings(offload_optimizer=True)
    with pytest.raises(ValueError, match="n_positions=1024"):
        plan_memory(XL, replace(HEADLINE, prompt_len=1000), 16.0)
    # the boundary: PPO's reward model reads the EOS appended to a truncated response, GRPO's function does not
    edge = replace(HEADLINE, algo="ppo", prompt_len=1024 - HEADLINE.response_len)
    with pytest.raises(ValueError, match=r"\+ 1 \(the EOS scoring appends\) tokens exceed the model's n_positions"):
        plan_memory(XL, edge, 16.0)
    plan_memory(XL, replace(edge, prompt_len=edge.prompt_len - 1), 16.0)
    plan_memory(XL, replace(edge, algo="grpo"), 16.0)


def test_sft_rm_dpo_have_only_an_update():
    for algo in ("sft", "rm", "dpo"):
        plan = plan_memory(XL, replace(HEADLINE, algo=algo, micro_batch_size=2), 16.0)
        assert [p.name for p in plan.phases] == ["update"]
        assert not any("KV cache" in i.label for i in plan.resident.items)
    dpo = items(plan.phases[0])
    assert "reference pass: block temporaries" in dpo  # the no-grad reference pass inside the update


def test_hf_dir_shape(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 48, "n_embd": 1600,
                                                      "n_head": 25, "vocab_size": 50257, "n_positions": 1024}))
    assert ModelShape.from_hf_dir(tmp_path).params == XL.params
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 2}))
    with pytest.raises(ValueError, match="n_layer, n_embd and vocab_size"):
        ModelShape.from_hf_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelShape.from_hf_dir(tmp_path / "missing")


# --- rlhf-fast plan -------------------------------------------------------------------------------------


def test_cli_plan_proposes_and_exits_0(capsys):
    argv = ["plan", "--preset", "gpt2-xl", "--precision", "bf16", "--lora", "--rollout-batch-size", "64",
            "--prompt-len", "256", "--response-len", "128", "--micro-batch-size", "8", "--vram", "16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "proposal: --micro-batch-size" in out and "--grad-checkpoint" in out
    assert "KV cache 64 x 384" in out and "without the fused lm-head kernel" in out
    assert out.rstrip().splitlines()[-1].startswith("without the fused lm-head kernel")


def test_cli_plan_fits(capsys):
    assert main(["plan", "--preset", "gpt2", "--micro-batch-size", "4", "--rollout-batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "proposal" not in out


def test_cli_plan_refuses_with_one_line_and_exits_2(capsys):
    assert main(["plan", "--preset", "gpt2-large", "--no-lora", "--micro-batch-size", "4"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlhf-fast plan: does not fit")
    assert "Traceback" not in captured.err


def test_cli_plan_input_errors_are_one_line(user_error):
    assert "unknown model preset 'gpt9'" in user_error(["plan", "--preset", "gpt9"])
    line = user_error(["plan", "--rollout-batch-size", "4"])
    assert "memory plan: micro_batch_size 8 exceeds" in line and line.endswith("(--micro-batch-size)")


def test_cli_plan_reads_an_hf_dir(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 12, "n_embd": 768, "vocab_size": 50257}))
    assert main(["plan", "--model", str(tmp_path), "--rollout-batch-size", "16", "--micro-batch-size", "4"]) == 0
    assert "124,439,808 parameters" in capsys.readouterr().out


# --- docs/memory.md -------------------------------------------------------------------------------------


def test_docs_memory_md_is_generated_from_the_plan():
    text = mp.DOC_PATH.read_text(encoding="utf-8")
    assert mp.render_docs(text) == text, "docs/memory.md is stale: run rlhf-fast plan --write-docs"
    assert "1,557,611,200" in text and "--grad-checkpoint" in text


def test_docs_check_fails_when_stale(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "memory.md"
    stale.write_text(mp.render_docs(mp.DOC_PATH.read_text(encoding="utf-8")).replace("7.03", "6.99"))
    assert not mp.sync_docs(stale, check=True)
    assert mp.sync_docs(stale) and mp.sync_docs(stale, check=True)
    stale.write_text(stale.read_text().replace("7.03", "6.99"))
    monkeypatch.setattr(mp, "DOC_PATH", stale)
    assert main(["plan", "--check-docs"]) == 1
    assert "is stale: run rlhf-fast plan --write-docs" in capsys.readouterr().err
    assert main(["plan", "--write-docs"]) == 0 and main(["plan", "--check-docs"]) == 0
    no_markers = tmp_path / "bare.md"
    no_markers.write_text("# memory\n")
    with pytest.raises(ValueError, match="lacks the markers"):
        mp.sync_docs(no_markers, check=True)


# --- the start-up check ---------------------------------------------------------------------------------


@pytest.fixture
def no_cuda_query(monkeypatch):
    def fail(device):
        raise AssertionError("the start-up check must not query a CUDA device on the CPU")

    monkeypatch.setattr(mp, "device_budget_gib", fail)


def test_startup_check_is_a_no_op_on_cpu(tmp_path, make_config, no_cuda_query):
    sft = build_sft_trainer(make_config(tmp_path / "sft", "sft", micro=3))
    assert mp.check_trainer_memory(sft) is None
    shape, settings = mp.trainer_plan_settings(sft)
    assert (shape.n_layer, shape.n_embd, shape.name) == (2, 32, "tiny")
    assert (settings.algo, settings.lora, settings.micro_batch_size, settings.prompt_len, settings.response_len) == \
        ("sft", False, 3, 48, 64)
    rm = build_reward_trainer(make_config(tmp_path / "rm", "rm", lora=True))
    assert mp.trainer_plan_settings(rm)[1].micro_rows == 2 * rm.config.optim.micro_batch_size


def test_rl_trainer_settings_on_cpu(tmp_path, no_cuda_query):
    lora = tiny_trainer(tmp_path / "lora", micro_batch_size=2)
    shape, s = mp.trainer_plan_settings(lora)
    assert (s.algo, s.lora, s.lora_rank, s.rollout_batch_size, s.micro_batch_size, s.response_len) == \
        ("ppo", True, 4, 6, 2, 9)
    assert s.n_frozen == 0 and s.has_reference and s.has_reward_model and s.prompt_len >= 1
    assert (s.strategy, s.weights, s.precision) == ("single", "fp32", "fp32")
    lora.models.policy.to(torch.bfloat16)  # the start-up check reads the weights' real dtype
    assert mp.trainer_plan_settings(lora)[1].weights == "bf16"
    full = tiny_trainer(tmp_path / "full", models=tiny_full_models(), kl_target=None)
    s = mp.trainer_plan_settings(full)[1]
    assert not s.lora and s.n_frozen == 2  # reference and reward model
    plan_memory(shape, s, 1.0)  # the settings a trainer yields are plannable


def fake_cuda_trainer(monkeypatch, budget_gib: float):
    """A trainer whose strategy is on CUDA and whose plan is the 16 GB headline case."""
    monkeypatch.setattr(mp, "device_budget_gib", lambda device: budget_gib)
    monkeypatch.setattr(mp, "trainer_plan_settings", lambda trainer, scorer=None: (XL, HEADLINE))
    return types.SimpleNamespace(strategy=types.SimpleNamespace(device=torch.device("cuda", 0)))


def test_startup_check_refuses_naming_the_flags(monkeypatch):
    trainer = fake_cuda_trainer(monkeypatch, 16.0)
    with pytest.raises(ValueError) as e:
        mp.check_trainer_memory(trainer)
    message = str(e.value)
    assert "\n" not in message and message.startswith("memory plan for cuda:0: peak")
    assert "use --micro-batch-size" in message and "--grad-checkpoint" in message and "rlhf-fast plan" in message


def test_startup_check_without_any_fit_says_why(monkeypatch):
    trainer = fake_cuda_trainer(monkeypatch, 4.0)
    with pytest.raises(ValueError, match="does not fit: resident .* even at micro-batch 1"):
        mp.check_trainer_memory(trainer)


def test_startup_check_logs_a_plan_that_fits(monkeypatch, caplog):
    trainer = fake_cuda_trainer(monkeypatch, 80.0)
    with caplog.at_level(logging.INFO, logger="rlhf_fast"):
        plan = mp.check_trainer_memory(trainer)
    assert plan is not None and plan.fits and "memory plan: peak" in caplog.text


def test_startup_check_can_be_told_to_warn(monkeypatch, caplog):
    trainer = fake_cuda_trainer(monkeypatch, 16.0)
    monkeypatch.setenv(mp.ENV_SWITCH, "warn")
    with caplog.at_level(logging.WARNING, logger="rlhf_fast"):
        plan = mp.check_trainer_memory(trainer)
    assert plan is not None and not plan.fits and "use --micro-batch-size" in caplog.text
