"""Does every estimator / loss option learn? Short CPU runs of the shared RL loop, held-out reward before
and after, every option against the same starting policy in the same run.

  synthetic   SFT -> RM -> RL on the built-in synthetic preference task (tiny preset, byte tokenizer):
              PPO (gae + critic), RLOO, REINFORCE++, GRPO on PPO's models; reward = the RM's score
  arithmetic  the verifiable arithmetic task from a cold-started tiny policy: GRPO (token mean, sequence
              mean), Dr. GRPO, RLOO, REINFORCE++, DAPO (clip-higher + dynamic sampling + soft overlong
              penalty), GRPO + k3 KL; reward = format + correctness (max 1.5)

    python -m benchmarks.rl_algorithms                 # both tasks, a few minutes on 2 CPU cores
    python -m benchmarks.rl_algorithms --task arithmetic --iterations 30

Prints a table and writes rl_algorithms-cpu-<time>.json (.benchmarks/smoke/ unless --out-dir names a directory,
e.g. benchmarks/results to keep it).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from rlhf_fast.benchmarking.harness import environment, print_table, suite_parser, write_record
from rlhf_fast.config import from_flat
from rlhf_fast.data import ByteTokenizer, arithmetic_split, synthetic_prompts
from rlhf_fast.model import GPT
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
from rlhf_fast.trainers.grpo import GRPOConfig, GRPOTrainer
from rlhf_fast.trainers.ppo import PPOConfig, PPOTrainer, load_ppo_models, prompt_batches
from rlhf_fast.trainers.reward_functions import reward_function
from rlhf_fast.trainers.sft import cold_start

SYNTHETIC = {  # name -> rl settings of PPOConfig (rows per rollout: 32)
    "ppo (gae)": dict(estimator="gae"),
    "rloo": dict(estimator="rloo", group_size=4, rollout_batch_size=8),
    "reinforce_pp": dict(estimator="reinforce_pp"),
    "grpo": dict(estimator="grpo", group_size=4, rollout_batch_size=8, init_kl_coef=0.0, kl_loss_coef=0.02),
}
ARITHMETIC = {  # name -> rl settings of GRPOConfig (rows per rollout: 64)
    "grpo (token mean)": dict(),
    "grpo (seq mean)": dict(loss_aggregation="seq_mean"),
    "dr_grpo (seq sum)": dict(estimator="dr_grpo", loss_aggregation="seq_sum"),
    "rloo": dict(estimator="rloo"),
    "reinforce_pp": dict(estimator="reinforce_pp"),
    "dapo": dict(clip_eps_high=0.28, dynamic_sampling=True, max_new_tokens=16, overlong_buffer=4),
    "grpo + k3 kl": dict(kl_loss_coef=0.05),
}


def _stage(out, stage, steps, model=None) -> TrainConfig:
    return TrainConfig(stage=stage, model=ModelSettings(preset=None if model else "tiny", model=model,
                                                         attn_backend="sdpa"),
                       lora=LoRASettings(enabled=model is not None, rank=4),
                       data=DataSettings(eval_size=64, synthetic_size=1600),
                       optim=OptimSettings(lr=3e-3, max_steps=steps, warmup_steps=1, micro_batch_size=16),
                       run=RunSettings(output_dir=str(out), device="cpu", save_every=0, eval_every=0, progress=False))


def synthetic(root: Path, iterations: int, warm_steps: float = 1.0) -> list[dict]:
    sft = build_sft_trainer(_stage(root / "sft", "sft", max(1, round(100 * warm_steps))))
    sft.train()
    sft_dir = sft.export(root / "sft" / "export")
    rm = build_reward_trainer(_stage(root / "rm", "rm", max(1, round(60 * warm_steps)), model=str(sft_dir)))
    rm.train()
    rm_dir = rm.export(root / "rm" / "export")
    rows = []
    for name, overrides in SYNTHETIC.items():
        critic = overrides.get("estimator", "gae") == "gae"
        models, tok = load_ppo_models(sft_dir, rm_dir, lora_rank=4, attn_backend="sdpa", critic=critic)
        config = from_flat(PPOConfig, **{**dict(iterations=iterations, rollout_batch_size=32, mini_batch_size=16,
                                                max_new_tokens=40, lr=3e-3, init_kl_coef=0.02, device="cpu",
                                                output_dir=str(root / name), progress=False), **overrides})
        prompts = prompt_batches(synthetic_prompts(256, 0), tok, config.rl.rollout_batch_size, 48, 0)
        trainer = PPOTrainer(config, models, tok, prompts, [tok.encode(p) for p in synthetic_prompts(64, 99)])
        rows.append(_run("synthetic", name, trainer))
    return rows


def arithmetic(root: Path, iterations: int, warm_steps: float = 1.0) -> list[dict]:
    train, held_out = arithmetic_split(32, seed=0, max_operand=9)
    torch.manual_seed(0)
    warm = GPT.from_preset("tiny", attn_backend="sdpa")
    cold_start(warm, ByteTokenizer(), [p.to_sft() for p in train], steps=max(1, round(60 * warm_steps)), lr=3e-3,
               seed=0)
    rows = []
    for name, overrides in ARITHMETIC.items():
        model = GPT.from_preset("tiny", attn_backend="sdpa")
        model.load_state_dict(warm.state_dict())
        config = GRPOConfig.from_dict({  # full fine-tuning of the tiny policy (as tests/trainers/test_grpo.py)
            "model": {"preset": "tiny", "attn_backend": "sdpa"}, "lora": {"enabled": False},
            "rl": {"iterations": iterations, "max_new_tokens": 10, "eval_prompts": 32, "eval_samples": 4,
                   "mini_batch_size": 32, **overrides},
            "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
            "run": {"output_dir": str(root / name), "device": "cpu", "compile": False, "progress": False,
                    "eval_every": 0, "save_every": 0}})
        trainer = GRPOTrainer(config, model, ByteTokenizer(), [p.prompt for p in train],
                              [p.prompt for p in held_out], reward_function("arithmetic"))
        rows.append(_run("arithmetic", name, trainer))
    return rows


def _run(task: str, name: str, trainer) -> dict:
    before = trainer.evaluate()
    t0 = time.perf_counter()
    history = trainer.train()
    after = trainer.eval_history[-1]
    row = {"task": task, "option": name, "reward_before": before["reward"], "reward_after": after["reward"],
           "greedy_before": before["greedy_reward"], "greedy_after": after["greedy_reward"],
           "kl_after": after.get("kl"), "iterations": len(history), "seconds": time.perf_counter() - t0}
    print(f"{task:10s} {name:20s} reward {row['reward_before']:7.3f} -> {row['reward_after']:7.3f}   greedy "
          f"{row['greedy_before']:7.3f} -> {row['greedy_after']:7.3f}   {row['seconds']:6.1f} s", flush=True)
    return row


def main(argv=None) -> int:
    p = suite_parser(__doc__)
    p.add_argument("--task", choices=["synthetic", "arithmetic", "both"], default="both")
    p.add_argument("--iterations", type=int, default=None, help="RL iterations (default: 16 synthetic, 50 arithmetic;"
                   " --smoke 1)")
    args = p.parse_args(argv)
    warm_steps = 0.02 if args.smoke else 1.0  # --smoke: a step or two of SFT / RM / cold start
    if args.smoke:
        args.iterations = args.iterations or 1
    torch.set_num_threads(1)
    env = environment()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.task in ("arithmetic", "both"):
            rows += arithmetic(Path(tmp) / "arithmetic", args.iterations or 50, warm_steps)
        if args.task in ("synthetic", "both"):
            rows += synthetic(Path(tmp) / "synthetic", args.iterations or 16, warm_steps)
    print_table(rows, ["task", "option", "reward_before", "reward_after", "greedy_before", "greedy_after", "seconds"])
    config = {"task": args.task, "iterations": args.iterations, "smoke": args.smoke}
    path = write_record("rl_algorithms" + ("-smoke" if args.smoke else ""), rows, {"config": config},
                        out_dir=args.out_dir, env=env)
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
