"""`rlhf-fast eval` on tiny exports: the files and their fields; bad exports give one line and exit 2."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from rlhf_fast.cli import main
from rlhf_fast.data import load_tokenizer
from rlhf_fast.evaluation import EvalConfig, run_eval
from rlhf_fast.model import GPT, RewardHead
from rlhf_fast.trainers.builders import export_model
from rlhf_fast.trainers.reward import REWARD_HEAD_FILE

SMALL = ["--num-prompts", "5", "--samples", "2", "--max-new-tokens", "10", "--batch-size", "3", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two tiny policies (an export dir and a run dir holding export/) and a tiny reward model."""
    root, tok = tmp_path_factory.mktemp("exports"), load_tokenizer("byte")
    for seed, stage in enumerate(("sft", "ppo", "rm")):
        torch.manual_seed(seed)
        model = GPT.from_preset("tiny")
        out = export_model(model, tok, root / stage / "export", merge_adapter=None)
        if stage == "rm":
            torch.save(RewardHead(model.config.n_embd).state_dict(), out / REWARD_HEAD_FILE)
    # a run directory holds the run's own config.json beside export/: eval must not take it for the model's
    (root / "ppo" / "config.json").write_text(json.dumps({"model": {"preset": "tiny"}, "run": {"seed": 0}}))
    return root


def test_eval_writes_json_table_plot_and_samples(exports, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--policies", str(exports / "sft" / "export"), str(exports / "ppo"), "--reward-model",
            str(exports / "rm" / "export"), "--output-dir", str(out), *SMALL]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| policy | RM score |" in printed and "win-rates over sft" in printed and "eval.png" in printed
    result = json.loads((out / "eval.json").read_text())
    assert result["task"] == "synthetic" and result["prompts"] == 5 and result["samples"] == 2
    assert [p["name"] for p in result["policies"]] == ["sft", "ppo"]
    for p in result["policies"]:
        for key in ("reward", "greedy_reward", "gold", "greedy_gold", "kl", "length", "truncated_frac",
                    "distinct_1", "distinct_2", "repetition"):
            assert isinstance(p[key], float), key
        assert -2.0 <= p["gold"] <= 2.0 and 0 < p["length"] <= 10
    assert result["policies"][0]["kl"] == 0.0  # the first policy is the reference
    judges = {(w["policy"], w["baseline"], w["judge"], w["responses"]): w for w in result["win_rates"]}
    assert set(judges) == {(a, b, j, r) for a, b in (("sft", "ppo"), ("ppo", "sft")) for j in ("reward_model", "gold")
                           for r in ("sampled", "greedy")}
    for responses in ("sampled", "greedy"):
        rm = judges["ppo", "sft", "reward_model", responses]
        assert 0.0 <= rm["low"] <= rm["rate"] <= rm["high"] <= 1.0 and rm["n"] == 5
        assert rm["rate"] == pytest.approx(1.0 - judges["sft", "ppo", "reward_model", responses]["rate"])
    assert isinstance(result["alarms"], list)
    table = (out / "eval.md").read_text()
    assert "| sft |" in table and "| ppo |" in table and "win-rates over sft [95% CI]" in table
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (out / "samples.md").read_text()
    assert samples.count("## Prompt") == 5 and "| | sft | ppo |" in samples and "| sample 2 |" in samples
    assert "Human:" in samples and "(rm " in samples and "gold " in samples


def test_eval_without_reward_model_on_arithmetic(exports, tmp_path):
    """No RM: no score or RM win-rate (n/a in the table); the gold reward is the exact answer."""
    cfg = EvalConfig(policies=(str(exports / "sft"), str(exports / "ppo")), names=("a", "b"), task="arithmetic",
                     reference=str(exports / "ppo"), num_prompts=4, samples=1, batch_size=4, device="cpu",
                     output_dir=str(tmp_path))
    result = run_eval(cfg)
    assert result["max_new_tokens"] == 16 and result["reward_model"] is None
    a, b = result["policies"]
    assert a["reward"] is None and a["gold"] in (0.0, 0.25, 0.5, 0.75, 1.0) and b["kl"] == 0.0
    assert {w["judge"] for w in result["win_rates"]} == {"gold"}
    assert "| b | n/a | n/a |" in (tmp_path / "eval.md").read_text()  # no RM win-rates


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("rlhf-fast: error: ")
    return lines[0]


def test_missing_policy_dir_is_one_line_and_exit_2(exports, tmp_path, user_error):
    missing = tmp_path / "no-such-run"
    line = user_error(["eval", "--policies", str(exports / "sft"), str(missing), "--output-dir", str(tmp_path), *SMALL])
    assert str(missing) in line and "no such directory" in line
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("damage", ["config_not_json", "no_weights", "corrupt_weights", "no_export"])
def test_corrupt_export_is_one_line_and_exit_2(exports, tmp_path, user_error, damage):
    bad = tmp_path / "bad"
    shutil.copytree(exports / "ppo" / "export", bad)
    if damage == "config_not_json":
        (bad / "config.json").write_text('{"model_type": "gpt2", ')
    elif damage == "no_weights":
        (bad / "model.safetensors").unlink()
    elif damage == "corrupt_weights":
        (bad / "model.safetensors").write_bytes(b"\x00garbage" * 8)
    else:
        (bad / "config.json").unlink()
    line = user_error(["eval", "--policies", str(exports / "sft"), str(bad), "--output-dir", str(tmp_path / "o"),
                       *SMALL])
    assert str(bad) in line, line


def test_bad_reward_model_and_names_are_one_line(exports, tmp_path, user_error):
    policies = ["--policies", str(exports / "sft"), str(exports / "ppo")]
    line = user_error(["eval", *policies, "--reward-model", str(exports / "sft"), *SMALL])
    assert str(exports / "sft" / "export") in line  # no reward head: not an RM export
    assert "--names" in user_error(["eval", *policies, "--names", "only-one", *SMALL])


def test_console_script_exits_2_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "eval", "--policies", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == f"rlhf-fast: error: {tmp_path / 'nope'}: no such directory (--policies)"


def test_prompt_file_bad_lines_are_named_or_skipped(tmp_path):
    from rlhf_fast.evaluation.evaluate import eval_prompts

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a"}) + "\n{bad\n" + "".join(json.dumps({"prompt": f"q{i}"}) + "\n"
                                                                 for i in range(5)))
    with pytest.raises(ValueError, match=r"p.jsonl:2\)$"):
        eval_prompts(EvalConfig(policies=("x",), prompts=str(f), num_prompts=2))
    config = EvalConfig(policies=("x",), prompts=str(f), num_prompts=2, skip_bad_examples=True)
    assert eval_prompts(config) == ["q3", "q4"]


def test_samples_table_cells_hold_every_line_break():
    from rlhf_fast.evaluation.evaluate import _cell

    cell = _cell("a\rb\r\nc\nd\u2028e|f`g")
    assert cell == "`a⏎b⏎c⏎d⏎e\\|f'g`" and len(cell.splitlines()) == 1
    assert _cell("") == "*(empty)*"
