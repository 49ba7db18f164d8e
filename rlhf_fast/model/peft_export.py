"""Write a LoRA adapter as a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`), without
peft installed: `peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), directory)` then runs the
same model as ours with that adapter on.

Our LoRALinear wraps an nn.Linear (weight (out, in)); HF GPT-2 has Conv1D (weight (in, out)) in the same
places, under the same module names. PEFT's LoRA on a Conv1D keeps lora_A (r, in) and lora_B (out, r), the
layout of ours, so A and B are written as they are; `fan_in_fan_out: true` tells PEFT that the base weight is
(in, out) when it merges. PEFT's scale is lora_alpha / r, as ours.
"""

from __future__ import annotations

import json
from pathlib import Path

from .hf import SCORE_WEIGHT, _score_state
from .lora import _check_adapter, lora_modules

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model


def save_peft_adapter(model, adapter: str, directory, *, base_model_name_or_path: str, score_head=None) -> Path:
    """Write adapter `adapter` of `model` as a PEFT LoRA directory whose base is `base_model_name_or_path` (an HF
    GPT-2 directory or hub name holding `model`'s weights without adapters).

    score_head: (weight (1, C), bias ()) of a reward head: the adapter is then one of a
    GPT2ForSequenceClassification (task SEQ_CLS) and carries `score` (and, for a non-zero bias, a shifted `ln_f`,
    see `hf.save_hf_gpt2`) as PEFT `modules_to_save`."""
    from safetensors.torch import save_file

    _check_adapter(model, adapter)
    cfg = model.lora_configs[adapter]
    state = {}
    for mod_name, m in lora_modules(model):
        if adapter not in m.lora_A:
            continue
        if m.merged_adapter is not None:
            raise ValueError(f"{mod_name}: adapter {m.merged_adapter!r} is merged into the base weights; "
                             "unmerge_adapter() before exporting an adapter")
        state[f"{_PREFIX}{mod_name}.lora_A.weight"] = m.lora_A[adapter].detach().float().cpu().contiguous()
        state[f"{_PREFIX}{mod_name}.lora_B.weight"] = m.lora_B[adapter].detach().float().cpu().contiguous()
    modules_to_save = None
    if score_head is not None:
        ln_f_bias = model.transformer.ln_f.bias.detach().float().cpu()
        head = _score_state(ln_f_bias, *score_head)
        state[f"{_PREFIX}{SCORE_WEIGHT}"] = head[SCORE_WEIGHT].float()
        modules_to_save = ["score"]
        if "transformer.ln_f.bias" in head:  # the folded bias: this adapter's own ln_f
            modules_to_save.append("ln_f")
            state[f"{_PREFIX}transformer.ln_f.weight"] = model.transformer.ln_f.weight.detach().float().cpu()
            state[f"{_PREFIX}transformer.ln_f.bias"] = head["transformer.ln_f.bias"].float()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if score_head is None else "SEQ_CLS",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        # our targets are module-name suffixes ("attn.c_attn"), as PEFT matches target_modules; the HF GPT-2 names
        "target_modules": list(cfg.targets),
        "fan_in_fan_out": True,  # HF GPT-2's Conv1D stores its weight (in, out)
        "bias": "none",
        "modules_to_save": modules_to_save,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory

