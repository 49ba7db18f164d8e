"""SFT, reward-model and DPO trainers, and PPO / GRPO / the critic-free family over one RL loop. They take
built objects, not strings to load."""

from .checkpoint import CheckpointManager
from .common import Trainer, TrainModule
from .config import (
    DataSettings,
    DPOSettings,
    LoRASettings,
    ModelSettings,
    OptimSettings,
    RLSettings,
    RunSettings,
    TrainConfig,
)
from .dpo import DPOTrainer, build_dpo_trainer
from .experience import ExperienceMaker
from .grpo import GRPOConfig, GRPOSettings, GRPOTrainer, TaskSettings, build_grpo_trainer
from .models import PPOModels
from .ppo import PPOConfig, PPOTrainer, load_ppo_models
from .reward import RewardTrainer, build_reward_trainer, load_reward_model
from .reward_functions import (
    REWARD_FUNCTIONS,
    FunctionScorer,
    ModelScorer,
    Scorer,
    WeightedScorer,
    register_reward_function,
)
from .rl_loop import LoopSettings, RLTrainer, build_rl_strategy
from .sft import SFTTrainer, build_sft_trainer

__all__ = [
    "CheckpointManager",
    "DPOSettings",
    "DPOTrainer",
    "DataSettings",
    "ExperienceMaker",
    "FunctionScorer",
    "GRPOConfig",
    "GRPOSettings",
    "GRPOTrainer",
    "LoRASettings",
    "LoopSettings",
    "ModelScorer",
    "ModelSettings",
    "OptimSettings",
    "PPOConfig",
    "PPOModels",
    "PPOTrainer",
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
    "build_rl_strategy",
    "build_reward_trainer",
    "build_sft_trainer",
    "load_ppo_models",
    "load_reward_model",
    "register_reward_function",
]
