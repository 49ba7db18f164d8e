"""Peak GPU memory and iteration time of real PPO iterations (`PPOTrainer.step`) under a 16 GiB cap, next to
what the memory plan (rlhf_fast/trainers/memory_plan.py, docs/memory.md) predicts for the trainer as built.

Configurations (each in its own subprocess, so an OOM or DeepSpeed's process group cannot leak into the
next):
  lora-xl            LoRA PPO of gpt2-xl: one base stored in bf16 (adapters and heads too), adapters policy /
                     value / reward (reference = adapters off), one device without autocast, no offload. Its
                     micro-batch and activation checkpointing are the plan's decision for 16 GiB (`decide`,
                     asked for docs/memory.md's headline micro-batch of 8).
  full-large-offload full-parameter PPO of gpt2-large: actor and critic are DeepSpeed ZeRO-2 engines with the
                     optimizer offloaded to the CPU (DeepSpeedCPUAdam); reference and reward model are frozen
                     copies moved to the GPU only for their passes (offload_frozen). Minibatches of 4.
  full-large-gpu     the baseline: the same without optimizer offload (fp32 master + Adam state on the GPU).
                     The plan predicts it does not fit; the trainer's start-up check only warns here, and the
                     record says whether it did.

Each builds the real trainer on random-init weights (no hub here; memory and time do not depend on them) and
64 random prompts of 256 tokens, and runs `trainer.step()`: rollout (128 new tokens, no EOS, so every row does
the same work) -> score -> advantages -> one epoch of PPO minibatches. The first step warms up (compilation,
CUDA graphs, the allocator), then --iters steps are timed. A row holds the trainer's own metrics (the phase
times; peak_mem_gb, the experience phase's peak; peak_mem_iter_gb, the whole iteration's) beside the plan of
the trainer as built (`trainer_plan_settings`), their ratio (peak_vs_plan), and what the plan chose. On CPU
(--smoke) the trainer's peaks are the process's peak resident memory: not comparable with the plan.

    python -m benchmarks.bench_memory_16gb                    # GPU: all configurations, record in results/
    python -m benchmarks.bench_memory_16gb --config lora-xl   # GPU: one configuration (in this process)
    python -m benchmarks.bench_memory_16gb --smoke            # CPU: tiny models, plumbing check only
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from rlhf_fast.benchmarking.harness import (
    REPO_ROOT,
    describe,
    environment,
    median,
    print_table,
    suite_parser,
    timed_calls,
    write_record,
)
from rlhf_fast.benchmarking.monitor import GIB, cap_memory

CAP_GIB = 16.0
CONFIGS = ("lora-xl", "full-large-offload", "full-large-gpu")
BASELINE = "full-large-gpu"
LORA_RANK = 8
SIZES = dict(rollout=64, prompt_len=256, new_tokens=128, mini_batch=8, full_mini_batch=4)
SMOKE_SIZES = dict(rollout=4, prompt_len=6, new_tokens=8, mini_batch=2, full_mini_batch=2)


def ppo_config(sizes: dict, *, full: bool, offload_optimizer: bool = False, micro_batch: int | None = None,
               precision: str, device: str | None, output_dir: str, iterations: int):
    """The PPOConfig of every configuration (the one place this suite builds one): one epoch over the rollout in
    minibatches of `mini_batch` rows, forwards of `micro_batch` rows (the plan's); full-parameter: DeepSpeed
    ZeRO-2 (its device: its accelerator's), minibatches of `full_mini_batch` (also its micro-batch), frozen
    models offloaded between their passes."""
    from rlhf_fast.config import from_flat
    from rlhf_fast.trainers.ppo import PPOConfig

    if full:
        layout = dict(mini_batch_size=sizes["full_mini_batch"], strategy="deepspeed", zero_stage=2,
                      offload_optimizer=offload_optimizer, offload_frozen=True)
    else:
        layout = dict(mini_batch_size=sizes["mini_batch"], micro_batch_size=micro_batch, device=device)
    return from_flat(PPOConfig, iterations=iterations, rollout_batch_size=sizes["rollout"], epochs=1,
                     max_new_tokens=sizes["new_tokens"], precision=precision, seed=0, output_dir=output_dir,
                     log_every=0, progress=False, **layout)


class RandomPrompts(torch.utils.data.Dataset):
    """`n` prompts of exactly `length` random token ids, in PromptDataset's item layout."""

    def __init__(self, n: int, length: int, vocab_size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.items = [{"prompt_ids": torch.randint(0, vocab_size, (length,), generator=g).tolist(), "prompt": ""}
                      for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def lora_models(preset: str, grad_checkpoint: bool, device):
    """One bf16 base with the policy / value / reward adapters and bf16 heads (no autocast needed)."""
    from rlhf_fast.model import GPT, ScalarHead, add_lora
    from rlhf_fast.trainers.models import PPOModels

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a CPU init of gpt2-xl alone takes many seconds
        base = GPT.from_preset(preset, grad_checkpoint=grad_checkpoint).to(dtype=torch.bfloat16)
    for name in ("policy", "value", "reward"):
        add_lora(base, name, rank=LORA_RANK)  # in the base's dtype: bf16
    heads = [ScalarHead(base.config.n_embd).to(device=device, dtype=torch.bfloat16) for _ in "vr"]
    base.set_adapter("policy")
    return PPOModels(base, *heads)


def full_models(preset: str):
    """Trained policy and critic, frozen reference and reward model: four fp32 copies on the CPU (the
    strategy casts and places them)."""
    from rlhf_fast.model import GPT, ScalarHead
    from rlhf_fast.trainers.models import PPOModels

    torch.manual_seed(0)
    policy, critic, reference, reward_model = (GPT.from_preset(preset) for _ in range(4))
    C = policy.config.n_embd
    return PPOModels(policy, ScalarHead(C), ScalarHead(C), critic=critic, reference=reference,
                     reward_model=reward_model)


def lora_decision(preset: str, sizes: dict):
    """The plan's decision for lora-xl under CAP_GIB: (verdict, the settings to run)."""
    from rlhf_fast.trainers.memory_plan import ModelShape, PlanSettings, decide

    asked = PlanSettings(lora=True, lora_rank=LORA_RANK, precision="fp32", strategy="single", weight_dtype="bf16",
                         rollout_batch_size=sizes["rollout"], prompt_len=sizes["prompt_len"],
                         response_len=sizes["new_tokens"], micro_batch_size=sizes["mini_batch"])
    verdict = decide(ModelShape.from_preset(preset), asked, CAP_GIB)
    return verdict, (verdict.proposal or verdict.plan).settings


def build_trainer(config_name: str, preset: str, sizes: dict, device: torch.device, out_dir: str, iters: int):
    """(trainer, plan fields) of one configuration; raises ValueError when the trainer refuses to start."""
    from rlhf_fast.data import PromptCollator, ResumableBatches
    from rlhf_fast.trainers.ppo import PPOTrainer

    fields = {}
    if config_name == "lora-xl":
        verdict, run = lora_decision(preset, sizes)
        fields = {"plan_decision": verdict.message(), "plan_flags": verdict.flags()}
        if verdict.refused:
            raise ValueError(f"refused by the plan: {verdict.message()}")
        config = ppo_config(sizes, full=False, micro_batch=run.micro_batch_size, precision="fp32", device=str(device),
                            output_dir=out_dir, iterations=iters)
        models = lora_models(preset, run.grad_checkpoint, device)
    else:
        precision = "bf16" if device.type == "cuda" else "fp32"  # DeepSpeed's; its CPU accelerator runs fp32
        config = ppo_config(sizes, full=True, offload_optimizer=config_name == "full-large-offload",
                            precision=precision, device=None, output_dir=out_dir, iterations=iters)
        models = full_models(preset)
    tokenizer = SimpleNamespace(eos_token_id=None, pad_token_id=0)  # no EOS: every response is full length
    prompts = ResumableBatches(RandomPrompts(4 * sizes["rollout"], sizes["prompt_len"],
                                             models.policy.config.vocab_size),
                               sizes["rollout"], PromptCollator(tokenizer))
    return PPOTrainer(config, models, tokenizer, prompts), fields


def plan_fields(trainer) -> dict:
    """The plan of the trainer as built (what its start-up check computes), per phase."""
    from rlhf_fast.trainers.memory_plan import plan_memory, trainer_plan_settings

    plan = plan_memory(*trainer_plan_settings(trainer), CAP_GIB)
    phases = {p.name: plan.phase_gib(p) for p in plan.phases}
    s = plan.settings
    return {"plan_micro_batch": s.micro_batch_size, "plan_grad_checkpoint": s.grad_checkpoint, "plan_fits": plan.fits,
            "plan": plan.summary(), "predicted_peak_gib": plan.peak_gib,
            "predicted_resident_gib": plan.resident.nbytes / GIB,
            "predicted_experience_gib": max(phases["generation"], phases["scoring"]),
            "predicted_update_gib": phases["update"]}


@contextlib.contextmanager
def environ(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_config(config_name: str, smoke: bool, iters: int) -> dict:
    """One configuration in this process: the plan's fields, then what ran (or why it did not)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = SMOKE_SIZES if smoke else SIZES
    preset = "tiny" if smoke else ("gpt2-xl" if config_name == "lora-xl" else "gpt2-large")
    row = {"config": config_name, "model": preset, "baseline": config_name == BASELINE}
    if device.type == "cuda":
        cap_memory(CAP_GIB, device)
    elif config_name != "lora-xl":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (gloo)
    # the baseline: the start-up check would refuse what this row measures
    check = {"RLHF_FAST_MEMORY_PLAN": "warn"} if config_name == BASELINE else {}
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            with environ(**check):
                trainer, fields = build_trainer(config_name, preset, sizes, device, out_dir, iters + 1)
        except ValueError as e:
            return {**row, "status": "refused", "error": " ".join(str(e).split())[:400]}
        row.update(fields, **plan_fields(trainer))
        try:
            times, metrics = timed_calls(trainer.step, device=trainer.device, warmup=1, iters=iters)
        except torch.OutOfMemoryError as e:
            return {**row, "status": f"OOM under the {CAP_GIB:g} GiB cap", "error": str(e).splitlines()[0]}
    seconds, mid = median(zip(times, metrics), key=lambda tm: tm[0])
    measured = {"status": "ok", "iter_s": seconds,
                **{f"{k}_s": mid[f"time/{k}"] for k in ("generate", "score", "advantages", "train")},
                "peak_experience_gib": max(m["peak_mem_gb"] for m in metrics),
                "peak_iter_gib": max(m["peak_mem_iter_gb"] for m in metrics)}
    measured["peak_vs_plan"] = measured["peak_iter_gib"] / row["predicted_peak_gib"]
    return {**row, **measured}


def run_all(args) -> list[dict]:
    """Every configuration in a subprocess of its own (`--config NAME --json FILE`)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, "-m", "benchmarks.bench_memory_16gb", "--config", name, "--iters",
                   str(args.iters), "--json", str(out)] + ["--smoke"] * args.smoke
            proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
            print(proc.stdout, end="", flush=True)
            if proc.returncode != 0 or not out.exists():
                rows.append({"config": name, "baseline": name == BASELINE, "status": f"failed (rc {proc.returncode})",
                             "error": (proc.stderr.strip().splitlines() or [""])[-1]})
                continue
            rows.append(json.loads(out.read_text()))
    return rows


def compare_to_baseline(rows: list[dict]) -> dict:
    """Optimizer offload against the baseline without it: peak memory saved, time paid (None unless both ran)."""
    by = {r["config"]: r for r in rows if r.get("status") == "ok"}
    off, base = by.get("full-large-offload"), by.get(BASELINE)
    if not (off and base):
        return {"offload_peak_saving_x": None, "offload_time_x": None}
    return {"offload_peak_saving_x": base["peak_iter_gib"] / off["peak_iter_gib"],
            "offload_time_x": off["iter_s"] / base["iter_s"]}


def main(argv=None) -> int:
    p = suite_parser(__doc__)
    p.add_argument("--config", choices=CONFIGS, help="run this one configuration in this process")
    p.add_argument("--configs", type=lambda s: s.split(","), default=list(CONFIGS),
                   help=f"comma-separated configurations, each in a subprocess (default: {','.join(CONFIGS)})")
    p.add_argument("--iters", type=int, default=2, help="timed iterations after one warm-up (default 2)")
    p.add_argument("--json", type=Path, help="with --config: write the row here instead of a record")
    args = p.parse_args(argv)
    if unknown := set(args.configs) - set(CONFIGS):
        p.error(f"unknown configuration(s) {sorted(unknown)}; known: {','.join(CONFIGS)}")
    if not torch.cuda.is_available() and not args.smoke:
        p.error("needs a CUDA GPU (it caps GPU memory at 16 GiB): run with --smoke for the CPU plumbing check")
    if args.config and args.json:  # a child of run_all, or gpu_check's xl16 section
        args.json.write_text(json.dumps(run_config(args.config, args.smoke, args.iters), default=str))
        return 0
    env = environment()
    print(f"# memory_16gb: {describe(env)}; cap {CAP_GIB:g} GiB")
    rows = [run_config(args.config, args.smoke, args.iters)] if args.config else run_all(args)
    comparison = compare_to_baseline(rows)
    print_table(rows, ["config", "model", "status", "plan_micro_batch", "plan_grad_checkpoint", "iter_s",
                       "generate_s", "train_s", "peak_experience_gib", "predicted_experience_gib", "peak_iter_gib",
                       "predicted_peak_gib", "peak_vs_plan"])
    for r in rows:
        if r.get("plan") or r.get("error"):
            print(f"{r['config']}: {r.get('plan') or ''} {r.get('error') or ''}".rstrip())
    print(", ".join(f"{k} {v:.3g}" if v is not None else f"{k} n/a" for k, v in comparison.items()))
    path = write_record("memory_16gb" + ("-smoke" if args.smoke else ""), rows,
                        {"cap_gib": CAP_GIB, "sizes": SMOKE_SIZES if args.smoke else SIZES, "comparison": comparison},
                        out_dir=args.out_dir, env=env)
    print(f"record: {path}")
    return 0 if all(r["status"] == "ok" or r["config"] == BASELINE for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
