"""DeepSpeedStrategy on CPU (DeepSpeed's CPU accelerator + gloo), against SingleDeviceStrategy.

DeepSpeed JIT-builds its CPU Adam and shared-memory comm ops on first use (~1-2 min, cached after),
hence `slow`; these tests still run in the default suite and CI. They skip only when deepspeed is not
importable. The bad-input tests at the end need no DeepSpeed at all.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_fast.distributed import DeepSpeedSettings, SingleDeviceStrategy
from rlhf_fast.distributed.deepspeed import import_deepspeed
from rlhf_fast.model import GPT, add_lora
from rlhf_fast.trainers import (
    DataSettings,
    LoRASettings,
    ModelSettings,
    OptimSettings,
    RunSettings,
    TrainConfig,
    build_reward_trainer,
    build_sft_trainer,
)
from rlhf_fast.trainers.builders import train_strategy
from rlhf_fast.trainers.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[2]
# Parameters with an exactly-zero gradient: Adam turns float noise there into +-lr steps, so their values
# are not compared (as in tests/trainers/test_invariance.py): the attention key bias (softmax ignores a
# shift shared by all keys) and the reward head's bias (the pairwise loss sees only score differences).
KEY_BIAS, HEAD_BIAS = "attn.c_attn.bias", "head.proj.bias"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ds_env():
    """deepspeed importable, and a one-process group on the loopback address for in-process engines."""
    pytest.importorskip("deepspeed", reason="deepspeed not installed (pip install 'rlhf_fast[deepspeed]')")
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread beats two contended ones on the 2-core CI machine
    yield
    torch.set_num_threads(threads)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _config(tmp_path, stage="sft", *, strategy="single", ds=None, steps=3, micro=4, accum=2, lr=3e-3, lora=False,
            device="cpu", **run):
    return TrainConfig(
        stage=stage,
        model=ModelSettings(preset="tiny", attn_backend="sdpa", kernel_backend="torch"),
        lora=LoRASettings(enabled=lora, rank=4),
        data=DataSettings(eval_size=8, synthetic_size=64, max_prompt_len=24, max_len=56),
        optim=OptimSettings(lr=lr, max_steps=steps, warmup_steps=1, micro_batch_size=micro, grad_accum_steps=accum),
        run=RunSettings(output_dir=str(tmp_path), device=device, compile=False, save_every=0, eval_every=0,
                        log_every=1, progress=False, strategy=strategy, **run),
        deepspeed=ds or DeepSpeedSettings(),
    )


def _params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in trainer.trainable.items()}


def _assert_params_close(a: dict, b: dict, atol=2e-5):
    assert a.keys() == b.keys()
    for n in a:
        x, y = a[n], b[n]
        if n.endswith(HEAD_BIAS):
            continue
        if n.endswith(KEY_BIAS):
            C = x.numel() // 3
            x, y = torch.cat([x[:C], x[2 * C:]]), torch.cat([y[:C], y[2 * C:]])
        assert torch.allclose(x, y, atol=atol, rtol=1e-4), f"{n}: max abs diff {(x - y).abs().max():.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("ds", [DeepSpeedSettings(zero_stage=2, offload_optimizer=True),
                                DeepSpeedSettings(zero_stage=3, offload_optimizer=True, offload_params=True)],
                         ids=["zero2-offload-optimizer", "zero3-offload-all"])
def test_zero_with_offload_matches_single_device(tmp_path, ds_env, ds):
    single = build_sft_trainer(_config(tmp_path / "single"))
    h_single = single.train()
    trainer = build_sft_trainer(_config(tmp_path / "ds", strategy="deepspeed", ds=ds))
    assert type(trainer.strategy.engine().optimizer).__name__.startswith("DeepSpeedZero")
    h_ds = trainer.train()
    assert len(h_ds) == len(h_single) == 3
    for a, b in zip(h_single, h_ds):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["lr"] == pytest.approx(a["lr"]) and b["tokens"] == a["tokens"]
    assert h_ds[-1]["loss"] < h_ds[0]["loss"]  # it trained
    with trainer.strategy.gathered(trainer.trainable.values()):
        _assert_params_close(_params(single), _params(trainer))


@pytest.mark.slow
def test_bf16_keeps_bf16_weights_and_fp32_masters_close_to_fp32_run(tmp_path, ds_env):
    h_fp32 = build_sft_trainer(_config(tmp_path / "fp32", steps=4)).train()
    ds = DeepSpeedSettings(zero_stage=2, offload_optimizer=True)
    trainer = build_sft_trainer(_config(tmp_path / "bf16", strategy="deepspeed", ds=ds, precision="bf16", steps=4))
    h_bf16 = trainer.train()
    assert {p.dtype for p in trainer.trainable.values()} == {torch.bfloat16}  # DeepSpeed cast the module
    # bf16 forward and backward, fp32 master weights and Adam: the loss curve stays within bf16 rounding of
    # the fp32 run's
    for a, b in zip(h_fp32, h_bf16, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-2)
    assert h_bf16[-1]["loss"] < h_bf16[0]["loss"] - 0.3


@pytest.mark.slow
def test_reward_model_with_lora_under_zero1_matches_single_device(tmp_path, ds_env):
    kw = dict(lora=True, micro=3, accum=2, lr=1e-2)
    single = build_reward_trainer(_config(tmp_path / "single", "rm", **kw))
    h_single = single.train()
    trainer = build_reward_trainer(_config(tmp_path / "ds", "rm", strategy="deepspeed",
                                           ds=DeepSpeedSettings(zero_stage=1), **kw))
    h_ds = trainer.train()
    for a, b in zip(h_single, h_ds, strict=True):
        for key in ("loss", "accuracy", "margin", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert set(trainer.trainable) == set(single.trainable) and all("lora" in n or n.startswith("head.")
                                                                   for n in trainer.trainable)
    _assert_params_close(_params(single), _params(trainer))


@pytest.mark.slow
def test_save_resume_is_exact_and_checkpoint_loads_without_deepspeed(tmp_path, ds_env):
    ds = DeepSpeedSettings(zero_stage=2, offload_optimizer=True)
    straight = build_sft_trainer(_config(tmp_path / "straight", strategy="deepspeed", ds=ds, steps=4))
    h_straight = straight.train()

    run = tmp_path / "resumed"
    first = build_sft_trainer(_config(run, strategy="deepspeed", ds=ds, steps=4))
    first.train(until_step=2)
    ckpt = CheckpointManager(run).latest()
    assert ckpt.name == "step-00000002" and (run / "strategy" / ckpt.name / "engine0").is_dir()
    # the torch-only weights of the checkpoint are the trained model: they load into a plain GPT
    blobs, _ = CheckpointManager.load(ckpt)
    plain = GPT.from_preset("tiny", attn_backend="sdpa", kernel_backend="torch")
    result = plain.load_state_dict({n.removeprefix("model."): w for n, w in blobs["weights"].items()}, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]  # tied to wte
    ids = torch.randint(0, 256, (3, 13))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), first.module.model(ids), atol=0, rtol=0)

    second = build_sft_trainer(_config(run, strategy="deepspeed", ds=ds, steps=4, resume=True))
    h_resumed = second.train()
    assert second.history and len(second.history) == 2  # steps 3 and 4 only
    for a, b in zip(h_straight[2:], h_resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    _assert_params_close(_params(straight), _params(second), atol=1e-6)
    # strategy state of checkpoints no longer kept is pruned with them
    kept = {p.name for p in CheckpointManager(run).checkpoints()}
    assert {p.name for p in (run / "strategy").iterdir()} == kept


LAUNCHERS = {
    "torchrun": ["torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "-m"],
    "deepspeed": ["deepspeed.launcher.runner", "--num_gpus", "2", "--module"],  # on CPU: 2 CPU ranks
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_match_one_process_same_global_batch(tmp_path, ds_env, launcher):
    """2 ranks x micro-batch 2 (ZeRO-2, gloo) == one process, micro-batch 2 x grad-accum 2."""
    out = tmp_path / "two"
    port = _free_port()
    launch, module_flag = LAUNCHERS[launcher][:-1], LAUNCHERS[launcher][-1]
    cmd = [sys.executable, "-m", *launch, "--master_addr", "127.0.0.1", "--master_port", str(port),
           module_flag, "rlhf_fast.cli", "sft", "--strategy", "deepspeed", "--zero-stage", "2",
           "--preset", "tiny", "--attn-backend", "sdpa", "--kernel-backend", "torch", "--no-lora",
           "--synthetic-size", "64", "--eval-size", "8", "--max-prompt-len", "24", "--max-len", "56",
           "--micro-batch-size", "2", "--grad-accum-steps", "1", "--max-steps", "3", "--warmup-steps", "1",
           "--lr", "3e-3", "--eval-every", "0", "--save-every", "0", "--log-every", "1",
           "--output-dir", str(out), "--no-progress", "--no-export"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    two = [rec for rec in lines if "train/loss" in rec]
    assert [rec["step"] for rec in two] == [1, 2, 3]  # rank 0 alone writes the log

    one = build_sft_trainer(_config(tmp_path / "one", micro=2, accum=2)).train()
    for a, b in zip(one, two):
        assert b["train/loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["train/grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["train/tokens"] == a["tokens"]


@pytest.mark.slow
def test_incompatible_models_are_refused(tmp_path, ds_env):
    from rlhf_fast.distributed import DeepSpeedStrategy

    def lora_gpt():
        model = GPT.from_preset("tiny", attn_backend="sdpa", kernel_backend="torch")
        add_lora(model, "policy", rank=2)
        return model

    model = lora_gpt()
    z3 = DeepSpeedStrategy(DeepSpeedSettings(zero_stage=3), micro_batch_size=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="ZeRO-3.*LoRA"):
        z3.prepare(model, opt)

    # two engines over the same trainable parameters (e.g. actor and critic built on one module)
    z2 = DeepSpeedStrategy(DeepSpeedSettings(zero_stage=2), micro_batch_size=2)
    z2.prepare(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    with pytest.raises(ValueError, match="already belong to another DeepSpeed engine"):
        z2.prepare(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    with pytest.raises(ValueError, match="not prepared"):
        z2.backward(torch.zeros((), requires_grad=True), model=lora_gpt())
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        DeepSpeedStrategy(precision="fp16")
    # a device the accelerator is not: here, without CUDA, --device's own check already refuses it
    with pytest.raises(ValueError, match="accelerator is cpu|no usable CUDA device"):
        train_strategy(_config(tmp_path, strategy="deepspeed", device="cuda"))


# --- bad input and CLI plumbing; no DeepSpeed needed ------------------------------------------------


def test_cli_flags_reach_the_deepspeed_section(tmp_path):
    from rlhf_fast.cli import parse

    user = tmp_path / "ds.json"
    user.write_text("{}")
    _, cfg, _ = parse(["--local_rank=1", "sft", "--strategy", "deepspeed", "--zero-stage", "3", "--offload-optimizer",
                       "--offload-params", "--deepspeed-config", str(user)])
    assert cfg.run.strategy == "deepspeed"
    assert cfg.deepspeed == DeepSpeedSettings(zero_stage=3, offload_optimizer=True, offload_params=True,
                                              config_file=str(user))
    assert parse(["rm"])[1].run.strategy == "single"
    with pytest.raises(ValueError, match="offload_params needs zero_stage=3"):
        parse(["sft", "--offload-params"])


def test_missing_deepspeed_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'rlhf_fast\[deepspeed\]'"):
        import_deepspeed()
    with pytest.raises(ImportError, match=r"rlhf_fast\[deepspeed\]"):
        train_strategy(_config(tmp_path, strategy="deepspeed"))
    assert isinstance(train_strategy(_config(tmp_path)), SingleDeviceStrategy)  # the default needs none


def test_settings_validation_and_generated_config(tmp_path):
    with pytest.raises(ValueError, match="zero_stage"):
        DeepSpeedSettings(zero_stage=4)
    with pytest.raises(ValueError, match="offload_params needs zero_stage=3"):
        DeepSpeedSettings(zero_stage=2, offload_params=True)
    with pytest.raises(ValueError, match="offload_optimizer needs zero_stage >= 1"):
        DeepSpeedSettings(zero_stage=0, offload_optimizer=True)
    with pytest.raises(ValueError, match=r"\(strategy\)"):
        RunSettings(strategy="fsdp")
    cfg = DeepSpeedSettings(zero_stage=3, offload_optimizer=True, offload_params=True).ds_config(
        micro_batch_size=3, grad_accum_steps=5, precision="bf16", max_grad_norm=0.7)
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 5
    assert cfg["gradient_clipping"] == 0.7 and cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    plain = DeepSpeedSettings(zero_stage=1).ds_config(micro_batch_size=2, grad_accum_steps=1, precision="fp32",
                                                      max_grad_norm=None)
    assert "offload_optimizer" not in plain["zero_optimization"] and plain["gradient_clipping"] == 0.0

    # a user's JSON: used as written, but the batch layout must agree with the trainer's
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "train_batch_size": 999,
                                "zero_optimization": {"stage": 1}, "gradient_clipping": 0.3}))
    got = DeepSpeedSettings(config_file=str(user)).ds_config(micro_batch_size=4, grad_accum_steps=2,
                                                             precision="fp32", max_grad_norm=1.0)
    assert got == {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                   "zero_optimization": {"stage": 1}, "gradient_clipping": 0.3}
    user.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    with pytest.raises(ValueError, match="gradient_accumulation_steps=8 disagrees"):
        DeepSpeedSettings(config_file=str(user)).ds_config(micro_batch_size=4, grad_accum_steps=2,
                                                           precision="fp32", max_grad_norm=1.0)
    user.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DeepSpeedSettings(config_file=str(user)).ds_config(micro_batch_size=4, grad_accum_steps=2,
                                                           precision="fp32", max_grad_norm=1.0)
    with pytest.raises(FileNotFoundError, match="DeepSpeed config file not found"):
        DeepSpeedSettings(config_file=str(tmp_path / "nope.json")).ds_config(
            micro_batch_size=4, grad_accum_steps=2, precision="fp32", max_grad_norm=1.0)
    # and TrainConfig carries it as its own section (config files, CLI overrides)
    tc = TrainConfig.from_dict({"run": {"strategy": "deepspeed"}, "deepspeed": {"zero_stage": 1}})
    assert tc.deepspeed == DeepSpeedSettings(zero_stage=1) and tc.to_dict()["deepspeed"]["zero_stage"] == 1


def _dpo_config(tmp_path, sft_dir, **kw):
    import dataclasses

    config = _config(tmp_path, "sft", **kw)
    model = dataclasses.replace(config.model, preset=None, model=str(sft_dir))
    return dataclasses.replace(config, stage="dpo", model=model)


@pytest.fixture
def tiny_export(tmp_path):
    """An (untrained) `tiny` export with the byte tokenizer: what `rlhf-fast sft` leaves, for DPO to start from."""
    import json

    torch.manual_seed(0)
    directory = tmp_path / "sft_export"
    GPT.from_preset("tiny").save_pretrained(directory)
    (directory / "rlhf_fast_tokenizer.json").write_text(json.dumps({"tokenizer": "byte"}))
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("lora, ds", [(True, DeepSpeedSettings(zero_stage=2, offload_optimizer=True)),
                                      (False, DeepSpeedSettings(zero_stage=3, offload_optimizer=True,
                                                                offload_params=True))],
                         ids=["lora-zero2", "full-zero3"])
def test_dpo_under_deepspeed_matches_single_device(tmp_path, ds_env, tiny_export, lora, ds):
    from rlhf_fast.trainers import build_dpo_trainer

    kw = dict(lora=lora, micro=3, accum=2, lr=1e-2 if lora else 1e-3)
    single = build_dpo_trainer(_dpo_config(tmp_path / "single", tiny_export, **kw))
    h_single = single.train()
    trainer = build_dpo_trainer(_dpo_config(tmp_path / "ds", tiny_export, strategy="deepspeed", ds=ds, **kw))
    assert (trainer.reference is None) == lora  # LoRA: the reference is the base with adapters off
    h_ds = trainer.train()
    for a, b in zip(h_single, h_ds, strict=True):
        for key in ("loss", "accuracy", "rewards/margins", "logps/chosen", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert h_ds[-1]["rewards/margins"] != 0.0  # the policy moved away from the reference
    with trainer.strategy.gathered(trainer.trainable.values()):
        _assert_params_close(_params(single), _params(trainer))
