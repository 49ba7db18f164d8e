"""The configs of generate, chat, serve, eval and plan: every old flag spelling parses (through
`rlhf_fast.config.add_flags` + `from_args`) to the values the hand-written parsers gave, every setting has help,
and a bad value is a ConfigError whose key maps to the flag to fix."""

import argparse
import dataclasses
import io
import sys

import pytest

from rlhf_fast.config import add_flags, build, from_args, iter_options
from rlhf_fast.errors import ConfigError
from rlhf_fast.evaluation import EvalConfig, EvalInputError, eval_command
from rlhf_fast.serving.batcher import BatchConfig
from rlhf_fast.serving.commands import ChatConfig, GenerateConfig, ServeConfig, chat_command, generate_command
from rlhf_fast.trainers import memory_plan as mp
from rlhf_fast.trainers.memory_plan import PlanCommand, PlanSettings, plan_command

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = (GenerateConfig, ChatConfig, ServeConfig, EvalConfig, PlanCommand)


def parse(cls, argv: list[str]):
    """(config, {key: flag}) as the CLI builds them."""
    parser = argparse.ArgumentParser()
    flags = add_flags(parser, cls)
    return from_args(cls, parser.parse_args(argv), flags), flags


def error(cls, argv: list[str]) -> tuple[ConfigError, dict[str, str]]:
    parser = argparse.ArgumentParser()
    flags = add_flags(parser, cls)
    with pytest.raises(ConfigError) as e:
        from_args(cls, parser.parse_args(argv), flags)
    return e.value, flags


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_setting_has_help(cls):
    for key, f, _, _ in iter_options(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{key} has no help text"


# --- generate / chat --------------------------------------------------------------------------------------


def test_generate_flags():
    argv = ["--model", "tiny", "--prompt", "a", "--prompt", "b", "--prompts-file", "p.txt", "--tokenizer", "byte",
            "--max-new-tokens", "7", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3",
            "--device", "cpu", "--dtype", "bfloat16"]
    config, _ = parse(GenerateConfig, argv)
    assert config == GenerateConfig(model="tiny", prompt=("a", "b"), prompts_file="p.txt", tokenizer="byte",
                                    max_new_tokens=7, temperature=0.8, top_k=20, top_p=0.9, seed=3, device="cpu",
                                    dtype="bfloat16")
    defaults, _ = parse(GenerateConfig, ["--model", "gpt2", "--prompt", "x"])  # the old parser's defaults
    assert (defaults.max_new_tokens, defaults.temperature, defaults.top_k, defaults.top_p, defaults.seed,
            defaults.device, defaults.dtype, defaults.tokenizer, defaults.prompts_file) == (
        64, 1.0, 0, 1.0, 0, None, "float32", None, None)
    with pytest.raises(SystemExit):
        parse(GenerateConfig, ["--model", "tiny", "--prompt", "x", "--dtype", "int8"])


@pytest.mark.parametrize("argv, key", [
    (["--prompt", "x"], "model"),
    (["--model", "tiny"], "prompt"),
    (["--model", "tiny", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--model", "tiny", "--prompt", "x", "--top-p", "0"], "top_p"),
    (["--model", "tiny", "--prompt", "x", "--top-k", "-2"], "top_k"),
    (["--model", "tiny", "--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
])
def test_generate_errors_name_the_flag(argv, key):
    e, flags = error(GenerateConfig, argv)
    assert e.where == key and key in flags


def test_generate_command_runs_and_reads_the_prompt_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first\n\nsecond\n")
    config = GenerateConfig(model="tiny", prompt=("Hi",), prompts_file=str(prompts), max_new_tokens=3,
                            temperature=0, device="cpu")
    assert generate_command(config) == 0
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("=== ")]
    assert headers == ["=== Hi", "=== first", "=== second"]
    with pytest.raises(ConfigError) as e:
        generate_command(dataclasses.replace(config, prompt=(), prompts_file=str(tmp_path / "missing.txt")))
    assert e.value.where == "prompts_file"


def test_chat_flags_and_command(monkeypatch, capsys):
    config, _ = parse(ChatConfig, ["--model", "tiny", "--system", "Be brief.", "--temperature", "0",
                                   "--max-new-tokens", "4", "--device", "cpu"])
    assert (config.model, config.system, config.temperature, config.max_new_tokens) == ("tiny", "Be brief.", 0.0, 4)
    assert not config.sampling().do_sample
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))  # then EOF
    assert chat_command(config) == 0
    out = capsys.readouterr().out
    assert "chatting with tiny (random init" in out and out.count("model: ") == 1


# --- serve ----------------------------------------------------------------------------------------------


def test_serve_flags():
    d = BatchConfig()
    config, _ = parse(ServeConfig, ["--model", "tiny"])
    assert (config.host, config.port, config.max_batch_size, config.batch_window_ms, config.max_queue, config.compile,
            config.device, config.dtype, config.seed) == (
        "127.0.0.1", 8000, d.max_batch_size, d.batch_window_ms, d.max_queue, None, None, "float32", 0)
    assert config.batch() == d
    assert parse(ServeConfig, ["--model", "tiny", "--no-compile"])[0].compile is False
    config, _ = parse(ServeConfig, ["--model", "x", "--host", "0.0.0.0", "--port", "9000", "--max-batch-size", "1",
                                    "--batch-window-ms", "2.5", "--max-queue", "3", "--compile", "--seed", "4"])
    assert config.batch() == BatchConfig(max_batch_size=1, batch_window_ms=2.5, max_queue=3, compile=True)
    assert (config.host, config.port, config.seed) == ("0.0.0.0", 9000, 4)


@pytest.mark.parametrize("argv, key, flag", [
    (["--port", "70000"], "port", "--port"),
    (["--max-batch-size", "0"], "max_batch_size", "--max-batch-size"),
    (["--batch-window-ms", "-1"], "batch_window_ms", "--batch-window-ms"),
    (["--max-queue", "0"], "max_queue", "--max-queue"),
])
def test_serve_errors_name_the_flag(argv, key, flag):
    e, flags = error(ServeConfig, ["--model", "tiny", *argv])
    assert e.where == key and flags[key] == flag


# --- eval -----------------------------------------------------------------------------------------------


def test_eval_flags():
    config, flags = parse(EvalConfig, ["--policies", "a", "b", "--names", "x", "y", "--reward-model", "rm",
                                       "--reference", "ref", "--task", "arithmetic", "--num-prompts", "5",
                                       "--samples", "2", "--max-new-tokens", "10", "--temperature", "0.7",
                                       "--seed", "1", "--batch-size", "3", "--device", "cpu", "--output-dir", "o"])
    assert config == EvalConfig(policies=("a", "b"), names=("x", "y"), reward_model="rm", reference="ref",
                                task="arithmetic", num_prompts=5, samples=2, max_new_tokens=10, temperature=0.7,
                                seed=1, batch_size=3, device="cpu", output_dir="o")
    assert flags["reward_model"] == "--reward-model" and flags["output_dir"] == "--output-dir"
    defaults, _ = parse(EvalConfig, ["--policies", "a"])
    assert (defaults.num_prompts, defaults.samples, defaults.max_new_tokens, defaults.temperature, defaults.seed,
            defaults.batch_size, defaults.output_dir, defaults.task_name, defaults.new_tokens) == (
        64, 4, None, 1.0, 0, 32, "runs/eval", "synthetic", 48)
    assert parse(EvalConfig, ["--policies", "a", "--prompts", "p.jsonl"])[0].task_name == "none"
    with pytest.raises(SystemExit):
        parse(EvalConfig, ["--policies", "a", "--task", "bogus"])


@pytest.mark.parametrize("argv, key", [
    ([], "policies"),
    (["--policies", "a", "b", "--names", "only-one"], "names"),
    (["--policies", "a", "b", "--names", "x", "x"], "names"),
    (["--policies", "a", "--samples", "0"], "samples"),
    (["--policies", "a", "--temperature", "0"], "temperature"),
    (["--policies", "a", "--task", "sentiment"], "prompts"),  # no built-in prompts
])
def test_eval_errors_name_the_flag(argv, key):
    e, flags = error(EvalConfig, argv)
    assert e.where == key and key in flags


def test_eval_command_names_a_missing_export(tmp_path):
    with pytest.raises(EvalInputError) as e:
        eval_command(EvalConfig(policies=(str(tmp_path / "nope"),), output_dir=str(tmp_path / "o")))
    assert isinstance(e.value, ConfigError) and e.value.where == "policies"
    assert e.value.what == f"{tmp_path / 'nope'}: no such directory"
    assert not (tmp_path / "o").exists()


# --- plan -----------------------------------------------------------------------------------------------


def test_plan_flags():
    argv = ["--preset", "gpt2-xl", "--precision", "bf16", "--lora", "--rollout-batch", "64", "--prompt-len", "256",
            "--response-len", "128", "--micro-batch", "8", "--vram", "16"]  # abbreviated flags work too
    config, flags = parse(PlanCommand, argv)
    assert config.preset == "gpt2-xl" and config.vram == 16.0 and config.settings == PlanSettings()
    assert flags["settings.micro_batch_size"] == "--micro-batch-size" and flags["settings.algo"] == "--algo"
    assert "settings.score_rows" not in flags  # a trainer-derived setting, not a flag
    config, _ = parse(PlanCommand, ["--model", "dir", "--algo", "grpo", "--no-lora", "--lora-rank", "4",
                                    "--strategy", "deepspeed", "--weight-dtype", "bf16", "--offload-optimizer",
                                    "--offload-frozen", "--group-size", "4", "--grad-checkpoint",
                                    "--no-fused-logprobs", "--micro-batch-size", "2"])
    assert config.model == "dir" and config.preset is None
    assert config.settings == PlanSettings(algo="grpo", lora=False, lora_rank=4, strategy="deepspeed",
                                           weight_dtype="bf16", offload_optimizer=True, offload_frozen=True,
                                           group_size=4, grad_checkpoint=True, fused_logprobs=False,
                                           micro_batch_size=2)
    assert parse(PlanCommand, ["--check-docs"])[0].check_docs
    assert parse(PlanCommand, ["--write-docs"])[0].write_docs
    assert parse(PlanCommand, [])[0].shape().name == "gpt2-xl"


@pytest.mark.parametrize("argv, key, flag", [
    (["--write-docs", "--check-docs"], "check_docs", "--check-docs"),
    (["--preset", "gpt2", "--model", "dir"], "model", "--model"),
    (["--vram", "0"], "vram", "--vram"),
    (["--rollout-batch-size", "4"], "settings.micro_batch_size", "--micro-batch-size"),
    (["--offload-optimizer"], "settings.offload_optimizer", "--offload-optimizer"),
])
def test_plan_errors_name_the_flag(argv, key, flag):
    e, flags = error(PlanCommand, argv)
    assert e.where == key and flags[key] == flag


def test_plan_command_exit_codes(tmp_path, monkeypatch, capsys):
    assert plan_command(build(PlanCommand, {"preset": "gpt2", "settings": {"micro_batch_size": 4,
                                                                           "rollout_batch_size": 16}})) == 0
    assert "FITS" in capsys.readouterr().out
    assert plan_command(build(PlanCommand, {"preset": "gpt2-large", "settings": {"lora": False,
                                                                                 "micro_batch_size": 4}})) == 2
    assert capsys.readouterr().err.startswith("rlhf-fast plan: does not fit")
    for argv, key in ((["--preset", "gpt9"], "preset"), (["--model", str(tmp_path / "none")], "model")):
        with pytest.raises(ConfigError) as e:
            plan_command(parse(PlanCommand, argv)[0])
        assert e.value.where == key
    stale = tmp_path / "memory.md"
    stale.write_text(mp.render_docs(mp.DOC_PATH.read_text(encoding="utf-8")).replace("7.03", "6.99"))
    monkeypatch.setattr(mp, "DOC_PATH", stale)
    assert plan_command(PlanCommand(check_docs=True)) == 1
    assert plan_command(PlanCommand(write_docs=True)) == 0 and plan_command(PlanCommand(check_docs=True)) == 0
