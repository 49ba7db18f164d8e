"""Fused lm-head log-probs (`kernels.linear_logprobs`) vs the unfused baseline (the seed's full (N, V) fp32
log-softmax, `benchmarking.baselines.unfused_logprobs`): peak memory and time, side by side in one run.

Cases, each fused and unfused, at every width of --widths (V = 50257, B x T tokens = --tokens):
  score       log-prob + entropy of every token, no grad (old / reference log-probs)
  fwd+bwd     the same with grad into hidden (LoRA: frozen head); upstream sum(lp * adv) + 0.01 sum(entropy)
  fwd+bwd+dW  ... with the head trained too (full-parameter); on CUDA by default (on CPU: --cases)
  update      one PPO update step of a GPT of that width (depth --update-layers, a LoRA policy adapter,
              micro-batch of --update-batch sequences of T + 1 tokens): hidden states -> log-probs + entropy
              of every next token -> clipped policy loss - 0.01 entropy -> backward -> AdamW step

Peak = the most memory allocated at once during the case beyond what was allocated before it (inputs,
weights, optimizer state): on CUDA `max_memory_allocated`, on CPU the running total of the CPU allocator's
events recorded by `torch.profiler` (profile_memory=True). Time = median of --repeats runs after warm-up
and the memory run; CPU default --repeats 0: the memory run's own time (profiler on; at full size each
run takes tens of seconds). Fused runs the Triton kernel on CUDA, the chunked torch reference on CPU
(backend "auto").

    python -m benchmarks.bench_logprobs                        # CUDA: bf16, full depth, record in results/
    python -m benchmarks.bench_logprobs                        # CPU: fp32, 2-layer update model
    python -m benchmarks.bench_logprobs --smoke --out-dir DIR  # tiny sizes in seconds (tests/test_bench_logprobs.py)

Targets (issue 16), over 32 x 384 tokens at V = 50257: log-prob + entropy pass peak >= 5x lower fused
(CPU and GPU); update-step peak >= 2x lower; GPU: fused fwd+bwd no slower than unfused eager.
"""

from __future__ import annotations

import gc
import time

import torch

from rlhf_fast import kernels
from rlhf_fast.benchmarking.baselines import unfused_logprobs
from rlhf_fast.benchmarking.harness import (
    describe,
    environment,
    print_table,
    print_targets,
    suite_parser,
    time_fn,
    write_record,
)

MIB = 2**20
CASES = ("score", "fwd+bwd", "fwd+bwd+dW", "update")
IMPLS = ("fused", "unfused")
GPT2_PRESETS = {768: "gpt2", 1024: "gpt2-medium", 1280: "gpt2-large", 1600: "gpt2-xl"}
ENTROPY_COEF = 0.01
TARGETS = {"score": 5.0, "fwd+bwd": 5.0, "fwd+bwd+dW": 5.0, "update": 2.0}  # peak unfused / fused
SMOKE = dict(widths=[64], tokens=(2, 128), vocab=2048, update_layers=1, update_batch=2, chunk_tokens=32,
             repeats=0, warmup=0)


# ----------------------------------------------------------------------------------------------
# Measuring


def cpu_peak_bytes(fn) -> int:
    """Most bytes the CPU allocator held at once during fn() beyond what it held before: the peak of the
    running sum of the profiler's allocation (+) and free (-) events, in time order."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    total = peak = 0
    for _, size in sorted(events):
        total += size
        peak = max(peak, total)
    return peak


def cuda_peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(fn, device: torch.device, repeats: int, warmup: int) -> tuple[float, float]:
    """(peak MiB, ms) of fn(): the median of `repeats` timed runs after the memory run, or with
    repeats = 0 the time of the memory run itself (CPU at full size: each run takes tens of seconds)."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    peak = (cuda_peak_bytes if device.type == "cuda" else cpu_peak_bytes)(fn)
    seconds = time.perf_counter() - t0
    if repeats:
        seconds = time_fn(fn, device=device, warmup=0, iters=repeats)
    return peak / MIB, seconds * 1e3


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# The two implementations, one signature: (hidden, weight, targets) -> (logprobs, entropy)


def fused(hidden, weight, targets, chunk_tokens=None):
    out = kernels.linear_logprobs(hidden, weight, targets, with_entropy=True, chunk_tokens=chunk_tokens)
    return out.logprobs, out.entropy


def unfused(hidden, weight, targets, chunk_tokens=None):
    return unfused_logprobs(hidden, weight, targets, with_entropy=True)


LOGPROBS = {"fused": fused, "unfused": unfused}


