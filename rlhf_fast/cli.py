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
    for name in ("lora_linear", "masked_attention", "gae", "ppo_loss", "linear_logprobs"):
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
    out = generate(model, input_ids.to(device), attention_mask.to(device),
                   max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                   temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   generator=torch.Generator(device).manual_seed(args.seed))
    P = input_ids.shape[1]
    for prompt, row, mask in zip(prompts, out.sequences[:, P:], out.response_mask, strict=True):
        print(f"=== {prompt}")
        print(tok.decode(row[mask.bool()].tolist()))
    return 0


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags of generate and chat, and the device and dtype to run on."""
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def cmd_chat(args) -> int:
    from rlhf_fast.generation import SamplingConfig
    from rlhf_fast.model import PRESETS
    from rlhf_fast.serving.chat import ChatSession, run_repl
    from rlhf_fast.serving.conversation import load_chat_model

    sampling = SamplingConfig(do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                              top_k=args.top_k, top_p=args.top_p)
    model, tokenizer, _ = load_chat_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed)
    session = ChatSession(model, tokenizer, sampling=sampling, max_new_tokens=args.max_new_tokens,
                          system=args.system, seed=args.seed)
    random_init = args.model in PRESETS
    return run_repl(session, name=f"{args.model} (random init: replies are noise)" if random_init else args.model)


# --- sft / rm: training stages -------------------------------------------------------------------

# (flag, config key, type, help); defaults come from the config dataclasses (shown in --help).
_TRAIN_FLAGS = [
    ("--preset", "model.preset", str, "random-init model preset: tiny, demo, gpt2, gpt2-medium, ..."),
    ("--model", "model.model", str, "HF GPT-2 directory or hub name to start from (overrides --preset)"),
    ("--tokenizer", "model.tokenizer", str, "'byte' or an HF tokenizer directory / hub name "
                                            "(default: byte for tiny/demo, else the model's)"),
    ("--attn-backend", "model.attn_backend", str, "attention backend: auto, torch, sdpa, triton, flash"),
    ("--kernel-backend", "model.kernel_backend", str, "fused-kernel backend: auto, torch, triton"),
    ("--grad-checkpoint", "model.grad_checkpoint", bool, "activation checkpointing: recompute each transformer "
                                                         "block in backward (less memory, ~1/3 more compute)"),
    ("--data", "data.data", str, "'synthetic', an HH-RLHF hub name (Anthropic/hh-rlhf), a .jsonl/.jsonl.gz "
                                 "file or a directory of them"),
    ("--data-subset", "data.subset", str, "HH-RLHF data subset, e.g. harmless-base"),
    ("--max-prompt-len", "data.max_prompt_len", int, "prompt tokens kept (from the end)"),
    ("--max-len", "data.max_len", int, "prompt + response tokens kept"),
    ("--eval-size", "data.eval_size", int, "held-out examples for evaluation"),
    ("--synthetic-size", "data.synthetic_size", int, "training pairs generated for --data synthetic"),
    ("--lora-rank", "lora.rank", int, "LoRA rank"),
    ("--lora-alpha", "lora.alpha", float, "LoRA alpha (scale = alpha / rank)"),
    ("--lora-dropout", "lora.dropout", float, "dropout on the LoRA input"),
    ("--lr", "optim.lr", float, "peak learning rate (AdamW)"),
    ("--weight-decay", "optim.weight_decay", float, "AdamW weight decay (matrices only)"),
    ("--max-steps", "optim.max_steps", int, "optimizer steps"),
    ("--warmup-steps", "optim.warmup_steps", int, "linear warmup steps"),
    ("--schedule", "optim.schedule", str, "learning-rate schedule after warmup: cosine or constant"),
    ("--micro-batch-size", "optim.micro_batch_size", int, "examples (RM: pairs) per forward pass"),
    ("--grad-accum-steps", "optim.grad_accum_steps", int, "micro-batches per optimizer step"),
    ("--max-grad-norm", "optim.max_grad_norm", float, "gradient clipping norm"),
    ("--output-dir", "run.output_dir", str, "run directory: config, metrics.jsonl, checkpoints, export"),
    ("--seed", "run.seed", int, "seed for init, data order and the synthetic task"),
    ("--device", "run.device", str, "cpu, cuda, cuda:1, ... (default: cuda when available)"),
    ("--precision", "run.precision", str, "fp32, bf16 or fp16 (fp16: CUDA only)"),
    ("--log-every", "run.log_every", int, "steps between metrics.jsonl lines"),
    ("--eval-every", "run.eval_every", int, "steps between evaluations (0: only at the end)"),
    ("--save-every", "run.save_every", int, "steps between checkpoints (0: only at the end)"),
    ("--keep-last", "run.keep_last", int, "checkpoints kept"),
    ("--strategy", "run.strategy", str, "single (one device) or deepspeed (ZeRO; also under torchrun / the "
                                        "deepspeed launcher)"),
    ("--zero-stage", "deepspeed.zero_stage", int, "DeepSpeed ZeRO stage 0-3"),
    ("--deepspeed-config", "deepspeed.config_file", str, "DeepSpeed JSON used instead of the generated config"),
]


_DPO_FLAGS = [
    ("--loss", "dpo.loss", str, "preference loss: dpo, ipo, robust, simpo, orpo (README: DPO losses)"),
    ("--beta", "dpo.beta", float, "DPO/IPO/robust: KL strength; SimPO: reward scale; ORPO: odds-ratio weight"),
    ("--label-smoothing", "dpo.label_smoothing", float, "dpo: conservative DPO (cDPO); robust: label-noise rate"),
    ("--gamma", "dpo.gamma", float, "SimPO's target reward margin"),
    ("--reference-model", "dpo.reference_model", str, "a separate frozen reference (default: the --model "
                                                      "itself; LoRA: its base with adapters off)"),
    ("--offload-reference", "dpo.offload_reference", bool, "full-parameter: the frozen reference on the CPU "
                                                           "between uses"),
]


def _add_flag_table(p: argparse.ArgumentParser, table, defaults: dict) -> None:
    """--config, then one flag per (flag, "section.key", type, help) row, its default from `defaults` (a
    config's nested dict) in the help; bool rows are --x / --no-x."""
    p.add_argument("--config", help="JSON (or YAML, with PyYAML) file of config sections; flags override it")
    for flag, key, typ, text in table:
        section, _, name = key.partition(".")
        default = defaults[section][name]
        text = text if default is None else f"{text} (default: {default})"
        if typ is bool:
            p.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        p.add_argument(flag, dest=key, type=typ, default=None, metavar=flag[2:].upper().replace("-", "_"), help=text)


def _add_train_args(p: argparse.ArgumentParser, stage: str) -> None:
    from rlhf_fast.trainers.config import TrainConfig

    defaults = TrainConfig(stage=stage).to_dict()
    _add_flag_table(p, _TRAIN_FLAGS + (_DPO_FLAGS if stage == "dpo" else []), defaults)
    p.add_argument("--lora", dest="lora.enabled", action=argparse.BooleanOptionalAction, default=None,
                   help="train LoRA adapters (--no-lora: full fine-tuning); default: LoRA when starting from "
                        "--model weights, full fine-tuning for a random-init --preset")
    p.add_argument("--compile", dest="run.compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (default: on for CUDA, off for CPU)")
    p.add_argument("--skip-bad-examples", dest="data.skip_bad_examples", action="store_const", const=True,
                   help="skip (and count in the log) data lines that cannot be parsed, instead of failing")
    p.add_argument("--resume", dest="run.resume", action="store_const", const=True,
                   help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--no-progress", dest="run.progress", action="store_const", const=False,
                   help="no tqdm progress bar")
    p.add_argument("--no-export", action="store_true", help="skip the merged HF-format export at the end")
    p.add_argument("--offload-optimizer", dest="deepspeed.offload_optimizer", action="store_const", const=True,
                   help="DeepSpeed: optimizer states and step on the CPU (DeepSpeedCPUAdam; ZeRO >= 1)")
    p.add_argument("--offload-params", dest="deepspeed.offload_params", action="store_const", const=True,
                   help="DeepSpeed: parameters on the CPU between uses (ZeRO-3)")


def _train_config(args, stage: str):
    from rlhf_fast.trainers.config import TrainConfig, apply_overrides, load_config_file

    file_config = load_config_file(args.config) if args.config else {}
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    return TrainConfig.from_dict(apply_overrides({**file_config, "stage": stage}, overrides))


def _run_stage(args, stage: str) -> int:
    import logging

    from rlhf_fast.trainers import build_dpo_trainer, build_reward_trainer, build_sft_trainer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = _train_config(args, stage)
    builders = {"sft": build_sft_trainer, "rm": build_reward_trainer, "dpo": build_dpo_trainer}
    trainer = builders[stage](config)
    trainer.train()
    if not args.no_export:
        with trainer.strategy.gathered(trainer.module.parameters()):  # full weights under ZeRO-3
            if trainer.strategy.is_main:
                print(f"exported merged model to {trainer.export(trainer.run_dir / 'export')}")
    return 0


def cmd_sft(args) -> int:
    return _run_stage(args, "sft")


def cmd_rm(args) -> int:
    return _run_stage(args, "rm")


def cmd_dpo(args) -> int:
    return _run_stage(args, "dpo")


# --- grpo: critic-free RL with a verifiable reward or a reward model -------------------------------

_GRPO_FLAGS = [
    ("--preset", "model.preset", str, "random-init model preset (tiny, demo, gpt2, ...) when no --model"),
    ("--model", "model.model", str, "HF GPT-2 directory (e.g. an `rlhf-fast sft` export) or hub name"),
    ("--tokenizer", "model.tokenizer", str, "'byte' or an HF tokenizer dir (default: byte for tiny/demo, "
                                            "else the model's)"),
    ("--attn-backend", "model.attn_backend", str, "attention backend: auto, torch, sdpa, triton, flash"),
    ("--kernel-backend", "model.kernel_backend", str, "fused-kernel backend: auto, torch, triton"),
    ("--grad-checkpoint", "model.grad_checkpoint", bool, "activation checkpointing: recompute each transformer "
                                                         "block in backward (less memory, ~1/3 more compute)"),
    ("--task", "task.task", str, "built-in verifiable task: arithmetic (default unless --reward-model)"),
    ("--reward", "task.reward", str, "registered reward function for the task: arithmetic, "
                                     "arithmetic_format, arithmetic_correct"),
    ("--reward-model", "task.reward_model", str, "an `rlhf-fast rm` export to score completions with; "
                                                 "prompts then come from --data"),
    ("--max-operand", "task.max_operand", int, "arithmetic operands lie in [0, MAX_OPERAND]"),
    ("--cold-start-steps", "task.cold_start_steps", int, "SFT warm-up steps on formatted task answers "
                                                         "before GRPO (R1-style cold start; 0: none)"),
    ("--data", "data.data", str, "prompts for --reward-model: synthetic, an HH-RLHF hub name or .jsonl file"),
    ("--max-prompt-len", "data.max_prompt_len", int, "prompt tokens kept (from the end)"),
    ("--group-size", "grpo.group_size", int, "G: completions sampled per prompt"),
    ("--rollout-batch-size", "grpo.rollout_batch_size", int, "prompts per rollout (rows = this * G)"),
    ("--iterations", "grpo.iterations", int, "rollout + update iterations"),
    ("--epochs", "grpo.epochs", int, "passes over each rollout's minibatches"),
    ("--mini-batch-size", "grpo.mini_batch_size", int, "rollout rows per optimizer step (a minibatch)"),
    ("--micro-batch-size", "grpo.micro_batch_size", int, "rollout rows per forward pass (default: a minibatch)"),
    ("--estimator", "grpo.estimator", str, "advantages: grpo, dr_grpo (no std division), rloo, reinforce_pp"),
    ("--loss-aggregation", "grpo.loss_aggregation", str, "token_mean (DAPO), seq_mean (GRPO paper), seq_sum "
                                                         "(Dr. GRPO's constant normaliser)"),
    ("--clip-eps", "grpo.clip_eps", float, "ratio clipping epsilon (lower side, and upper by default)"),
    ("--clip-eps-high", "grpo.clip_eps_high", float, "DAPO clip-higher: upper ratio clip, e.g. 0.28"),
    ("--kl-loss-coef", "grpo.kl_loss_coef", float, "k3 KL to the reference in the loss (adapters off; 0: no "
                                                   "reference pass)"),
    ("--std-eps", "grpo.std_eps", float, "grpo: (score - mean) / (std + STD_EPS)"),
    ("--dynamic-sampling", "grpo.dynamic_sampling", bool, "DAPO: drop groups whose scores are all equal and "
                                                          "sample more prompts to refill the batch"),
    ("--overlong-buffer", "grpo.overlong_buffer", int, "DAPO soft overlong penalty over the last N tokens "
                                                       "(0: off)"),
    ("--mask-truncated", "grpo.mask_truncated", bool, "DAPO overlong filtering: no loss on responses cut at "
                                                      "--max-new-tokens"),
    ("--max-new-tokens", "grpo.max_new_tokens", int, "longest completion"),
    ("--temperature", "grpo.temperature", float, "sampling temperature of the rollouts"),
    ("--eval-prompts", "grpo.eval_prompts", int, "held-out prompts scored at each evaluation"),
    ("--lora-rank", "lora.rank", int, "LoRA rank"),
    ("--lr", "optim.lr", float, "learning rate (AdamW)"),
    ("--max-grad-norm", "optim.max_grad_norm", float, "gradient clipping norm"),
    ("--output-dir", "run.output_dir", str, "run directory: config, metrics.jsonl, checkpoints, export"),
    ("--seed", "run.seed", int, "seed for init, prompt order, sampling and the task"),
    ("--device", "run.device", str, "cpu, cuda, cuda:1, ... (default: cuda when available)"),
    ("--precision", "run.precision", str, "fp32, bf16 or fp16 (fp16: CUDA only)"),
    ("--strategy", "run.strategy", str, "single (one device) or deepspeed (ZeRO 0-2, launched by `deepspeed`)"),
    ("--zero-stage", "deepspeed.zero_stage", int, "DeepSpeed ZeRO stage 0-2 (with --strategy deepspeed)"),
    ("--eval-every", "run.eval_every", int, "iterations between evaluations (0: only at the end)"),
    ("--save-every", "run.save_every", int, "iterations between checkpoints (0: only at the end)"),
]


def _add_grpo_args(p: argparse.ArgumentParser) -> None:
    from dataclasses import asdict

    from rlhf_fast.trainers.grpo import GRPOConfig

    defaults = asdict(GRPOConfig())
    _add_flag_table(p, _GRPO_FLAGS, defaults)
    p.add_argument("--lora", dest="lora.enabled", action=argparse.BooleanOptionalAction, default=None,
                   help="train a LoRA adapter `policy` (--no-lora: all weights); default: LoRA when starting "
                        "from --model weights, all weights for a random-init --preset")
    p.add_argument("--resume", dest="run.resume", action="store_const", const=True,
                   help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--no-progress", dest="run.progress", action="store_const", const=False,
                   help="no tqdm progress bar")
    p.add_argument("--no-export", action="store_true", help="skip the merged HF-format export at the end")


def _grpo_config(args):
    from rlhf_fast.trainers.config import apply_overrides, load_config_file
    from rlhf_fast.trainers.grpo import GRPOConfig

    file_config = load_config_file(args.config) if args.config else {}
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    d = apply_overrides(file_config, overrides)
    if overrides.get("task.reward_model") is not None and overrides.get("task.task") is None:
        d["task"]["task"] = None  # --reward-model replaces the default built-in task
    return GRPOConfig.from_dict(d)


def cmd_grpo(args) -> int:
    import logging

    from rlhf_fast.trainers.grpo import build_grpo_trainer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    trainer = build_grpo_trainer(_grpo_config(args))
    before = trainer.evaluate() if trainer.iteration == 0 and not trainer.config.run.resume else None
    trainer.train()
    after = trainer.eval_history[-1] if trainer.eval_history else trainer.evaluate()
    if before is not None:
        print(f"held-out reward: {before['reward']:.3f} -> {after['reward']:.3f} (sampled), "
              f"{before['greedy_reward']:.3f} -> {after['greedy_reward']:.3f} (greedy)")
    else:
        print(f"held-out reward: {after['reward']:.3f} (sampled), {after['greedy_reward']:.3f} (greedy)")
    if not args.no_export:
        print(f"exported merged model to {trainer.export(trainer.run_dir / 'export')}")
    return 0


# --- ppo / demo ----------------------------------------------------------------------------------


def _add_ppo_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per PPOConfig field (--rollout-batch-size, --init-kl-coef, ...), default from the dataclass."""
    import dataclasses

    from rlhf_fast.trainers.ppo import PPOConfig

    for f in dataclasses.fields(PPOConfig):
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if isinstance(default, bool):
            p.add_argument(flag, dest=f"ppo.{f.name}", action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default: {default})")
            continue
        ann = str(f.type)  # "int", "float | None", ...: the field's own type, also where the default is None
        typ = int if ann.startswith("int") else float if ann.startswith("float") else str
        p.add_argument(flag, dest=f"ppo.{f.name}", type=typ, default=None, metavar=f.name.upper(),
                       help=f"(default: {default})")


def cmd_ppo(args) -> int:
    import logging

    from rlhf_fast.trainers.ppo import PPOConfig, PPOTrainer, load_ppo_models, load_prompts, prompt_batches

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("ppo.") and v is not None}
    config = PPOConfig(**overrides)
    models, tokenizer = load_ppo_models(args.sft_model, args.reward_model, lora=args.lora,
                                        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                                        attn_backend=args.attn_backend, kernel_backend=args.kernel_backend,
                                        seed=config.seed, critic=config.critic,
                                        grad_checkpoint=config.grad_checkpoint)
    train, held_out = load_prompts(args.data, subset=args.data_subset, eval_size=args.eval_size,
                                   synthetic_size=args.synthetic_size, seed=config.seed)
    prompts = prompt_batches(train, tokenizer, config.rollout_batch_size, args.max_prompt_len, config.seed)
    eval_prompts = [tokenizer.encode(p)[-args.max_prompt_len:] for p in held_out]
    trainer = PPOTrainer(config, models, tokenizer, prompts, eval_prompts, strategy=_ppo_strategy(args, config))
    trainer.train()
    if trainer.strategy.is_main:
        print(f"exported PPO policy to {trainer.export(trainer.run_dir / 'export')}")
    return 0


def _ppo_strategy(args, config):
    """The strategy of `rlhf-fast ppo`: --strategy plus the DeepSpeed flags, as for sft / rm."""
    from rlhf_fast.distributed import DeepSpeedSettings
    from rlhf_fast.trainers.rl_loop import build_rl_strategy

    ds = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("deepspeed.") and v is not None}
    return build_rl_strategy(config, args.strategy, DeepSpeedSettings(**ds) if ds else None)


def cmd_demo(args) -> int:
    import logging

    from rlhf_fast.trainers.demo import DemoConfig, format_summary, run_demo

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.task == "sentiment":
        return _demo_sentiment(args)
    if args.data is not None or args.rl_iterations is not None:
        raise ValueError("--data and --rl-iterations apply to --task sentiment")
    sizes = {k: v for k, v in vars(args).items() if k.startswith(("sft_", "rm_", "ppo_", "dpo_")) and v is not None}
    common = dict(output_dir=args.output_dir or "runs/demo", device=args.device, seed=args.seed,
                  progress=not args.no_progress, algo=args.algo, **sizes)
    config = DemoConfig.quick(**common) if args.quick else DemoConfig(**common)
    summary = run_demo(config)
    print(format_summary(summary))
    extra = "ppo_curves.png, sft/ rm/ ppo/" if config.algo == "ppo" else "sft/ rm/ dpo/"
    print(f"\nrun directory: {config.output_dir} (summary.json, {extra} with checkpoints, metrics.jsonl and "
          "exports)")
    return 0


def _demo_sentiment(args) -> int:
    from rlhf_fast.trainers.sentiment_task import SentimentTaskConfig, format_sentiment_summary, run_sentiment_task

    synthetic_only = [flag for flag, value in (("--rm-steps", args.rm_steps), ("--ppo-iterations", args.ppo_iterations),
                                               ("--dpo-steps", args.dpo_steps)) if value is not None]
    if synthetic_only or args.algo != "ppo":
        raise ValueError(f"{', '.join(synthetic_only or ['--algo'])} apply to --task synthetic; --task sentiment "
                         "runs SFT then GRPO (sizes: --sft-steps, --rl-iterations)")
    sizes = {k: v for k, v in (("sft_steps", args.sft_steps), ("rl_iterations", args.rl_iterations),
                               ("data", args.data)) if v is not None}
    common = dict(output_dir=args.output_dir or "runs/demo-sentiment", device=args.device, seed=args.seed,
                  progress=not args.no_progress, **sizes)
    config = SentimentTaskConfig.quick(**common) if args.quick else SentimentTaskConfig(**common)
    print(format_sentiment_summary(run_sentiment_task(config)))
    print(f"\nrun directory: {config.output_dir} (summary.json; sft/export; rl/ with config, metrics.jsonl, "
          "checkpoints and export)")
    return 0


# --- eval: policies compared on held-out prompts -------------------------------------------------


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    from rlhf_fast.evaluation import TASKS, EvalConfig

    d = EvalConfig(policies=("-",))
    p.add_argument("--policies", nargs="+", required=True, metavar="DIR",
                   help="policy exports or run directories (runs/demo/ppo); the first is the baseline")
    p.add_argument("--names", nargs="+", help="a name per policy (default: from the directory names)")
    p.add_argument("--reward-model", metavar="DIR", help="an `rlhf-fast rm` export: scores and win-rates")
    p.add_argument("--reference", metavar="DIR", help="the KL reference (default: the first policy)")
    p.add_argument("--task", choices=TASKS, help="held-out prompts and gold reward: synthetic (default), "
                   "arithmetic, sentiment (with --prompts), none (default with --prompts)")
    p.add_argument("--prompts", metavar="FILE", help="a .jsonl(.gz) file of {\"prompt\": ...} lines or HH "
                   "records: its last --num-prompts prompts instead of the task's")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts, help=f"(default: {d.num_prompts})")
    p.add_argument("--samples", type=int, default=d.samples, help="sampled responses per prompt, plus one "
                   f"greedy (default: {d.samples})")
    p.add_argument("--max-new-tokens", type=int, help="(default: 48; arithmetic 16)")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"(default: {d.temperature})")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling, bootstrap and the task's held-out draw "
                   f"(default: {d.seed}: the demo's held-out prompts)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"prompts per batch (default: "
                   f"{d.batch_size})")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--output-dir", default=d.output_dir, help="eval.json, eval.md, eval.png, samples.md "
                   f"(default: {d.output_dir})")


def cmd_eval(args) -> int:
    from rlhf_fast.evaluation import EvalConfig, run_eval
    from rlhf_fast.evaluation.evaluate import format_markdown

    try:
        config = EvalConfig(policies=tuple(args.policies), names=tuple(args.names) if args.names else None,
                            reward_model=args.reward_model, reference=args.reference, task=args.task,
                            prompts=args.prompts, num_prompts=args.num_prompts, samples=args.samples,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                            batch_size=args.batch_size, device=args.device, output_dir=args.output_dir)
        result = run_eval(config)
    except USER_ERRORS as e:  # a missing or corrupt export, a bad flag: one line naming it, exit 2
        if args.debug:
            raise
        print(f"rlhf-fast eval: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(format_markdown(result))
    print("\nwrote " + ", ".join(result["files"].values()))
    return 0


def cmd_bench(args) -> int:
    from pathlib import Path

    import torch

    from rlhf_fast.benchmarking import BenchConfig, format_report, run_bench, write_chart, write_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    overrides = {k: v for k, v in vars(args).items() if k in BENCH_FIELDS and v is not None}
    for name in ("presets", "backends"):
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    config = BenchConfig.for_device(device, **overrides)
    record = run_bench(config)
    print(format_report(record))
    out_dir = Path(config.out_dir or ("benchmarks/results" if torch.device(device).type == "cuda"
                                      else ".benchmarks/smoke"))
    path = write_json(record, out_dir)
    chart = write_chart(record, path.with_suffix(".png"))
    print(f"\nrecord: {path}\nchart:  {chart}")
    return 0


BENCH_FIELDS = ("presets", "batch_size", "prompt_len", "new_tokens", "dtype", "backends", "mini_batch_size",
                "ppo_epochs", "lora_rank", "warmup", "iters", "data", "compile", "hf", "baseline",
                "max_vram_gb", "out_dir", "seed")


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", dest="presets", action="append",
                   help="model preset, repeatable (default: gpt2 and gpt2-medium on CUDA, tiny on CPU)")
    p.add_argument("--batch-size", type=int, help="prompts per PPO iteration (default: 64; CPU 4)")
    p.add_argument("--prompt-len", type=int, help="prompt width in tokens (default: 256; CPU 12)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per prompt (default: 128; CPU 6)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16; CPU float32")
    p.add_argument("--backend", dest="backends", action="append", choices=["triton", "torch"],
                   help="kernel backend(s) of our PPO rows, repeatable (default: triton and torch)")
    p.add_argument("--mini-batch-size", type=int, help="sequences per PPO optimizer step (default: 8; CPU 2)")
    p.add_argument("--ppo-epochs", type=int, help="passes over each rollout (default: 1)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (default: 8)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default: 1)")
    p.add_argument("--iters", type=int, help="timed iterations, median reported (default: 2)")
    p.add_argument("--data", help="prompt lengths: auto (HH-RLHF from ../shared/data/hh-rlhf when present), "
                   "synthetic, or an HH-RLHF .jsonl(.gz) file / directory")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the compiled decode step (default: on CUDA)")
    p.add_argument("--hf", action=argparse.BooleanOptionalAction, default=None,
                   help="time HF generate (default: on)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                   help="time the seed-style baseline iteration (default: on)")
    p.add_argument("--max-vram-gb", type=float, help="emulate a card with this many GiB (CUDA only), e.g. 16")
    p.add_argument("--out-dir", help="record + chart directory (default: benchmarks/results; CPU: "
                   ".benchmarks/smoke)")
    p.add_argument("--device", help="default: cuda when available")
    p.add_argument("--seed", type=int)


# --- plan: predicted peak memory per phase (docs/memory.md) ----------------------------------------

_PLAN_FLAGS = [  # (flag, PlanSettings field, help); defaults come from PlanSettings (shown in --help)
    ("--algo", "algo", "ppo (with a critic), grpo (critic-free), dpo, sft or rm"),
    ("--precision", "precision", "fp32, bf16 or fp16 autocast"),
    ("--lora", "lora", "LoRA adapters on one frozen base (--no-lora: the trained models in full)"),
    ("--lora-rank", "lora_rank", "LoRA rank"),
    ("--strategy", "strategy", "single (fp32 master weights under autocast) or deepspeed (ZeRO 0-2: a 16-bit "
                               "module)"),
    ("--weight-dtype", "weight_dtype", "fp32, bf16 or fp16 weights on the device (default: fp32 on one device, the "
                                       "--precision dtype under deepspeed)"),
    ("--offload-optimizer", "offload_optimizer", "deepspeed: fp32 masters, Adam state and gradients on the CPU"),
    ("--offload-frozen", "offload_frozen", "separate frozen models (reference, reward) on the CPU between uses"),
    ("--rollout-batch-size", "rollout_batch_size", "RL: prompts per rollout"),
    ("--group-size", "group_size", "RL: responses per prompt"),
    ("--prompt-len", "prompt_len", "prompt tokens (the padded width)"),
    ("--response-len", "response_len", "response tokens (RL: --max-new-tokens)"),
    ("--micro-batch-size", "micro_batch_size", "rows per training forward (rm, dpo: pairs)"),
    ("--grad-checkpoint", "grad_checkpoint", "activation checkpointing per transformer block"),
    ("--fused-logprobs", "fused_logprobs", "the fused lm-head log-prob kernel (--no-fused-logprobs: logits "
                                           "materialised)"),
]


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    from rlhf_fast.trainers.memory_plan import PlanSettings

    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", default="gpt2-xl", help="model preset (default: gpt2-xl)")
    model.add_argument("--model", help="HF GPT-2 directory: the shape from its config.json (no weights are read)")
    defaults = PlanSettings()
    for flag, field, text in _PLAN_FLAGS:
        default = getattr(defaults, field)
        text = text if default is None else f"{text} (default: {default})"
        if isinstance(default, bool):
            p.add_argument(flag, dest=field, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            p.add_argument(flag, dest=field, type=type(default) if default is not None else str, default=default,
                           help=text)
    p.add_argument("--vram", type=float, default=16.0, metavar="GIB", help="device memory budget in GiB "
                   "(default: 16)")
    docs = p.add_mutually_exclusive_group()
    docs.add_argument("--write-docs", action="store_true", help="regenerate the numbers of docs/memory.md instead")
    docs.add_argument("--check-docs", action="store_true", help="exit 1 when docs/memory.md's numbers are stale")


def cmd_plan(args) -> int:
    from rlhf_fast.trainers.memory_plan import DOC_PATH, ModelShape, PlanSettings, decide, format_verdict, sync_docs

    if args.write_docs or args.check_docs:
        if not sync_docs(DOC_PATH, check=args.check_docs):
            print(f"rlhf-fast plan: {DOC_PATH} is stale: run rlhf-fast plan --write-docs", file=sys.stderr)
            return 1
        print(f"{DOC_PATH}: {'written' if args.write_docs else 'up to date'}")
        return 0
    shape = ModelShape.from_hf_dir(args.model) if args.model else ModelShape.from_preset(args.preset)
    settings = PlanSettings(**{field: getattr(args, field) for _, field, _ in _PLAN_FLAGS})
    verdict = decide(shape, settings, args.vram)
    print(format_verdict(verdict))
    if verdict.refused:
        print(f"rlhf-fast plan: {verdict.message()}", file=sys.stderr)
        return 2
    return 0


# --- serve: the OpenAI-compatible HTTP server ------------------------------------------------------


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    from rlhf_fast.serving.batcher import BatchConfig  # no fastapi: the defaults live there

    d = BatchConfig()
    p.add_argument("--model", required=True, help="an `rlhf-fast` export / HF GPT-2 directory, or a preset "
                   "(random init: a smoke test)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="requests per generate call "
                   f"(1: no batching, one request at a time; default: {d.max_batch_size})")
    p.add_argument("--batch-window-ms", type=float, default=d.batch_window_ms, help="how long the oldest waiting "
                   f"request waits for others to batch with (default: {d.batch_window_ms:g})")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests before the server "
                   f"answers 429 (default: {d.max_queue})")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled decode step (CUDA graphs on CUDA; default: on for CUDA, off for CPU)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0, help="init seed of a preset model")


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise SystemExit("rlhf-fast serve needs: pip install 'rlhf_fast[serve]'") from None
    from rlhf_fast.serving.batcher import BatchConfig
    from rlhf_fast.serving.conversation import load_chat_model
    from rlhf_fast.serving.server import serve

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    batch = BatchConfig(max_batch_size=args.max_batch_size, batch_window_ms=args.batch_window_ms,
                        max_queue=args.max_queue, compile=args.compile)
    model, tokenizer, name = load_chat_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed)
    serve(model, tokenizer, name, host=args.host, port=args.port, batch=batch)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-fast", description=__doc__)
    # the deepspeed launcher passes --local_rank=N before the subcommand; the rank is read from LOCAL_RANK
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, devices and usable kernel/attention backends")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("generate", help="complete prompts with a preset (random init) or an HF GPT-2 dir")
    p.add_argument("--model", required=True, help="preset (tiny, demo, gpt2, ...) or HF GPT-2 directory")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--tokenizer", help="'byte' or an HF tokenizer dir (default: byte for a preset, "
                   "else --model)")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="talk to a model in the terminal: multi-turn HH-format chat, streamed")
    p.add_argument("--model", required=True, help="an `rlhf-fast` export (e.g. runs/demo/ppo/export) or HF GPT-2 "
                   "directory, or a preset (random init: a smoke test)")
    p.add_argument("--system", help="text put before the conversation")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("sft", help="supervised fine-tuning on prompt/response data (loss on responses)")
    _add_train_args(p, "sft")
    p.set_defaults(func=cmd_sft)
    p = sub.add_parser("rm", help="reward-model training on preference pairs")
    _add_train_args(p, "rm")
    p.set_defaults(func=cmd_rm)
    p = sub.add_parser("dpo", help="DPO / IPO / robust / SimPO / ORPO on preference pairs, from an SFT export")
    _add_train_args(p, "dpo")
    p.set_defaults(func=cmd_dpo)
    p = sub.add_parser("grpo", help="GRPO: G completions per prompt, group-normalised advantages, no critic")
    _add_grpo_args(p)
    p.set_defaults(func=cmd_grpo)
    p = sub.add_parser("ppo", help="PPO from an SFT export and a reward-model export (LoRA: one shared base)")
    p.add_argument("--sft-model", required=True, help="HF GPT-2 directory exported by `rlhf-fast sft`")
    p.add_argument("--reward-model", required=True, help="directory exported by `rlhf-fast rm`")
    p.add_argument("--data", default="synthetic", help="prompts: 'synthetic', an HH-RLHF hub name, .jsonl(.gz) "
                   "HH records, or a .jsonl(.gz) file of {\"prompt\": ...} lines")
    p.add_argument("--data-subset", help="HH-RLHF data subset, e.g. harmless-base")
    p.add_argument("--max-prompt-len", type=int, default=48, help="prompt tokens kept (from the end)")
    p.add_argument("--eval-size", type=int, default=128, help="held-out prompts for evaluation")
    p.add_argument("--synthetic-size", type=int, default=4000, help="training prompts for --data synthetic")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True,
                   help="LoRA adapters on one frozen base (--no-lora: full-parameter policy + separate critic)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--attn-backend", default="auto", help="auto, torch, sdpa, triton, flash")
    p.add_argument("--kernel-backend", default="auto", help="auto, torch, triton")
    p.add_argument("--strategy", default="single", choices=["single", "deepspeed"],
                   help="single (one device) or deepspeed (ZeRO 0-2; --no-lora: actor and critic engines)")
    p.add_argument("--zero-stage", dest="deepspeed.zero_stage", type=int, help="DeepSpeed ZeRO stage 0-2")
    p.add_argument("--deepspeed-config", dest="deepspeed.config_file",
                   help="DeepSpeed JSON used instead of the generated config")
    p.add_argument("--offload-optimizer", dest="deepspeed.offload_optimizer", action="store_const", const=True,
                   help="DeepSpeed: optimizer states and step on the CPU (DeepSpeedCPUAdam; ZeRO >= 1)")
    p.add_argument("--offload-params", dest="deepspeed.offload_params", action="store_const", const=True,
                   help="DeepSpeed: parameters on the CPU between uses (ZeRO-3, which PPO refuses)")
    _add_ppo_config_flags(p)
    p.set_defaults(func=cmd_ppo)
    p = sub.add_parser("demo", help="the main job: SFT -> RM -> PPO (--algo dpo: DPO) on the built-in synthetic "
                                    "task, offline")
    p.add_argument("--task", choices=["synthetic", "sentiment"], default="synthetic",
                   help="synthetic (default): the built-in preference task, byte tokenizer; sentiment: SFT on "
                        "HH-RLHF dialogues with the GPT-2 tokenizer, then GRPO toward positive sentiment (VADER)")
    p.add_argument("--output-dir", help="run directory (default: runs/demo; --task sentiment: runs/demo-sentiment)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="--task sentiment: an HH-RLHF .jsonl(.gz) file or directory "
                                  "(default: ../shared/data/hh-rlhf)")
    p.add_argument("--rl-iterations", dest="rl_iterations", type=int, help="--task sentiment: GRPO iterations")
    p.add_argument("--sft-steps", dest="sft_steps", type=int, help="SFT optimizer steps (default: 300)")
    p.add_argument("--rm-steps", dest="rm_steps", type=int, help="reward-model optimizer steps (default: 200)")
    p.add_argument("--ppo-iterations", dest="ppo_iterations", type=int, help="PPO iterations (default: 40)")
    p.add_argument("--algo", choices=["ppo", "dpo"], default="ppo",
                   help="the alignment stage after SFT and the RM: ppo (default) or dpo (the RM then only judges)")
    p.add_argument("--dpo-steps", dest="dpo_steps", type=int, help="DPO optimizer steps (default: 200)")
    p.add_argument("--quick", action="store_true", help="tiny model and step counts: a smoke test in seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("eval", help="compare policies on held-out prompts: RM score and win-rate (95% CI), gold "
                                    "reward, KL, length, diversity, reward-hacking alarms")
    _add_eval_args(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("bench", help="end-to-end throughput: generation, experience, PPO iteration vs the "
                       "seed-style baseline; table + JSON record + PNG chart")
    _add_bench_args(p)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("plan", help="predicted peak memory per phase for a model, precision, batch layout and "
                                    "memory budget: fits, a proposal that fits, or why nothing does")
    _add_plan_args(p)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming) with dynamic "
                                     "batching; needs the serve extra")
    _add_serve_args(p)
    p.set_defaults(func=cmd_serve)
    return parser


# Bad input (config, data file and line, paths, checkpoints) raises these from the library with a message
# naming what to fix: the CLI shows that message as one line instead of a traceback (--debug shows it).
USER_ERRORS = (ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        message = " ".join(str(e).split("\n")) or type(e).__name__
        raise SystemExit(f"rlhf-fast {args.command}: {message}") from e


if __name__ == "__main__":
    raise SystemExit(main())
