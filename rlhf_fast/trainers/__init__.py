"""SFT, reward-model, PPO, GRPO and DPO trainers. They take built objects, not strings to load."""

from .checkpoint import CheckpointManager
from .common import Trainer, TrainModule
from .config import DataSettings, LoRASettings, ModelSettings, OptimSettings, RunSettings, TrainConfig
from .experience import ExperienceMaker, PPOModels
from .ppo import PPOConfig, PPOTrainer, load_ppo_models
from .reward import RewardTrainer, build_reward_trainer, load_reward_model
from .sft import SFTTrainer, build_sft_trainer

__all__ = [
    "CheckpointManager",
    "DataSettings",
    "ExperienceMaker",
    "LoRASettings",
    "ModelSettings",
    "OptimSettings",
    "PPOConfig",
    "PPOModels",
    "PPOTrainer",
    "RewardTrainer",
    "RunSettings",
    "SFTTrainer",
    "TrainConfig",
    "TrainModule",
    "Trainer",
    "build_reward_trainer",
    "build_sft_trainer",
    "load_ppo_models",
    "load_reward_model",
]
