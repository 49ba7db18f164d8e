"""`rlhf-fast bench`: end-to-end throughput of generation, experience collection and PPO, side by side
with the baselines, on the same weights and shapes, in one run.

Sections (each a group of rows in the table and the JSON record):
  generation  tokens/s of ours eager, ours compiled, HF `generate`, and the seed's no-KV-cache loop
              (greedy, exactly `new_tokens` per prompt: no EOS);
  ppo         per kernel backend (triton / torch), a full PPO iteration of the real `PPOTrainer`
              (LoRA: one shared base): experience samples/s with its generate / score / advantages
              split, training-step tokens/s, iteration samples/s, peak memory per phase, GPU use;
  baseline    the seed-style iteration (`baselines.SeedStyleBaseline`) on the same prompts.
Weights are random init of the preset (no hub here); speed does not depend on them.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from rlhf_fast import kernels
from rlhf_fast.config import from_flat, option
from rlhf_fast.errors import ConfigError
from rlhf_fast.generation import generate, release_kv_caches
from rlhf_fast.model import GPT, PRESETS, ScalarHead, add_lora
from rlhf_fast.trainers.models import PPOModels
from rlhf_fast.trainers.ppo import PPOConfig, PPOTrainer

from .baselines import SeedStyleBaseline, hf_copy, no_cache_generate, separate_copy
from .harness import default_out_dir, median, time_fn
from .monitor import GpuSampler, PhaseMemory, cap_memory, environment, sync

BACKENDS = ("triton", "torch")
BYTES_PER_GPT2_TOKEN = 4.0  # English text; the GPT-2 BPE files are not available offline
TARGETS = {
    "iteration_x_baseline": (">=", 10.0),
    "iteration_gpu_util_pct": (">=", 85.0),
    "generate_fraction": ("<=", 0.5),
}


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
    compile: bool | None = option(None, "also time the compiled decode step (default: on CUDA)")
    hf: bool = option(True, "time HF generate")
    baseline: bool = option(True, "time the seed-style baseline iteration")
    max_vram_gb: float | None = option(None, "emulate a card with this many GiB (CUDA only), e.g. 16")
    out_dir: str | None = option(None, "record + chart directory (default: benchmarks/results on CUDA, "
                                 ".benchmarks/smoke elsewhere)")
    seed: int = option(0, "seed of the random-init weights and prompts")

    def __post_init__(self):
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        object.__setattr__(self, "device", device)
        try:
            cuda = torch.device(device).type == "cuda"
        except RuntimeError as e:
            raise ConfigError(str(e), "device") from None
        for name, value in (GPU_DEFAULTS if cuda else CPU_DEFAULTS).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "presets", tuple(self.presets))
        object.__setattr__(self, "backends", tuple(self.backends))
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
        lengths = torch.randint(
            max(1, cfg.prompt_len // 2), cfg.prompt_len + 1, (cfg.batch_size,), generator=g
        )
        return lengths.tolist(), "synthetic: uniform in [prompt_len/2, prompt_len]"
    from rlhf_fast.data.hh import ASSISTANT

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:  # the prompt: the dialogue up to its last assistant turn
        dialogues = [json.loads(line)["chosen"] for line in itertools.islice(f, 4096) if line.strip()]
    texts = [d[: d.rfind(ASSISTANT) + len(ASSISTANT)] for d in dialogues]
    pick = torch.randint(0, len(texts), (cfg.batch_size,), generator=g).tolist()
    lengths = [
        min(cfg.prompt_len, max(1, round(len(texts[i].encode()) / BYTES_PER_GPT2_TOKEN))) for i in pick
    ]
    return lengths, f"hh-rlhf {path.name}: prompt bytes / {BYTES_PER_GPT2_TOKEN:g}, capped at prompt_len"


def make_prompts(lengths: list[int], P: int, vocab: int, device, seed: int):
    """Left-padded random token ids (B, P) and their attention mask for the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), P), generator=g)
    mask = (torch.arange(P)[None, :] >= (P - torch.tensor(lengths))[:, None]).long()
    return ids.to(device), mask.to(device)


# --- sections -------------------------------------------------------------------------------------


