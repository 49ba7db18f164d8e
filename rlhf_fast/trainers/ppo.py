"""PPO (Ouyang et al. 2022 / Ziegler et al. 2019 recipe) and the critic-free estimators on PPO's models.

`rlhf-fast ppo` starts from an SFT export and a reward-model export. With the default `gae` estimator it
trains a critic (value adapter + value head) and shapes per-token rewards with a fixed or adaptive KL
penalty; `--estimator rloo|reinforce_pp|grpo|dr_grpo` drops the critic (RLOO and GRPO sample
`--group-size` responses per prompt). Everything else (rollout, fused GAE + PPO loss, minibatches,
checkpoints, evaluation) is the shared loop in `rl_loop.py`.

Strategies: `SingleDeviceStrategy` or `DeepSpeedStrategy` (ZeRO 0-2). Under DeepSpeed, full-parameter PPO
makes the actor and the critic two engines, and the frozen reference and reward model go through
`prepare_frozen`; LoRA PPO is one engine over the adapters and heads (they share the frozen base).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_fast.data import PromptCollator, PromptDataset, ResumableBatches, load_preference_splits, load_tokenizer
from rlhf_fast.distributed import PRECISIONS, Strategy
from rlhf_fast.model import GPT, ScalarHead, add_lora, load_adapter

from .common import TOKENIZER_MARKER
from .config import RLSettings
from .metrics import log
from .models import POLICY, REWARD, VALUE, PPOModels
from .reward import REWARD_ADAPTER_FILE, REWARD_META_FILE, load_reward_model, weights_fingerprint
from .rl_loop import LoopSettings, RLTrainer, build_rl_strategy


@dataclass(frozen=True)
class PPOConfig(RLSettings):
    """RLSettings (PPO's defaults: gae with a critic, KL in the reward) plus the run's settings."""

    lr: float = 5e-4  # LoRA adapters; ~1e-6..1e-5 for full-parameter PPO of gpt2 sizes
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    offload_frozen: bool = False  # move the separate reference / reward model to the CPU between uses
    loss_backend: str = "auto"  # kernels backend for gae and ppo_loss
    grad_checkpoint: bool = False  # recompute the trained models' block activations in backward (less memory)
    precision: str = "fp32"
    device: str | None = None  # None: cuda when available
    seed: int = 0
    output_dir: str = "runs/ppo"
    log_every: int = 1
    eval_every: int = 0  # iterations between held-out evaluations (0: only at the end)
    save_every: int = 0  # iterations between checkpoints (0: only at the end)
    keep_last: int = 2
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.lr <= 0 or (self.max_grad_norm is not None and self.max_grad_norm <= 0):
            raise ValueError("ppo: need lr > 0 and max_grad_norm > 0 (or None)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"ppo.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.keep_last < 1 or min(self.log_every, self.eval_every, self.save_every) < 0:
            raise ValueError("ppo: need keep_last >= 1 and log_every / eval_every / save_every >= 0")

    @property
    def rl(self) -> RLSettings:
        return self

    def loop(self) -> LoopSettings:
        return LoopSettings(output_dir=self.output_dir, seed=self.seed, lr=self.lr, weight_decay=self.weight_decay,
                            log_every=self.log_every, eval_every=self.eval_every, save_every=self.save_every,
                            keep_last=self.keep_last, resume=self.resume, progress=self.progress,
                            loss_backend=self.loss_backend, offload_frozen=self.offload_frozen)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class PPOTrainer(RLTrainer):
    """PPO over built objects: PPOModels, a tokenizer, resumable prompt batches, held-out prompts (ids or
    texts), optionally a strategy (`build_rl_strategy`; default: one device) and a scorer (default: the
    models' reward role)."""

    stage = "ppo"

    def __init__(self, config: PPOConfig, models: PPOModels, tokenizer, prompts: ResumableBatches,
                 eval_prompts=None, strategy: Strategy | None = None, scorer=None):
        strategy = strategy if strategy is not None else build_rl_strategy(config)
        if strategy.precision != config.precision:
            raise ValueError(f"ppo.precision={config.precision!r} but the strategy runs {strategy.precision!r}")
        if config.device is not None and torch.device(config.device).type != strategy.device.type:
            raise ValueError(f"ppo.device={config.device!r}, but the strategy's device is {strategy.device}: drop "
                             "--device (under DeepSpeed set DS_ACCELERATOR=cpu to force the CPU)")
        super().__init__(config, config, config.loop(), models, tokenizer, prompts, eval_prompts, scorer, strategy)


# --- builders: PPO models from the SFT and RM exports --------------------------------------------


def export_tokenizer_name(directory: Path) -> str:
    marker = directory / TOKENIZER_MARKER
    return json.loads(marker.read_text())["tokenizer"] if marker.is_file() else str(directory)


def tokenizer_signature(tokenizer) -> str:
    """A digest of the token -> id mapping (what must agree between policy and reward model)."""
    if hasattr(tokenizer, "tok"):
        items = sorted(tokenizer.tok.get_vocab().items())
    else:
        items = [("byte", tokenizer.vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id)]
    return hashlib.sha256(repr(items).encode()).hexdigest()


def _existing_dir(path, what: str, flag: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} (give the export directory of the "
                                f"previous stage with {flag})")
    return p


def load_ppo_models(sft_model, reward_model, *, lora: bool = True, lora_rank: int = 8, lora_alpha: float = 16.0,
                    attn_backend: str = "auto", kernel_backend: str = "auto", seed: int = 0, critic: bool = True,
                    grad_checkpoint: bool = False):
    """(PPOModels, tokenizer) from an SFT export (`rlhf-fast sft`) and an RM export (`rlhf-fast rm`).

    LoRA mode: the SFT model is the one frozen base with adapters `policy` and `value`; when the RM was
    trained as a LoRA adapter on this very base (its export holds the adapter and the base's weight
    fingerprint) the `reward` adapter joins them, else the merged RM is kept as a separate frozen model.
    Full mode: trained policy, separate critic and frozen reference, all from the SFT weights.
    critic=False (critic-free estimators): no value adapter, value head or critic model.
    grad_checkpoint: activation checkpointing in the trained models (the policy base and the critic).
    """
    sft_dir = _existing_dir(sft_model, "SFT model directory", "--sft-model")
    rm_dir = _existing_dir(reward_model, "reward model directory", "--reward-model")
    tokenizer = load_tokenizer(export_tokenizer_name(sft_dir))
    rm_tokenizer = load_tokenizer(export_tokenizer_name(rm_dir))
    if tokenizer_signature(tokenizer) != tokenizer_signature(rm_tokenizer):
        raise ValueError(f"the reward model {rm_dir} was trained with a different tokenizer "
                         f"({export_tokenizer_name(rm_dir)}, {rm_tokenizer.vocab_size} tokens) than the SFT "
                         f"policy {sft_dir} ({export_tokenizer_name(sft_dir)}, {tokenizer.vocab_size} tokens)")
    backends = dict(attn_backend=attn_backend, kernel_backend=kernel_backend)
    torch.manual_seed(seed)  # LoRA A matrices and the value head
    trained = dict(backends, grad_checkpoint=grad_checkpoint)
    policy = GPT.from_pretrained(str(sft_dir), **trained)
    reward_model, reward_head = load_reward_model(rm_dir, **backends)
    if reward_model.config.vocab_size != policy.config.vocab_size:
        raise ValueError(f"the reward model {rm_dir} has vocab_size {reward_model.config.vocab_size}, the SFT "
                         f"policy {sft_dir} has {policy.config.vocab_size}: they need the same tokenizer")
    value_head = ScalarHead(policy.config.n_embd) if critic else None
    if not lora:
        critic_model = GPT.from_pretrained(str(sft_dir), **trained) if critic else None
        reference = GPT.from_pretrained(str(sft_dir), **backends)
        return PPOModels(policy, value_head, reward_head, critic=critic_model, reference=reference,
                         reward_model=reward_model), tokenizer
    meta_path = rm_dir / REWARD_META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    shared = (rm_dir / REWARD_ADAPTER_FILE).is_file() and meta.get("base_fingerprint") == weights_fingerprint(policy)
    add_lora(policy, POLICY, rank=lora_rank, alpha=lora_alpha)
    if critic:
        add_lora(policy, VALUE, rank=lora_rank, alpha=lora_alpha)
    if shared:
        load_adapter(policy, rm_dir / REWARD_ADAPTER_FILE, REWARD)
        reward_model = None  # one frozen base for all four roles
    else:
        log.info("%s was not trained as a LoRA adapter on %s: keeping it as a separate frozen model",
                 rm_dir, sft_dir)
    policy.set_adapter(POLICY)
    return PPOModels(policy, value_head, reward_head, reward_model=reward_model), tokenizer


def load_prompts(source: str, *, subset: str | None = None, eval_size: int = 128, synthetic_size: int = 4000,
                 seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts: a .jsonl(.gz) file of {"prompt": ...} lines (its last `eval_size` held
    out), or the prompts of any preference source `load_preference_splits` reads (synthetic, HH-RLHF)."""
    path = Path(source)
    if path.is_file() and path.name.endswith((".jsonl", ".jsonl.gz")):
        with (gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path)) as f:
            first = next((line for line in f if line.strip()), "{}")
        if "prompt" in json.loads(first) and "chosen" not in json.loads(first):
            return _prompt_file(path, eval_size)
    train, held_out, _ = load_preference_splits(source, subset=subset, eval_size=eval_size,
                                                synthetic_size=synthetic_size, seed=seed)
    return [ex.prompt for ex in train], [ex.prompt for ex in held_out]


def _prompt_file(path: Path, eval_size: int) -> tuple[list[str], list[str]]:
    prompts = []
    with gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'prompt'")
            prompts.append(record["prompt"])
    if len(prompts) <= eval_size:
        raise ValueError(f"{path}: {len(prompts)} prompts, need more than eval_size={eval_size}")
    return prompts[:-eval_size], prompts[-eval_size:]


def prompt_batches(prompts, tokenizer, batch_size: int, max_prompt_len: int, seed: int) -> ResumableBatches:
    return ResumableBatches(PromptDataset(prompts, tokenizer, max_prompt_len), batch_size, PromptCollator(tokenizer),
                            seed=seed)


