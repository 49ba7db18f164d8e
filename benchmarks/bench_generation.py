"""Generated tokens/s of `rlhf_fast.generation.generate` against, in the same run, (a) Hugging Face
`generate` on the same weights and (b) a no-KV-cache loop that recomputes the whole prefix for every
token (what the seed code did). Also the decode step's memory floor: (weights + live KV bytes) per
step / measured copy bandwidth, and our measured step time against it.

    python -m benchmarks.bench_generation                      # GPU: gpt2 + gpt2-medium, 64 x (256 + 128), bf16
    python -m benchmarks.bench_generation --smoke              # CPU: tiny preset, a few tokens, no HF baseline

Every row generates exactly --new-tokens per prompt (no EOS), greedy, from left-padded random prompts
of lengths in [prompt_len / 2, prompt_len].
"""

from __future__ import annotations

import tempfile

import torch

from rlhf_fast.benchmarking.baselines import hf_copy, no_cache_generate
from rlhf_fast.benchmarking.harness import (
    copy_bandwidth,
    describe,
    environment,
    print_table,
    suite_parser,
    time_fn,
    write_record,
)
from rlhf_fast.generation import generate
from rlhf_fast.model import GPT

GPU_TARGETS = dict(x_hf=2.0, x_nocache=30.0, step_over_floor=2.0)
SMOKE = dict(preset=["tiny"], batch_size=[2], prompt_len=8, new_tokens=4, warmup=0, iters=1, no_hf=True)


def left_padded_prompts(B, P, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, P), generator=g)
    lengths = torch.randint(max(1, P // 2), P + 1, (B,), generator=g)
    mask = (torch.arange(P)[None, :] >= (P - lengths)[:, None]).long()
    return ids.to(device), mask.to(device)


def decode_floor_bytes(model, B, P, N, dtype):
    """Bytes one decode step must read at least: all weights + the KV of the live tokens (mean over steps)."""
    c = model.config
    elt = torch.empty((), dtype=dtype).element_size()
    kv = 2 * c.n_layer * B * c.n_embd * (P + N / 2) * elt
    return model.num_parameters() * elt + kv


def bench_one(preset, B, P, N, dtype, device, args, bandwidth, tmp):
    torch.manual_seed(0)
    model = GPT.from_preset(preset).to(device=device, dtype=dtype).eval()
    ids, mask = left_padded_prompts(B, P, model.config.vocab_size, device)
    ours = lambda n: generate(model, ids, mask, max_new_tokens=n, do_sample=False)  # noqa: E731
    assert ours(N).sequences.shape == (B, P + N)
    t_ours = time_fn(lambda: ours(N), device=device, warmup=args.warmup, iters=args.iters)
    t_one = time_fn(lambda: ours(1), device=device, warmup=args.warmup, iters=args.iters)
    step = (t_ours - t_one) / (N - 1)  # decode-only time per token (prefill cancels out)
    row = dict(preset=preset, B=B, P=P, N=N, dtype=str(dtype).removeprefix("torch."),
               ours_tok_s=B * N / t_ours)
    if not args.no_hf:
        hf = hf_copy(model, tmp, dtype, device)
        hf_gen = lambda: hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N,  # noqa: E731
                                     min_new_tokens=N, pad_token_id=0)
        t_hf = time_fn(hf_gen, device=device, warmup=1, iters=args.iters)
        row.update(hf_tok_s=B * N / t_hf, x_hf=t_hf / t_ours)
        del hf
    if not args.no_nocache:
        no_cache = lambda: no_cache_generate(model, ids, mask, N)  # noqa: E731
        t_nc = time_fn(no_cache, device=device, warmup=1, iters=args.iters)
        row.update(nocache_tok_s=B * N / t_nc, x_nocache=t_nc / t_ours)
    floor = decode_floor_bytes(model, B, P, N, dtype) / bandwidth
    row.update(step_ms=step * 1e3, floor_ms=floor * 1e3, step_over_floor=step / floor)
    return row


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
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    p.add_argument("--no-nocache", action="store_true", help="skip the no-KV-cache baseline")
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    presets = args.preset or (["gpt2", "gpt2-medium"] if cuda else ["tiny"])
    batch_sizes = args.batch_size or ([64] if cuda else [1, 8])
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the decode step time is a difference of two runs)")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    env = environment()
    bandwidth = copy_bandwidth(device)
    print(f"# generation: {describe(env)}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            for B in batch_sizes:
                rows.append(bench_one(preset, B, args.prompt_len, args.new_tokens, dtype, device, args,
                                      bandwidth, tmp))
    print_table(rows)
    if device.type == "cuda":
        print("GPU targets: " + ", ".join(f"{k} {'>=' if k.startswith('x_') else '<='} {v}"
                                          for k, v in GPU_TARGETS.items()))
    path = write_record("generation", rows, extra=dict(copy_bandwidth_bytes_s=bandwidth, targets=GPU_TARGETS),
                        out_dir=args.out_dir, env=env)
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
