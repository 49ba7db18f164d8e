"""Hugging Face GPT-2 interop: load HF checkpoints into `GPT`, export `GPT` as an HF GPT-2 directory.

HF GPT-2 stores its attention/MLP projections as `Conv1D` with weight (in, out); ours are
nn.Linear (out, in), so those four weights are transposed both ways. Everything else maps by name.
An export's config.json carries the token ids of its tokenizer (so HF `generate` stops at EOS); a reward
model's export adds `score.weight`, which makes the same directory a `GPT2ForSequenceClassification`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .gpt2 import GPTConfig

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # HF's causal-mask buffers in old checkpoints
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HUB_PROBE_TIMEOUT_S = 10.0  # the first request to the model hub; a hub that answers answers well within it
SCORE_WEIGHT = "score.weight"  # GPT2ForSequenceClassification's (bias-free) score head, in reward-model exports


def resolve_checkpoint_dir(name_or_path: str) -> Path:
    """A local directory as is; otherwise a hub name (e.g. "gpt2-medium"): the hub cache first, then the hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    looks_local = os.sep in str(name_or_path) and not _looks_like_repo_id(str(name_or_path))
    if looks_local or path.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {name_or_path}")
    return _from_hub(str(name_or_path))


def _from_hub(name: str) -> Path:
    """The hub cache's snapshot of `name`, else a download. Offline (HF_HUB_OFFLINE) or with no hub answering
    within HUB_PROBE_TIMEOUT_S this fails at once with one line: a bare download would wait on a hub that cannot
    answer, retrying with back-off (each retry logged)."""
    from huggingface_hub import HfApi, constants, snapshot_download

    patterns = ["config.json", *_WEIGHT_FILES, "*.safetensors"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not in the cache (or an incomplete snapshot): ask the hub
        pass
    where = f"{name!r} is not a local directory and not in the Hugging Face hub cache"
    if constants.is_offline_mode():
        raise FileNotFoundError(f"{where}, and HF_HUB_OFFLINE is set (download it where the hub is reachable, "
                                "or give a local directory)")
    try:  # one short request, no retries: tells an unreachable hub or unknown repo apart from a slow download
        HfApi().model_info(name, timeout=HUB_PROBE_TIMEOUT_S)
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, ...: say what was tried, on one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FileNotFoundError(f"{where}, and the model hub did not provide it ({type(e).__name__}: {first})") from e


def _looks_like_repo_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "~"))


