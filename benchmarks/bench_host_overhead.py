"""Host cost of every public kernel: Python and ATen dispatch per forward+backward of the Triton path, with the
GPU launches stubbed out, next to the torch path's (`backend="torch"`) on tiny CPU tensors, interleaved.

    python -m benchmarks.bench_host_overhead                        # every kernel, 400 interleaved repeats
    python -m benchmarks.bench_host_overhead --kernel lora_linear --repeats 2000
    python -m benchmarks.bench_host_overhead --smoke                # 40 repeats: a plumbing check

Why: a kernel that saves GPU time but costs more host time than the library call it replaces loses whenever
the host is the bottleneck (small batches, decode, LoRA layers of a small model). The Triton path runs here
exactly as on a GPU except the launches: `rlhf_fast.kernels.launch` is patched as the cross-compile tier's
`capturing` patches it (arch, SM count, launchability), and `launch.wrap` still runs (its cost is host cost)
but hands back a recorder that only counts launches. Triton's own per-launch binding and the driver call
are therefore not in the Triton column (nor is the CUDA launch of each ATen op in the torch column); the
`launches` column says how many launches each call makes. The torch path runs its real ops on CPU tensors
so small that their arithmetic is negligible. Each repeat times one call of every (kernel, path) pair in
alternating order with the garbage collector off; a path's time is the minimum over repeats (the low
`--percentile` with --percentile), which a busy machine can only inflate, never shrink. Beside the times, two
counts that do not depend on the machine's load: launches per call and ATen ops dispatched per call (top-level
ones, autograd's included, from one profiled call of each path).

Must run without TRITON_INTERPRET (interpreted kernels are plain Python calls, not launches). Target: the
Triton path's host time <= 1.2x the torch path's for every kernel (tests/kernels/test_host_overhead.py).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time

import torch

from rlhf_fast.benchmarking.harness import describe, environment, print_table, suite_parser, write_record

KERNELS = ("lora_linear", "masked_attention", "gae", "ppo_loss", "linear_logprobs")
TARGET_RATIO = 1.2
TARGET_SMS = {80: 108, 86: 48, 89: 46, 90: 132}  # as tests/kernels/cross_compile.py: the smallest card per target


class _Counter:
    """What `launch.wrap(kernel)` returns while stubbed: `[grid](...)` only counts the launch."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.launches += 1


@contextlib.contextmanager
def stubbed_launches(target: int = 90):
    """Within: launchers think they run on sm_`target`, launch nothing and count launches (the yielded
    counter); the public API accepts CPU tensors for backend="triton"."""
    from rlhf_fast import kernels
    from rlhf_fast.kernels import launch

    counter = _Counter()
    real_wrap = launch.wrap
    patches = {
        (launch, "arch"): lambda device: target,
        (launch, "num_sms"): lambda device: TARGET_SMS[target],
        (launch, "wrap"): lambda kernel: (real_wrap(kernel), counter)[1],
        (launch, "require_launchable"): lambda device, name: None,
        (kernels, "interpreter_enabled"): lambda: True,  # resolve_backend's CPU-tensor check for "triton"
    }
    saved = {k: getattr(*k) for k in patches}
    for (obj, name), value in patches.items():
        setattr(obj, name, value)
    try:
        yield counter
    finally:
        for (obj, name), value in saved.items():
            setattr(obj, name, value)


def cases(backend: str) -> dict:
    """kernel name -> a zero-argument call of one forward+backward (gae: forward only, it has no gradient)
    on tiny CPU fp32 inputs through `rlhf_fast.kernels.<name>(..., backend=backend)`."""
    from rlhf_fast import kernels

    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    grad = torch.autograd.grad
    x, w, bias = rand(2, 8, 32, grad=True), rand(48, 32), rand(48)
    a, b = rand(4, 32, grad=True), rand(48, 4, grad=True)
    gy = rand(2, 8, 48)
    q, k, v = (rand(1, 2, 8, 16, grad=True) for _ in range(3))
    kpm = torch.ones(1, 8, dtype=torch.bool)
    kpm[0, :2] = False
    go = rand(1, 2, 8, 16)
    rewards, values = rand(2, 16), rand(2, 16)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, 12:] = False
    lp, vals = rand(2, 16, grad=True), rand(2, 16, grad=True)
    old_lp, adv, old_v, ret, ref = (rand(2, 16) for _ in range(5))
    hidden, head, tgt = rand(2, 8, 32, grad=True), rand(64, 32), torch.randint(0, 64, (2, 8), generator=g)
    glp = rand(2, 8)

    def lora_linear():
        return grad(kernels.lora_linear(x, w, bias, a, b, 2.0, backend=backend), (x, a, b), gy)

    def masked_attention():
        return grad(kernels.masked_attention(q, k, v, kpm, True, backend=backend), (q, k, v), go)

    def gae():
        return kernels.gae(rewards, values, mask, 0.99, 0.95, backend=backend)

    def ppo_loss():
        out = kernels.ppo_loss(lp, old_lp, adv, vals, old_v, ret, mask, ref_logprobs=ref, kl_coef=0.05,
                               backend=backend)
        return grad(out.loss, (lp, vals))

    def linear_logprobs():
        return grad(kernels.linear_logprobs(hidden, head, tgt, backend=backend).logprobs, (hidden,), glp)

    fns = dict(lora_linear=lora_linear, masked_attention=masked_attention, gae=gae, ppo_loss=ppo_loss,
               linear_logprobs=linear_logprobs)
    return {name: fns[name] for name in KERNELS}


