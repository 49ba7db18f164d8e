"""GPT-2 model, LoRA adapters, heads. nn.Modules only: no RL, no DeepSpeed."""

from .compile import (
    CompileOptions,
    compile_model,
    load_compile_cache,
    region_graphs,
    save_compile_cache,
    uncompile_model,
)
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
    "CompileOptions",
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
    "compile_model",
    "disable_adapters",
    "last_token_index",
    "load_adapter",
    "load_compile_cache",
    "merge_adapter",
    "preset_config",
    "region_graphs",
    "reward_scores",
    "save_compile_cache",
    "save_adapter",
    "sequence_scores",
    "set_adapter",
    "uncompile_model",
    "unmerge_adapter",
]