def _read_hf_config(directory: Path) -> dict:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if cfg.get("model_type") != "gpt2":
        raise ValueError(f"{directory} holds a {cfg.get('model_type')!r} model, not a GPT-2 checkpoint "
                         "(config.json model_type must be 'gpt2')")
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{directory}: activation_function {act!r} is not supported (GPT-2 uses gelu_new)")
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("add_cross_attention"):
        raise ValueError(f"{directory}: scale_attn_by_inverse_layer_idx / cross-attention are not supported")
    return cfg


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """One weight file; a corrupt or truncated one is a ValueError naming it, not a library traceback."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # SafetensorError, UnpicklingError, RuntimeError ("PytorchStreamReader failed ...")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: corrupt or truncated weights ({first})") from e


def _load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "model.safetensors").is_file():
        return _read_weights(directory / "model.safetensors")
    if (directory / "model.safetensors.index.json").is_file():
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        state = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(_read_weights(directory / shard))
        return state
    if (directory / "pytorch_model.bin").is_file():
        return _read_weights(directory / "pytorch_model.bin")
    raise FileNotFoundError(f"{directory} has no weights (looked for {', '.join(_WEIGHT_FILES)})")


def load_hf_gpt2(cls, name_or_path: str, **config_overrides):
    directory = resolve_checkpoint_dir(name_or_path)
    hf = _read_hf_config(directory)
    config = GPTConfig(**{
        "vocab_size": hf["vocab_size"],
        "n_positions": hf.get("n_positions", hf.get("n_ctx", 1024)),
        "n_embd": hf["n_embd"],
        "n_layer": hf["n_layer"],
        "n_head": hf["n_head"],
        "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5),
        **config_overrides,
    })
    state = _load_state_dict(directory)
    if hf.get("tie_word_embeddings", True) is False:
        raise ValueError(f"{directory}: untied lm_head (tie_word_embeddings=false) is not supported; GPT-2 ties it")
    head = state.pop("lm_head.weight", None)
    wte = state.get("transformer.wte.weight", state.get("wte.weight"))
    if head is not None and wte is not None and not torch.equal(head, wte):
        raise ValueError(f"{directory}: lm_head.weight differs from the token embedding; GPT-2 ties them")
    model = cls(config)
    ours = model.state_dict()
    loaded = set()
    with torch.no_grad():
        for key, tensor in state.items():
            if key.endswith(_IGNORED_SUFFIXES) or key == SCORE_WEIGHT:  # the score head is the reward model's
                continue
            name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
            if name not in ours:
                raise ValueError(f"{directory}: unexpected weight {key!r} for a GPT-2 checkpoint")
            if name.endswith(_CONV1D):
                tensor = tensor.t()
            if tensor.shape != ours[name].shape:
                raise ValueError(f"{directory}: {key} has shape {tuple(tensor.shape)}, "
                                 f"config.json implies {tuple(ours[name].shape)}")
            ours[name].copy_(tensor)
            loaded.add(name)
    missing = set(ours) - loaded - {"lm_head.weight"}  # lm_head is tied to wte
    if missing:
        raise ValueError(f"{directory}: checkpoint is missing {len(missing)} weights, e.g. {sorted(missing)[:3]}")
    return model


def save_hf_gpt2(model, directory, *, merge_adapter: str | None = None, token_ids: dict | None = None,
                 score_head=None) -> None:
    """Write `model` as an HF GPT-2 directory. token_ids: {"bos_token_id", "eos_token_id", "pad_token_id"} of its
    tokenizer, into config.json (default: GPT-2's <|endoftext|> for a 50,257-token vocabulary). score_head:
    (weight (1, C), bias ()) of a reward head, written as GPT2ForSequenceClassification's `score.weight`; HF's
    score has no bias, so a non-zero bias b is folded into ln_f's bias (ln_f.bias += b w / |w|^2, which adds
    exactly w . delta = b to the score); that ln_f only feeds the score in a reward-model export."""
    from safetensors.torch import save_file

    from .lora import lora_modules

    cfg = model.config
    if not cfg.bias:
        raise ValueError("save_pretrained: HF GPT-2 has biases; a model with bias=False cannot be exported")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    deltas = {}
    if merge_adapter is not None:
        from .lora import _check_adapter

        _check_adapter(model, merge_adapter)
        for mod_name, m in lora_modules(model):
            if merge_adapter in m.lora_A and m.merged_adapter != merge_adapter:
                deltas[f"{mod_name}.weight"] = m.delta_weight(merge_adapter).detach()
    state = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name or name == "lm_head.weight":  # adapters are not HF weights; lm_head is tied
            continue
        tensor = tensor.detach()
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        if name.endswith(_CONV1D):
            tensor = tensor.t()
        state[name] = tensor.contiguous().cpu()
    if score_head is not None:
        state.update(_score_state(state["transformer.ln_f.bias"], *score_head))
    hf_config = {
        "architectures": ["GPT2LMHeadModel"] if score_head is None else ["GPT2ForSequenceClassification"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions,
        "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": True,
    }
    gpt2_eos = 50256 if cfg.vocab_size == 50257 else None  # <|endoftext|> of the real GPT-2 vocabulary
    hf_config.update(token_ids or {"bos_token_id": gpt2_eos, "eos_token_id": gpt2_eos, "pad_token_id": gpt2_eos})
    if score_head is not None:
        hf_config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    # safetensors writes through a private temporary file (mode 0600): give the weights config.json's mode
    shutil.copymode(directory / "config.json", directory / "model.safetensors")


def _score_state(ln_f_bias: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"score.weight"} (+ the shifted "transformer.ln_f.bias" when the head has a bias): see `save_hf_gpt2`."""
    w = weight.detach().float().cpu().reshape(1, -1)
    if w.shape[1] != ln_f_bias.shape[0]:
        raise ValueError(f"score head weight has {w.shape[1]} inputs, the model's hidden size is {ln_f_bias.shape[0]}")
    out = {SCORE_WEIGHT: w.to(ln_f_bias.dtype).contiguous()}
    b = float(bias.detach())
    if b != 0.0:
        norm2 = float((w.double() ** 2).sum())
        if norm2 == 0.0:
            raise ValueError("the reward head's weight is all zeros: its bias cannot be folded into the export")
        shift = (b / norm2) * w[0].double()
        out["transformer.ln_f.bias"] = (ln_f_bias.double() + shift).to(ln_f_bias.dtype).contiguous()
    return out
