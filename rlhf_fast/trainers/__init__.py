"""SFT, reward-model and DPO trainers, and PPO / GRPO / the critic-free family over one RL loop. They take
built objects, not strings to load."""

from .checkpoint import CheckpointManager
from .config import DataSettings, DPOSettings, LoRASettings, ModelSettings, OptimSettings, RunSettings, TrainConfig
from .dpo import DPOTrainer, build_dpo_trainer
from .experience import ExperienceMaker
from .grpo import GRPOTrainer, build_grpo_trainer
from .loop import Trainer, TrainModule
from .models import PPOModels
from .ppo import PPOTrainer, build_ppo_trainer, load_ppo_models
from .reward import RewardTrainer, build_reward_trainer, load_reward_model
from .reward_functions import (
    REWARD_FUNCTIONS,
    FunctionScorer,
    ModelScorer,
    Scorer,
    WeightedScorer,
    register_reward_function,
)
from .rl_config import GRPOConfig, PPOConfig, RLConfig, RLSettings, TaskSettings
from .rl_loop import RLTrainer
from .sft import SFTTrainer, build_sft_trainer

__all__ = [
    "CheckpointManager",
    "DPOSettings",
    "DPOTrainer",
    "DataSettings",
    "ExperienceMaker",
    "FunctionScorer",
    "GRPOConfig",
    "GRPOTrainer",
    "LoRASettings",
    "ModelScorer",
    "ModelSettings",
    "OptimSettings",
    "PPOConfig",
    "PPOModels",
    "PPOTrainer",
    "RLConfig",
    "REWARD_FUNCTIONS",
    "RLSettings",
    "RLTrainer",
    "RewardTrainer",
    "RunSettings",
    "Scorer",
    "SFTTrainer",
    "TaskSettings",
    "TrainConfig",
    "TrainModule",
    "Trainer",
    "WeightedScorer",
    "build_dpo_trainer",
    "build_grpo_trainer",
    "build_ppo_trainer",
    "build_reward_trainer",
    "build_sft_trainer",
    "load_ppo_models",
    "load_reward_model",
    "register_reward_function",
]