def _oom_row(row: dict, err: Exception) -> dict:
    torch.cuda.empty_cache()
    return {**row, "status": f"out of memory: {str(err).splitlines()[0][:120]}"}


def bench_generation(cfg, model: GPT, ids, mask, device, tmp) -> list[dict]:
    """Our engine (eager, compiled), HF generate and the no-KV-cache loop on `model`'s weights."""
    B, N = ids.shape[0], cfg.new_tokens
    rows = []

    def row(impl, fn, warmup=cfg.warmup):
        r = dict(section="generation", impl=impl)
        try:
            with PhaseMemory(device) as mem:
                t = time_fn(fn, device=device, warmup=warmup, iters=cfg.iters)
        except torch.cuda.OutOfMemoryError as e:
            return rows.append(_oom_row(r, e))
        rows.append(
            {
                **r,
                "status": "ok",
                "seconds": t,
                "tokens_per_s": B * N / t,
                "peak_alloc_gib": mem.allocated_gib,
                "peak_reserved_gib": mem.reserved_gib,
            }
        )

    model.eval()
    row("ours eager", lambda: generate(model, ids, mask, max_new_tokens=N, do_sample=False, compile=False))
    if cfg.compile:
        row(
            "ours compiled",
            lambda: generate(model, ids, mask, max_new_tokens=N, do_sample=False, compile=True),
            warmup=max(1, cfg.warmup),
        )
    else:
        rows.append(dict(section="generation", impl="ours compiled", status="skipped (--no-compile)"))
    release_kv_caches(model)
    torch.compiler.reset()  # drop compiled graphs (and the weights they hold) before the next model
    if cfg.hf:
        hf = hf_copy(model, tmp, model.lm_head.weight.dtype, device)
        row(
            "hf generate",
            lambda: hf.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=N, min_new_tokens=N, pad_token_id=0
            ),
        )
        del hf
    else:
        rows.append(dict(section="generation", impl="hf generate", status="skipped (--no-hf)"))
    row("no-KV-cache loop (seed)", lambda: no_cache_generate(model, ids, mask, N), warmup=min(cfg.warmup, 1))
    eager = rows[0].get("seconds")
    for r in rows:
        if r.get("seconds") and eager:
            r["x_vs_ours_eager"] = r["seconds"] / eager
    return rows


def lora_models(base: GPT, device, dtype, backend: str, lora_rank: int, seed: int) -> PPOModels:
    """PPOModels in LoRA mode (one base, adapters policy/value/reward) on a copy of `base`'s weights with
    every kernel (attention, LoRA linear) on `backend`."""
    model = separate_copy(base, device, dtype, attn_backend=backend, kernel_backend=backend)
    torch.manual_seed(seed)
    for name in ("policy", "value", "reward"):
        add_lora(model, name, rank=lora_rank)
    C = model.config.n_embd
    heads = [
        ScalarHead(C).to(device=model.lm_head.weight.device, dtype=model.lm_head.weight.dtype) for _ in "vr"
    ]
    model.set_adapter("policy")
    return PPOModels(model, *heads)


def _phase_fields(prefix: str, mem: PhaseMemory, gpu: dict) -> dict:
    return {
        f"{prefix}_peak_alloc_gib": mem.allocated_gib,
        f"{prefix}_peak_reserved_gib": mem.reserved_gib,
        f"{prefix}_gpu_util_mean": gpu["gpu_util_mean"],
        f"{prefix}_gpu_mem_used_max_gib": gpu["gpu_mem_used_max_gib"],
    }


def ppo_config(cfg: BenchConfig, backend: str, device: torch.device, output_dir: str) -> PPOConfig:
    """The PPOConfig of our rows (the one place this suite builds one)."""
    return from_flat(PPOConfig, iterations=cfg.warmup + cfg.iters, rollout_batch_size=cfg.batch_size,
                     mini_batch_size=cfg.mini_batch_size, epochs=cfg.ppo_epochs, max_new_tokens=cfg.new_tokens,
                     kernel_backend=backend, precision=cfg.precision, device=str(device), seed=cfg.seed,
                     output_dir=output_dir, log_every=0, progress=False)


