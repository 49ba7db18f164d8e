"""The one config system (rlhf_fast/config.py) and the table-driven CLI built from it."""

import ast
import json
from pathlib import Path

import pytest

from rlhf_fast.cli import COMMANDS, build_parser, main
from rlhf_fast.config import ConfigError, build, from_flat
from rlhf_fast.trainers import GRPOConfig, PPOConfig, TrainConfig

PKG = Path(__file__).resolve().parents[1] / "rlhf_fast"
TINY_SFT = ["--preset", "tiny", "--attn-backend", "sdpa", "--device", "cpu", "--max-steps", "3", "--micro-batch-size",
            "4", "--eval-size", "8", "--synthetic-size", "32", "--no-progress", "--no-export", "--log-every", "1"]
TINY_GRPO = ["--preset", "tiny", "--attn-backend", "sdpa", "--device", "cpu", "--iterations", "2", "--group-size", "4",
             "--rollout-batch-size", "2", "--mini-batch-size", "8", "--max-new-tokens", "6", "--eval-prompts", "4",
             "--eval-every", "0", "--save-every", "0", "--no-progress", "--no-export", "--no-compile"]


def _train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    noise = ("time", "per_s", "peak_mem", "logprob_gap")  # clocks, memory and float-rounding diagnostics
    return [{k: v for k, v in r.items() if not any(n in k for n in noise)}
            for r in map(json.loads, lines) if any(k.startswith("train/") for k in r)]


def test_every_command_builds_with_help_on_every_flag():
    parser, flags = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help and len(action.help) > 10, (name, action.option_strings)
        if COMMANDS[name][1] is not None:
            assert "--config" in p._option_string_actions, name


def test_cli_module_is_thin():
    assert len((PKG / "cli.py").read_text().splitlines()) <= 300


def test_leaf_modules_import_nothing_else_from_the_package():
    for name in ("config.py", "errors.py"):
        tree = ast.parse((PKG / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert {m for m in imported if m.startswith("rlhf_fast")} <= {"rlhf_fast.errors"}, name


def test_old_flag_spellings_keep_working():
    parser, flags = build_parser("ppo")
    args = parser.parse_args(["ppo", "--sft-model", "s", "--reward-model", "r", "--loss-backend", "torch",
                              "--no-progress", "--rollout-batch-size", "4", "--mini-batch-size", "2", "--no-lora"])
    from rlhf_fast.config import from_args

    c = from_args(PPOConfig, args, flags["ppo"])
    assert (c.model.model, c.model.reward_model, c.model.kernel_backend) == ("s", "r", "torch")
    assert (c.run.progress, c.rl.rollout_batch_size, c.lora.enabled, c.run.output_dir) == (False, 4, False, "runs/ppo")
    assert flags["ppo"]["model.model"] == "--sft-model"  # renamed for ppo; --model stays an alias
    parser, flags = build_parser("sft")
    args = parser.parse_args(["sft", "--no-export", "--skip-bad-examples", "--resume-if-possible", "--strategy",
                              "deepspeed", "--zero-stage", "1"])
    c = from_args(TrainConfig, args, [*flags["sft"], "stage"])
    assert (c.run.export, c.data.skip_bad_examples, c.run.resume_if_possible, c.deepspeed.zero_stage) == \
        (False, True, True, 1)


def test_sections_keep_per_command_defaults():
    assert PPOConfig().optim.lr == 5e-4 and GRPOConfig().optim.lr == 1e-4 and TrainConfig().optim.lr == 1e-3
    assert PPOConfig().rl.estimator == "gae" and GRPOConfig().rl.estimator == "grpo"
    assert GRPOConfig.from_dict({"optim": {"weight_decay": 0.1}}).optim.lr == 1e-4  # the file sets one key
    c = from_flat(PPOConfig, lr=1e-3, iterations=5, output_dir="x", kernel_backend="torch")
    assert (c.optim.lr, c.rl.iterations, c.run.output_dir, c.model.kernel_backend) == (1e-3, 5, "x", "torch")
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        from_flat(PPOConfig, nope=1)


def test_config_errors_name_the_setting_and_the_cli_its_flag(tmp_path, user_error):
    with pytest.raises(ConfigError) as e:
        build(GRPOConfig, {"rl": {"clip_eps": -1}})
    assert e.value.where == "rl.clip_eps"
    assert user_error(["grpo", "--clip-eps", "-1"]).endswith("(--clip-eps)")
    assert user_error(["ppo", "--reward-model", "r"]).endswith("(--sft-model)")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"rl": {"iterations": 1}, "optim": {"lrr": 1}}))
    line = user_error(["grpo", "--config", str(cfg)])
    assert "unknown setting optim.lrr" in line and line.endswith(f"({cfg})")
    cfg.write_text('{"optim": {"lr": 1e-3},\n "run": }')
    assert user_error(["sft", "--config", str(cfg)]).endswith(f"({cfg}:2)")
    line = user_error(["sft", "--compile-cache", str(cfg)])  # a file where the cache directory would go
    assert "exists and is not a directory" in line and line.endswith("(--compile-cache)")


@pytest.mark.parametrize("command, flags", [("sft", TINY_SFT), ("grpo", TINY_GRPO)])
def test_saved_config_reproduces_the_run(tmp_path, command, flags, one_thread):
    first, again = tmp_path / "first", tmp_path / "again"
    assert main([command, *flags, "--lr", "3e-3", "--seed", "3", "--output-dir", str(first)]) == 0
    saved = json.loads((first / "config.json").read_text())
    assert main([command, "--config", str(first / "config.json"), "--output-dir", str(again)]) == 0
    resaved = json.loads((again / "config.json").read_text())
    assert resaved == {**saved, "run": {**saved["run"], "output_dir": str(again)}}
    a, b = _train_records(first), _train_records(again)
    assert len(a) >= 2 and a[:2] == b[:2]
