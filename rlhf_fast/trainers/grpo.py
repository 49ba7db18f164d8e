"""GRPO (Shao et al. 2024, DeepSeekMath) and its variants on the shared RL loop: G sampled completions per
prompt, group-relative advantages, no critic, clipped-ratio updates, optional k3 KL to the reference.

What is GRPO-specific lives here: its defaults (`GRPOSettings`: estimator `grpo`, no KL in the reward),
where prompts and scores come from (`TaskSettings`: the built-in verifiable arithmetic task with a
registered reward function, or an `rlhf-fast rm` export), and the R1-style cold start (`sft.cold_start`)
before the first rollout. Dr. GRPO is `estimator="dr_grpo", loss_aggregation="seq_sum"`; DAPO adds
`clip_eps_high`, `dynamic_sampling`, `overlong_buffer` / `mask_truncated` (README: RL options).

The loss is a token mean over the minibatch by default (DAPO's token-level loss); `loss_aggregation=
"seq_mean"` gives DeepSeekMath's mean of per-sequence means.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlhf_fast.data import PromptCollator, PromptDataset, ResumableBatches
from rlhf_fast.distributed import DeepSpeedSettings, Strategy
from rlhf_fast.model import GPT, set_adapter
from rlhf_fast.model.lora import adapter_names

from .common import build_model, lr_lambda
from .config import DataSettings, LoRASettings, ModelSettings, OptimSettings, RLSettings, RunSettings
from .metrics import log
from .models import POLICY, PPOModels
from .reward_functions import as_scorer, check_reward_spec, load_reward_model_scorer, reward_function
from .rl_loop import LoopSettings, RLTrainer, build_rl_strategy
from .sft import cold_start

TASKS = ("arithmetic",)
COLD_START_FILE = "cold_start.pt"


@dataclass(frozen=True)
class GRPOSettings(RLSettings):
    """RLSettings with GRPO's defaults, plus the held-out evaluation's size."""

    iterations: int = 100
    rollout_batch_size: int = 8  # prompts per rollout; rows = rollout_batch_size * group_size
    group_size: int = 8
    mini_batch_size: int = 8
    epochs: int = 1  # 1 keeps it on-policy (the ratio starts at exactly 1)
    max_new_tokens: int = 16  # the arithmetic answers are <= 11 bytes + EOS
    estimator: str = "grpo"
    init_kl_coef: float = 0.0  # no KL in the reward: GRPO puts it in the loss (kl_loss_coef)
    eval_prompts: int = 64  # held-out prompts scored at each evaluation
    eval_samples: int = 4  # sampled completions per held-out prompt (plus one greedy)

    def __post_init__(self):
        super().__post_init__()
        if min(self.eval_prompts, self.eval_samples) < 1:
            raise ValueError("grpo.eval_prompts and grpo.eval_samples must be >= 1")


@dataclass(frozen=True)
class TaskSettings:
    """Where prompts and rewards come from: the built-in verifiable task, or a reward model."""

    task: str | None = "arithmetic"  # built-in verifiable task (rlhf_fast.data.arithmetic); None with reward_model
    reward: str = "arithmetic"  # registered reward function or "name:argument" spec (reward_functions)
    reward_model: str | None = None  # an `rlhf-fast rm` export; prompts then come from data.data
    max_operand: int = 9  # arithmetic operands in [0, max_operand]
    ops: str = "+-"
    cold_start_steps: int = 0  # SFT warm-up steps on formatted task answers before GRPO (0: none)
    cold_start_lr: float = 3e-3

    def __post_init__(self):
        if (self.task is None) == (self.reward_model is None):
            raise ValueError("set exactly one reward source: task='arithmetic' or reward_model=<rm export dir>")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {sorted(TASKS)}")
        check_reward_spec(self.reward)  # also "embedding-similarity:<file>" and the like
        if self.cold_start_steps < 0 or self.cold_start_lr <= 0:
            raise ValueError("task.cold_start_steps must be >= 0 and task.cold_start_lr > 0")
        if self.cold_start_steps and self.task is None:
            raise ValueError("task.cold_start_steps needs a built-in task (it trains on the task's answers)")


_SECTIONS = {"model": ModelSettings, "lora": LoRASettings, "task": TaskSettings, "data": DataSettings,
             "grpo": GRPOSettings, "optim": OptimSettings, "run": RunSettings, "deepspeed": DeepSpeedSettings}


@dataclass(frozen=True)
class GRPOConfig:
    """model + lora + task + data + grpo + optim + run (+ deepspeed). The batch layout is grpo's
    (mini_batch_size rows per optimizer step, micro_batch_size per forward); optim.max_steps is derived."""

    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoRASettings = field(default_factory=LoRASettings)
    task: TaskSettings = field(default_factory=TaskSettings)
    data: DataSettings = field(default_factory=lambda: DataSettings(max_prompt_len=48, max_len=112))
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(lr=1e-4, warmup_steps=0, schedule="constant"))
    run: RunSettings = field(default_factory=lambda: RunSettings(log_every=1, eval_every=10, save_every=10))
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)  # with run.strategy=deepspeed

    def __post_init__(self):
        if self.lora.enabled is None:  # as for SFT/RM: LoRA when starting from trained weights
            object.__setattr__(self, "lora", dataclasses.replace(self.lora, enabled=self.model.model is not None))
        if self.run.output_dir is None:
            object.__setattr__(self, "run", dataclasses.replace(self.run, output_dir="runs/grpo"))
        if (self.optim.micro_batch_size, self.optim.grad_accum_steps) != (8, 1):
            raise ValueError("GRPO's batch layout is grpo.mini_batch_size / grpo.micro_batch_size "
                             "(--mini-batch-size / --micro-batch-size), not optim.micro_batch_size/grad_accum_steps")
        rows, minibatch = self.grpo.rows, self.grpo.mini_batch_size
        if rows % minibatch:
            raise ValueError(f"the rollout's {rows} rows (rollout_batch_size * group_size) must split into whole "
                             f"minibatches of mini_batch_size = {minibatch}")
        steps = self.grpo.iterations * self.grpo.epochs * (rows // minibatch)
        object.__setattr__(self, "optim", dataclasses.replace(self.optim, max_steps=steps))

    # what the shared loop and build_rl_strategy read
    rl = property(lambda self: self.grpo)
    device = property(lambda self: self.run.device)
    precision = property(lambda self: self.run.precision)
    max_grad_norm = property(lambda self: self.optim.max_grad_norm)

    def loop(self) -> LoopSettings:
        o, r = self.optim, self.run
        return LoopSettings(output_dir=r.output_dir, seed=r.seed, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas,
                            lr_lambda=lr_lambda(o), log_every=r.log_every, eval_every=r.eval_every,
                            save_every=r.save_every, keep_last=r.keep_last, resume=r.resume, progress=r.progress,
                            loss_backend=self.model.kernel_backend, compile=r.compile,
                            eval_samples=self.grpo.eval_samples, max_prompt_len=self.data.max_prompt_len)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GRPOConfig:
        """From nested {"section": {...}} (a config file + CLI overrides); unknown keys are errors."""
        unknown = set(d) - set(_SECTIONS)
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}; expected {sorted(_SECTIONS)}")
        factories = {f.name: f.default_factory for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in d.items():
            if not isinstance(value, dict):
                raise ValueError(f"config section {name!r} must be a mapping, got {type(value).__name__}")
            bad = set(value) - {f.name for f in dataclasses.fields(_SECTIONS[name])}
            if bad:
                raise ValueError(f"unknown key(s) {sorted(bad)} in config section {name!r}")
            kwargs[name] = dataclasses.replace(factories[name](), **value)  # GRPO's defaults, then the file
        return cls(**kwargs)


class GRPOTrainer(RLTrainer):
    """GRPO on built objects: a GPT (with a `policy` LoRA adapter, or fully trainable), its tokenizer, training
    and held-out prompt texts, and what scores completions (a reward function or a Scorer)."""

    stage = "grpo"

    def __init__(self, config: GRPOConfig, model: GPT, tokenizer, train_prompts: list[str], eval_prompts: list[str],
                 reward_fn, strategy: Strategy | None = None):
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only "
                             f"{model.config.vocab_size}: they do not belong together")
        lora = POLICY in adapter_names(model)
        if config.lora.enabled and not lora:
            raise ValueError("config.lora.enabled but the model has no 'policy' adapter (add_lora(model, 'policy'))")
        if lora:
            set_adapter(model, POLICY)
        if not train_prompts or not eval_prompts:
            raise ValueError("GRPOTrainer needs at least one training and one held-out prompt")
        g = config.grpo
        # Full-parameter mode needs a frozen copy as the KL reference; LoRA mode switches the adapters off.
        kl = g.kl_loss_coef > 0 or g.init_kl_coef > 0 or g.kl_target is not None
        reference = copy.deepcopy(model).eval().requires_grad_(False) if kl and not lora else None
        models = PPOModels(model, reference=reference)
        batches = ResumableBatches(PromptDataset(train_prompts, tokenizer, config.data.max_prompt_len),
                                   g.rollout_batch_size, PromptCollator(tokenizer), seed=config.run.seed)
        strategy = strategy if strategy is not None else build_rl_strategy(config)
        super().__init__(config, g, config.loop(), models, tokenizer, batches, list(eval_prompts)[: g.eval_prompts],
                         as_scorer(reward_fn, tokenizer), strategy)

    @property
    def model(self) -> GPT:
        return self.models.policy

    @property
    def reference(self) -> GPT | None:
        return self.models.reference


def build_grpo_trainer(config: GRPOConfig, strategy: Strategy | None = None) -> GRPOTrainer:
    """Everything a GRPO run needs, from its config: policy (+ adapter `policy` in LoRA mode), prompts,
    the reward function or reward model, and (optionally) a cold-start SFT warm-up on the task."""
    from rlhf_fast.data import arithmetic_split, load_preference_splits

    if strategy is None:
        ds = config.deepspeed if config.run.strategy == "deepspeed" else None
        strategy = build_rl_strategy(config, config.run.strategy, ds)
    model, tokenizer = build_model(config, adapter=POLICY)
    model.to(strategy.device)
    t, d = config.task, config.data
    if t.reward_model is not None:
        m = config.model
        reward_fn = load_reward_model_scorer(t.reward_model, tokenizer, model.config.vocab_size, strategy.device,
                                             attn_backend=m.attn_backend, kernel_backend=m.kernel_backend)
        train, held_out, _ = load_preference_splits(d.data, subset=d.subset, eval_size=d.eval_size,
                                                    synthetic_size=d.synthetic_size, seed=config.run.seed,
                                                    skip_bad_examples=d.skip_bad_examples)
        train_prompts = list(dict.fromkeys(ex.prompt for ex in train))
        eval_prompts = list(dict.fromkeys(ex.prompt for ex in held_out))
    else:
        problems, held_out = arithmetic_split(config.grpo.eval_prompts, config.run.seed, t.max_operand, t.ops)
        train_prompts, eval_prompts = [p.prompt for p in problems], [p.prompt for p in held_out]
        reward_fn = reward_function(t.reward)
        if t.cold_start_steps:
            _cold_start_once(config, model, tokenizer, [p.to_sft() for p in problems])
    return GRPOTrainer(config, model, tokenizer, train_prompts, eval_prompts, reward_fn, strategy)


def _cold_start_once(config: GRPOConfig, model: GPT, tokenizer, examples) -> None:
    """Cold start, saved in the run directory, so a resumed run reloads the very same warmed-up base."""
    path = Path(config.run.output_dir) / COLD_START_FILE
    if config.run.resume and path.is_file():
        model.load_state_dict(torch.load(path, map_location=model.transformer.wte.weight.device, weights_only=True))
        log.info("cold start: loaded %s", path)
        return
    t = config.task
    losses = cold_start(model, tokenizer, examples, steps=t.cold_start_steps, lr=t.cold_start_lr, batch_size=16,
                        seed=config.run.seed, max_prompt_len=config.data.max_prompt_len, max_len=config.data.max_len)
    log.info("cold start: %d SFT steps, loss %.3f -> %.3f", len(losses), losses[0], losses[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(path)  # atomic: a crash mid-save never leaves a half-written cold start
