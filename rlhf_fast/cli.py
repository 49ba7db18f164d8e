"""Command-line entry point `rlhf-fast`: parse args, build a config, call the library. Keep it thin."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args) -> int:
    import torch

    from rlhf_fast import __version__, kernels
    from rlhf_fast.model.gpt2 import resolve_attn_backend

    print(f"rlhf_fast     {__version__}")
    print(f"python        {platform.python_version()} ({sys.executable})")
    for dist in ("torch", "triton", "transformers", "datasets", "deepspeed", "flash-attn"):
        print(f"{dist:<13} {_version(dist)}")
    cuda = torch.cuda.is_available()
    print(f"cuda          {'available: ' + str(torch.cuda.device_count()) + ' device(s)' if cuda else 'not available'}")
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i}      {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
    device = torch.device("cuda" if cuda else "cpu")
    interp = kernels.interpreter_enabled()
    print(f"TRITON_INTERPRET {'on' if interp else 'off'}")
    print("kernels (backend='auto' on this machine's default device):")
    for name in ("lora_linear", "masked_attention", "gae", "ppo_loss"):
        built = kernels.triton_implemented(name)
        state = "not built"
        if built:
            state = "usable" if cuda or interp else "built, needs CUDA or TRITON_INTERPRET=1"
        print(f"  {name:<17} triton {state}; auto -> {kernels.resolve_backend(name, 'auto', device)}")
    flash = importlib.util.find_spec("flash_attn") is not None
    print("attention backends: torch, sdpa"
          + (", triton" if kernels.triton_implemented("masked_attention") else "")
          + (", flash" if flash and cuda else "")
          + f"; auto -> {resolve_attn_backend('auto', device)}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from rlhf_fast.data import load_tokenizer
    from rlhf_fast.generation import generate
    from rlhf_fast.model import GPT, PRESETS

    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise SystemExit("rlhf-fast generate: give --prompt and/or --prompts-file")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model in PRESETS:  # random init: a smoke test of the engine, not meaningful text
        torch.manual_seed(args.seed)
        model = GPT.from_preset(args.model)
    else:
        model = GPT.from_pretrained(args.model)
    model = model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    tok = load_tokenizer(args.tokenizer or ("byte" if args.model in PRESETS else args.model))
    encoded = [tok.encode(p) or [tok.eos_token_id] for p in prompts]  # an empty prompt starts from EOS
    input_ids, attention_mask = tok.pad(encoded, side="left")
    try:
        out = generate(model, input_ids.to(device), attention_mask.to(device),
                       max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                       temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       generator=torch.Generator(device).manual_seed(args.seed))
    except ValueError as e:
        raise SystemExit(f"rlhf-fast generate: {e}") from e
    P = input_ids.shape[1]
    for prompt, row, mask in zip(prompts, out.sequences[:, P:], out.response_mask, strict=True):
        print(f"=== {prompt}")
        print(tok.decode(row[mask.bool()].tolist()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, devices and usable kernel/attention backends")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("generate", help="complete prompts with a preset (random init) or an HF GPT-2 dir")
    p.add_argument("--model", required=True, help="preset (tiny, demo, gpt2, ...) or HF GPT-2 directory")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--tokenizer", help="'byte' or an HF tokenizer dir (default: byte for a preset, "
                   "else --model)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
