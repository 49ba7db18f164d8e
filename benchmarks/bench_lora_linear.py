"""LoRA linear: every backend against PEFT's chain (the baseline) and the plain linear without LoRA (the
floor), forward / backward / forward+backward, all timed in the same run.

    python -m benchmarks.bench_lora_linear                             # GPU: the gpt2-xl grid, bf16
    python -m benchmarks.bench_lora_linear --grid all --write-dispatch  # GPU: every preset; update the table
    python -m benchmarks.bench_lora_linear --shape 4096x1600x4800x16   # one shape (tokens x in x out x rank)
    python -m benchmarks.bench_lora_linear                             # CPU: the CPU target, fp32
    python -m benchmarks.bench_lora_linear --smoke                     # CPU: tiny shape, Triton interpreter

Impls: auto (what `backend="auto"` picks: the dispatch table's winner, else torch), torch (cuBLAS-first:
addmm + the low-rank term added in place), triton (the fused kernels; GPU and --smoke), eager_peft
(PEFT's lora.Linear: base linear + A -> B -> scale -> add; the baseline) and plain_linear (no LoRA; the
floor). The base weight is frozen and x requires grad (an inner layer of a LoRA fine-tune), so backward
computes dx, dA, dB. On a GPU, times are CUDA-event kernel times with the host's launch cost hidden
(harness.time_kernels); wall_ms (host + GPU) is its own column. On CPU both are wall time.

Targets (gpt2-xl grid, bf16, GPU): auto fwd+bwd >= 1.3x eager_peft on average (geometric mean) and >= 1.0x
on every shape; auto fwd <= 1.15x plain_linear. CPU: auto fwd+bwd >= 1.3x eager_peft at 4096 x 768 -> 2304,
r=8, fp32.

--write-dispatch (GPU): the fwd+bwd winner of torch vs triton per shape becomes a row of
rlhf_fast/kernels/dispatch_table.json (rows of the same key are replaced); the record carries the rows too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlhf_fast.benchmarking.harness import (
    compare,
    describe,
    environment,
    print_table,
    print_targets,
    suite_parser,
    time_interleaved,
    use_interpreter_without_cuda,
    write_record,
)

use_interpreter_without_cuda()  # before triton is imported: without CUDA the kernels run interpreted

from rlhf_fast import kernels  # noqa: E402
from rlhf_fast.kernels import dispatch  # noqa: E402

PASSES = ("fwd", "bwd", "fwdbwd")
# (in, out) of gpt2-xl's adapted linears: c_attn, c_fc, mlp c_proj
XL_LINEARS = [(1600, 4800), (1600, 6400), (6400, 1600)]
XL_GRID = [(n, i, o, r) for n in (4096, 16384) for i, o in XL_LINEARS for r in (8, 16, 64)]
ALL_GRID = XL_GRID + [(n, c, o, r) for c in (768, 1024, 1280) for i, o in [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)]
                      for n in (4096, 16384) for r in (8, 16)]
CPU_SHAPE = (4096, 768, 2304, 8)
SMOKE_SHAPE = (64, 48, 80, 8)
MIN_AVG_SPEEDUP, MIN_EACH_SPEEDUP, MAX_FWD_OVER_FLOOR, MIN_CPU_SPEEDUP = 1.3, 1.0, 1.15, 1.3


def eager_peft(x, weight, bias, lora_a, lora_b, scale):
    # What PEFT's lora.Linear does: base linear, then dropout(identity) -> A -> B, scale, add.
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a), lora_b) * scale


def backend_fn(backend: str):
    return lambda *args: kernels.lora_linear(*args, backend=backend)


def plain_linear(x, weight, bias, lora_a, lora_b, scale):
    return F.linear(x, weight, bias)


FNS = {"auto": backend_fn("auto"), "torch": backend_fn("torch"), "triton": backend_fn("triton"),
       "eager_peft": eager_peft, "plain_linear": plain_linear}


def _inputs(n, d_in, d_out, r, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    x = rand(n, d_in).requires_grad_()
    weight, bias = rand(d_out, d_in, std=d_in**-0.5), rand(d_out)
    lora_a = rand(r, d_in, std=d_in**-0.5).requires_grad_()
    lora_b = rand(d_out, r, std=r**-0.5).requires_grad_()
    return x, weight, bias, lora_a, lora_b


def step(impl: str, pass_: str, shape, device, dtype):
    """A zero-argument call running one pass of impl; backward-only steps reuse one forward's graph."""
    n, d_in, d_out, r = shape
    fn = FNS[impl]
    args = _inputs(n, d_in, d_out, r, device, dtype)
    grad_inputs = [args[0]] if impl == "plain_linear" else [args[0], args[3], args[4]]
    grad_y = torch.randn(n, d_out, device=device, dtype=dtype)
    if pass_ == "fwd":
        return torch.no_grad()(lambda: fn(*args, 2.0))
    if pass_ == "bwd":
        y = fn(*args, 2.0)
        return lambda: torch.autograd.grad(y, grad_inputs, grad_y, retain_graph=True)
    return lambda: torch.autograd.grad(fn(*args, 2.0), grad_inputs, grad_y)


