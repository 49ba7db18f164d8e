"""`rlhf-fast bench`'s settings (BenchConfig) and its prompts: how many, how long, from where."""

from __future__ import annotations

import gzip
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_fast.config import option, resolve_device
from rlhf_fast.errors import ConfigError
from rlhf_fast.model import PRESETS

BACKENDS = ("triton", "torch")
SECTIONS = ("ppo", "baseline", "generation")  # the order they run in: the end-to-end numbers first
BYTES_PER_GPT2_TOKEN = 4.0  # English text; the GPT-2 BPE files are not available offline

# The reference sizes on CUDA; tiny sizes (a smoke run, times meaningless) elsewhere: what a setting left at
# None becomes on the run's device.
GPU_DEFAULTS = dict(presets=("gpt2", "gpt2-medium"), batch_size=64, prompt_len=256, new_tokens=128, dtype="bfloat16",
                    mini_batch_size=8, compile=True)
CPU_DEFAULTS = dict(presets=("tiny",), batch_size=4, prompt_len=12, new_tokens=6, dtype="float32", mini_batch_size=2,
                    compile=False)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class BenchConfig:
    """`rlhf-fast bench`. Settings left unset take the device's defaults (GPU_DEFAULTS on CUDA, CPU_DEFAULTS
    elsewhere) when the config is built."""

    presets: tuple[str, ...] | None = option(None, "model preset, repeatable (default: gpt2 and gpt2-medium on "
                                             "CUDA, tiny on CPU)", flag="--preset", append=True)
    sections: tuple[str, ...] = option(SECTIONS, "what to time, repeatable; they run in the order ppo, baseline, "
                                       "generation", flag="--section", append=True, choices=SECTIONS)
    batch_size: int | None = option(None, "prompts per PPO iteration, one response each (default: 64; CPU 4)")
    prompt_len: int | None = option(None, "left-padded prompt width in tokens (default: 256; CPU 12)")
    new_tokens: int | None = option(None, "tokens generated per prompt, no EOS (default: 128; CPU 6)")
    dtype: str | None = option(None, "model weights; PPO runs under autocast of the same dtype (default: "
                               "bfloat16; CPU float32)", choices=DTYPES)
    device: str | None = option(None, "cuda, cuda:1, cpu, ... (default: cuda when available)")
    backends: tuple[str, ...] = option(BACKENDS, "kernel backend of our PPO rows, repeatable", flag="--backend",
                                       append=True, choices=BACKENDS)
    mini_batch_size: int | None = option(None, "sequences per PPO optimizer step; divides --batch-size (default: 8; "
                                         "CPU 2)")
    ppo_epochs: int = option(1, "passes over each rollout")
    lora_rank: int = option(8, "LoRA rank of the policy / value / reward adapters")
    warmup: int = option(1, "untimed iterations first (compilation, allocator warm-up)")
    iters: int = option(2, "timed iterations; the median is reported")
    data: str = option("synthetic", "prompt lengths: synthetic (uniform in [P/2, P]) or an HH-RLHF .jsonl(.gz) file "
                       "or a directory of them")
    eager: bool = option(True, "time our PPO rows eagerly (--no-eager: only the compiled ones, e.g. to time a cold "
                         "start)")
    compile: bool | None = option(None, "also time the compiled rows: PPO with compile_model, the inductor decode "
                                  "step, HF generate compiled (default: on CUDA)")
    hf: bool = option(True, "time HF generate (static cache)")
    max_vram_gb: float | None = option(None, "emulate a card with this many GiB (CUDA only), e.g. 16")
    out_dir: str | None = option(None, "record + chart directory (default: benchmarks/results on CUDA, "
                                 ".benchmarks/smoke elsewhere)")
    seed: int = option(0, "seed of the random-init weights and prompts")

    def __post_init__(self):
        device = resolve_device(self.device)
        object.__setattr__(self, "device", self.device or device.type)
        cuda = device.type == "cuda"
        for name, value in (GPU_DEFAULTS if cuda else CPU_DEFAULTS).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in ("presets", "backends", "sections"):  # a repeated value runs once
            object.__setattr__(self, name, tuple(dict.fromkeys(getattr(self, name))))
        for name in ("batch_size", "prompt_len", "new_tokens", "mini_batch_size", "ppo_epochs", "lora_rank", "iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", name)
        if self.warmup < 0:
            raise ConfigError(f"must be >= 0, got {self.warmup}", "warmup")
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(f"{self.mini_batch_size} does not divide the batch size {self.batch_size} (whole "
                              "minibatches per PPO epoch)", "mini_batch_size")
        unknown = [p for p in self.presets if p not in PRESETS]
        if unknown or not self.presets:
            raise ConfigError(f"unknown preset(s) {unknown}; known: {', '.join(PRESETS)}", "presets")
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad or not self.backends:
            raise ConfigError(f"must be among {BACKENDS}, got {list(self.backends)}", "backends")
        bad = [s for s in self.sections if s not in SECTIONS]
        if bad or not self.sections:
            raise ConfigError(f"must be among {SECTIONS}, got {list(self.sections)}", "sections")
        if "ppo" in self.sections and not (self.eager or self.compile):
            raise ConfigError("--no-eager with --no-compile leaves no PPO row to time", "eager")
        if self.dtype not in DTYPES:
            raise ConfigError(f"must be one of {DTYPES}, got {self.dtype!r}", "dtype")
        for p in self.presets:
            if self.prompt_len + self.new_tokens > PRESETS[p].get("n_positions", 1024):
                raise ConfigError(f"prompt_len + new_tokens = {self.prompt_len + self.new_tokens} exceeds {p}'s "
                                  f"context of {PRESETS[p].get('n_positions', 1024)} positions", "prompt_len")
        if self.data != "synthetic" and not Path(self.data).exists():
            raise ConfigError(f"{self.data} not found (an HH-RLHF .jsonl(.gz) file or directory, or synthetic)", "data")
        if self.max_vram_gb is not None and (not cuda or self.max_vram_gb <= 0):
            raise ConfigError(f"{self.max_vram_gb:g} emulates a smaller GPU: it needs a CUDA device (this run is on "
                              f"{device}) and a size > 0", "max_vram_gb")

    @property
    def precision(self) -> str:
        return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[self.dtype]


