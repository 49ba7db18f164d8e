"""`rlhf-fast` on bad input, in-process through `cli.main`.

A user error (bad data line, config value or file, missing or corrupt checkpoint) exits 2 with exactly one stderr
line, `rlhf-fast: error: <what> (<where>)`, naming the place to fix (file:line, flag, config file, directory) and
no traceback; `--debug` before the subcommand lets the exception (a ValueError) propagate. Resuming: `--resume`
needs a checkpoint (`--resume-if-possible` starts fresh without one), a corrupt newest checkpoint is moved aside
and the previous one used, and metrics.jsonl holds each train step once after a resume. Also: HH records with an
empty chosen reply train, and `ppo --skip-bad-examples` skips a bad prompt line. Flag mistakes (a prefix, a typo,
an unknown command), config-file values of the wrong type, plan lengths past the model's context, data in no known
format, a --report-to sink that is not installed and --export-adapter without LoRA are one line too; checkpoint
files that need unpickling and bad serve limits: tests/test_cli_errors_safety.py.
"""

import importlib.util
import json
import shutil
import time

import pytest
import torch

from rlhf_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--attn-backend", "sdpa", "--device", "cpu", "--micro-batch-size", "4", "--eval-size", "8",
          "--synthetic-size", "32", "--no-progress"]
SFT = ["--preset", "tiny", *COMMON]
# the tiny SFT run (module fixture) and its resumes: checkpoints at steps 2 and 4, every step in metrics.jsonl
RUN4 = [*SFT, "--max-steps", "4", "--save-every", "2", "--keep-last", "3", "--log-every", "1"]


def hh(prompt: str, chosen: str, rejected: str) -> str:
    head = f"\n\nHuman: {prompt}\n\nAssistant:"
    return json.dumps({"chosen": head + chosen, "rejected": head + rejected})


GOOD_HH = [hh(f"what is {i} plus {i}?", f" It is {2 * i}. Thanks!", " go away") for i in range(24)]
PROMPTS = [json.dumps({"prompt": f"\n\nHuman: tell me about {w}\n\nAssistant:"})
           for w in ("cats", "dogs", "tea", "rain", "maps", "jazz", "bread", "ships", "trees")]
