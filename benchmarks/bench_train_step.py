"""SFT / reward-model training-step throughput: eager (baseline) vs torch.compile, LoRA vs full fine-tuning.

    python benchmarks/bench_train_step.py                      # GPU: gpt2 preset, bf16
    python benchmarks/bench_train_step.py --preset tiny --steps 3 --device cpu --precision fp32  # CPU smoke

Each row times optimizer steps of the real trainer on synthetic-task batches; the baseline of each compiled
row is the eager step of the same stage and mode at the same precision, timed in the same run.
Prints a table and writes a record under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, sync, write_record  # noqa: E402

from rlhf_fast.trainers import (  # noqa: E402
    DataSettings,
    LoRASettings,
    ModelSettings,
    OptimSettings,
    RunSettings,
    TrainConfig,
    build_reward_trainer,
    build_sft_trainer,
)


def measure(args, stage: str, lora: bool, compiled: bool, out_dir: str) -> dict:
    import time

    cfg = TrainConfig(
        stage=stage,
        model=ModelSettings(preset=args.preset),
        lora=LoRASettings(enabled=lora),
        data=DataSettings(eval_size=8, synthetic_size=args.micro_batch_size * (args.steps + args.warmup + 2)),
        optim=OptimSettings(max_steps=args.steps + args.warmup + 1, micro_batch_size=args.micro_batch_size),
        run=RunSettings(output_dir=out_dir, device=args.device, precision=args.precision, compile=compiled,
                        progress=False),
    )
    trainer = (build_sft_trainer if stage == "sft" else build_reward_trainer)(cfg)
    for _ in range(args.warmup):  # includes compilation
        trainer.train_step()
    sync(args.device)
    t0, tokens = time.perf_counter(), 0
    for _ in range(args.steps):
        tokens += trainer.train_step()["tokens"]
    sync(args.device)
    seconds = (time.perf_counter() - t0) / args.steps
    return {"stage": stage, "mode": "lora" if lora else "full", "compile": compiled,
            "ms_per_step": 1e3 * seconds, "tokens_per_s": tokens / args.steps / seconds}


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2" if cuda else "tiny", help="model preset (random init)")
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="device to run on")
    p.add_argument("--precision", default="bf16" if cuda else "fp32", help="fp32, bf16 or fp16")
    p.add_argument("--micro-batch-size", type=int, default=8, help="examples (RM: pairs) per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=4,
                   help="untimed steps first (compilation and dynamic-shape recompiles happen here)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows (slow compiles on CPU)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in ("sft", "rm"):
            for lora in (True, False):
                base = measure(args, stage, lora, False, tmp)
                base["speedup"] = 1.0
                rows.append(base)
                if not args.no_compile:
                    row = measure(args, stage, lora, True, tmp)
                    row["speedup"] = base["ms_per_step"] / row["ms_per_step"]
                    rows.append(row)
    print_table(rows)
    print("record:", write_record("train_step", rows, {"args": vars(args)}))


if __name__ == "__main__":
    main()
