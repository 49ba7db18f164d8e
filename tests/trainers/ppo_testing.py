"""Small PPO setups shared by the experience / PPO tests: a `tiny` base with the three LoRA roles."""

import torch

from rlhf_fast.config import from_flat
from rlhf_fast.data import ByteTokenizer, synthetic_prompts
from rlhf_fast.model import GPT, ScalarHead, add_lora
from rlhf_fast.trainers import DataSettings, LoRASettings, ModelSettings, OptimSettings, RunSettings, TrainConfig
from rlhf_fast.trainers.models import PPOModels
from rlhf_fast.trainers.ppo import PPOConfig, PPOTrainer, prompt_batches


def tiny_models(seed: int = 0, perturb_policy: bool = False, attn_backend: str = "sdpa") -> PPOModels:
    """One frozen tiny base with adapters policy / value / reward and random heads (deterministic)."""
    torch.manual_seed(seed)
    base = GPT.from_preset("tiny", attn_backend=attn_backend)
    for name in ("policy", "value", "reward"):
        add_lora(base, name, rank=4)
    reward_head = ScalarHead(base.config.n_embd)
    with torch.no_grad():
        reward_head.proj.weight.mul_(30.0)  # scores of order 1 instead of 0.01
        for n, p in base.named_parameters():  # B = 0 would make every adapter a no-op
            if ".lora_B." in n and (perturb_policy or not n.endswith(".policy")):
                p.normal_(0.0, 0.05)
    base.set_adapter("policy")
    return PPOModels(base, ScalarHead(base.config.n_embd), reward_head)


def tiny_full_models(seed: int = 0) -> PPOModels:
    """Full-parameter roles: trained policy and critic, frozen reference (a copy of the policy) and a separate
    frozen reward model, all `tiny` (deterministic)."""
    torch.manual_seed(seed)
    policy = GPT.from_preset("tiny", attn_backend="sdpa", kernel_backend="torch")
    reference = GPT.from_preset("tiny", attn_backend="sdpa", kernel_backend="torch")
    reference.load_state_dict(policy.state_dict())
    critic = GPT.from_preset("tiny", attn_backend="sdpa", kernel_backend="torch")
    reward_model = GPT.from_preset("tiny", attn_backend="sdpa", kernel_backend="torch")
    reward_head = ScalarHead(policy.config.n_embd)
    with torch.no_grad():
        reward_head.proj.weight.mul_(30.0)  # scores of order 1 instead of 0.01
    return PPOModels(policy, ScalarHead(policy.config.n_embd), reward_head, critic=critic, reference=reference,
                     reward_model=reward_model)


def tiny_trainer(tmp_path, models=None, strategy=None, scorer=None, n_eval: int = 8, **overrides) -> PPOTrainer:
    config = dict(iterations=3, rollout_batch_size=6, mini_batch_size=4, epochs=2, max_new_tokens=9,
                  device="cpu", output_dir=str(tmp_path), progress=False, lr=3e-3)
    config = from_flat(PPOConfig, **{**config, **overrides})
    tok = ByteTokenizer()
    prompts = prompt_batches(synthetic_prompts(30, 0), tok, config.rl.rollout_batch_size, 48, config.run.seed)
    held_out = [tok.encode(p) for p in synthetic_prompts(n_eval, 99)]
    return PPOTrainer(config, models if models is not None else tiny_models(), tok, prompts, held_out,
                      strategy=strategy(config) if strategy is not None else None, scorer=scorer)


def stage_config(out_dir, stage: str, steps: int, model: str | None = None) -> TrainConfig:
    """SFT (full fine-tuning of `tiny`) or RM (LoRA on the SFT export `model`) on the synthetic task."""
    return TrainConfig(
        stage=stage,
        model=ModelSettings(preset=None if model else "tiny", model=model, attn_backend="sdpa"),
        lora=LoRASettings(enabled=model is not None, rank=4),
        data=DataSettings(eval_size=64, synthetic_size=1600),
        optim=OptimSettings(lr=3e-3, max_steps=steps, warmup_steps=1, micro_batch_size=16),
        run=RunSettings(output_dir=str(out_dir), device="cpu", save_every=0, eval_every=0, progress=False),
    )
