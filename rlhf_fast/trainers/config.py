"""Config dataclasses shared by the SFT and reward-model stages, and JSON/YAML config files.

A run's config is `TrainConfig` = model + lora + data + optim + run (+ deepspeed) for SFT/RM; the RL
algorithms share `RLSettings` (what the one RL loop and experience maker read). Each part validates itself in
`__post_init__`; configs are frozen and never changed while training. A config file holds the same
nested structure ({"model": {...}, "optim": {...}, ...}); CLI flags override what it sets.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlhf_fast.distributed import PRECISIONS, DeepSpeedSettings

STAGES = ("sft", "rm", "dpo")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum")  # as rl.loss_weights defines them
STRATEGIES = ("single", "deepspeed")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class ModelSettings:
    preset: str | None = "tiny"  # random-init preset (tiny, demo, gpt2, ...); ignored when `model` is set
    model: str | None = None  # HF GPT-2 directory or hub name (e.g. an SFT export for the RM stage)
    tokenizer: str | None = None  # None: "byte" for tiny/demo, else the model's directory or "gpt2"
    attn_backend: str = "auto"
    kernel_backend: str = "auto"
    grad_checkpoint: bool = False  # recompute each transformer block's activations in backward (less memory)

    def __post_init__(self):
        if self.preset is None and self.model is None:
            raise ValueError("set a model: a preset name or a model directory / hub name")


@dataclass(frozen=True)
class LoRASettings:
    # None = auto: LoRA when starting from trained weights (--model), full fine-tuning for a random-init
    # preset, whose frozen random embeddings an adapter could barely use.
    enabled: bool | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self):
        if self.enabled is not False and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"lora.rank must be a positive int, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class DataSettings:
    data: str = "synthetic"  # "synthetic", an HH-RLHF hub name, a .jsonl(.gz) file or a directory of them
    subset: str | None = None  # HH data subset (e.g. harmless-base)
    max_prompt_len: int = 48
    max_len: int = 112
    eval_size: int = 200
    synthetic_size: int = 4000
    skip_bad_examples: bool = False

    def __post_init__(self):
        if not 0 < self.max_prompt_len < self.max_len:
            raise ValueError(f"need 0 < data.max_prompt_len < data.max_len, got {self.max_prompt_len}, "
                             f"{self.max_len}")
        if self.eval_size < 1 or self.synthetic_size < 1:
            raise ValueError("data.eval_size and data.synthetic_size must be >= 1")


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 1e-3  # LoRA on small models; use ~1e-5 for full fine-tuning of gpt2 sizes
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    max_steps: int = 200  # optimizer steps
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine decay to 10% after warmup, or constant
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.lr <= 0 or self.max_steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"optim: need lr > 0, max_steps >= 1, warmup_steps >= 0 (got {self.lr}, "
                             f"{self.max_steps}, {self.warmup_steps})")
        if self.micro_batch_size < 1 or self.grad_accum_steps < 1:
            raise ValueError("optim.micro_batch_size and optim.grad_accum_steps must be >= 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"optim.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")

    @property
    def batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps


@dataclass(frozen=True)
class RunSettings:
    output_dir: str | None = None  # None: runs/<stage>
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu (deepspeed: its accelerator decides)
    strategy: str = "single"  # single (one device) | deepspeed (ZeRO, offload, multi-process; see deepspeed)
    precision: str = "fp32"  # fp32 | bf16 | fp16 autocast (fp16 adds a gradient scaler)
    # torch.compile the loss step. None = auto: on for CUDA; off for CPU, where compiling costs tens of
    # seconds per graph and small models gain little.
    compile: bool | None = None
    log_every: int = 10
    eval_every: int = 100  # 0: evaluate only at the end
    save_every: int = 100  # 0: save only at the end
    keep_last: int = 2
    resume: bool = False  # continue from the newest checkpoint in output_dir
    progress: bool = True  # tqdm progress bar

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"run.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"run.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.keep_last < 1:
            raise ValueError(f"run.keep_last must be >= 1, got {self.keep_last}")
        if min(self.log_every, self.eval_every, self.save_every) < 0:
            raise ValueError("run.log_every / eval_every / save_every must be >= 0")


@dataclass(frozen=True)
class DPOSettings:
    """The preference loss of the dpo stage (rl.PREFERENCE_LOSSES; README: DPO losses)."""

    loss: str = "dpo"  # dpo | ipo | robust | simpo | orpo
    beta: float = 0.1  # DPO/IPO/robust: KL strength; SimPO: reward scale; ORPO: the odds-ratio weight λ
    label_smoothing: float = 0.0  # dpo: conservative DPO (cDPO); robust: the assumed label-noise rate
    gamma: float = 0.0  # SimPO's target margin γ (in reward units)
    reference_model: str | None = None  # None: the starting model (LoRA: adapters off; full: a frozen copy)
    offload_reference: bool = False  # full-parameter: keep the frozen reference on the CPU between uses

    def __post_init__(self):
        from rlhf_fast.rl import PREFERENCE_LOSSES

        if self.loss not in PREFERENCE_LOSSES:
            raise ValueError(f"dpo.loss must be one of {sorted(PREFERENCE_LOSSES)}, got {self.loss!r}")
        if not self.beta > 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label-smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss not in ("dpo", "robust", "simpo"):
            raise ValueError(f"--label-smoothing applies to the dpo, robust and simpo losses, not {self.loss!r}")
        if self.gamma and self.loss != "simpo":
            raise ValueError(f"--gamma is SimPO's margin: it does not apply to the {self.loss!r} loss")


@dataclass(frozen=True)
class TrainConfig:
    stage: str = "sft"
    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoRASettings = field(default_factory=LoRASettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    run: RunSettings = field(default_factory=RunSettings)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)  # used with run.strategy=deepspeed
    dpo: DPOSettings = field(default_factory=DPOSettings)  # used by the dpo stage

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.lora.enabled is None:
            lora = dataclasses.replace(self.lora, enabled=self.model.model is not None)
            object.__setattr__(self, "lora", lora)
        if self.run.output_dir is None:
            object.__setattr__(self, "run", dataclasses.replace(self.run, output_dir=f"runs/{self.stage}"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        parts = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(parts)
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}; expected {sorted(parts)}")
        kwargs = {}
        for name, value in d.items():
            sub = _SECTIONS.get(name)
            if sub is None:
                kwargs[name] = value
                continue
            if not isinstance(value, dict):
                raise ValueError(f"config section {name!r} must be a mapping, got {type(value).__name__}")
            known = {f.name for f in dataclasses.fields(sub)}
            bad = set(value) - known
            if bad:
                raise ValueError(f"unknown key(s) {sorted(bad)} in config section {name!r}; "
                                 f"known: {sorted(known)}")
            kwargs[name] = sub(**value)
        return cls(**kwargs)


_SECTIONS = {"model": ModelSettings, "lora": LoRASettings, "data": DataSettings, "optim": OptimSettings,
             "run": RunSettings, "deepspeed": DeepSpeedSettings, "dpo": DPOSettings}


def apply_overrides(d: dict, overrides: dict) -> dict:
    """A copy of nested config dict `d` with {"section.key": value} overrides set (None values skipped).

    Applied to the dict, before the dataclasses are built, so auto defaults (e.g. lora.enabled) are
    resolved once, from the final settings.
    """
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.partition(".")
        if name:
            out.setdefault(section, {})[name] = value
        else:
            out[section] = value
    return out


def load_config_file(path) -> dict:
    """The nested dict in a .json file, or a .yaml/.yml file when PyYAML is installed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: YAML config files need PyYAML (pip install pyyaml); "
                             "or write the config as JSON") from None
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of sections")
    return data