def run(shapes, impls, device, dtype, rounds: int) -> list[dict]:
    rows = []
    for shape in shapes:
        n, d_in, d_out, r = shape
        for pass_ in PASSES:
            group = f"{pass_} n={n} {d_in}->{d_out} r={r} {str(dtype).removeprefix('torch.')}"
            calls = {impl: step(impl, pass_, shape, device, dtype) for impl in impls}
            for call in calls.values():
                call()  # compile / autotune outside the timed rounds
            times = time_interleaved(calls, device=device, warmup=min(3, rounds), iters=rounds)
            for impl, (gpu_s, wall_s) in times.items():
                rows.append(dict(group=group, impl=impl, pass_=pass_, n=n, d_in=d_in, d_out=d_out, r=r,
                                 median_ms=1e3 * gpu_s, wall_ms=1e3 * wall_s,
                                 clock="cuda_events" if device == "cuda" else "wall",
                                 baseline=impl == "eager_peft", floor=impl == "plain_linear"))
    return compare(rows)


def _auto(rows, pass_):
    return [r for r in rows if r["impl"] == "auto" and r["pass_"] == pass_]


def judge(rows: list[dict], on_cuda: bool) -> list[dict]:
    """The issue's targets from the auto rows (CPU: the CPU target's shape only; smoke: not judged)."""
    fb = [r for r in _auto(rows, "fwdbwd") if r["speedup_vs_baseline"]]
    if not fb:
        return []
    if not on_cuda:
        cpu = [r for r in fb if (r["n"], r["d_in"], r["d_out"], r["r"]) == CPU_SHAPE]
        return [dict(what="auto fwd+bwd vs eager_peft (CPU, fp32)", value=r["speedup_vs_baseline"],
                     target=f">= {MIN_CPU_SPEEDUP}", met=r["speedup_vs_baseline"] >= MIN_CPU_SPEEDUP) for r in cpu]
    speedups = [r["speedup_vs_baseline"] for r in fb]
    avg = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
    worst = min(fb, key=lambda r: r["speedup_vs_baseline"])
    fwd = [r for r in _auto(rows, "fwd") if r["x_floor"]]
    out = [dict(what="auto fwd+bwd vs eager_peft, geometric mean", value=avg, target=f">= {MIN_AVG_SPEEDUP}",
                met=avg >= MIN_AVG_SPEEDUP),
           dict(what=f"auto fwd+bwd vs eager_peft, worst ({worst['group']})", value=worst["speedup_vs_baseline"],
                target=f">= {MIN_EACH_SPEEDUP}", met=worst["speedup_vs_baseline"] >= MIN_EACH_SPEEDUP)]
    if fwd:
        slow = max(fwd, key=lambda r: r["x_floor"])
        out.append(dict(what=f"auto fwd vs plain_linear, worst ({slow['group']})", value=slow["x_floor"],
                        target=f"<= {MAX_FWD_OVER_FLOOR}", met=slow["x_floor"] <= MAX_FWD_OVER_FLOOR))
    return out