BAD_LINE = '{"prompt": oops'


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_user_error(capsys, argv, *names) -> str:
    """`main(argv)` exits 2 with one stderr line `rlhf-fast: error: ...` naming each of `names`, no traceback;
    with --debug first, the ValueError itself propagates. Returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, (exit_info.value.code, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("rlhf-fast: error: "), lines[0]
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
    with pytest.raises(ValueError):
        main(["--debug", *argv])
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny SFT run (checkpoints at steps 2 and 4, export) and a tiny RM run on its export."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("runs")
        sft, rm = root / "sft", root / "rm"
        assert main(["sft", *RUN4, "--output-dir", str(sft)]) == 0
        assert main(["rm", *COMMON, "--model", str(sft / "export"), "--lora-rank", "2", "--max-steps", "2",
                     "--output-dir", str(rm)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert {"step-00000002", "step-00000004"} <= {p.name for p in (sft / "checkpoints").iterdir()}
    return {"sft": sft, "sft_export": sft / "export", "rm_export": rm / "export"}


@pytest.fixture
def files(tmp_path):
    good = GOOD_HH
    return {
        "bad_hh": write(tmp_path / "bad.jsonl", good[:12] + ['{"chosen": "\\n\\nHuman: hi", broken'] + good[12:]),
        "unknown_cfg": write(tmp_path / "unknown.json", [json.dumps({"optim": {"lrr": 0.01}})]),
        "invalid_cfg": write(tmp_path / "invalid.json", ['{"optim": {"lr": 0.01,}']),
        "bad_prompts": write(tmp_path / "prompts.jsonl", PROMPTS[:4] + [BAD_LINE] + PROMPTS[4:]),
        "bad_first_prompt": write(tmp_path / "first.jsonl", [BAD_LINE, *PROMPTS]),
        # chosen reply empty: the dialogue ends with "\n\nAssistant:"
        "empty_chosen": write(tmp_path / "empty_chosen.jsonl", good[:10] + [hh("say nothing", "", " no")] * 3
                              + good[10:]),
    }


def ppo_args(runs, out) -> list[str]:
    return ["ppo", "--sft-model", str(runs["sft_export"]), "--reward-model", str(runs["rm_export"]),
            "--iterations", "1", "--rollout-batch-size", "2", "--mini-batch-size", "2", "--max-new-tokens", "4",
            "--eval-size", "2", "--device", "cpu", "--attn-backend", "sdpa", "--no-progress", "--output-dir", str(out)]


# --- user errors: one line, the place named, exit 2 --------------------------------------------------------

def test_sft_bad_data_line(tmp_path, files, capsys):
    assert_user_error(capsys, ["sft", *SFT, "--max-steps", "1", "--data", str(files["bad_hh"]),
                               "--output-dir", str(tmp_path / "run")], "bad.jsonl:13")


def test_rm_bad_data_line(tmp_path, files, runs, capsys):
    assert_user_error(capsys, ["rm", *COMMON, "--model", str(runs["sft_export"]), "--max-steps", "1",
                               "--data", str(files["bad_hh"]), "--output-dir", str(tmp_path / "run")],
                      "bad.jsonl:13")


def test_sft_bad_config_value_names_the_flag(tmp_path, capsys):
    assert_user_error(capsys, ["sft", *SFT, "--lr", "-1", "--output-dir", str(tmp_path / "run")], "--lr")


@pytest.mark.parametrize("which, names", [("unknown_cfg", ("unknown.json", "lrr")),
                                          ("invalid_cfg", ("invalid.json",))])
def test_sft_bad_config_file_names_the_file(tmp_path, files, capsys, which, names):
    assert_user_error(capsys, ["sft", *SFT, "--config", str(files[which]), "--output-dir", str(tmp_path / "run")],
                      *names)


def test_grpo_bad_config_value_names_the_flag(tmp_path, capsys):
    assert_user_error(capsys, ["grpo", "--preset", "tiny", "--device", "cpu", "--iterations", "1",
                               "--rollout-batch-size", "2", "--max-new-tokens", "4", "--no-progress",
                               "--group-size", "0", "--output-dir", str(tmp_path / "run")], "--group-size")


def test_ppo_bad_config_value_names_the_flag(tmp_path, runs, capsys):
    assert_user_error(capsys, [*ppo_args(runs, tmp_path / "run"), "--rollout-batch-size", "0"],
                      "--rollout-batch-size")


@pytest.mark.parametrize("which, place", [("bad_prompts", "prompts.jsonl:5"), ("bad_first_prompt", "first.jsonl:1")])
def test_ppo_bad_prompt_line(tmp_path, files, runs, capsys, which, place):
    assert_user_error(capsys, [*ppo_args(runs, tmp_path / "run"), "--data", str(files[which])], place)


def test_ppo_skip_bad_examples(tmp_path, files, runs):
    out = tmp_path / "run"
    assert main([*ppo_args(runs, out), "--data", str(files["bad_prompts"]), "--skip-bad-examples"]) == 0
    assert (out / "export").is_dir()


# --- resume --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exists", [True, False], ids=["empty-dir", "new-dir"])
def test_resume_without_checkpoint(tmp_path, capsys, exists):
    out = tmp_path / "run"
    if exists:
        out.mkdir()
    argv = ["sft", *SFT, "--max-steps", "2", "--no-export", "--output-dir", str(out)]
    assert_user_error(capsys, [*argv, "--resume"], out, "--resume-if-possible")
    assert main([*argv, "--resume-if-possible"]) == 0  # starts fresh
    assert (out / "checkpoints" / "step-00000002").is_dir()


def train_records(run_dir, since: float = 0.0) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if "train/loss" in r and r["time"] >= since]


@pytest.mark.parametrize("corruption", ["truncated-weights", "empty-optim", "garbage-state"])
def test_corrupt_newest_checkpoint_moved_aside(tmp_path, runs, capsys, caplog, corruption):
    run = shutil.copytree(runs["sft"], tmp_path / "run")
    newest = run / "checkpoints" / "step-00000004"
    if corruption == "truncated-weights":
        (newest / "weights.pt").write_bytes((newest / "weights.pt").read_bytes()[:100])
    elif corruption == "empty-optim":
        (newest / "optim.pt").write_bytes(b"")
    else:
        (newest / "trainer_state.json").write_text("{garbage")
    capsys.readouterr()
    started = time.time() - 0.01
    assert main(["sft", *RUN4, "--no-export", "--output-dir", str(run), "--resume"]) == 0
    captured = capsys.readouterr()
    aside = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("corrupt-")]
    assert any("step-00000004" in name for name in aside), sorted(p.name for p in (run / "checkpoints").iterdir())
    # resumed from the intact step-2 checkpoint: this run trained steps 3 and 4 only
    assert [r["step"] for r in train_records(run, since=started)] == [3, 4]
    warned = [line for line in captured.err.splitlines() if "step-00000004" in line]
    warned += [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "step-00000004" in r.getMessage()]
    assert warned, f"no warning naming the corrupt checkpoint; stderr:\n{captured.err}"


def test_metrics_hold_each_step_once_after_resume(tmp_path, runs):
    run = shutil.copytree(runs["sft"], tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step-00000004")  # as if the run died after logging steps 3 and 4
    assert main(["sft", *RUN4, "--no-export", "--output-dir", str(run), "--resume"]) == 0
    steps = [r["step"] for r in train_records(run)]
    assert sorted(steps) == [1, 2, 3, 4], steps


# --- valid input that used to be refused ------------------------------------------------------------------

def test_hh_records_with_empty_chosen_reply_train(tmp_path, files, runs):
    data = str(files["empty_chosen"])
    assert main(["sft", *SFT, "--max-steps", "5", "--no-export", "--data", data,
                 "--output-dir", str(tmp_path / "sft")]) == 0
    assert main(["rm", *COMMON, "--model", str(runs["sft_export"]), "--lora-rank", "2", "--max-steps", "5",
                 "--no-export", "--data", data, "--output-dir", str(tmp_path / "rm")]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("argv", [
    ["sft", "--preset", "tiny", "--device", "cuda"],
    ["ppo", "--device", "cuda:1"],
    ["demo", "--quick", "--device", "cuda"],
    ["generate", "--model", "tiny", "--prompt", "hi", "--device", "cuda"],
    ["serve", "--model", "tiny", "--device", "cuda"],
    ["eval", "--policies", "runs/x", "--device", "cuda"],
    ["bench", "--device", "cuda"],
    ["grpo", "--device", "tpu"],
    ["chat", "--model", "tiny", "--device", "tpu"],
])
def test_a_device_this_machine_lacks_is_one_line_naming_the_flag(capsys, argv):
    # was a traceback ("Torch not compiled with CUDA enabled") from deep in the memory plan or a .to(device)
    line = assert_user_error(capsys, argv, repr(argv[-1]), "(--device)")
    assert ("no usable CUDA device" if argv[-1].startswith("cuda") else "is not a device") in line


@pytest.fixture(scope="module")
def corrupt_export(tmp_path_factory):
    from rlhf_fast.model import GPT

    d = tmp_path_factory.mktemp("corrupt")
    GPT.from_preset("tiny").save_pretrained(d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])  # a copy cut short
    return d


@pytest.mark.parametrize("command", ["generate", "sft", "dpo", "ppo", "chat"])
def test_corrupt_weights_are_one_line_naming_the_file(capsys, tmp_path, corrupt_export, command):
    # was a SafetensorError traceback in generate, sft, dpo and ppo
    model = str(corrupt_export)
    argv = {"generate": ["generate", "--model", model, "--prompt", "hi", "--tokenizer", "byte"],
            "sft": ["sft", "--model", model, "--tokenizer", "byte", "--output-dir", str(tmp_path)],
            "dpo": ["dpo", "--model", model, "--tokenizer", "byte", "--output-dir", str(tmp_path)],
            "ppo": ["ppo", "--sft-model", model, "--reward-model", model, "--output-dir", str(tmp_path)],
            "chat": ["chat", "--model", model]}[command]
    line = assert_user_error(capsys, argv, corrupt_export / "model.safetensors")
    assert "corrupt or truncated weights" in line or "could not load the model" in line


def test_a_new_run_in_a_used_output_dir_is_refused_or_replaced_never_mixed(capsys, tmp_path):
    run = [*SFT, "--max-steps", "1", "--output-dir", str(tmp_path)]
    assert main(["sft", *run]) == 0
    before = (tmp_path / "metrics.jsonl").read_text()
    line = assert_user_error(capsys, ["sft", *run], tmp_path, "holds an earlier run", "--resume", "(--output-dir)")
    assert "--overwrite" in line and (tmp_path / "metrics.jsonl").read_text() == before  # nothing touched
    assert_user_error(capsys, ["sft", *run, "--overwrite", "--resume"], "--overwrite")
    (tmp_path / "notes.txt").write_text("mine")  # not a run's file: --overwrite refuses rather than delete it
    assert_user_error(capsys, ["sft", *run, "--overwrite"], "notes.txt", "(--output-dir)")
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "checkpoints" / "step-00000001" / "stale").write_text("x")
    assert main(["sft", *run, "--overwrite"]) == 0  # starts clean: the old checkpoints are gone
    assert not (tmp_path / "checkpoints" / "step-00000001" / "stale").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]


@pytest.mark.parametrize("argv, names", [
    (["sft", "--max-step", "3"], ["--max-step", "did you mean --max-steps?", "rlhf-fast sft --help"]),  # no prefixes
    (["sft", "--lr", "fast"], ["--lr", "invalid float value"]),
    (["grpo", "--precision", "fp8"], ["--precision", "invalid choice"]),
    (["trian"], ["unknown command 'trian'", "sft"]),
])
def test_flag_mistakes_are_one_line_not_the_whole_usage(user_error, argv, names):
    line = user_error(argv)
    for name in names:
        assert name in line, line
    assert "usage:" not in line


@pytest.mark.parametrize("setting, flag, message", [
    ({"optim": {"lr": "fast"}}, "--lr", "must be a number, got 'fast'"),
    ({"optim": {"max_steps": 2.5}}, "--max-steps", "must be an integer"),
    ({"run": {"resume": "yes"}}, "--resume", "must be true or false"),
    ({"optim": {"betas": [0.9, "x"]}}, "--betas", "must be a number"),
    ({"data": {"data": 3}}, "--data", "must be a string"),
])
def test_config_file_values_of_the_wrong_type_name_the_setting(user_error, tmp_path, setting, flag, message):
    line = user_error(["sft", "--config", str(write(tmp_path / "c.json", [json.dumps(setting)]))])
    assert message in line and line.endswith(f"({flag})"), line


def test_config_values_keep_their_declared_types():
    from rlhf_fast.trainers import TrainConfig

    config = TrainConfig.from_dict({"optim": {"lr": 1, "max_steps": 10.0, "betas": [0.8, 0.9]}})
    assert (type(config.optim.lr), type(config.optim.max_steps), config.optim.betas) == (float, int, (0.8, 0.9))


def test_plan_lengths_past_the_models_context_name_their_flags(user_error, tmp_path):
    from rlhf_fast.model import GPT

    GPT.from_preset("tiny").save_pretrained(tmp_path / "export")
    n_positions = GPT.from_preset("tiny").config.n_positions
    line = user_error(["plan", "--model", str(tmp_path / "export")])  # the default 256 + 128 tokens
    assert f"n_positions={n_positions}" in line and "--prompt-len" in line and "--response-len" in line, line
    assert main(["plan", "--model", str(tmp_path / "export"), "--prompt-len", "16", "--response-len", "8"]) == 0


# --- data formats, --report-to, --export-adapter ---------------------------------------------------------------
FORMATS_FAST = ["--preset", "tiny", "--attn-backend", "sdpa", "--device", "cpu", "--max-steps", "2",
                "--micro-batch-size", "2", "--eval-size", "2", "--max-prompt-len", "16", "--max-len", "40",
                "--no-progress"]


def _jsonl_file(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _without(*names):
    """importlib.util.find_spec as on a machine without `names` installed."""
    real = importlib.util.find_spec
    return lambda name, *a, **k: None if name in names else real(name, *a, **k)


def test_wrong_or_unknown_formats_are_one_line_errors(tmp_path, user_error):
    prompts = _jsonl_file(tmp_path / "prompts.jsonl", [{"prompt": "q"}] * 4)
    line = user_error(["sft", *FORMATS_FAST, "--data", prompts, "--output-dir", str(tmp_path / "a")])
    assert "prompt-only records ({\"prompt\"}) are not SFT data" in line and line.endswith(f"({prompts}:1)")
    odd = _jsonl_file(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}] * 4)
    line = user_error(["sft", *FORMATS_FAST, "--data", odd, "--output-dir", str(tmp_path / "b")])
    assert "no known dataset format (keys: answer, question)" in line and '{"prompt", "completion"}' in line
    assert line.endswith(f"({odd}:1)")


def test_cli_names_report_to_when_its_package_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", _without("tensorboard"))
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", *SFT, "--max-steps", "2", "--output-dir", str(tmp_path / "run"), "--report-to", "tensorboard"])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert "pip install tensorboard" in err[0] and err[0].endswith("(--report-to)"), err[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_export_adapter_without_lora_is_one_line(tmp_path, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", *SFT, "--max-steps", "1", "--export-adapter", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "--export-adapter" in err and "LoRA" in err

