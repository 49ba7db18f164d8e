"""`rlhf-fast bench`: end-to-end throughput of PPO, experience collection and generation, side by side with the
baselines, on the same weights and shapes, in one run.

Sections, in the order they run (each a group of rows in the table and the JSON record):
  ppo         per mode (eager first, then compiled: the trainer's `compile_model`) and kernel backend (triton /
              torch), a full PPO iteration of the real `PPOTrainer` (LoRA: one shared base): experience
              samples/s with its generate / score / advantages split, training-step tokens/s, iteration
              samples/s, peak memory per phase, GPU use, and first_iteration_s: model build -> end of the first
              iteration (compile included);
  baseline    the seed-style iteration (`baselines.SeedStyleBaseline`) on the same prompts;
  generation  tokens/s of ours eager, ours CUDA graph (+ inductor), HF `generate` with a static cache (+ compile)
              and the seed's no-KV-cache loop (`generation_bench`; greedy, exactly `new_tokens` per prompt).
The record is rewritten after every row (`complete` false until the end), so a run cut short keeps its rows.
Cold start (`record["cold_start"]`): the first compiled PPO row's model build -> end of its first iteration, and
the same from process start; target <= 60 s, <= 20 s with the compile cache ($RLHF_FAST_COMPILE_CACHE=<dir>: the
trainer loads it when it compiles and saves it after its first iteration; `compile_cache` in the record). Weights
are random init of the preset (no hub here); speed does not depend on them.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from rlhf_fast import kernels
from rlhf_fast.config import from_flat
from rlhf_fast.generation import release_kv_caches
from rlhf_fast.model import GPT, ScalarHead, add_lora
from rlhf_fast.model.compile import CACHE_FILE, cache_dir
from rlhf_fast.trainers.models import PPOModels
from rlhf_fast.trainers.ppo import PPOConfig, PPOTrainer

from .baselines import SeedStyleBaseline, separate_copy
from .bench_config import BACKENDS, SECTIONS, BenchConfig, make_prompts, prompt_lengths
from .generation_bench import generation_rows, judge
from .harness import default_out_dir, median
from .monitor import GpuSampler, PhaseMemory, cap_memory, environment, sync

__all__ = ["BACKENDS", "SECTIONS", "BenchConfig", "bench_command", "run_bench"]

TARGETS = {
    "iteration_x_baseline": (">=", 10.0),
    "iteration_gpu_util_pct": (">=", 85.0),
    "generate_fraction": ("<=", 0.5),
    "cold_start_s": ("<=", 60.0),  # model build -> end of the first compiled PPO iteration, compile included
}
COLD_START_CACHED_S = 20.0  # the cold-start target when the compile cache was loaded


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), None where that cannot be read."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# --- the compile cache: the trainer's (RunCompiler: loaded when it compiles, saved after its first step) ------


def cache_file_bytes() -> int | None:
    """The size of $RLHF_FAST_COMPILE_CACHE/compile_cache.bin, None when there is none."""
    directory = cache_dir()
    path = directory / CACHE_FILE if directory else None
    return path.stat().st_size if path is not None and path.exists() else None


# --- ppo and baseline rows ----------------------------------------------------------------------------


def _oom_row(row: dict, err: Exception) -> dict:
    torch.cuda.empty_cache()
    return {**row, "status": f"out of memory: {str(err).splitlines()[0][:120]}"}


def lora_models(base: GPT, device, dtype, backend: str, lora_rank: int, seed: int) -> PPOModels:
    """PPOModels in LoRA mode (one base, adapters policy/value/reward) on a copy of `base`'s weights with
    every kernel (attention, LoRA linear) on `backend`."""
    model = separate_copy(base, device, dtype, attn_backend=backend, kernel_backend=backend)
    torch.manual_seed(seed)
    for name in ("policy", "value", "reward"):
        add_lora(model, name, rank=lora_rank)
    C = model.config.n_embd
    heads = [ScalarHead(C).to(device=model.lm_head.weight.device, dtype=model.lm_head.weight.dtype) for _ in "vr"]
    model.set_adapter("policy")
    return PPOModels(model, *heads)


def _phase_fields(prefix: str, mem: PhaseMemory, gpu: dict) -> dict:
    return {
        f"{prefix}_peak_alloc_gib": mem.allocated_gib,
        f"{prefix}_peak_reserved_gib": mem.reserved_gib,
        f"{prefix}_gpu_util_mean": gpu["gpu_util_mean"],
        f"{prefix}_gpu_mem_used_max_gib": gpu["gpu_mem_used_max_gib"],
    }


def ppo_config(cfg: BenchConfig, backend: str, compiled: bool, device: torch.device, output_dir: str) -> PPOConfig:
    """The PPOConfig of our rows (the one place this suite builds one)."""
    return from_flat(PPOConfig, iterations=cfg.warmup + cfg.iters, rollout_batch_size=cfg.batch_size,
                     mini_batch_size=cfg.mini_batch_size, epochs=cfg.ppo_epochs, max_new_tokens=cfg.new_tokens,
                     kernel_backend=backend, precision=cfg.precision, device=str(device), seed=cfg.seed,
                     compile=compiled, output_dir=output_dir, log_every=0, progress=False)


def bench_ppo(cfg, base: GPT, ids, mask, device, backend: str, compiled: bool, sampler: GpuSampler, tmp) -> dict:
    """Warm-up + timed iterations of the real PPOTrainer (the first one also timed from the model build:
    its cold start); median over the timed ones."""
    mode = "compiled" if compiled else "eager"
    row = dict(section="ppo", impl=f"ours ({backend} kernels, {mode})", backend=backend, mode=mode)
    if backend == "triton" and device.type != "cuda" and not kernels.interpreter_enabled():
        return {**row, "status": "skipped (triton needs CUDA or TRITON_INTERPRET=1)"}
    try:
        t_build = time.perf_counter()
        models = lora_models(base, device, getattr(torch, cfg.dtype), backend, cfg.lora_rank, cfg.seed)
        pcfg = ppo_config(cfg, backend, compiled, device, str(Path(tmp) / f"ppo-{backend}-{mode}"))
        # No EOS: every response has exactly new_tokens tokens, so all rows do the same work.
        tokenizer = SimpleNamespace(eos_token_id=None, pad_token_id=0)
        trainer = PPOTrainer(pcfg, models, tokenizer, itertools.repeat({"input_ids": ids, "attention_mask": mask}))
        compiler = getattr(trainer, "compiler", None)
        timed, first, compiles = [], {}, []
        for i in range(cfg.warmup + cfg.iters):
            sync(device)
            t0 = time.perf_counter()
            with PhaseMemory(device) as mem_exp:
                exp, stats = trainer.rollout()
            t1 = time.perf_counter()
            with PhaseMemory(device) as mem_train:
                trainer.update(exp)
            sync(device)
            t2 = time.perf_counter()
            # what trainer.step() does after an iteration: count new graphs; the first one saves the compile cache
            compiles.append(compiler.step_metrics().get("compiles") if compiler is not None else None)
            if i == 0:
                first = {"first_iteration_s": t2 - t_build, "first_iteration_from_process_start_s": process_age_s(),
                         "compile_cache_loaded": getattr(compiler, "loaded", None)}
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
        **first,
        "compiles_first_iteration": compiles[0],
        "compiles_after_first": sum(compiles[1:]) if None not in compiles else None,
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
        dtype = getattr(torch, cfg.dtype)
        heads = [ScalarHead(base.config.n_embd).to(device=device, dtype=dtype) for _ in "vr"]
        seed_style = SeedStyleBaseline(base, device, dtype, *heads, max_new_tokens=cfg.new_tokens,
                                       mini_batch_size=cfg.mini_batch_size, ppo_epochs=cfg.ppo_epochs,
                                       lora_rank=cfg.lora_rank, precision=cfg.precision, seed=cfg.seed)
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
    gpu = sampler.window(t0, t1)
    return {**row, "status": "ok", "seconds": total, "samples_per_s": cfg.batch_size / total,
            "generate_s": times["time/generate"], "score_s": times["time/score"],
            "advantages_s": times["time/advantages"], "train_s": times["time/train"],
            "generate_fraction": times["time/generate"] / total, "iteration_peak_alloc_gib": mem.allocated_gib,
            "iteration_peak_reserved_gib": mem.reserved_gib, "iteration_gpu_util_mean": gpu["gpu_util_mean"]}


# --- targets and the record ----------------------------------------------------------------------------


def targets(rows: list[dict], cold_start: dict | None, on_gpu: bool) -> dict:
    """The GPU targets per preset, from the fastest of our PPO rows vs the baseline, and the cold start ("met"
    is None off CUDA: tiny CPU sizes say nothing about them; the cold start is judged on a compiled row only)."""
    out = {}
    for preset in dict.fromkeys(r["preset"] for r in rows):
        ours = [r for r in rows if r["preset"] == preset and r["section"] == "ppo" and r.get("seconds")]
        base = next((r for r in rows if r["preset"] == preset and r["section"] == "baseline" and r.get("seconds")),
                    None)
        judged = {}
        if ours:
            best = min(ours, key=lambda r: r["seconds"])
            values = {"iteration_x_baseline": base["seconds"] / best["seconds"] if base else None,
                      "iteration_gpu_util_pct": best.get("iteration_gpu_util_mean"),
                      "generate_fraction": best["generate_fraction"]}
            judged = {k: (v, TARGETS[k][1], best["impl"], on_gpu) for k, v in values.items()}
        if cold_start and cold_start["preset"] == preset:
            bound = COLD_START_CACHED_S if cold_start["compile_cache_loaded"] else TARGETS["cold_start_s"][1]
            judged["cold_start_s"] = (cold_start["seconds"], bound, cold_start["impl"],
                                      on_gpu and cold_start["compiled"])
        out[preset] = {k: {"value": v, "target": f"{TARGETS[k][0]} {bound:g}", "best": impl,
                           "met": judge(v, TARGETS[k][0], bound, ok)} for k, (v, bound, impl, ok) in judged.items()}
    return {p: t for p, t in out.items() if t}


def cold_start_of(row: dict) -> dict:
    return {"preset": row["preset"], "impl": row["impl"], "compiled": row["mode"] == "compiled",
            "seconds": row["first_iteration_s"], "compile_cache_loaded": row.get("compile_cache_loaded"),
            "from_process_start_s": row.get("first_iteration_from_process_start_s")}


def run_bench(cfg: BenchConfig, on_update: Callable[[dict], None] | None = None) -> dict:
    """Run every section for every preset; returns the record (environment, config, rows, targets, ...).
    on_update(record) after every row, with `complete` false until the last."""
    device = torch.device(cfg.device)
    cap = cap_memory(cfg.max_vram_gb, device) if cfg.max_vram_gb is not None else None
    dtype = getattr(torch, cfg.dtype)
    lengths, length_source = prompt_lengths(cfg)
    cache = cache_dir()
    record = {"benchmark": "e2e", "environment": environment(), "config": dataclasses.asdict(cfg), "memory_cap": cap,
              "prompt_lengths": {"source": length_source, "mean": sum(lengths) / len(lengths), "min": min(lengths),
                                 "max": max(lengths)},
              "gpu_monitor": None, "compile_cache": {"dir": str(cache) if cache else None, "loaded": None,
                                                     "bytes": cache_file_bytes()},
              "cold_start": None, "rows": [], "targets": {}, "complete": False}

    def add(row: dict) -> None:
        record["rows"].append(row)
        cache = record["compile_cache"]
        if row.get("mode") == "compiled":  # the file as the trainer saved it; loaded: the first compiled trainer's word
            cache["bytes"] = cache_file_bytes()
            cache["loaded"] = row.get("compile_cache_loaded") if cache["loaded"] is None else cache["loaded"]
        cold = record["cold_start"]  # the first compiled PPO row's, else the first PPO row's
        if row.get("first_iteration_s") is not None and (cold is None or (not cold["compiled"]
                                                                          and row["mode"] == "compiled")):
            record["cold_start"] = cold_start_of(row)
        record["targets"] = targets(record["rows"], record["cold_start"], device.type == "cuda")
        if on_update is not None:
            on_update(record)

    with GpuSampler(device) as sampler, tempfile.TemporaryDirectory() as tmp:
        record["gpu_monitor"] = {"available": sampler.available,
                                 "reason": None if sampler.available else sampler.reason}
        for preset in cfg.presets:
            torch.manual_seed(cfg.seed)
            base = GPT.from_preset(preset)  # fp32 on the CPU: every section copies it to the device
            ids, mask = make_prompts(lengths, cfg.prompt_len, base.config.vocab_size, device, cfg.seed)
            if "ppo" in cfg.sections:
                for compiled in [False] * cfg.eager + [True] * bool(cfg.compile):
                    for backend in cfg.backends:
                        add({"preset": preset, **bench_ppo(cfg, base, ids, mask, device, backend, compiled, sampler,
                                                           tmp)})
            if "baseline" in cfg.sections:
                add({"preset": preset, **bench_baseline(cfg, base, ids, mask, device, sampler)})
            if "generation" in cfg.sections:
                model = separate_copy(base, device, dtype)
                impls = ["eager", "cuda_graph", *["inductor"] * bool(cfg.compile), *["hf_static"] * cfg.hf, "nocache"]
                added = []

                def on_row(rows, preset=preset, added=added):
                    added.append({"preset": preset, "section": "generation", **rows[-1]})
                    add(added[-1])

                rows = generation_rows(model, ids, mask, cfg.new_tokens, impls, device=device, warmup=cfg.warmup,
                                       iters=cfg.iters, tmp=tmp, compile_hf=bool(cfg.compile) and device.type == "cuda",
                                       on_row=on_row)
                for rec_row, row in zip(added, rows):
                    rec_row.update(row)  # the ratios to ours eager, known once every row ran
                release_kv_caches(model)
                del model
                torch.compiler.reset()  # drop compiled graphs (and the weights they hold) before the next model
            del base
            if device.type == "cuda":
                torch.cuda.empty_cache()
    record["complete"] = True
    if on_update is not None:
        on_update(record)
    return record


def bench_command(cfg: BenchConfig) -> int:
    """`rlhf-fast bench`: run, print the report, write the JSON record (after every row) and the PNG chart."""
    from .report import format_report, write_chart, write_json

    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg.device)
    record = run_bench(cfg, on_update=lambda rec: write_json(rec, out_dir))
    path = write_json(record, out_dir)  # the same file: its name comes from the config and the start time
    print(format_report(record))
    chart = write_chart(record, path.with_suffix(".png"))
    print(f"\nrecord: {path}\nchart:  {chart}")
    return 0
