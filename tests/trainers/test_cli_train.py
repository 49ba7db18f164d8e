"""`rlhf-fast sft` / `rlhf-fast rm` end to end on tiny runs, config files and flag help."""

import json
import subprocess
import sys

import pytest

from rlhf_fast.cli import build_parser, main
from rlhf_fast.config import load_config_file
from rlhf_fast.data import BadExampleError
from rlhf_fast.trainers import TrainConfig

COMMON = ["--preset", "tiny", "--attn-backend", "sdpa", "--device", "cpu", "--max-steps", "3",
          "--micro-batch-size", "4", "--eval-size", "8", "--synthetic-size", "32", "--no-progress"]


def test_every_flag_has_help():
    parser, flags = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("sft", "rm"):
        actions = [a for a in sub.choices[name]._actions if a.dest != "help"]
        assert len(actions) == len(flags[name]) + 1  # + --config
        assert {"run.resume", "run.resume_if_possible", "data.skip_bad_examples", "deepspeed.offload_params"} <= \
            set(flags[name])
        for a in actions:
            assert a.help and len(a.help) > 10, a.option_strings


def test_sft_then_rm_pipeline_from_cli(tmp_path, capsys):
    sft_dir, rm_dir = tmp_path / "sft", tmp_path / "rm"
    cfg = tmp_path / "sft.json"
    cfg.write_text(json.dumps({"optim": {"lr": 0.01, "max_steps": 50}, "run": {"log_every": 1}}))
    assert main(["sft", "--config", str(cfg), *COMMON, "--output-dir", str(sft_dir)]) == 0
    saved = json.loads((sft_dir / "config.json").read_text())
    assert saved["optim"]["lr"] == 0.01 and saved["optim"]["max_steps"] == 3  # file, then flags override
    assert saved["lora"]["enabled"] is False  # random-init preset: full fine-tuning
    records = [json.loads(line) for line in (sft_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("train/loss" in r for r in records) == 3 and any("eval/loss" in r for r in records)
    assert (sft_dir / "checkpoints" / "step-00000003").is_dir()
    export = sft_dir / "export"
    assert (export / "config.json").is_file() and (export / "rlhf_fast_tokenizer.json").is_file()

    # RM on the SFT export: LoRA adapter `reward` + head by default (trained weights to adapt)
    assert main(["rm", *COMMON, "--model", str(export), "--lora-rank", "2", "--output-dir", str(rm_dir)]) == 0
    saved = json.loads((rm_dir / "config.json").read_text())
    assert saved["stage"] == "rm"
    assert saved["lora"] == {"enabled": True, "rank": 2, "alpha": 16.0, "dropout": 0.0}
    assert (rm_dir / "export" / "reward_head.safetensors").is_file()  # no pickle in an export (issue 31)
    assert "exported merged model" in capsys.readouterr().out

    # --resume on a finished run: nothing left to train, same final checkpoint
    assert main(["rm", *COMMON, "--model", str(export), "--lora-rank", "2", "--output-dir", str(rm_dir),
                 "--resume", "--no-export"]) == 0
    assert [p.name for p in (rm_dir / "checkpoints").iterdir()] == ["step-00000003"]


def test_bad_data_through_cli(tmp_path):
    data = tmp_path / "pairs.jsonl"
    good = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    data.write_text("\n".join([json.dumps(good)] * 12 + ["{broken"] + [json.dumps(good)] * 12) + "\n")
    args = ["sft", *COMMON, "--data", str(data), "--output-dir", str(tmp_path / "run"), "--no-export"]
    with pytest.raises(SystemExit, match="2"):
        main(args)
    with pytest.raises(BadExampleError, match=rf"^not valid JSON .*\({data}:13\)$"):
        main(["--debug", *args])
    assert main([*args, "--skip-bad-examples"]) == 0
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["event"]["skipped_bad_examples"] == 1 and first["event"]["train_examples"] == 16


def test_config_validation_and_files(tmp_path):
    with pytest.raises(ValueError, match=r"unknown setting optim.lrr; known in optim: betas, "):
        TrainConfig.from_dict({"optim": {"lrr": 1}})
    with pytest.raises(ValueError, match="unknown setting optimizer"):
        TrainConfig.from_dict({"optimizer": {}})
    with pytest.raises(ValueError, match="micro_batch_size"):
        TrainConfig.from_dict({"optim": {"micro_batch_size": 0}})
    with pytest.raises(ValueError, match="precision"):
        TrainConfig.from_dict({"run": {"precision": "fp8"}})
    with pytest.raises(ValueError, match="max_prompt_len"):
        TrainConfig.from_dict({"data": {"max_prompt_len": 64, "max_len": 64}})
    assert TrainConfig(stage="rm").run.output_dir == "runs/rm"
    bad = tmp_path / "c.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config_file(bad)
    with pytest.raises(ValueError, match="config file not found"):
        load_config_file(tmp_path / "missing.json")
    pytest.importorskip("yaml")
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr: 0.002\nmodel:\n  preset: demo\n")
    cfg = TrainConfig.from_dict(load_config_file(y))
    assert cfg.optim.lr == 0.002 and cfg.model.preset == "demo"


def test_console_reports_bad_data_in_one_line(tmp_path):
    """`rlhf-fast rm` on a malformed file: one line naming file and line, no traceback, nonzero exit."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "rm", *COMMON, "--data", str(data),
                           "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"rlhf-fast: error: missing field(s) ['rejected']; pass --skip-bad-examples to skip such lines ({data}:1)"]
