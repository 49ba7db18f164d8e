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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, devices and usable kernel/attention backends")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