# --- prompts --------------------------------------------------------------------------------------


def _hh_file(data: str) -> Path | None:
    if data == "synthetic":
        return None
    path = Path(data)
    found = path if path.is_file() else min(path.glob("*.jsonl*"), default=None)
    if found is None:
        raise ConfigError(f"{data} holds no .jsonl(.gz) file", "data")
    return found


def prompt_lengths(cfg: BenchConfig) -> tuple[list[int], str]:
    """batch_size prompt lengths in [1, prompt_len] and where they came from. HH-RLHF: the lengths of
    its prompts in GPT-2 tokens, estimated as bytes / 4 (kept from the end, like the trainers do);
    synthetic: uniform in [prompt_len / 2, prompt_len]."""
    g = torch.Generator().manual_seed(cfg.seed)
    path = _hh_file(cfg.data)
    if path is None:
        lengths = torch.randint(max(1, cfg.prompt_len // 2), cfg.prompt_len + 1, (cfg.batch_size,), generator=g)
        return lengths.tolist(), "synthetic: uniform in [prompt_len/2, prompt_len]"
    from rlhf_fast.data.hh import ASSISTANT

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:  # the prompt: the dialogue up to its last assistant turn
        dialogues = [json.loads(line)["chosen"] for line in itertools.islice(f, 4096) if line.strip()]
    texts = [d[: d.rfind(ASSISTANT) + len(ASSISTANT)] for d in dialogues]
    pick = torch.randint(0, len(texts), (cfg.batch_size,), generator=g).tolist()
    lengths = [min(cfg.prompt_len, max(1, round(len(texts[i].encode()) / BYTES_PER_GPT2_TOKEN))) for i in pick]
    return lengths, f"hh-rlhf {path.name}: prompt bytes / {BYTES_PER_GPT2_TOKEN:g}, capped at prompt_len"


def make_prompts(lengths: list[int], P: int, vocab: int, device, seed: int):
    """Left-padded random token ids (B, P) and their attention mask for the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), P), generator=g)
    mask = (torch.arange(P)[None, :] >= (P - torch.tensor(lengths))[:, None]).long()
    return ids.to(device), mask.to(device)
