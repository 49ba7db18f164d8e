"""Benchmark the fused GAE and PPO-loss kernels against their baselines, all timed in the same run.

gae:      Triton kernel vs the Python loop over time used by TRL / OpenRLHF / DeepSpeed-Chat (one
          step per time index, a handful of kernel launches each) and that loop under torch.compile.
ppo_loss: Triton forward+backward vs the eager torch reference and the torch.compile'd reference.
GB/s is the kernel's compulsory traffic over its time, next to a measured device copy.

    python benchmarks/bench_ppo.py                      # GPU: B = 64..1024, T = 128..2048
    python benchmarks/bench_ppo.py --smoke              # CPU smoke run (Triton interpreter, tiny sizes)

Prints a table and writes benchmarks/results/ppo-<device>-<time>.json.
Targets (GPU): gae >= 100x the Python loop at B=256, T=512; ppo_loss fwd+bwd >= 5x eager.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import copy_bandwidth, environment, print_table, time_fn, write_record  # noqa: E402

GAMMA, LAM = 1.0, 0.95
HPARAMS = dict(clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.5, kl_coef=0.05)


def gae_python_loop(rewards, values, mask, gamma: float, lam: float):
    """The loop TRL's PPOTrainer / OpenRLHF / DeepSpeed-Chat run (values/rewards zeroed by the mask,
    one reverse step per time index), as the baseline."""
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    last_gae = 0
    reversed_adv = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        reversed_adv.append(last_gae)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages, advantages + values


def make_inputs(B: int, T: int, device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pad = torch.randint(0, T // 4 + 1, (B, 1), generator=gen)
    mask = (torch.arange(T).unsqueeze(0) >= pad).to(device)
    r = lambda: torch.randn(B, T, generator=gen).to(device)
    old_lp = -torch.rand(B, T, generator=gen).to(device)
    return dict(
        rewards=r(),
        values=r(),
        mask=mask,
        logprobs=old_lp + 0.1 * r(),
        old_logprobs=old_lp,
        advantages=r(),
        old_values=r(),
        returns=r(),
        ref_logprobs=old_lp + 0.1 * r(),
    )


def bench_gae(B, T, device, args, kernels, bandwidth):
    x = make_inputs(B, T, device)
    rewards, values, mask = x["rewards"], x["values"], x["mask"]
    fmask = mask.float()
    iters = args.iters
    t_kernel = time_fn(
        lambda: kernels.gae(rewards, values, mask, GAMMA, LAM, backend="triton"),
        device=device,
        warmup=args.warmup,
        iters=iters,
    )
    t_loop = time_fn(
        lambda: gae_python_loop(rewards, values, fmask, GAMMA, LAM),
        device=device,
        warmup=1,
        iters=max(3, iters // 4),
    )
    t_compiled = compile_s = None
    if T <= args.compile_max_t:
        compiled = torch.compile(gae_python_loop, dynamic=False)
        t0 = time.perf_counter()
        compiled(rewards, values, fmask, GAMMA, LAM)
        compile_s = time.perf_counter() - t0
        t_compiled = time_fn(
            lambda: compiled(rewards, values, fmask, GAMMA, LAM), device=device, warmup=1, iters=iters
        )
    nbytes = B * T * (rewards.element_size() + values.element_size() + mask.element_size() + 2 * 4)
    return {
        "bench": "gae",
        "B": B,
        "T": T,
        "triton_ms": 1e3 * t_kernel,
        "loop_ms": 1e3 * t_loop,
        "compiled_loop_ms": None if t_compiled is None else 1e3 * t_compiled,
        "x_loop": t_loop / t_kernel,
        "x_compiled": None if t_compiled is None else t_compiled / t_kernel,
        "GB/s": nbytes / t_kernel / 1e9,
        "%copy": 100 * nbytes / t_kernel / bandwidth,
        "compile_s": compile_s,
    }


def bench_ppo_loss(B, T, device, args, kernels, reference, bandwidth):
    x = make_inputs(B, T, device)
    lp = x["logprobs"].clone().requires_grad_(True)
    v = x["values"].clone().requires_grad_(True)
    consts = (x["old_logprobs"], x["advantages"])
    tail = (x["old_values"], x["returns"], x["mask"])

    def step(fn):
        def run():
            lp.grad = v.grad = None
            out = fn(lp, *consts, v, *tail, ref_logprobs=x["ref_logprobs"], **HPARAMS)
            out.loss.backward()

        return run

    triton_fn = lambda *a, **k: kernels.ppo_loss(*a, backend="triton", **k)
    t_kernel = time_fn(step(triton_fn), device=device, warmup=args.warmup, iters=args.iters)
    t_eager = time_fn(step(reference.ppo_loss), device=device, warmup=args.warmup, iters=args.iters)
    compiled = torch.compile(reference.ppo_loss, dynamic=False)
    t0 = time.perf_counter()
    step(compiled)()
    compile_s = time.perf_counter() - t0
    t_compiled = time_fn(step(compiled), device=device, warmup=args.warmup, iters=args.iters)
    # compulsory traffic: forward reads 7 tensors + mask, backward reads them again and writes 2 grads
    nbytes = B * T * (2 * (7 * 4 + x["mask"].element_size()) + 2 * 4)
    return {
        "bench": "ppo_loss fwd+bwd",
        "B": B,
        "T": T,
        "triton_ms": 1e3 * t_kernel,
        "eager_ms": 1e3 * t_eager,
        "compiled_ms": 1e3 * t_compiled,
        "x_eager": t_eager / t_kernel,
        "x_compiled": t_compiled / t_kernel,
        "GB/s": nbytes / t_kernel / 1e9,
        "%copy": 100 * nbytes / t_kernel / bandwidth,
        "compile_s": compile_s,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--T", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--compile-max-t",
        type=int,
        default=2048,
        help="skip the torch.compile'd GAE loop above this T (compile time grows with T: it unrolls)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes; on CPU runs the Triton interpreter")
    p.add_argument("--no-record", action="store_true", help="do not write a results file")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if args.smoke:
        args.B, args.T, args.iters, args.warmup, args.compile_max_t = [4], [33], 3, 1, 33
    if not cuda:
        if not args.smoke:
            p.error("no CUDA GPU: only --smoke runs on CPU (through the Triton interpreter)")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported below
    device = "cuda" if cuda else "cpu"

    from rlhf_fast import kernels
    from rlhf_fast.kernels import reference

    bandwidth = copy_bandwidth(device)
    env = environment()
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
    print(f"# measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write)")
    gae_rows = [bench_gae(B, T, device, args, kernels, bandwidth) for B in args.B for T in args.T]
    print_table(gae_rows)
    print()
    ppo_rows = [
        bench_ppo_loss(B, T, device, args, kernels, reference, bandwidth) for B in args.B for T in args.T
    ]
    print_table(ppo_rows)

    targets = {}
    for row in gae_rows:
        if (row["B"], row["T"]) == (256, 512):
            targets["gae_x_loop_at_256x512"] = {"value": row["x_loop"], "target": 100.0}
    for row in ppo_rows:
        if (row["B"], row["T"]) == (256, 512):
            targets["ppo_loss_x_eager_at_256x512"] = {"value": row["x_eager"], "target": 5.0}
    for name, t in targets.items():
        verdict = "met" if t["value"] >= t["target"] else "NOT met"
        print(f"target {name}: {t['value']:.1f}x (>= {t['target']:.0f}x) {verdict}")
    if not args.no_record:
        extra = {
            "copy_bandwidth_GBps": bandwidth / 1e9,
            "targets": targets,
            "interpreter": not cuda,
            "gamma": GAMMA,
            "lam": LAM,
            "hparams": HPARAMS,
        }
        path = write_record("ppo", gae_rows + ppo_rows, extra)
        print(f"# wrote {path}")


if __name__ == "__main__":
    main()