def dispatch_rows(rows: list[dict], env: dict, device, dtype, source: str) -> list[dict]:
    """One dispatch-table row per shape: the faster of torch and triton for fwd+bwd (kernel time)."""
    out = []
    for group in dict.fromkeys(r["group"] for r in rows if r["pass_"] == "fwdbwd"):
        ms = {r["impl"]: r["median_ms"] for r in rows if r["group"] == group and r["impl"] in ("torch", "triton")}
        if len(ms) < 2:
            continue
        r0 = next(r for r in rows if r["group"] == group)
        key = dispatch.lora_key(torch.device(device), dtype, r0["d_in"], r0["d_out"], r0["r"], r0["n"])
        out.append(dict(kernel="lora_linear", key=key, winner=min(ms, key=ms.get), ms=ms, pass_="fwdbwd",
                        device=env["device"], torch=env["torch"], triton=env["triton"], commit=env["commit"],
                        source=source))
    return out


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = [int(v) for v in text.lower().split("x")]
    if len(parts) != 4:
        raise ValueError(f"--shape wants tokens x in x out x rank, got {text!r}")
    return tuple(parts)


def main(argv=None) -> int:
    p = suite_parser(__doc__)
    p.add_argument("--shape", type=parse_shape, action="append", help="tokens x in x out x rank, repeatable "
                   "(default: the --grid on a GPU; 4096x768x2304x8 on CPU; --smoke: 64x48x80x8)")
    p.add_argument("--grid", choices=("xl", "all"), default="xl", help="GPU shapes: gpt2-xl's linears (default) "
                   "or every gpt2 preset's")
    p.add_argument("--rounds", type=int, default=None, help="timed calls per row, median reported (default 30; "
                   "CPU 11; --smoke 3)")
    p.add_argument("--write-dispatch", action="store_true", help="GPU: write the torch-vs-triton winners into "
                   "rlhf_fast/kernels/dispatch_table.json")
    args = p.parse_args(argv)
    interpreted = use_interpreter_without_cuda()
    cuda = torch.cuda.is_available() and not interpreted
    if args.write_dispatch and not cuda:
        p.error("--write-dispatch needs a CUDA GPU (the table holds GPU measurements only)")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda:
        shapes, impls, rounds = args.shape or (ALL_GRID if args.grid == "all" else XL_GRID), list(FNS), 30
    elif args.smoke:
        shapes, impls, rounds = args.shape or [SMOKE_SHAPE], list(FNS), 3
    else:  # CPU timing: the Triton interpreter is not a speed path
        shapes, impls, rounds = args.shape or [CPU_SHAPE], [i for i in FNS if i != "triton"], 11
    rounds = args.rounds or rounds
    env = environment()
    print(f"# lora_linear: {describe(env)}; {dtype}, median of {rounds}")
    rows = run(shapes, impls, device, dtype, rounds)
    print_table(rows, ["group", "impl", "median_ms", "wall_ms", "speedup_vs_baseline", "x_floor"])
    targets = [] if args.smoke else judge(rows, cuda)
    print_targets(targets)
    table_rows = dispatch_rows(rows, env, device, dtype, source="bench_lora_linear") if cuda else []
    if args.write_dispatch:
        path = dispatch.write_rows(dispatch.merge_rows(dispatch.load_rows(), table_rows))
        print(f"dispatch table: {len(table_rows)} rows written to {path}")
    path = write_record("lora_linear", rows, {"dtype": str(dtype), "rounds": rounds, "smoke": args.smoke,
                                              "targets": targets, "dispatch_rows": table_rows},
                        out_dir=args.out_dir, env=env)
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
