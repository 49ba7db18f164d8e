"""Compile cost of the training step, regional (`compile_model`) against whole-model, and the recompiles of an
RL run whose lengths change every iteration.

    python -m benchmarks.bench_compile                         # CPU: dynamo + AOTAutograd (aot_eager), gpt2
    python -m benchmarks.bench_compile --backend inductor      # on a GPU: the real compile
    python -m benchmarks.bench_compile --smoke                 # tiny model, 3 iterations: a plumbing check

cold: each mode runs in a fresh subprocess (nothing cached in memory; inductor's on-disk caches off, so cold
means cold): a gpt2 with a LoRA policy adapter on a frozen base (what every RL stage trains), fwd+bwd at
two lengths (B=2, T=32 then 48). compile_s is dynamo's own timers (every frame's tracing, AOTAutograd and
backend, plus the lazily compiled backward); the cold calls minus the same calls again, warm, is the wall-time
view of it (noisier on a busy machine). whole = `torch.compile(model.hidden_states)` (dynamo's default automatic
dynamic: static at the first length, recompiled dynamic at the second); regional = `compile_model(model)`.

recompiles: a LoRA PPO run (policy / value / reward adapters on one base, KL to the adapters-off
reference), its prompt lengths and max_new_tokens drawn at random every iteration, with the block region
compiled; the region's new graphs per iteration. Graphs made in the first iteration are its variants
(grad mode x adapter, `rlhf_fast.model.compile`); those made later are recompiles caused by new lengths.

Targets (issue 26, CPU): regional >= 4x faster cold compile than whole-model; <= 2 recompiles per compiled
region over a 10-iteration run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

from rlhf_fast.benchmarking.harness import (
    REPO_ROOT,
    environment,
    print_table,
    print_targets,
    suite_parser,
    write_record,
)

TARGET_SPEEDUP, TARGET_RECOMPILES = 4.0, 2
LENGTHS = (32, 48)


def cold_compile(preset: str, mode: str, backend: str, lengths=LENGTHS) -> dict:
    """In this process (run it fresh): seconds of compile at each length for `mode` (whole / regional / eager)."""
    from rlhf_fast.model import GPT, add_lora, compile_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = GPT.from_preset(preset, kernel_backend="torch", attn_backend="sdpa").to(device)
    add_lora(model, "policy", rank=8)
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        p.requires_grad_(".policy" in n)
    forward = model.hidden_states
    if mode == "whole":
        forward = torch.compile(model.hidden_states, backend=backend)
    elif mode == "regional":
        compile_model(model, backend=backend)

    def step(T: int) -> float:
        ids = torch.randint(0, model.config.vocab_size, (2, T), device=device)
        mask = torch.ones(2, T, dtype=torch.long, device=device)
        mask[0, : T // 4] = 0
        t0 = time.perf_counter()
        forward(ids, mask).float().square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    cold = [step(T) for T in lengths]
    warm = [min(step(T) for _ in range(2)) for T in lengths]
    return {"mode": mode, "compile_s": dynamo_compile_s(), "cold_s": cold, "warm_s": warm,
            "cold_minus_warm_s": sum(max(c - w, 0.0) for c, w in zip(cold, warm))}


def dynamo_compile_s() -> float:
    """Seconds this process spent compiling, by dynamo's own timers: every frame's compile (tracing, AOTAutograd,
    the backend) plus the lazily compiled backward graphs. Unlike cold minus warm wall time, a busy machine
    inflates it only as much as it slows the compiler itself."""
    names, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    times = dict(zip(names, map(float, values)))
    return times.get("_compile.compile_inner", 0.0) + times.get("backward._backward_impl", 0.0)


def cold_in_subprocess(preset: str, mode: str, backend: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "PYTHONPATH": str(REPO_ROOT)}
    code = (f"import json, benchmarks.bench_compile as b; "
            f"print('RESULT', json.dumps(b.cold_compile({preset!r}, {mode!r}, {backend!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{mode} compile subprocess failed (rc {out.returncode}): {out.stderr[-800:]}")
    return json.loads(lines[-1][len("RESULT "):])


def recompiles(preset: str, backend: str, iters: int, seed: int = 0) -> list[dict]:
    """Per-iteration region graphs of a LoRA PPO run with random prompt / response lengths."""
    from rlhf_fast.config import from_flat
    from rlhf_fast.model import GPT, ScalarHead, add_lora
    from rlhf_fast.trainers.models import PPOModels
    from rlhf_fast.trainers.ppo import PPOConfig, PPOTrainer

    torch._dynamo.reset()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    model = GPT.from_preset(preset, kernel_backend="torch", attn_backend="sdpa").to(device)
    for name in ("policy", "value", "reward"):
        add_lora(model, name, rank=8)
    model.set_adapter("policy")
    heads = [ScalarHead(model.config.n_embd).to(device) for _ in "vr"]
    rng = torch.Generator().manual_seed(seed)
    B, max_prompt, max_new = 4, 24, 12

    def prompts():
        while True:  # left-padded prompts of a random width, rows of random lengths below it
            P = int(torch.randint(4, max_prompt + 1, (), generator=rng))
            lens = torch.randint(1, P + 1, (B,), generator=rng)
            mask = (torch.arange(P) >= P - lens[:, None]).long()
            ids = torch.randint(0, model.config.vocab_size, (B, P), generator=rng) * mask
            yield {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_flat(PPOConfig, iterations=iters, rollout_batch_size=B, mini_batch_size=2, max_new_tokens=max_new,
                        device=device, compile=True, compile_backend=backend, output_dir=tmp, log_every=0,
                        progress=False, init_kl_coef=0.05)
        trainer = PPOTrainer(cfg, PPOModels(model, *heads), SimpleNamespace(eos_token_id=None, pad_token_id=0),
                             prompts())
        rows = []
        for i in range(iters):
            n_new = int(torch.randint(2, max_new + 1, (), generator=rng))
            trainer.maker.generation["max_new_tokens"] = n_new  # a new response length every iteration
            t0 = time.perf_counter()
            m = trainer.step()
            rows.append({"section": "recompiles", "iteration": i + 1, "max_new_tokens": n_new,
                         "compiles": m["compiles"], "compile_graphs": m["compile_graphs"],
                         "seconds": time.perf_counter() - t0})
    return rows


def main(argv=None) -> int:
    p = suite_parser(__doc__)
    p.add_argument("--preset", default=None, help="model of the cold-compile section (default gpt2; smoke tiny)")
    p.add_argument("--backend", default="aot_eager", choices=("aot_eager", "inductor", "eager"))
    p.add_argument("--iters", type=int, default=None, help="PPO iterations of the recompile section (default 10)")
    args = p.parse_args(argv)
    preset = args.preset or ("tiny" if args.smoke else "gpt2")
    iters = args.iters or (3 if args.smoke else 10)
    env = environment()
    print(f"bench_compile: {preset}, backend {args.backend}, {env['device']}")
    cold = {mode: cold_in_subprocess(preset, mode, args.backend) for mode in ("whole", "regional")}
    rows = [{"section": "cold", "preset": preset, "backend": args.backend, **c}
            for c in cold.values()]
    speedup = cold["whole"]["compile_s"] / max(cold["regional"]["compile_s"], 1e-9)
    rows[1]["speedup_vs_whole"] = speedup
    print_table(rows, ["section", "mode", "compile_s", "cold_minus_warm_s", "speedup_vs_whole"])
    rec = recompiles("tiny", args.backend, iters)
    print_table(rec)
    after_first = sum(r["compiles"] for r in rec[1:])
    targets = [
        {"what": "regional cold compile (dynamo's timers) x faster than whole-model", "value": round(speedup, 2),
         "target": f">= {TARGET_SPEEDUP:g}", "met": None if args.smoke else speedup >= TARGET_SPEEDUP},
        {"what": f"region recompiles after iteration 1 of {iters}, random lengths", "value": after_first,
         "target": f"<= {TARGET_RECOMPILES}", "met": after_first <= TARGET_RECOMPILES},
    ]
    print_targets(targets)
    path = write_record("compile", rows + rec, {"targets": targets, "variants": rec[0]["compiles"],
                                                "smoke": args.smoke}, out_dir=args.out_dir, env=env)
    print(f"record: {path}")
    return 0 if all(t["met"] is not False for t in targets) else 1


if __name__ == "__main__":
    raise SystemExit(main())
