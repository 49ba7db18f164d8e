"""Command-line entry point `rlhf-fast`: flags from the config declarations, then one library call.

Every subcommand is a row of COMMANDS: its config class (whose settings declare their own flags and help
text, `rlhf_fast.config`) and the function that runs it. A command takes `--config FILE` (e.g. a run's saved
config.json) and flags override it. Bad input (config, data, paths, checkpoints) prints one line,
`rlhf-fast: error: <what> (<where>)`, and exits 2; `--debug` (or RLHF_FAST_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import sys

# name: (help, config class, run function (config) -> exit code, settings hidden from the flags, fixed settings)
COMMANDS = {
    "info": ("versions, devices and usable kernel/attention backends", None, None, (), {}),
    "generate": ("complete prompts with a preset (random init) or an HF GPT-2 dir",
                 "rlhf_fast.serving.commands:GenerateConfig", "rlhf_fast.serving.commands:generate_command", (), {}),
    "chat": ("talk to a model in the terminal: multi-turn HH-format chat, streamed",
             "rlhf_fast.serving.commands:ChatConfig", "rlhf_fast.serving.commands:chat_command", (), {}),
    "sft": ("supervised fine-tuning on prompt/response data (loss on responses)",
            "rlhf_fast.trainers.config:TrainConfig", "rlhf_fast.trainers.commands:train_command",
            ("dpo", "model.reward_model"), {"stage": "sft"}),
    "rm": ("reward-model training on preference pairs", "rlhf_fast.trainers.config:TrainConfig",
           "rlhf_fast.trainers.commands:train_command", ("dpo", "model.reward_model"), {"stage": "rm"}),
    "dpo": ("DPO / IPO / robust / SimPO / ORPO on preference pairs, from an SFT export",
            "rlhf_fast.trainers.config:TrainConfig", "rlhf_fast.trainers.commands:train_command",
            ("model.reward_model",), {"stage": "dpo"}),
    "grpo": ("GRPO: G completions per prompt, group-normalised advantages, no critic",
             "rlhf_fast.trainers.rl_config:GRPOConfig", "rlhf_fast.trainers.commands:grpo_command", (), {}),
    "ppo": ("PPO from an SFT export and a reward-model export (LoRA: one shared base)",
            "rlhf_fast.trainers.rl_config:PPOConfig", "rlhf_fast.trainers.commands:ppo_command", (), {}),
    "demo": ("the main job: SFT -> RM -> PPO (--algo dpo: DPO) on the built-in synthetic task, offline",
             "rlhf_fast.trainers.commands:DemoCommand", "rlhf_fast.trainers.commands:demo_command", (), {}),
    "eval": ("compare policies on held-out prompts: RM score and win-rate (95% CI), gold reward, KL, length, "
             "diversity, reward-hacking alarms", "rlhf_fast.evaluation:EvalConfig", "rlhf_fast.evaluation:eval_command",
             (), {}),
    "bench": ("end-to-end throughput: generation, experience, PPO iteration vs the seed-style baseline; table + "
              "JSON record + PNG chart", "rlhf_fast.benchmarking:BenchConfig", "rlhf_fast.benchmarking:bench_command",
              (), {}),
    "plan": ("predicted peak memory per phase for a model, precision, batch layout and memory budget: fits, a "
             "proposal that fits, or why nothing does", "rlhf_fast.trainers.memory_plan:PlanCommand",
             "rlhf_fast.trainers.memory_plan:plan_command", (), {}),
    "serve": ("OpenAI-compatible HTTP server (completions, chat, streaming) with dynamic batching; needs the serve "
              "extra", "rlhf_fast.serving.commands:ServeConfig", "rlhf_fast.serving.commands:serve_command", (), {}),
}


def _load(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info() -> int:
    import torch

    from rlhf_fast import __version__, kernels
    from rlhf_fast.kernels import dispatch
    from rlhf_fast.model.gpt2 import PRESETS

    print(f"rlhf_fast     {__version__}")
    print(f"python        {platform.python_version()} ({sys.executable})")
    for dist in ("torch", "triton", "transformers", "datasets", "deepspeed", "flash-attn"):
        print(f"{dist:<13} {_version(dist)}")
    cuda = torch.cuda.is_available()
    print(f"cuda          {'available: ' + str(torch.cuda.device_count()) + ' device(s)' if cuda else 'not available'}")
    for i in range(torch.cuda.device_count() if cuda else 0):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i}      {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
    device = torch.device("cuda" if cuda else "cpu")
    interp = kernels.interpreter_enabled()
    print(f"TRITON_INTERPRET {'on' if interp else 'off'}")
    print("kernels (backend='auto' on this machine's default device):")
    for name in ("lora_linear", "masked_attention", "gae", "ppo_loss", "linear_logprobs"):
        built = kernels.triton_implemented(name)
        state = "not built"
        if built:
            state = "usable" if cuda or interp else "built, needs CUDA or TRITON_INTERPRET=1"
        recorded = name in dispatch.WINNERS and device.type == "cuda"
        how = f"per recorded winner ({len(dispatch.load_rows())} rows in the table)" if recorded else \
            kernels.resolve_backend(name, "auto", device)
        print(f"  {name:<17} triton {state}; auto -> {how}")
    print("auto for the gpt2 presets (bf16):")
    presets = {n: (p["n_embd"], p["n_head"]) for n, p in PRESETS.items() if n.startswith("gpt2")}
    for text in dispatch.describe_auto(device, torch.bfloat16, presets):
        print(f"  {text}")
    flash = importlib.util.find_spec("flash_attn") is not None
    print("attention backends: torch (= sdpa)" + (", triton" if kernels.triton_implemented("masked_attention") else "")
          + (", flash" if flash and cuda else "") + "; auto -> the recorded winner, else torch")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with exact flag names (no `--max-step` for `--max-steps`: a prefix that a new flag could make
    ambiguous later) and one-line errors: the mistake, a close flag name when there is one, and where the full
    usage is; the whole usage block is for --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        import difflib

        hint = ""
        if message.startswith("unrecognized arguments:"):
            wrong = next((a.split("=", 1)[0] for a in message.split(":", 1)[1].split() if a.startswith("-")), None)
            known = [o for p in self._all_parsers() for a in p._actions for o in a.option_strings]
            close = difflib.get_close_matches(wrong or "", known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
        command = self._chosen.prog if getattr(self, "_chosen", None) else self.prog
        print(f"rlhf-fast: error: {message}{hint} (see {command} --help)", file=sys.stderr)
        raise SystemExit(2)

    def _all_parsers(self):
        chosen = getattr(self, "_chosen", None)
        return [self] + ([chosen] if chosen is not None else [])

    def parse_known_args(self, args=None, namespace=None):
        # remember which subcommand's parser ran, so an error left to the top parser names its flags
        sub = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is not None and args is not None:
            self._chosen = next((sub.choices[a] for a in args if a in sub.choices), None)
        return super().parse_known_args(args, namespace)


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, dict[str, str]]]:
    """The parser, and {command: {setting key: flag}}. `only`: add the flags of that command alone (the
    others are listed, without importing their config classes)."""
    from rlhf_fast.config import add_flags

    parser = _Parser(prog="rlhf-fast", description=__doc__.split("\n")[0])
    # the deepspeed launcher passes --local_rank=N before the subcommand; the rank is read from LOCAL_RANK
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error "
                        "(also: RLHF_FAST_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    flags = {}
    for name, (text, config, _, hidden, _fixed) in COMMANDS.items():
        p = sub.add_parser(name, help=text.replace("%", "%%"), description=text)  # help is %-formatted
        if config is not None and only in (None, name):
            flags[name] = add_flags(p, _load(config), hidden)
    return parser, flags


def _where(e: Exception, flags: dict[str, str]) -> str:
    """One line: <what> (<where>), a setting's key shown as the flag that sets it."""
    from rlhf_fast.errors import UserError

    if isinstance(e, UserError):
        where = flags.get(e.where, e.where)
        return " ".join(f"{e.what} ({where})".split()) if where else " ".join(e.what.split())
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror} ({e.filename})"
    return " ".join(str(e).split()) or type(e).__name__