def aten_ops(calls: dict) -> dict:
    """{key: ATen ops one call of calls[key]() dispatches}: top-level ones (not those an ATen op runs inside),
    from Python, autograd and the kernels' host code alike, counted by the profiler in one session."""
    from torch.autograd.profiler import profile, record_function

    scope = {}
    with profile() as prof:
        for key, fn in calls.items():
            with record_function(f"host_overhead::{len(scope)}"):
                fn()
            scope[f"host_overhead::{len(scope)}"] = key
    counts = dict.fromkeys(calls, 0)
    for event in prof.function_events:
        parent = event.cpu_parent
        if not event.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
            continue
        while parent is not None and parent.name not in scope:
            parent = parent.cpu_parent
        if parent is not None:
            counts[scope[parent.name]] += 1
    return counts


def measure(kernels=KERNELS, repeats: int = 400, warmup: int = 20, percentile: float = 0.0,
            target: int = 90) -> list[dict]:
    """One row per kernel: triton_us, torch_us (host µs per call, the `percentile` over interleaved repeats;
    0 = the minimum), ratio = triton_us / torch_us, launches per Triton call, ATen ops per call of each path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: intra-op threads would only add wake-up noise
    gc_was_enabled = gc.isenabled()
    try:
        with stubbed_launches(target) as counter:
            calls = {(name, "triton"): fn for name, fn in cases("triton").items() if name in kernels}
            calls.update({(name, "torch"): fn for name, fn in cases("torch").items() if name in kernels})
            launches = {}
            for (name, path), fn in calls.items():
                before = counter.launches
                for _ in range(warmup):
                    fn()
                if path == "triton":
                    launches[name] = (counter.launches - before) / warmup
            ops = aten_ops(calls)
            gc.collect()
            gc.disable()
            order = list(calls.items())
            samples = {key: [] for key in calls}
            clock = time.perf_counter_ns
            for i in range(repeats):
                for key, fn in order if i % 2 == 0 else reversed(order):
                    t0 = clock()
                    fn()
                    samples[key].append(clock() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
        torch.set_num_threads(threads)

    def stat(xs):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(percentile / 100 * len(xs)))] / 1e3

    rows = []
    for name in (n for n in KERNELS if n in kernels):
        tri, ref = stat(samples[name, "triton"]), stat(samples[name, "torch"])
        rows.append(dict(kernel=name, triton_us=tri, torch_us=ref, ratio=tri / ref, launches=launches[name],
                         triton_aten_ops=ops[name, "triton"], torch_aten_ops=ops[name, "torch"],
                         met=tri / ref <= TARGET_RATIO))
    return rows


def main(argv=None) -> int:
    p = suite_parser(__doc__)
    p.add_argument("--kernel", action="append", choices=KERNELS, help="repeatable (default: all)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timed calls per path (default 400; "
                   "--smoke 40)")
    p.add_argument("--percentile", type=float, default=0.0, help="reported statistic over the repeats (default "
                   "0: the minimum)")
    p.add_argument("--target", type=int, choices=sorted(TARGET_SMS), default=90,
                   help="the GPU arch the launchers are told they run on (its SM count from the cross-compile tier)")
    p.add_argument("--json", help="also write the rows to this file (no record is written then)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("unset TRITON_INTERPRET: interpreted kernels are Python calls, not launches")
    repeats = args.repeats or (40 if args.smoke else 400)
    rows = measure(args.kernel or KERNELS, repeats=repeats, percentile=args.percentile, target=args.target)
    env = environment()
    stat = "min" if not args.percentile else f"p{args.percentile:g}"
    print(f"# host overhead: {describe(env)}; µs per fwd+bwd, {stat} of {repeats} interleaved repeats, "
          f"launches stubbed (sm_{args.target})")
    print_table(rows, ["kernel", "triton_us", "torch_us", "ratio", "launches", "triton_aten_ops", "torch_aten_ops",
                       "met"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"repeats": repeats, "percentile": args.percentile, "rows": rows}, f)
        return 0
    path = write_record("host_overhead", rows, {"repeats": repeats, "percentile": args.percentile,
                                                "target": args.target, "target_ratio": TARGET_RATIO,
                                                "smoke": args.smoke}, out_dir=args.out_dir, env=env)
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