def bench_ppo(cfg, base: GPT, ids, mask, device, backend: str, sampler: GpuSampler, tmp) -> dict:
    """Warm-up + timed iterations of the real PPOTrainer; median over the timed ones."""
    row = dict(section="ppo", impl=f"ours ({backend} kernels)")
    if backend == "triton" and device.type != "cuda" and not kernels.interpreter_enabled():
        return {**row, "status": "skipped (triton needs CUDA or TRITON_INTERPRET=1)"}
    try:
        models = lora_models(base, device, getattr(torch, cfg.dtype), backend, cfg.lora_rank, cfg.seed)
        pcfg = ppo_config(cfg, backend, device, str(Path(tmp) / f"ppo-{backend}"))
        # No EOS: every response has exactly new_tokens tokens, so all rows do the same work.
        tokenizer = SimpleNamespace(eos_token_id=None, pad_token_id=0)
        trainer = PPOTrainer(
            pcfg, models, tokenizer, itertools.repeat({"input_ids": ids, "attention_mask": mask})
        )
        timed = []
        for i in range(cfg.warmup + cfg.iters):
            sync(device)
            t0 = time.perf_counter()
            with PhaseMemory(device) as mem_exp:
                exp, stats = trainer.rollout()
            t1 = time.perf_counter()
            with PhaseMemory(device) as mem_train:
                trainer.update(exp)
            t2 = time.perf_counter()
            if i >= cfg.warmup:
                timed.append((t2 - t0, t0, t1, t2, stats, mem_exp, mem_train, exp.sequences.numel()))
        release_kv_caches(models.policy)
        torch.compiler.reset()
    except torch.cuda.OutOfMemoryError as e:
        return _oom_row(row, e)
    total, t0, t1, t2, stats, mem_exp, mem_train, seq_tokens = median(timed, key=lambda x: x[0])
    B = cfg.batch_size
    out = {
        **row,
        "status": "ok",
        "seconds": total,
        "samples_per_s": B / total,
        "experience_samples_per_s": B / (t1 - t0),
        "generate_s": stats["time/generate"],
        "score_s": stats["time/score"],
        "advantages_s": stats["time/advantages"],
        "train_s": t2 - t1,
        "train_tokens_per_s": cfg.ppo_epochs * seq_tokens / (t2 - t1),
        "generate_fraction": stats["time/generate"] / total,
        **_phase_fields("experience", mem_exp, sampler.window(t0, t1)),
        **_phase_fields("train", mem_train, sampler.window(t1, t2)),
    }
    it = sampler.window(t0, t2)
    out["iteration_gpu_util_mean"] = it["gpu_util_mean"]
    if it["gpu_util_mean"] is None:
        out["gpu_util_reason"] = it["gpu_util_reason"]
    return out


def bench_baseline(cfg, base: GPT, ids, mask, device, sampler: GpuSampler) -> dict:
    row = dict(section="baseline", impl="seed-style (no KV cache, 4 models, eager, torch)")
    try:
        C = base.config.n_embd
        dtype = getattr(torch, cfg.dtype)
        heads = [ScalarHead(C).to(device=device, dtype=dtype) for _ in "vr"]
        seed_style = SeedStyleBaseline(
            base,
            device,
            dtype,
            *heads,
            max_new_tokens=cfg.new_tokens,
            mini_batch_size=cfg.mini_batch_size,
            ppo_epochs=cfg.ppo_epochs,
            lora_rank=cfg.lora_rank,
            precision=cfg.precision,
            seed=cfg.seed,
        )
        timed = []
        for i in range(min(cfg.warmup, 1) + cfg.iters):  # one warm-up at most: it is the slow one
            sync(device)
            t0 = time.perf_counter()
            with PhaseMemory(device) as mem:
                times = seed_style.iteration(ids, mask)
            t1 = time.perf_counter()
            if i >= min(cfg.warmup, 1):
                timed.append((t1 - t0, t0, t1, times, mem))
        del seed_style
    except torch.cuda.OutOfMemoryError as e:
        return _oom_row(row, e)
    total, t0, t1, times, mem = median(timed, key=lambda x: x[0])
    B = cfg.batch_size
    gpu = sampler.window(t0, t1)
    return {
        **row,
        "status": "ok",
        "seconds": total,
        "samples_per_s": B / total,
        "generate_s": times["time/generate"],
        "score_s": times["time/score"],
        "advantages_s": times["time/advantages"],
        "train_s": times["time/train"],
        "generate_fraction": times["time/generate"] / total,
        "iteration_peak_alloc_gib": mem.allocated_gib,
        "iteration_peak_reserved_gib": mem.reserved_gib,
        "iteration_gpu_util_mean": gpu["gpu_util_mean"],
    }