class _Std(logging.StreamHandler):
    """A handler writing to sys.stdout or sys.stderr as they are when a record comes (not when it was made)."""

    def __init__(self, name: str):
        super().__init__(getattr(sys, name))
        self.std = name

    def emit(self, record):
        self.stream = getattr(sys, self.std)
        super().emit(record)


def _setup_logging() -> None:
    """INFO lines to stdout, warnings and errors to stderr (where the one-line error goes)."""
    out, err = _Std("stdout"), _Std("stderr")
    out.addFilter(lambda r: r.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[out, err], force=True)


def parse(argv: list[str]) -> tuple[argparse.Namespace, object, dict[str, str]]:
    """(args, the command's validated config (None for info), {setting key: flag}) of a command line."""
    from rlhf_fast.config import from_args

    parser, flags = build_parser(next((a for a in argv if a in COMMANDS), None))
    args = parser.parse_args(argv)
    _, config_cls, _, _, fixed = COMMANDS[args.command]
    if config_cls is None:
        return args, None, {}
    for key, value in fixed.items():
        setattr(args, key, value)
    cmd_flags = flags[args.command]
    try:
        return args, from_args(_load(config_cls), args, [*cmd_flags, *fixed]), cmd_flags
    except ValueError as e:
        e.flags = cmd_flags  # for main's one-line message
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv[: next((i for i, a in enumerate(argv) if a in COMMANDS), len(argv))] or \
        bool(os.environ.get("RLHF_FAST_DEBUG"))
    flags: dict[str, str] = {}
    if not any(a in COMMANDS for a in argv) and not {"-h", "--help"} & set(argv):
        word = next((a for a in argv if not a.startswith("-")), None)
        if word is not None:  # a misspelt command: one line with the commands there are
            print(f"rlhf-fast: error: unknown command {word!r}; commands: {', '.join(COMMANDS)} (see rlhf-fast "
                  f"--help)", file=sys.stderr)
            raise SystemExit(2)
        build_parser()[0].print_help(sys.stderr)  # no command: say which there are
        return 2
    try:
        args, config, flags = parse(argv)
        if config is None:
            return cmd_info()
        _setup_logging()
        return _load(COMMANDS[args.command][2])(config)
    except (ValueError, OSError) as e:  # user errors: rlhf_fast.errors raises them with the place to fix
        if debug:
            raise
        print(f"rlhf-fast: error: {_where(e, getattr(e, 'flags', flags))}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    raise SystemExit(main())
