"""SFT / reward-model training-step throughput: eager (the baseline) vs torch.compile, LoRA vs full fine-tuning.

    python -m benchmarks.bench_train_step                      # GPU: gpt2 preset, bf16
    python -m benchmarks.bench_train_step --smoke              # CPU: tiny preset, fp32, eager rows only

Each row times optimizer steps of the real trainer on synthetic-task batches; the baseline of each compiled
row is the eager step of the same stage and mode at the same precision, timed in the same run
(speedup_vs_baseline = eager ms per step / compiled ms per step).
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from rlhf_fast.benchmarking.harness import (
    compare,
    describe,
    environment,
    median,
    print_table,
    suite_parser,
    timed_calls,
    write_record,
)
from rlhf_fast.trainers import (
    DataSettings,
    LoRASettings,
    ModelSettings,
    OptimSettings,
    RunSettings,
    TrainConfig,
    build_reward_trainer,
    build_sft_trainer,
)

SMOKE = dict(preset="tiny", device="cpu", precision="fp32", micro_batch_size=4, steps=2, warmup=1)


def measure(args, stage: str, lora: bool, compiled: bool, out_dir: str) -> dict:
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
    # warm-up includes compilation and dynamic-shape recompiles
    times, outs = timed_calls(trainer.train_step, device=args.device, warmup=args.warmup, iters=args.steps)
    mode = "lora" if lora else "full"
    return {"group": f"{stage} {mode}", "stage": stage, "mode": mode, "compile": compiled, "baseline": not compiled,
            "median_ms": 1e3 * median(times), "tokens_per_s": sum(o["tokens"] for o in outs) / sum(times)}


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = suite_parser(__doc__)
    p.add_argument("--preset", default="gpt2" if cuda else "tiny", help="model preset (random init)")
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="device to run on")
    p.add_argument("--precision", default="bf16" if cuda else "fp32", help="fp32, bf16 or fp16")
    p.add_argument("--micro-batch-size", type=int, default=8, help="examples (RM: pairs) per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (median ms per step reported)")
    p.add_argument("--warmup", type=int, default=4,
                   help="untimed steps first (compilation and dynamic-shape recompiles happen here)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the compiled rows (default: on; --smoke: off, CPU compiles take minutes)")
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    if args.compile is None:
        args.compile = not args.smoke
    env = environment()
    print(f"# train_step: {describe(env)}; {args.preset}, {args.precision}, micro-batch {args.micro_batch_size}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in ("sft", "rm"):
            for lora in (True, False):
                for compiled in (False, True) if args.compile else (False,):
                    rows.append(measure(args, stage, lora, compiled, tmp))
    rows = compare(rows)
    print_table(rows, ["group", "compile", "median_ms", "tokens_per_s", "speedup_vs_baseline"])
    config = {k: str(v) if k == "out_dir" else v for k, v in vars(args).items()}
    path = write_record("train_step", rows, {"config": config}, out_dir=args.out_dir, env=env)
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