# ----------------------------------------------------------------------------------------------
# Cases: each returns {impl: zero-argument step}


def logprob_pass(case: str, C: int, args, device, dtype):
    B, T = args.tokens
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, C, generator=g).to(device, dtype)  # (B, T, C), like ln_f's output
    weight = (0.02 * torch.randn(args.vocab, C, generator=g)).to(device, dtype)  # (V, C), GPT-2's init
    targets = torch.randint(0, args.vocab, (B, T), generator=g).to(device)
    adv = torch.randn(B, T, generator=g).to(device)  # uneven upstream gradient
    inputs = {"score": [], "fwd+bwd": [hidden], "fwd+bwd+dW": [hidden, weight]}[case]
    for t in inputs:
        t.requires_grad_(True)

    def step(impl):
        def run():
            with torch.set_grad_enabled(bool(inputs)):
                lp, ent = LOGPROBS[impl](hidden, weight, targets, args.chunk_tokens)
                if inputs:
                    torch.autograd.grad((lp * adv).sum() + ENTROPY_COEF * ent.sum(), inputs)

        return run

    return {impl: step(impl) for impl in IMPLS}, {}


def update_step(C: int, args, device, dtype):
    from rlhf_fast.model import GPT, add_lora
    from rlhf_fast.model.gpt2 import GPTConfig, preset_config
    from rlhf_fast.model.lora import adapter_parameters
    from rlhf_fast.rl.losses import clipped_policy_loss, entropy_loss

    B, T = args.update_batch, args.tokens[1]
    preset = GPT2_PRESETS.get(C)
    shape = dict(vocab_size=args.vocab, n_positions=max(1024, T + 1))
    if args.update_layers:
        shape["n_layer"] = args.update_layers
    if preset:
        cfg = preset_config(preset, **shape)
    else:  # smoke widths: head dim 64
        cfg = GPTConfig(n_embd=C, n_head=max(1, C // 64), **{"n_layer": 1, **shape})
    torch.manual_seed(0)
    model = GPT(cfg).to(device=device, dtype=dtype).eval()  # the RL update runs in eval mode (no dropout)
    add_lora(model, "policy", rank=8)
    opt = torch.optim.AdamW(adapter_parameters(model, "policy"), lr=1e-5)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, args.vocab, (B, T + 1), generator=g).to(device)  # (B, T + 1): T actions
    attn = torch.ones_like(seq)
    action_mask = torch.ones(B, T, dtype=torch.bool, device=device)
    adv = torch.randn(B, T, generator=g).to(device)
    with torch.no_grad():
        old_lp = fused(model.hidden_states(seq, attn)[:, :-1], model.lm_head.weight, seq[:, 1:])[0]

    def step(impl):
        def run():
            opt.zero_grad(set_to_none=True)
            h = model.hidden_states(seq, attn)[:, :-1]  # (B, T, C)
            lp, ent = LOGPROBS[impl](h, model.lm_head.weight, seq[:, 1:], args.chunk_tokens)
            pg, _ = clipped_policy_loss(lp, old_lp, adv, action_mask)
            loss = pg + ENTROPY_COEF * entropy_loss(ent, action_mask)[0]
            loss.backward()
            opt.step()

        return run

    info = {"preset": preset or "custom", "n_layer": cfg.n_layer, "n_head": cfg.n_head, "batch": B,
            "lora_rank": 8}
    return {impl: step(impl) for impl in IMPLS}, info


# ----------------------------------------------------------------------------------------------
# Run, compare, report


def run_all(args, device, dtype) -> tuple[list[dict], list[dict]]:
    rows, comparisons = [], []
    for C in args.widths:
        for case in args.cases:
            steps, info = update_step(C, args, device, dtype) if case == "update" else logprob_pass(
                case, C, args, device, dtype)
            B, T = (args.update_batch, args.tokens[1]) if case == "update" else args.tokens
            measured = {}
            for impl in IMPLS:
                t0 = time.perf_counter()
                peak_mib, ms = measure(steps[impl], device, args.repeats, args.warmup)
                backend = "eager" if impl == "unfused" else kernels.resolve_backend("linear_logprobs", "auto", device)
                measured[impl] = row = {"case": case, "width": C, "impl": impl, "backend": backend, "B": B, "T": T,
                                        "vocab": args.vocab, "peak_mib": peak_mib, "time_ms": ms, **info}
                rows.append(row)
                print(f"  {case:<10} C={C:<5} {impl:<8} peak {peak_mib:9.1f} MiB  {ms:9.1f} ms  "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            del steps
            release(device)
            f, u = measured["fused"], measured["unfused"]
            comparisons.append({
                "case": case, "width": C, "tokens": f"{B}x{T}", "n_layer": info.get("n_layer"),
                "fused_backend": f["backend"], "fused_peak_mib": f["peak_mib"], "unfused_peak_mib": u["peak_mib"],
                "peak_ratio": u["peak_mib"] / max(f["peak_mib"], 1e-9), "fused_ms": f["time_ms"],
                "unfused_ms": u["time_ms"], "speedup": u["time_ms"] / f["time_ms"],
            })
    return rows, comparisons


def judge(comparisons: list[dict], on_cuda: bool) -> list[dict]:
    """Issue 16's targets, one line per (case, width): peak ratio >= target; on CUDA also fwd+bwd not slower."""
    out = []
    for c in comparisons:
        target = TARGETS[c["case"]]
        out.append({"case": c["case"], "width": c["width"], "what": "peak unfused / fused",
                    "value": c["peak_ratio"], "target": f">= {target:g}", "met": c["peak_ratio"] >= target})
        if c["case"] == "fwd+bwd":
            out.append({"case": c["case"], "width": c["width"], "what": "time unfused / fused",
                        "value": c["speedup"], "target": ">= 1 (GPU)", "met": c["speedup"] >= 1.0 if on_cuda else None})
    return out


def parse_args(argv=None):
    p = suite_parser(__doc__)
    p.add_argument("--widths", type=lambda s: [int(w) for w in s.split(",")], default=[768, 1600],
                   help="hidden widths C, comma-separated (default 768,1600: gpt2, gpt2-xl)")
    p.add_argument("--tokens", type=lambda s: tuple(int(x) for x in s.lower().split("x")), default=(32, 384),
                   help="B x T tokens of the log-prob pass (default 32x384); the update step uses T")
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--cases", type=lambda s: s.split(","), default=None,
                   help=f"comma-separated subset of {','.join(CASES)} (default: all; on CPU all but fwd+bwd+dW)")
    p.add_argument("--update-batch", type=int, default=8, help="sequences per update micro-batch (PPOConfig's 8)")
    p.add_argument("--update-layers", type=int, default=None,
                   help="update model depth (default: the preset's on CUDA, 2 on CPU)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="fused chunk (default: the kernel's own)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per measurement (default 5 on CUDA; 0 on CPU: time the memory run)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 2 CUDA, 0 CPU)")
    args = p.parse_args(argv)
    on_cuda = torch.cuda.is_available()
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
        args.cases = args.cases or list(CASES)
    args.cases = args.cases or [c for c in CASES if on_cuda or c != "fwd+bwd+dW"]
    bad = [c for c in args.cases if c not in CASES]
    if bad or len(args.tokens) != 2:
        p.error(f"unknown case(s) {bad}; choose from {','.join(CASES)}" if bad else "--tokens must be BxT")
    if args.update_layers is None and not on_cuda:
        args.update_layers = 2  # a full-depth gpt2-xl step takes minutes on a laptop CPU
    args.repeats = (5 if on_cuda else 0) if args.repeats is None else args.repeats
    args.warmup = (2 if on_cuda else 0) if args.warmup is None else args.warmup
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    env = environment()
    print(f"# logprobs: {describe(env)}")
    print(f"# {args.tokens[0]}x{args.tokens[1]} tokens, V={args.vocab}, {args.dtype}, widths {args.widths}, "
          f"update: {args.update_batch} sequences, {args.update_layers or 'preset'} layers; "
          + (f"time: median of {args.repeats} after {args.warmup} warm-up" if args.repeats
             else "time: of the memory run"))
    t0 = time.perf_counter()
    rows, comparisons = run_all(args, device, dtype)
    print()
    whole = lambda c: {k: round(v) if k.endswith(("_mib", "_ms")) else v for k, v in c.items()}  # noqa: E731
    print_table([whole(c) for c in comparisons], ["case", "width", "tokens", "n_layer", "fused_backend",
                                                  "fused_peak_mib", "unfused_peak_mib", "peak_ratio", "fused_ms",
                                                  "unfused_ms", "speedup"])
    targets = judge(comparisons, device.type == "cuda")
    print_targets(targets, "targets (issue 16)")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    config = {k: getattr(args, k) for k in ("smoke", "widths", "tokens", "vocab", "cases", "update_batch",
                                             "update_layers", "chunk_tokens", "dtype", "repeats", "warmup")}
    path = write_record("logprobs" + ("-smoke" if args.smoke else ""), rows,
                        {"config": config, "comparisons": comparisons, "targets": targets}, out_dir=args.out_dir,
                        env=env)
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
