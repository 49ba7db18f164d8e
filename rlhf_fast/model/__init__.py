"""GPT-2 model, LoRA adapters, heads. nn.Modules only: no RL, no DeepSpeed."""

from .gpt2 import ATTN_BACKENDS, GPT, PRESETS, GPTConfig, preset_config
from .heads import RewardHead, ScalarHead, ValueHead, last_token_index, reward_scores, sequence_scores
from .lora import (
    LoRAConfig,
    LoRALinear,
    adapter_parameters,
    adapter_state_dict,
    add_lora,
    disable_adapters,
    load_adapter,
    merge_adapter,
    save_adapter,
    set_adapter,
    unmerge_adapter,
)

__all__ = [
    "ATTN_BACKENDS",
    "GPT",
    "GPTConfig",
    "LoRAConfig",
    "LoRALinear",
    "PRESETS",
    "RewardHead",
    "ScalarHead",
    "ValueHead",
    "adapter_parameters",
    "adapter_state_dict",
    "add_lora",
    "disable_adapters",
    "last_token_index",
    "load_adapter",
    "merge_adapter",
    "preset_config",
    "reward_scores",
    "save_adapter",
    "sequence_scores",
    "set_adapter",
    "unmerge_adapter",
]
