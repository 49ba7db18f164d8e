"""Generated tokens/s of our engine (eager, CUDA graph, CUDA graph + inductor) against, in the same run, HF
`generate` with a static cache + torch.compile and the seed's no-KV-cache loop; and our decode step against its
memory floor: (weights + live KV bytes) per step / measured copy bandwidth.

    python -m benchmarks.bench_generation                  # GPU: gpt2 + gpt2-medium, 64 x (256 + 128), bf16, every row
    python -m benchmarks.bench_generation --impl eager --impl cuda_graph --impl hf_static --impl nocache
    python -m benchmarks.bench_generation --smoke          # CPU: tiny preset, a few tokens (default: eager + no-cache)

The rows are `rlhf_fast.benchmarking.generation_bench`'s (the same as `rlhf-fast bench`'s generation section):
greedy, exactly --new-tokens per prompt (no EOS), left-padded random prompts of lengths in [P/2, P]. The record is
rewritten after every row, so a run cut short keeps the rows it finished. Targets, judged on CUDA: ours (the CUDA
graph row) >= 2x HF static + compile and >= 30x the no-cache loop in tokens/s, its decode step <= 2x the floor.
"""

from __future__ import annotations

import tempfile

import torch

from rlhf_fast.benchmarking.generation_bench import (
    IMPLS,
    OURS,
    decode_floor_bytes,
    generation_rows,
    generation_targets,
)
from rlhf_fast.benchmarking.harness import (
    copy_bandwidth,
    describe,
    environment,
    print_table,
    print_targets,
    suite_parser,
    write_record,
)
from rlhf_fast.model import GPT

SMOKE = dict(preset=["tiny"], batch_size=[2], prompt_len=8, new_tokens=4, warmup=0, iters=1)
COLUMNS = ["preset", "B", "impl", "status", "tokens_per_s", "first_call_s", "step_ms", "floor_ms", "step_over_floor",
           "x_vs_ours_eager"]


def left_padded_prompts(B, P, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, P), generator=g)
    lengths = torch.randint(max(1, P // 2), P + 1, (B,), generator=g)
    mask = (torch.arange(P)[None, :] >= (P - lengths)[:, None]).long()
    return ids.to(device), mask.to(device)


def bench_one(preset, B, P, N, dtype, device, args, bandwidth, tmp, on_rows):
    """The rows of one (preset, batch size), each with the group's floor, and their judged targets;
    on_rows(rows, targets) after every row."""
    torch.manual_seed(0)
    model = GPT.from_preset(preset).to(device=device, dtype=dtype).eval()
    ids, mask = left_padded_prompts(B, P, model.config.vocab_size, device)
    floor_s = decode_floor_bytes(model, B, P, N, dtype) / bandwidth
    group = dict(preset=preset, B=B, P=P, N=N, dtype=str(dtype).removeprefix("torch."), floor_ms=1e3 * floor_s)

    def tagged(rows):
        for r in rows:
            r.update({**group, **r})
            if r.get("step_ms") is not None:
                r["step_over_floor"] = r["step_ms"] / group["floor_ms"]
        targets = generation_targets(rows, floor_s, device.type == "cuda")
        return rows, [{**t, "what": f"{preset} B={B} {P}+{N}: {t['what']}"} for t in targets]

    rows = generation_rows(model, ids, mask, N, args.impl, device=device, warmup=args.warmup, iters=args.iters,
                           tmp=tmp, compile_hf=device.type == "cuda", step_time=True,
                           on_row=lambda rows: on_rows(*tagged(rows)))
    del model
    if device.type == "cuda":
        torch.compiler.reset()  # drop compiled graphs (and the weights they hold) before the next model
        torch.cuda.empty_cache()
    return tagged(rows)


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = suite_parser(__doc__)
    p.add_argument("--preset", action="append", help="model preset (repeatable); default gpt2 + "
                   "gpt2-medium on CUDA, tiny on CPU")
    p.add_argument("--batch-size", type=int, action="append",
                   help="repeatable; default 64 (CUDA), 1 and 8 (CPU)")
    p.add_argument("--prompt-len", type=int, default=256 if cuda else 32)
    p.add_argument("--new-tokens", type=int, default=128 if cuda else 24)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32",
                   choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls, the first (compile, capture) included")
    p.add_argument("--iters", type=int, default=3)
    impls = "; ".join(f"{k}: {v}" for k, v in IMPLS.items())
    p.add_argument("--impl", action="append", choices=list(IMPLS), help="the rows, in this order (repeatable); "
                   f"default every one on CUDA, eager + hf_static + nocache on CPU (--smoke: eager + nocache). {impls}")
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    presets = args.preset or (["gpt2", "gpt2-medium"] if cuda else ["tiny"])
    batch_sizes = args.batch_size or ([64] if cuda else [1, 8])
    default = IMPLS if cuda else ["eager", "nocache"] if args.smoke else ["eager", "hf_static", "nocache"]
    args.impl = list(dict.fromkeys(args.impl or default))
    if args.new_tokens < 2 and any(k in OURS for k in args.impl):
        p.error("--new-tokens must be >= 2 (the decode step time is a difference of two runs)")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    env = environment()
    bandwidth = copy_bandwidth(device)
    print(f"# generation: {describe(env)}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)", flush=True)
    done, targets = [], []

    def write(rows=(), group_targets=()):  # the record so far: every finished group, and this one's rows
        extra = dict(copy_bandwidth_bytes_s=bandwidth, impls=args.impl, targets=[*targets, *group_targets])
        return write_record("generation", [*done, *rows], extra=extra, out_dir=args.out_dir, env=env)

    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            for B in batch_sizes:
                rows, judged = bench_one(preset, B, args.prompt_len, args.new_tokens, dtype, device, args,
                                         bandwidth, tmp, write)
                done += rows
                targets += judged
    print_table(done, COLUMNS)
    print_targets(targets, "targets (judged on CUDA only)")
    print(f"record: {write()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
