"""Benchmark the fused GAE and PPO-loss kernels against their baselines, all timed in the same run.

gae:      Triton kernel vs the Python loop over time used by TRL / OpenRLHF / DeepSpeed-Chat (one
          step per time index, a handful of kernel launches each) and that loop under torch.compile.
ppo_loss: Triton forward+backward vs the eager torch reference and the torch.compile'd reference.
GB/s is the kernel's compulsory traffic over its time, next to a measured device copy.

    python -m benchmarks.bench_ppo                      # GPU: B = 64..1024, T = 128..2048
    python -m benchmarks.bench_ppo --smoke              # CPU smoke run (Triton interpreter, tiny sizes)

Prints a table and writes ppo-<device>-<time>.json (benchmarks/results/ on a GPU, --out-dir to choose).
Targets (GPU): gae >= 100x the Python loop at B=256, T=512; ppo_loss fwd+bwd >= 5x eager.
"""

from __future__ import annotations

import time

import torch

from rlhf_fast.benchmarking.harness import (
    copy_bandwidth,
    describe,
    environment,
    print_table,
    print_targets,
    suite_parser,
    time_fn,
    use_interpreter_without_cuda,
    write_record,
)

use_interpreter_without_cuda()  # before triton is imported: without CUDA the kernels run interpreted

from rlhf_fast import kernels  # noqa: E402
from rlhf_fast.kernels import reference  # noqa: E402

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


def bench_gae(B, T, device, args, bandwidth):
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


def bench_ppo_loss(B, T, device, args, bandwidth):
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


def judge(gae_rows: list[dict], ppo_rows: list[dict], on_cuda: bool) -> list[dict]:
    """The targets at B=256, T=512 (judged on CUDA only)."""
    out = []
    for rows, col, bound in ((gae_rows, "x_loop", 100.0), (ppo_rows, "x_eager", 5.0)):
        for r in rows:
            if (r["B"], r["T"]) == (256, 512):
                met = r[col] >= bound if on_cuda else None
                out.append(dict(bench=r["bench"], what=col, value=r[col], target=f">= {bound:g}", met=met))
    return out


def main(argv=None) -> int:
    p = suite_parser(__doc__)
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
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not kernels.interpreter_enabled()
    if args.smoke:
        args.B, args.T, args.iters, args.warmup, args.compile_max_t = [4], [33], 3, 1, 33
    elif not cuda:
        p.error("no CUDA GPU: only --smoke runs on CPU (through the Triton interpreter)")
    device = "cuda" if cuda else "cpu"

    bandwidth = copy_bandwidth(device)
    env = environment()
    print(f"# ppo kernels: {describe(env)}")
    print(f"# measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write)")
    gae_rows = [bench_gae(B, T, device, args, bandwidth) for B in args.B for T in args.T]
    print_table(gae_rows)
    print()
    ppo_rows = [bench_ppo_loss(B, T, device, args, bandwidth) for B in args.B for T in args.T]
    print_table(ppo_rows)
    targets = judge(gae_rows, ppo_rows, cuda)
    print_targets(targets)
    extra = {
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "targets": targets,
        "interpreter": not cuda,
        "gamma": GAMMA,
        "lam": LAM,
        "hparams": HPARAMS,
    }
    path = write_record("ppo", gae_rows + ppo_rows, extra, out_dir=args.out_dir, env=env)
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
