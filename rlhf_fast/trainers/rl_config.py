"""The configs of the RL commands: the `rl` section (the one RL loop's knobs) and PPO's and GRPO's configs.

`PPOConfig` and `GRPOConfig` are the same sections (model, lora, data, rl, optim, run, deepspeed; GRPO adds
`task`) with different defaults: PPO trains a critic (`gae`) from an SFT export against a reward-model
export; GRPO samples groups without a critic, scoring with a built-in verifiable task or a reward model.
The batch layout of an RL run is the rl section's (mini_batch_size rows per optimizer step, micro_batch_size
per forward); optim.max_steps is derived from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rlhf_fast.config import Config, option, section
from rlhf_fast.distributed import DeepSpeedSettings
from rlhf_fast.errors import ConfigError

from .config import DataSettings, LoRASettings, ModelSettings, OptimSettings, RunSettings, resolve_defaults

LOSS_AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum")  # as rl.loss_weights defines them
ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")
TASKS = ("arithmetic",)


@dataclass(frozen=True)
class RLSettings(Config):
    """The knobs of the RL loop shared by PPO, GRPO and the critic-free family (README: RL options).

    A rollout samples `group_size` responses for each of `rollout_batch_size` prompts; `epochs` passes
    of optimizer steps over `mini_batch_size` rows (forwards of `micro_batch_size` rows) follow.
    """

    iterations: int = option(40, "rollout + update iterations")
    rollout_batch_size: int = option(32, "prompts per rollout (rows = this * group size)")
    group_size: int = option(1, "responses sampled per prompt (grpo, dr_grpo, rloo need >= 2)")
    mini_batch_size: int = option(8, "rollout rows per optimizer step (a minibatch)")
    micro_batch_size: int | None = option(None, "rollout rows per forward pass (default: a minibatch)")
    epochs: int = option(2, "passes over each rollout's minibatches")
    max_new_tokens: int = option(48, "longest response, in tokens")
    temperature: float = option(1.0, "rollout sampling temperature; every log-prob is that of logits / temperature")
    top_k: int = option(0, "must stay 0 in RL: log-probs of a filtered distribution would bias the update")
    top_p: float = option(1.0, "must stay 1.0 in RL (see --top-k)")
    estimator: str = option("gae", "advantages: gae (critic), grpo, dr_grpo (no std division), rloo, reinforce_pp",
                            choices=ESTIMATORS)
    gamma: float = option(1.0, "discount (gae)")
    lam: float = option(0.95, "GAE lambda")
    whiten_advantages: bool = option(True, "gae: whiten the advantages over the batch's tokens")
    std_eps: float = option(1e-4, "grpo: (score - mean) / (std + STD_EPS)")
    clip_eps: float = option(0.2, "ratio clipping epsilon (lower side, and upper unless --clip-eps-high)")
    clip_eps_high: float | None = option(None, "DAPO clip-higher: the upper ratio clip, e.g. 0.28")
    loss_aggregation: str = option("token_mean", "token_mean (DAPO), seq_mean (GRPO paper), seq_sum (Dr. GRPO's "
                                   "constant normaliser)", choices=LOSS_AGGREGATIONS)
    value_clip_eps: float = option(0.2, "value clipping epsilon (gae)")
    vf_coef: float = option(0.5, "critic loss weight (gae)")
    init_kl_coef: float = option(0.05, "per-token KL penalty in the reward (PPO, REINFORCE++)")
    kl_target: float | None = option(None, "adaptive KL controller's target KL per sequence (Ziegler et al. 2019; "
                                     "default: a fixed coefficient)")
    kl_horizon: int | None = option(None, "adaptive KL controller's horizon, in samples (default: a tenth of the "
                                    "run's samples, so the coefficient can move up to e^+-2 over the run, as TRL's "
                                    "10,000 does over 100k episodes)")
    kl_estimator: str = option("k1", "estimator of the reward's KL penalty: k1, k2, k3")
    kl_loss_coef: float = option(0.0, "k3 KL to the reference as a loss term (GRPO; DeepSeekMath used 0.04)")
    dynamic_sampling: bool = option(False, "DAPO: drop groups whose scores are all equal and sample more prompts "
                                    "to refill the batch")
    max_sampling_rounds: int = option(4, "dynamic sampling: rollouts tried per iteration to fill the batch")
    overlong_buffer: int = option(0, "DAPO soft overlong penalty over the last N of --max-new-tokens (0: off)")
    overlong_penalty: float = option(1.0, "the overlong penalty's largest value (a truncated response)")
    mask_truncated: bool = option(False, "DAPO overlong filtering: no loss on responses cut at --max-new-tokens")
    offload_frozen: bool = option(False, "separate frozen models (reference, reward model) on the CPU between uses")
    eval_prompts: int = option(64, "held-out prompts scored at each evaluation")
    eval_samples: int = option(1, "sampled responses per held-out prompt at an evaluation (plus one greedy)")

    def __post_init__(self):
        from rlhf_fast.rl.kl import KL_ESTIMATORS

        for name in ("iterations", "rollout_batch_size", "group_size", "mini_batch_size", "epochs",
                     "max_new_tokens", "kl_horizon", "max_sampling_rounds", "eval_prompts", "eval_samples"):
            value = getattr(self, name)
            if name == "kl_horizon" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"must be an int >= 1, got {value!r}", name)
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= self.mini_batch_size:
            raise ConfigError(f"must lie in [1, mini_batch_size={self.mini_batch_size}], got {self.micro_batch_size}",
                              "micro_batch_size")
        if self.mini_batch_size > self.rows:
            raise ConfigError(f"{self.mini_batch_size} exceeds the rollout's {self.rows} rows "
                              "(rollout_batch_size * group_size)", "mini_batch_size")
        if self.temperature <= 0:
            raise ConfigError(f"must be > 0, got {self.temperature}", "temperature")
        if self.top_k != 0 or self.top_p != 1.0:
            raise ConfigError("top_k / top_p are not allowed for RL rollouts: the update would train on log-probs of "
                              "a different distribution than the one sampled (use temperature; top-k/top-p belong "
                              "to `rlhf-fast generate`)", "top_k")
        for name in ("clip_eps", "clip_eps_high", "kl_target"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"must be > 0, got {value}", name)
        for name in ("value_clip_eps", "vf_coef", "init_kl_coef", "kl_loss_coef", "overlong_penalty"):
            if getattr(self, name) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, name)}", name)
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"must be one of {sorted(KL_ESTIMATORS)}, got {self.kl_estimator!r}", "kl_estimator")
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ConfigError(f"must be one of {LOSS_AGGREGATIONS}, got {self.loss_aggregation!r}",
                              "loss_aggregation")
        if not 0 <= self.overlong_buffer < self.max_new_tokens:
            raise ConfigError(f"must lie in [0, max_new_tokens={self.max_new_tokens}), got {self.overlong_buffer}",
                              "overlong_buffer")
        if self.dynamic_sampling and self.group_size < 2:
            raise ConfigError("drops groups without score spread: it needs group_size >= 2", "dynamic_sampling")
        try:
            self.advantage_config()  # validates estimator / gamma / lam / group_size / std_eps
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(" ".join(str(e).split()), "estimator") from e

    @property
    def rows(self) -> int:
        return self.rollout_batch_size * self.group_size

    def kl_horizon_samples(self, world_size: int = 1) -> int:
        """--kl-horizon, else a tenth of the samples the run will draw (every rank's rows, each iteration)."""
        return self.kl_horizon or max(1, self.iterations * self.rows * world_size // 10)

    @property
    def micro_rows(self) -> int:
        return self.micro_batch_size or self.mini_batch_size

    @property
    def critic(self) -> bool:
        """Whether the estimator needs a critic (value model + value head)."""
        return self.estimator == "gae"

    def advantage_config(self, backend: str = "auto"):
        from rlhf_fast.rl import AdvantageConfig

        return AdvantageConfig(estimator=self.estimator, gamma=self.gamma, lam=self.lam, group_size=self.group_size,
                               whiten=self.whiten_advantages and self.estimator == "gae", std_eps=self.std_eps,
                               backend=backend)


@dataclass(frozen=True)
class TaskSettings(Config):
    """GRPO's built-in verifiable task (prompts and a reward function); unused with --reward-model."""

    task: str | None = option(None, "built-in verifiable task: arithmetic (default unless --reward-model)",
                              choices=TASKS)
    reward: str = option("arithmetic", "reward function of the task: arithmetic, arithmetic_format, "
                         "arithmetic_correct, sentiment, embedding-similarity:<file>, or weighted name=w,... specs")
    max_operand: int = option(9, "arithmetic operands lie in [0, MAX_OPERAND]")
    ops: str = option("+-", "arithmetic operators to draw from")
    cold_start_steps: int = option(0, "SFT warm-up steps on formatted task answers before GRPO (R1-style cold "
                                   "start; 0: none)")
    cold_start_lr: float = option(3e-3, "learning rate of the cold start")

    def __post_init__(self):
        from .reward_functions import check_reward_spec

        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {sorted(TASKS)}", "task")
        try:
            check_reward_spec(self.reward)  # also "embedding-similarity:<file>" and the like
        except ValueError as e:
            raise ConfigError(" ".join(str(e).split()), "reward") from e
        if self.cold_start_steps < 0:
            raise ConfigError(f"must be >= 0, got {self.cold_start_steps}", "cold_start_steps")
        if self.cold_start_lr <= 0:
            raise ConfigError(f"must be > 0, got {self.cold_start_lr}", "cold_start_lr")


def _rl_optim() -> OptimSettings:
    return OptimSettings(lr=1e-4, warmup_steps=0, schedule="constant")


def _rl_run() -> RunSettings:
    return RunSettings(log_every=1, eval_every=10, save_every=10)


@dataclass(frozen=True)
class RLConfig(Config):
    """What every RL command shares; PPOConfig and GRPOConfig set their own defaults."""

    # the batch layout is the rl section's; optim's is derived
    cli_hidden = ("optim.max_steps", "optim.micro_batch_size", "optim.grad_accum_steps")
    output_dir = "runs/rl"

    model: ModelSettings = section(ModelSettings)
    lora: LoRASettings = section(LoRASettings)
    data: DataSettings = section(DataSettings)
    rl: RLSettings = section(RLSettings)
    optim: OptimSettings = section(_rl_optim)
    run: RunSettings = section(_rl_run)
    deepspeed: DeepSpeedSettings = section(DeepSpeedSettings)  # with run.strategy=deepspeed

    def __post_init__(self):
        o = self.optim
        if (o.micro_batch_size, o.grad_accum_steps) != (8, 1):
            raise ConfigError("an RL run's batch layout is --mini-batch-size / --micro-batch-size (rows of the "
                              "rollout), not optim.micro_batch_size / grad_accum_steps", "optim.micro_batch_size")
        steps = self.rl.iterations * self.rl.epochs * -(-self.rl.rows // self.rl.mini_batch_size)
        object.__setattr__(self, "optim", dataclasses.replace(o, max_steps=steps))
        resolve_defaults(self, self.output_dir)


def _ppo_model() -> ModelSettings:
    return ModelSettings(preset=None)


def _ppo_rl() -> RLSettings:
    return RLSettings(eval_prompts=128)


@dataclass(frozen=True)
class PPOConfig(RLConfig):
    """`rlhf-fast ppo`: a LoRA (or full-parameter) policy from an SFT export (model.model), scored by a
    reward-model export (model.reward_model; `build_ppo_trainer` needs both; a PPOTrainer over built models
    reads neither); gae with a critic and a KL penalty in the reward by default."""

    cli_hidden = (*RLConfig.cli_hidden, "model.preset", "model.tokenizer")
    cli_flags = {"model.model": "--sft-model"}
    output_dir = "runs/ppo"

    model: ModelSettings = section(_ppo_model)
    lora: LoRASettings = section(lambda: LoRASettings(enabled=True))
    data: DataSettings = section(lambda: DataSettings(eval_size=128))
    rl: RLSettings = section(_ppo_rl)
    optim: OptimSettings = section(lambda: OptimSettings(lr=5e-4, warmup_steps=0, schedule="constant"))
    run: RunSettings = section(lambda: RunSettings(log_every=1, eval_every=0, save_every=0))

def _grpo_rl() -> RLSettings:
    return RLSettings(iterations=100, rollout_batch_size=8, group_size=8, mini_batch_size=8, epochs=1,
                      max_new_tokens=16, estimator="grpo", init_kl_coef=0.0, eval_samples=4)


@dataclass(frozen=True)
class GRPOConfig(RLConfig):
    """`rlhf-fast grpo`: G completions per prompt, group-relative advantages, no critic; the built-in arithmetic
    task with a reward function, or --reward-model with prompts from --data."""

    output_dir = "runs/grpo"

    rl: RLSettings = section(_grpo_rl)
    task: TaskSettings = section(TaskSettings)

    def __post_init__(self):
        self.model.require()
        t = self.task
        if t.task is None and self.model.reward_model is None:
            object.__setattr__(self, "task", dataclasses.replace(t, task="arithmetic"))
        elif t.task is not None and self.model.reward_model is not None:
            raise ConfigError("give a built-in --task or a --reward-model, not both", "task.task")
        rows, minibatch = self.rl.rows, self.rl.mini_batch_size
        if rows % minibatch:
            raise ConfigError(f"the rollout's {rows} rows (rollout_batch_size * group_size) must split into whole "
                              f"minibatches of {minibatch}", "rl.mini_batch_size")
        if self.task.cold_start_steps and self.task.task is None:
            raise ConfigError("needs a built-in task (it trains on the task's answers)", "task.cold_start_steps")
        super().__post_init__()
