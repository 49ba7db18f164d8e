"""GRPO (Shao et al. 2024, DeepSeekMath) and its variants on the shared RL loop: G sampled completions per
prompt, group-relative advantages, no critic, clipped-ratio updates, optional k3 KL to the reference.

What is GRPO-specific: its config (`rl_config.GRPOConfig`: estimator `grpo`, no KL in the reward), where
prompts and scores come from (the task section: the built-in verifiable arithmetic task with a registered
reward function; or --reward-model, an `rlhf-fast rm` export, with prompts from --data), and the R1-style
cold start (`sft.cold_start`) before the first rollout. Dr. GRPO is `estimator="dr_grpo",
loss_aggregation="seq_sum"`; DAPO adds `clip_eps_high`, `dynamic_sampling`, `overlong_buffer` /
`mask_truncated` (README: RL options).

The loss is a token mean over the minibatch by default (DAPO's token-level loss); `loss_aggregation=
"seq_mean"` gives DeepSeekMath's mean of per-sequence means.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from rlhf_fast.data import PromptCollator, PromptDataset, ResumableBatches
from rlhf_fast.distributed import Strategy
from rlhf_fast.model import GPT, set_adapter
from rlhf_fast.model.lora import adapter_names

from .builders import build_model, train_strategy
from .metrics import log
from .models import POLICY, PPOModels
from .reward_functions import as_scorer, load_reward_model_scorer, reward_function
from .rl_config import GRPOConfig, TaskSettings
from .rl_loop import RLTrainer
from .sft import cold_start

__all__ = ["GRPOConfig", "GRPOTrainer", "TaskSettings", "build_grpo_trainer"]

COLD_START_FILE = "cold_start.pt"


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
        g = config.rl
        # Full-parameter mode needs a frozen copy as the KL reference; LoRA mode switches the adapters off.
        kl = g.kl_loss_coef > 0 or g.init_kl_coef > 0 or g.kl_target is not None
        reference = copy.deepcopy(model).eval().requires_grad_(False) if kl and not lora else None
        models = PPOModels(model, reference=reference)
        batches = ResumableBatches(PromptDataset(train_prompts, tokenizer, config.data.max_prompt_len),
                                   g.rollout_batch_size, PromptCollator(tokenizer), seed=config.run.seed)
        super().__init__(config, models, tokenizer, batches, eval_prompts, as_scorer(reward_fn, tokenizer), strategy)

    @property
    def model(self) -> GPT:
        return self.models.policy

    @property
    def reference(self) -> GPT | None:
        return self.models.reference


def build_grpo_trainer(config: GRPOConfig, strategy: Strategy | None = None) -> GRPOTrainer:
    """Everything a GRPO run needs, from its config: policy (+ adapter `policy` in LoRA mode), prompts,
    the reward function or reward model, and (optionally) a cold-start SFT warm-up on the task."""
    from rlhf_fast.data import arithmetic_split, load_prompts

    strategy = strategy if strategy is not None else train_strategy(config)
    model, tokenizer = build_model(config, adapter=POLICY)
    model.to(strategy.device)
    t, d = config.task, config.data
    if config.model.reward_model is not None:
        m = config.model
        reward_fn = load_reward_model_scorer(m.reward_model, tokenizer, model.config.vocab_size, strategy.device,
                                             attn_backend=m.attn_backend, kernel_backend=m.kernel_backend)
        train, held_out = load_prompts(d.data, subset=d.subset, eval_size=d.eval_size,
                                       synthetic_size=d.synthetic_size, seed=config.run.seed,
                                       skip_bad_examples=d.skip_bad_examples, chat_template=d.chat_template)
        train_prompts, eval_prompts = list(dict.fromkeys(train)), list(dict.fromkeys(held_out))
    else:
        problems, held_out = arithmetic_split(config.rl.eval_prompts, config.run.seed, t.max_operand, t.ops)
        train_prompts, eval_prompts = [p.prompt for p in problems], [p.prompt for p in held_out]
        reward_fn = reward_function(t.reward)
        if t.cold_start_steps:
            _cold_start_once(config, model, tokenizer, [p.to_sft() for p in problems])
    return GRPOTrainer(config, model, tokenizer, train_prompts, eval_prompts, reward_fn, strategy)


def _cold_start_once(config: GRPOConfig, model: GPT, tokenizer, examples) -> None:
    """Cold start, saved in the run directory, so a resumed run reloads the very same warmed-up base."""
    path = Path(config.run.output_dir) / COLD_START_FILE
    if config.run.resuming and path.is_file():
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
