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

import json
from pathlib import Path

import torch

from rlhf_fast.data import PromptCollator, PromptDataset, ResumableBatches, load_prompts, load_tokenizer
from rlhf_fast.data.tokenizer import tokenizer_name
from rlhf_fast.distributed import Strategy
from rlhf_fast.errors import ConfigError
from rlhf_fast.model import GPT, ScalarHead, add_lora, load_adapter

from .builders import tokenizer_signature
from .metrics import log
from .models import POLICY, REWARD, VALUE, PPOModels
from .reward import REWARD_ADAPTER_FILE, REWARD_META_FILE, load_adapter_head, load_reward_model, weights_fingerprint
from .rl_config import PPOConfig
from .rl_loop import RLTrainer

__all__ = ["PPOConfig", "PPOTrainer", "build_ppo_trainer", "load_ppo_models",
           "prompt_batches", "tokenizer_signature"]


class PPOTrainer(RLTrainer):
    """PPO over built objects: PPOModels, a tokenizer, resumable prompt batches, held-out prompts (ids or
    texts), optionally a strategy (default: the config's, `train_strategy`) and a scorer (default: the models'
    reward role)."""

    stage = "ppo"

    def __init__(self, config: PPOConfig, models: PPOModels, tokenizer, prompts: ResumableBatches,
                 eval_prompts=None, strategy: Strategy | None = None, scorer=None):
        run = config.run
        if strategy is not None and strategy.precision != run.precision:
            raise ConfigError(f"{run.precision!r}, but the strategy runs {strategy.precision!r}", "run.precision")
        if strategy is not None and run.device is not None and torch.device(run.device).type != strategy.device.type:
            raise ConfigError(f"{run.device!r}, but the strategy's device is {strategy.device}: drop --device (under "
                              "DeepSpeed set DS_ACCELERATOR=cpu to force the CPU)", "run.device")
        super().__init__(config, models, tokenizer, prompts, eval_prompts, scorer, strategy)


def build_ppo_trainer(config: PPOConfig, strategy: Strategy | None = None) -> PPOTrainer:
    """`rlhf-fast ppo`: the models from the SFT and RM exports (`load_ppo_models`), prompts from data.data
    (`load_prompts`), the trainer."""
    m, lc, d, seed = config.model, config.lora, config.data, config.run.seed
    for key, what in (("model", "the SFT export directory"), ("reward_model", "the reward-model export directory")):
        if getattr(m, key) is None:
            raise ConfigError(f"give {what}", f"model.{key}")
    models, tokenizer = load_ppo_models(m.model, m.reward_model, lora=lc.enabled, lora_rank=lc.rank,
                                        lora_alpha=lc.alpha, attn_backend=m.attn_backend,
                                        kernel_backend=m.kernel_backend, seed=seed, critic=config.rl.critic,
                                        grad_checkpoint=m.grad_checkpoint)
    train, held_out = load_prompts(d.data, subset=d.subset, eval_size=d.eval_size, synthetic_size=d.synthetic_size,
                                   seed=seed, skip_bad_examples=d.skip_bad_examples, chat_template=d.chat_template)
    prompts = prompt_batches(train, tokenizer, config.rl.rollout_batch_size, d.max_prompt_len, seed)
    return PPOTrainer(config, models, tokenizer, prompts, held_out, strategy=strategy)


# --- builders: PPO models from the SFT and RM exports --------------------------------------------


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
    tokenizer, rm_tokenizer = load_tokenizer(sft_dir), load_tokenizer(rm_dir)
    if tokenizer_signature(tokenizer) != tokenizer_signature(rm_tokenizer):
        raise ValueError(f"the reward model {rm_dir} was trained with a different tokenizer "
                         f"({tokenizer_name(rm_dir)}, {rm_tokenizer.vocab_size} tokens) than the SFT "
                         f"policy {sft_dir} ({tokenizer_name(sft_dir)}, {tokenizer.vocab_size} tokens)")
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
        reward_head = load_adapter_head(rm_dir)  # the head as trained on the unmerged base
        reward_model = None  # one frozen base for all four roles
    else:
        log.info("%s was not trained as a LoRA adapter on %s: keeping it as a separate frozen model",
                 rm_dir, sft_dir)
    policy.set_adapter(POLICY)
    return PPOModels(policy, value_head, reward_head, reward_model=reward_model), tokenizer


def prompt_batches(prompts, tokenizer, batch_size: int, max_prompt_len: int, seed: int) -> ResumableBatches:
    return ResumableBatches(PromptDataset(prompts, tokenizer, max_prompt_len), batch_size, PromptCollator(tokenizer),
                            seed=seed)