def targets(rows: list[dict], on_gpu: bool) -> dict:
    """The GPU targets per preset, from the fastest backend of ours vs the baseline ("met" is None off
    CUDA: tiny CPU sizes say nothing about them)."""
    out = {}
    for preset in dict.fromkeys(r["preset"] for r in rows):
        ours = [r for r in rows if r["preset"] == preset and r["section"] == "ppo" and r.get("seconds")]
        base = next(
            (r for r in rows if r["preset"] == preset and r["section"] == "baseline" and r.get("seconds")),
            None,
        )
        if not ours:
            continue
        best = min(ours, key=lambda r: r["seconds"])
        values = {
            "iteration_x_baseline": base["seconds"] / best["seconds"] if base else None,
            "iteration_gpu_util_pct": best.get("iteration_gpu_util_mean"),
            "generate_fraction": best["generate_fraction"],
        }
        out[preset] = {
            k: {
                "value": v,
                "target": f"{TARGETS[k][0]} {TARGETS[k][1]:g}",
                "best": best["impl"],
                "met": None
                if v is None or not on_gpu
                else (v >= TARGETS[k][1] if TARGETS[k][0] == ">=" else v <= TARGETS[k][1]),
            }
            for k, v in values.items()
        }
    return out


def run_bench(cfg: BenchConfig) -> dict:
    """Run every section for every preset; returns the record (environment, config, rows, targets, ...)."""
    device = torch.device(cfg.device)
    cap = cap_memory(cfg.max_vram_gb, device) if cfg.max_vram_gb is not None else None
    dtype = getattr(torch, cfg.dtype)
    lengths, length_source = prompt_lengths(cfg)
    rows = []
    with GpuSampler(device) as sampler, tempfile.TemporaryDirectory() as tmp:
        for preset in cfg.presets:
            torch.manual_seed(cfg.seed)
            base = GPT.from_preset(preset)  # fp32 on the CPU: every section copies it to the device
            ids, mask = make_prompts(lengths, cfg.prompt_len, base.config.vocab_size, device, cfg.seed)
            section_rows = bench_generation(cfg, separate_copy(base, device, dtype), ids, mask, device, tmp)
            section_rows += [bench_ppo(cfg, base, ids, mask, device, b, sampler, tmp) for b in cfg.backends]
            if cfg.baseline:
                section_rows.append(bench_baseline(cfg, base, ids, mask, device, sampler))
            rows += [{"preset": preset, **r} for r in section_rows]
            del base
            if device.type == "cuda":
                torch.cuda.empty_cache()
        gpu_reason = None if sampler.available else sampler.reason
    config = dataclasses.asdict(cfg)
    return {
        "benchmark": "e2e",
        "environment": environment(),
        "config": config,
        "memory_cap": cap,
        "prompt_lengths": {
            "source": length_source,
            "mean": sum(lengths) / len(lengths),
            "min": min(lengths),
            "max": max(lengths),
        },
        "gpu_monitor": {"available": gpu_reason is None, "reason": gpu_reason},
        "rows": rows,
        "targets": targets(rows, device.type == "cuda"),
    }


def bench_command(cfg: BenchConfig) -> int:
    """`rlhf-fast bench`: run, print the report, write the JSON record and the PNG chart."""
    from .report import format_report, write_chart, write_json

    record = run_bench(cfg)
    print(format_report(record))
    path = write_json(record, Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg.device))
    chart = write_chart(record, path.with_suffix(".png"))
    print(f"\nrecord: {path}\nchart:  {chart}")
    return 0
