"""The config sections every training command shares, and the SFT / RM / DPO config.

A run's config is a frozen dataclass of sections (`rlhf_fast.config`): model + lora + data + optim + run
(+ deepspeed, + dpo for DPO); the RL commands add `rl` and (GRPO) `task` (`rl_config.py`). Each setting is
declared once, with its default, its help text and so its `--flag`; each section validates itself in
`__post_init__` and raises ConfigError naming the setting. A config file holds the same nested structure
({"model": {...}, "optim": {...}, ...}); CLI flags override what it sets; a run saves the resolved config as
`config.json`, which `--config` takes back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from rlhf_fast.config import Config, option, resolve_device, section
from rlhf_fast.distributed import PRECISIONS, DeepSpeedSettings
from rlhf_fast.errors import ConfigError
from rlhf_fast.model.compile import BACKENDS as COMPILE_BACKENDS

from .metrics import REPORT_TO, check_report_to

STAGES = ("sft", "rm", "dpo")
STRATEGIES = ("single", "deepspeed")
SCHEDULES = ("cosine", "constant")
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class ModelSettings(Config):
    preset: str | None = option("tiny", "random-init model preset: tiny, demo, gpt2, gpt2-medium, gpt2-large, "
                                "gpt2-xl (used when no --model is given)")
    model: str | None = option(None, "HF GPT-2 directory or hub name to start from, e.g. an `rlhf-fast sft` "
                               "export", aliases=("--sft-model",))
    reward_model: str | None = option(None, "an `rlhf-fast rm` export that scores responses (ppo; grpo: "
                                      "instead of a built-in task)")
    tokenizer: str | None = option(None, "'byte' or an HF tokenizer directory / hub name (default: byte for "
                                   "tiny/demo, else the model's)")
    attn_backend: str = option("auto", "attention backend: auto, torch, sdpa, triton, flash")
    kernel_backend: str = option("auto", "fused-kernel backend (LoRA-linear, log-probs, GAE + PPO loss): auto, "
                                 "torch, triton", choices=BACKENDS, aliases=("--loss-backend",))
    grad_checkpoint: bool = option(False, "activation checkpointing: recompute each transformer block in "
                                   "backward (less memory, ~1/3 more compute)")

    def require(self) -> None:
        if self.preset is None and self.model is None:
            raise ConfigError("set a model: a preset name or a model directory / hub name", "model.model")


@dataclass(frozen=True)
class LoRASettings(Config):
    enabled: bool | None = option(None, "train LoRA adapters (--no-lora: all weights); default: LoRA when starting "
                                  "from --model weights, all weights for a random-init --preset", flag="--lora")
    rank: int = option(8, "LoRA rank", flag="--lora-rank")
    alpha: float = option(16.0, "LoRA alpha (scale = alpha / rank)", flag="--lora-alpha")
    dropout: float = option(0.0, "dropout on the LoRA input", flag="--lora-dropout")

    def __post_init__(self):
        if self.enabled is not False and (not isinstance(self.rank, int) or self.rank < 1):
            raise ConfigError(f"must be a positive int, got {self.rank!r}", "rank")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"must be in [0, 1), got {self.dropout}", "dropout")


@dataclass(frozen=True)
class DataSettings(Config):
    data: str = option("synthetic", "'synthetic'; a .jsonl/.jsonl.gz file or a directory of them (files named "
                       "*train*/*test* are the splits, else the tail is held out); or a hub dataset, NAME (train + "
                       "test splits) or NAME:SPLIT. Records in TRL's formats: {\"prompt\", \"completion\"}, "
                       "{\"messages\"}, {\"text\"}, {\"prompt\"}, {\"prompt\", \"chosen\", \"rejected\"} "
                       "or {\"chosen\", \"rejected\"} (HH-RLHF dialogues or message lists), as the command needs")
    subset: str | None = option(None, "file-name prefix in a --data directory (harmless-base: harmless-base-*), "
                                "the data directory of Anthropic/hh-rlhf, else the hub dataset's config name",
                                flag="--data-subset")
    chat_template: str | None = option(None, "Jinja chat template (a string or a .jinja file) rendering "
                                       "conversational records, given messages and add_generation_prompt (default: "
                                       "HH's '\\n\\nHuman: ...\\n\\nAssistant: ...' format)")
    max_prompt_len: int = option(48, "prompt tokens kept (from the end)")
    max_len: int = option(112, "prompt + response tokens kept")
    eval_size: int = option(200, "held-out examples (pairs, prompts) for evaluation")
    synthetic_size: int = option(4000, "training examples generated for --data synthetic")
    skip_bad_examples: bool = option(False, "skip (and count in the log) data lines that cannot be parsed, "
                                     "instead of failing")

    def __post_init__(self):
        if not 0 < self.max_prompt_len < self.max_len:
            raise ConfigError(f"need 0 < max_prompt_len < max_len, got {self.max_prompt_len}, {self.max_len}",
                              "max_prompt_len")
        for name in ("eval_size", "synthetic_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", name)


@dataclass(frozen=True)
class OptimSettings(Config):
    lr: float = option(1e-3, "peak learning rate (AdamW); ~1e-3 for LoRA on small models, ~1e-5 for full "
                       "fine-tuning of gpt2 sizes")
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only)")
    betas: tuple[float, ...] = option((0.9, 0.95), "AdamW betas", metavar="BETA")
    max_steps: int = option(200, "optimizer steps (RL: derived from the iterations)")
    warmup_steps: int = option(10, "linear learning-rate warmup steps")
    schedule: str = option("cosine", "learning-rate schedule after warmup: cosine (decay to 10%) or constant",
                           choices=SCHEDULES)
    micro_batch_size: int = option(8, "examples (RM, DPO: pairs) per forward pass")
    grad_accum_steps: int = option(1, "micro-batches per optimizer step")
    max_grad_norm: float | None = option(1.0, "gradient clipping norm")

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"need two values in [0, 1), got {self.betas}", "betas")
        for name, ok, need in (("lr", self.lr > 0, "> 0"), ("max_steps", self.max_steps >= 1, ">= 1"),
                               ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                               ("micro_batch_size", self.micro_batch_size >= 1, ">= 1"),
                               ("grad_accum_steps", self.grad_accum_steps >= 1, ">= 1"),
                               ("max_grad_norm", self.max_grad_norm is None or self.max_grad_norm > 0, "> 0 or None")):
            if not ok:
                raise ConfigError(f"must be {need}, got {getattr(self, name)!r}", name)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"must be one of {SCHEDULES}, got {self.schedule!r}", "schedule")

    @property
    def batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps


@dataclass(frozen=True)
class RunSettings(Config):
    output_dir: str | None = option(None, "run directory: config.json, metrics.jsonl, checkpoints, export "
                                    "(default: runs/<command>)")
    seed: int = option(0, "seed for init, data order, sampling and the synthetic task")
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (default: cuda when available; under deepspeed its "
                                "accelerator decides)")
    strategy: str = option("single", "single (one device) or deepspeed (ZeRO, offload; also under torchrun / the "
                           "deepspeed launcher)", choices=STRATEGIES)
    precision: str = option("fp32", "fp32, bf16 or fp16 autocast (fp16: CUDA only, with a gradient scaler)",
                            choices=PRECISIONS)
    compile: bool | None = option(None, "regional torch.compile of the model's blocks for training and scoring "
                                  "(default: on for CUDA, off for CPU)")
    compile_backend: str = option("inductor", "torch.compile backend: inductor, or aot_eager (dynamo + AOTAutograd) "
                                  "/ eager (dynamo) to debug",
                                  choices=COMPILE_BACKENDS)
    compile_cache: str | None = option(None, "directory of the compile cache: loaded before the first step, saved "
                                       "after it and at the end (default: $RLHF_FAST_COMPILE_CACHE)")
    log_every: int = option(10, "steps (RL: iterations) between metrics.jsonl lines")
    report_to: tuple[str, ...] = option(("auto",), "where metrics go besides metrics.jsonl: tensorboard, wandb "
                                        "(both: --report-to tensorboard wandb; $WANDB_MODE=offline needs no network), "
                                        "none, or auto: tensorboard when installed", choices=REPORT_TO)
    eval_every: int = option(100, "steps (RL: iterations) between evaluations (0: only at the end)")
    save_every: int = option(100, "steps (RL: iterations) between checkpoints (0: only at the end)")
    keep_last: int = option(2, "checkpoints kept")
    resume: bool = option(False, "continue from the newest intact checkpoint in --output-dir (an error when there "
                          "is none)")
    overwrite: bool = option(False, "start over in an --output-dir that holds an earlier run: its config, metrics, "
                             "checkpoints, export and curves are deleted first (each named in the log)")
    resume_if_possible: bool = option(False, "continue from the newest intact checkpoint when there is one, else "
                                      "start from step 0")
    trust_checkpoint: bool = option(False, "on resume, load checkpoint files that need full unpickling (older "
                                    "checkpoints; it can run any code: only for files you trust)")
    progress: bool = option(True, "tqdm progress bar")
    export: bool = option(True, "write the trained model (adapters merged) to <output-dir>/export, loadable as "
                          "--model")
    export_adapter: bool = option(False, "LoRA runs: also write the trained adapter, unmerged, as a PEFT adapter "
                                  "directory <output-dir>/export/adapter (base: --model, else export/adapter/base)")

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"must be one of {PRECISIONS}, got {self.precision!r}", "precision")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"must be one of {STRATEGIES}, got {self.strategy!r}", "strategy")
        if self.keep_last < 1:
            raise ConfigError(f"must be >= 1, got {self.keep_last}", "keep_last")
        object.__setattr__(self, "report_to", check_report_to(self.report_to))
        for name in ("log_every", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, name)}", name)
        if self.device is not None:
            resolve_device(self.device)
        if self.compile_cache is not None and Path(self.compile_cache).is_file():
            raise ConfigError(f"{self.compile_cache} exists and is not a directory", "compile_cache")
        if self.resume and self.resume_if_possible:
            raise ConfigError("give --resume or --resume-if-possible, not both", "resume")
        if self.overwrite and self.resuming:
            raise ConfigError("--overwrite starts over, --resume continues: give one", "overwrite")

    @property
    def resuming(self) -> bool:
        """Whether the run looks for a checkpoint to continue from."""
        return self.resume or self.resume_if_possible


@dataclass(frozen=True)
class DPOSettings(Config):
    """The preference loss of the dpo stage (rl.PREFERENCE_LOSSES; README: DPO losses)."""

    loss: str = option("dpo", "preference loss: dpo, ipo, robust, simpo, orpo (README: DPO losses)")
    beta: float = option(0.1, "DPO/IPO/robust: KL strength; SimPO: reward scale; ORPO: the odds-ratio weight")
    label_smoothing: float = option(0.0, "dpo: conservative DPO (cDPO); robust: the assumed label-noise rate")
    gamma: float = option(0.0, "SimPO's target reward margin")
    reference_model: str | None = option(None, "a separate frozen reference (default: the --model itself; LoRA: its "
                                         "base with adapters off)")
    offload_reference: bool = option(False, "full-parameter: the frozen reference on the CPU between uses")

    def __post_init__(self):
        from rlhf_fast.rl import PREFERENCE_LOSSES

        if self.loss not in PREFERENCE_LOSSES:
            raise ConfigError(f"must be one of {sorted(PREFERENCE_LOSSES)}, got {self.loss!r}", "loss")
        if not self.beta > 0:
            raise ConfigError(f"must be > 0, got {self.beta}", "beta")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"must lie in [0, 0.5), got {self.label_smoothing}", "label_smoothing")
        if self.label_smoothing and self.loss not in ("dpo", "robust", "simpo"):
            raise ConfigError(f"applies to the dpo, robust and simpo losses, not {self.loss!r}", "label_smoothing")
        if self.gamma and self.loss != "simpo":
            raise ConfigError(f"is SimPO's margin: it does not apply to the {self.loss!r} loss", "gamma")


@dataclass(frozen=True)
class TrainConfig(Config):
    """sft / rm / dpo: the stage, then its sections (`dpo` is read by the dpo stage only)."""

    stage: str = option("sft", "the training stage: sft, rm or dpo (set by the command)", cli=False)
    model: ModelSettings = section(ModelSettings)
    lora: LoRASettings = section(LoRASettings)
    data: DataSettings = section(DataSettings)
    optim: OptimSettings = section(OptimSettings)
    run: RunSettings = section(RunSettings)
    deepspeed: DeepSpeedSettings = section(DeepSpeedSettings)  # used with run.strategy=deepspeed
    dpo: DPOSettings = section(DPOSettings)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ConfigError(f"must be one of {STAGES}, got {self.stage!r}", "stage")
        self.model.require()
        if self.model.reward_model is not None:
            raise ConfigError(f"the {self.stage} stage takes no reward model", "model.reward_model")
        resolve_defaults(self, f"runs/{self.stage}")


def resolve_defaults(config, output_dir: str) -> None:
    """Check the run's strategy settings and fill the auto settings of a (frozen) config in place: lora.enabled
    (LoRA when starting from trained weights, full fine-tuning for a random-init preset, whose frozen random
    embeddings an adapter could barely use) and run.output_dir. The saved config then holds the resolved values."""
    if config.run.strategy != "deepspeed" and config.deepspeed != DeepSpeedSettings():
        raise ConfigError("DeepSpeed settings (--zero-stage, --offload-*, --deepspeed-config) need --strategy "
                          "deepspeed", "run.strategy")
    if config.lora.enabled is None:
        object.__setattr__(config, "lora", dataclasses.replace(config.lora, enabled=config.model.model is not None))
    if config.run.export_adapter and not config.lora.enabled:
        raise ConfigError("writes a LoRA adapter: it needs a LoRA run (--lora; a --preset run trains all weights by "
                          "default)", "run.export_adapter")
    if config.run.output_dir is None:
        object.__setattr__(config, "run", dataclasses.replace(config.run, output_dir=output_dir))