@dataclass(frozen=True)
class RLSettings:
    """The knobs of the RL loop shared by PPO, GRPO and the critic-free family (README: RL options).

    A rollout samples `group_size` responses for each of `rollout_batch_size` prompts; `epochs` passes
    of optimizer steps over `mini_batch_size` rows (forwards of `micro_batch_size` rows) follow.
    """

    iterations: int = 40  # rollout + update rounds
    rollout_batch_size: int = 32  # prompts per rollout
    group_size: int = 1  # sampled responses per prompt (grpo / dr_grpo / rloo need >= 2)
    mini_batch_size: int = 8  # rows per optimizer step
    micro_batch_size: int | None = None  # rows per forward pass (None: mini_batch_size)
    epochs: int = 2  # passes over each rollout
    max_new_tokens: int = 48
    temperature: float = 1.0  # rollout sampling; every log-prob is that of logits / temperature
    top_k: int = 0  # must stay 0 and top_p 1: log-probs of a filtered distribution would bias the update
    top_p: float = 1.0
    estimator: str = "gae"  # rl.ADVANTAGE_ESTIMATORS: gae (critic), grpo, dr_grpo, rloo, reinforce_pp
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True  # gae: whiten over the batch's tokens
    std_eps: float = 1e-4  # grpo: (score - mean) / (std + std_eps)
    clip_eps: float = 0.2  # ratio clip, lower side (and upper unless clip_eps_high)
    clip_eps_high: float | None = None  # DAPO clip-higher (e.g. 0.28); None: clip_eps
    loss_aggregation: str = "token_mean"  # token_mean (DAPO) | seq_mean (GRPO paper) | seq_sum (Dr. GRPO)
    value_clip_eps: float = 0.2
    vf_coef: float = 0.5  # critic loss weight (gae only)
    init_kl_coef: float = 0.05  # per-token KL penalty in the reward (PPO, REINFORCE++)
    kl_target: float | None = None  # None: fixed KL coefficient; else adaptive (Ziegler et al. 2019)
    kl_horizon: int = 10000
    kl_estimator: str = "k1"  # the reward penalty's estimator
    kl_loss_coef: float = 0.0  # k3 KL to the reference as a loss term (GRPO; DeepSeekMath used 0.04)
    dynamic_sampling: bool = False  # DAPO: drop groups whose scores are all equal, sample more prompts
    max_sampling_rounds: int = 4  # dynamic sampling: rollouts tried per iteration to fill the batch
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N of max_new_tokens (0: off)
    overlong_penalty: float = 1.0  # its largest penalty (a truncated response)
    mask_truncated: bool = False  # DAPO overlong filtering: responses cut at max_new_tokens get no loss

    def __post_init__(self):
        from rlhf_fast.rl.kl import KL_ESTIMATORS

        for name in ("iterations", "rollout_batch_size", "group_size", "mini_batch_size", "epochs",
                     "max_new_tokens", "kl_horizon", "max_sampling_rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= self.mini_batch_size:
            raise ValueError(f"micro_batch_size must lie in [1, mini_batch_size={self.mini_batch_size}], "
                             f"got {self.micro_batch_size}")
        if self.mini_batch_size > self.rows:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) exceeds the rollout's {self.rows} rows "
                             "(rollout_batch_size * group_size)")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k != 0 or self.top_p != 1.0:
            raise ValueError("top_k / top_p are not allowed for RL rollouts: the update would train on log-probs "
                             "of a different distribution than the one sampled (use temperature; top-k/top-p "
                             "belong to `rlhf-fast generate`)")
        if self.clip_eps <= 0 or (self.clip_eps_high is not None and self.clip_eps_high <= 0):
            raise ValueError("clip_eps and clip_eps_high must be > 0")
        if min(self.value_clip_eps, self.vf_coef, self.init_kl_coef, self.kl_loss_coef, self.overlong_penalty) < 0:
            raise ValueError("value_clip_eps, vf_coef, init_kl_coef, kl_loss_coef and overlong_penalty must be >= 0")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ValueError(f"kl_target must be > 0 or None, got {self.kl_target}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_aggregation must be one of {LOSS_AGGREGATIONS}, got {self.loss_aggregation!r}")
        if not 0 <= self.overlong_buffer < self.max_new_tokens:
            raise ValueError(f"overlong_buffer must lie in [0, max_new_tokens={self.max_new_tokens}), "
                             f"got {self.overlong_buffer}")
        if self.dynamic_sampling and self.group_size < 2:
            raise ValueError("dynamic_sampling drops groups without score spread: it needs group_size >= 2")
        self.advantage_config()  # validates estimator / gamma / lam / group_size / std_eps

    @property
    def rows(self) -> int:
        return self.rollout_batch_size * self.group_size

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

    def to_dict(self) -> dict:
        return asdict(self)
