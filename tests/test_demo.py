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
                "KL to reference", "sft / pairs / rm / ppo / total", "one frozen base for all roles            yes",
                "gold reward, SFT / PPO policy (sampled)", "gold win-rate, PPO vs SFT (greedy)",
                "RM win-rate, PPO vs SFT (sampled)", "reward-hacking alarm"):
        assert row in printed, row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["ppo_iterations"] == 2 and summary["reward_model_shares_base"]
    assert summary["sft_policy_kl"] == pytest.approx(0.0, abs=1e-4)  # evaluated before any PPO update
    assert summary["max_gen_logprob_gap"] < 1e-4
    _assert_gold_and_win_rate(summary, "ppo")
    assert (out / "ppo_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the gold-vs-KL curve: the SFT point (iteration 0, KL 0), then each PPO evaluation (here: both iterations)
    curve = summary["gold_vs_kl"]
    assert [p["iteration"] for p in curve] == [0, 1, 2] and curve[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert all(-2 <= p["gold"] <= 2 and -2 <= p["greedy_gold"] <= 2 for p in curve)
    assert curve[0]["gold"] == pytest.approx(summary["sft_policy_gold"])  # the same held-out samples
    assert (out / "gold_vs_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("sft", "rm", "ppo"):
        assert (out / stage / "metrics.jsonl").is_file(), stage
        assert (out / stage / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stage
        assert any((out / stage / "checkpoints").glob("step-*")), stage
        assert (out / stage / "export" / "config.json").is_file(), stage
    assert (out / "rm" / "export" / "reward_adapter.pt").is_file()
    pairs = [json.loads(line) for line in (out / "data" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == summary["pairs"] and all(p["chosen"] != p["rejected"] for p in pairs)
    assert (out / "data" / "demonstrations.jsonl").is_file()
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
                "held-out pairs: accuracy / margin", "sft / pairs / rm / dpo / total", "gold reward, SFT / DPO policy",
                "gold win-rate, DPO vs SFT (sampled)"):
        assert row in printed, row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algo"] == "dpo" and summary["sft_policy_kl"] == pytest.approx(0.0, abs=1e-4)
    # the DPO adapter moved the policy off the SFT reference (an unmoved one gives k1 = 0 on every token; a few
    # tiny steps can give a sampled estimate of either sign)
    assert abs(summary["dpo_policy_kl"]) > 1e-4
    _assert_gold_and_win_rate(summary, "dpo")
    assert (out / "dpo" / "export" / "config.json").is_file() and not (out / "ppo").exists()


def _assert_gold_and_win_rate(summary, algo):
    """The synthetic task's gold reward of both policies (in [-2, 2]), sampled and greedy, and the gold and RM
    win-rates with their intervals."""
    for key in ("sft_policy_gold", f"{algo}_policy_gold", "sft_policy_greedy_gold", f"{algo}_policy_greedy_gold"):
        assert -2.0 <= summary[key] <= 2.0, key
    for rate in ("win_rate", "gold_win_rate", "greedy_gold_win_rate", "greedy_win_rate"):
        low, high = summary[f"{algo}_vs_sft_{rate}_ci"]
        assert 0.0 <= low <= summary[f"{algo}_vs_sft_{rate}"] <= high <= 1.0, rate
    assert isinstance(summary["reward_hacking"], bool)
    assert summary["pairs"] > 0 and -2.0 <= summary["pair_samples_gold"] <= 2.0
