"""What the training commands of `rlhf-fast` run, from their configs: sft / rm / dpo, grpo, ppo and the demo."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from rlhf_fast.config import Config, option, resolve_device
from rlhf_fast.errors import ConfigError

from .checkpoint import claim_run_dir
from .config import TrainConfig
from .rl_config import GRPOConfig, PPOConfig


def train_command(config: TrainConfig) -> int:
    from .dpo import build_dpo_trainer
    from .reward import build_reward_trainer
    from .sft import build_sft_trainer

    builders = {"sft": build_sft_trainer, "rm": build_reward_trainer, "dpo": build_dpo_trainer}
    claim_run_dir(config.run)
    trainer = builders[config.stage](config)
    trainer.train()
    if config.run.export:
        with trainer.strategy.gathered(trainer.module.parameters()):  # full weights under ZeRO-3
            if trainer.strategy.is_main:
                print(f"exported merged model to {trainer.export(trainer.run_dir / 'export')}")
    return 0


def grpo_command(config: GRPOConfig) -> int:
    from .grpo import build_grpo_trainer

    claim_run_dir(config.run)
    trainer = build_grpo_trainer(config)
    before = trainer.evaluate() if trainer.iteration == 0 and not config.run.resuming else None
    trainer.train()
    after = trainer.eval_history[-1] if trainer.eval_history else trainer.evaluate()
    if before is not None:
        print(f"held-out reward: {before['reward']:.3f} -> {after['reward']:.3f} (sampled), "
              f"{before['greedy_reward']:.3f} -> {after['greedy_reward']:.3f} (greedy)")
    else:
        print(f"held-out reward: {after['reward']:.3f} (sampled), {after['greedy_reward']:.3f} (greedy)")
    if config.run.export and trainer.strategy.is_main:
        print(f"exported merged model to {trainer.export(trainer.run_dir / 'export')}")
    return 0


def ppo_command(config: PPOConfig) -> int:
    from .ppo import build_ppo_trainer

    claim_run_dir(config.run)
    trainer = build_ppo_trainer(config)
    trainer.train()
    if config.run.export and trainer.strategy.is_main:
        print(f"exported PPO policy to {trainer.export(trainer.run_dir / 'export')}")
    return 0


@dataclass(frozen=True)
class DemoCommand(Config):
    """`rlhf-fast demo`: the synthetic task's SFT -> RM -> PPO (or DPO), or the sentiment task's SFT -> GRPO."""

    task: str = option("synthetic", "synthetic: the built-in preference task, byte tokenizer; sentiment: SFT on "
                       "HH-RLHF dialogues with the GPT-2 tokenizer, then GRPO toward positive sentiment (VADER)",
                       choices=("synthetic", "sentiment"))
    algo: str = option("ppo", "the alignment stage after SFT and the RM: ppo, or dpo (the RM then only judges)",
                       choices=("ppo", "dpo"))
    output_dir: str | None = option(None, "run directory (default: runs/demo; --task sentiment: "
                                    "runs/demo-sentiment)")
    device: str | None = option(None, "cpu, cuda, ... (default: cuda when available)")
    seed: int = option(0, "seed of every stage")
    data: str | None = option(None, "--task sentiment: an HH-RLHF .jsonl(.gz) file or directory (default: "
                              "../shared/data/hh-rlhf)")
    sft_steps: int | None = option(None, "SFT optimizer steps (default: 400; sentiment 250)")
    rm_steps: int | None = option(None, "reward-model optimizer steps (default: 200)")
    ppo_iterations: int | None = option(None, "PPO iterations (default: 40)")
    dpo_steps: int | None = option(None, "--algo dpo: DPO optimizer steps (default: 200)")
    rl_iterations: int | None = option(None, "--task sentiment: GRPO iterations (default: 24)")
    quick: bool = option(False, "tiny model and step counts: a smoke test in seconds")
    progress: bool = option(True, "progress bars")

    def __post_init__(self):
        resolve_device(self.device)
        sentiment = self.task == "sentiment"
        for key in ("rm_steps", "ppo_iterations", "dpo_steps", "algo", "data", "rl_iterations"):
            synthetic_only = key in ("rm_steps", "ppo_iterations", "dpo_steps", "algo")
            value = getattr(self, key)
            if (value is not None and value != "ppo") and synthetic_only == sentiment:
                raise ConfigError(f"applies to --task {'synthetic' if synthetic_only else 'sentiment'}", key)


def demo_command(cmd: DemoCommand) -> int:
    quiet = logging.getLogger("rlhf_fast")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # no progress lines of the stages: the summary says it all
    try:
        return _demo(cmd)
    finally:
        quiet.setLevel(level)


def _demo(cmd: DemoCommand) -> int:
    sizes = {k: getattr(cmd, k) for k in ("sft_steps", "rm_steps", "ppo_iterations", "dpo_steps", "rl_iterations",
                                          "data") if getattr(cmd, k) is not None}
    common = dict(device=cmd.device, seed=cmd.seed, progress=cmd.progress, **sizes)
    if cmd.task == "sentiment":
        from .sentiment_task import SentimentTaskConfig, format_sentiment_summary, run_sentiment_task

        make = SentimentTaskConfig.quick if cmd.quick else SentimentTaskConfig
        config = make(output_dir=cmd.output_dir or "runs/demo-sentiment", **common)
        print(format_sentiment_summary(run_sentiment_task(config)))
        print(f"\nrun directory: {config.output_dir} (summary.json; sft/export; rl/ with config, metrics.jsonl, "
              "checkpoints and export)")
        return 0
    from .demo import DemoConfig, format_summary, run_demo

    config = (DemoConfig.quick if cmd.quick else DemoConfig)(output_dir=cmd.output_dir or "runs/demo", algo=cmd.algo,
                                                             **common)
    print(format_summary(run_demo(config)))
    extra = "ppo_curves.png, sft/ rm/ ppo/" if config.algo == "ppo" else "sft/ rm/ dpo/"
    print(f"\nrun directory: {config.output_dir} (summary.json, {extra} with checkpoints, metrics.jsonl and exports)")
    return 0
