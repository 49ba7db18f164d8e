"""SFT, reward-model, PPO and GRPO trainers (DPO is not built yet). They take built objects, not strings to load."""

from .checkpoint import CheckpointManager
from .common import Trainer, TrainModule
from .config import DataSettings, LoRASettings, ModelSettings, OptimSettings, RunSettings, TrainConfig
from .experience import ExperienceMaker, PPOModels
from .grpo import GRPOConfig, GRPOSettings, GRPOTrainer, TaskSettings, build_grpo_trainer
from .ppo import PPOConfig, PPOTrainer, load_ppo_models
from .reward import RewardTrainer, build_reward_trainer, load_reward_model
from .reward_functions import REWARD_FUNCTIONS, RewardModelScorer, register_reward_function
from .sft import SFTTrainer, build_sft_trainer

__all__ = [
    "CheckpointManager",
    "DataSettings",
    "ExperienceMaker",
    "GRPOConfig",
    "GRPOSettings",
    "GRPOTrainer",
    "LoRASettings",
    "ModelSettings",
    "OptimSettings",
    "PPOConfig",
    "PPOModels",
    "PPOTrainer",
    "REWARD_FUNCTIONS",
    "RewardModelScorer",
    "RewardTrainer",
    "RunSettings",
    "SFTTrainer",
    "TaskSettings",
    "TrainConfig",
    "TrainModule",
    "Trainer",
    "build_grpo_trainer",
    "build_reward_trainer",
    "build_sft_trainer",
    "load_ppo_models",
    "load_reward_model",
    "register_reward_function",
]
