"""`rlhf-fast demo --quick`: the main job's whole pipeline (SFT -> RM -> PPO) at tiny sizes."""

import json

import pytest

from rlhf_fast.cli import main
from rlhf_fast.trainers.demo import DemoConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out), "--device", "cpu", "--no-progress",
                 "--ppo-iterations", "2"]) == 0
    printed = capsys.readouterr().out
    for row in ("SFT   eval loss", "RM    accuracy", "mean reward, SFT policy", "mean reward, PPO policy",
                "KL to reference", "sft / rm / ppo / total", "one frozen base for all roles        yes",
                "gold reward, SFT / PPO policy", "RM win-rate, PPO vs SFT (95% CI)"):
        assert row in printed, row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["ppo_iterations"] == 2 and summary["reward_model_shares_base"]
    assert summary["sft_policy_kl"] == pytest.approx(0.0, abs=1e-4)  # evaluated before any PPO update
    assert summary["max_gen_logprob_gap"] < 1e-4
    _assert_gold_and_win_rate(summary, "ppo")
    assert (out / "ppo_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("sft", "rm", "ppo"):
        assert (out / stage / "metrics.jsonl").is_file(), stage
        assert (out / stage / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stage
        assert any((out / stage / "checkpoints").glob("step-*")), stage
        assert (out / stage / "export" / "config.json").is_file(), stage
    assert (out / "rm" / "export" / "reward_adapter.pt").is_file()
    ppo_lines = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ppo_lines if "score" in r] == [1, 2]


def test_demo_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="ppo_iterations"):
        DemoConfig(ppo_iterations=0)
    assert DemoConfig.quick(seed=3).seed == 3 and DemoConfig.quick().preset == "tiny"


def test_demo_quick_dpo_branch(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--algo", "dpo", "--output-dir", str(out), "--device", "cpu", "--no-progress",
                 "--dpo-steps", "3"]) == 0
    printed = capsys.readouterr().out
    for row in ("mean reward, SFT policy", "mean reward, DPO policy", "KL to reference, DPO policy",
                "held-out pairs: accuracy / margin", "sft / rm / dpo / total", "gold reward, SFT / DPO policy"):
        assert row in printed, row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algo"] == "dpo" and summary["sft_policy_kl"] == pytest.approx(0.0, abs=1e-4)
    assert summary["dpo_policy_kl"] > 0  # the DPO adapter moved the policy away from the SFT reference
    _assert_gold_and_win_rate(summary, "dpo")
    assert (out / "dpo" / "export" / "config.json").is_file() and not (out / "ppo").exists()


def _assert_gold_and_win_rate(summary, algo):
    """The synthetic task's gold reward of both policies (in [-2, 2]) and the RM win-rate with its interval."""
    for key in ("sft_policy_gold", f"{algo}_policy_gold"):
        assert -2.0 <= summary[key] <= 2.0, key
    low, high = summary[f"{algo}_vs_sft_win_rate_ci"]
    assert 0.0 <= low <= summary[f"{algo}_vs_sft_win_rate"] <= high <= 1.0
