"""Peak GPU memory and iteration time of one PPO iteration under a 16 GiB cap (docs/memory.md).

Configurations (each in its own subprocess, so an OOM or DeepSpeed's process group cannot leak into the
next):
  lora-xl            LoRA PPO of gpt2-xl: one frozen bf16 base, adapters policy / value / reward
                     (reference = adapters off), SingleDeviceStrategy, no offload.
  full-large-offload full-parameter PPO of gpt2-large: actor and critic are DeepSpeed ZeRO-2 engines with
                     the optimizer offloaded to the CPU (DeepSpeedCPUAdam); reference and reward model are
                     frozen bf16 copies moved to the GPU only while they score.
  full-large-gpu     baseline: the same without optimizer offload (fp32 master + Adam state on the GPU);
                     the plan predicts it does not fit, and the record says whether it did.

One PPO iteration = generate (64 prompts x 128 tokens -> 384 tokens, static KV cache) -> score (reference
log-probs, values, rewards; no-grad, in chunks) -> update (PPO loss, micro-batches of 4, actor then
critic, one optimizer step each). Weights are random (no hub here); memory and time do not depend on them.

    python benchmarks/bench_memory_16gb.py            # GPU: all configurations, record in results/
    python benchmarks/bench_memory_16gb.py --smoke    # CPU: tiny models, plumbing check only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import print_table, write_record  # noqa: E402

CAP_GIB = 16.0
CONFIGS = ("lora-xl", "full-large-offload", "full-large-gpu")
GIB = 2**30


def predicted_peak_gib(config: str, L: int, C: int, batch: int, seq: int, micro: int, V: int = 50257) -> float:
    """docs/memory.md's arithmetic: max over phases of (resident weights + phase memory)."""
    P = V * C + 1024 * C + L * (12 * C * C + 13 * C) + 2 * C
    kv = 2 * L * batch * seq * C * 2
    act = 34 * C * L * micro * seq + V * micro * seq * 4
    if config == "lora-xl":
        lora = 16 * 8 * C * L
        resident = 2 * P + 3 * lora * 4 + 2 * lora * 12
        return (resident + max(kv, act)) / GIB
    buckets = 2 * 2 * 5e7 * 2
    resident = 2 * (2 * P) + buckets  # actor + critic, bf16
    if config == "full-large-gpu":
        resident += 2 * 12 * P  # fp32 master + Adam m, v of both on the GPU
    return (resident + max(kv, 2 * 2 * P, act)) / GIB


class Critic(nn.Module):
    """Value model: a GPT and a value head; forward = values at the action positions."""

    def __init__(self, gpt, head):
        super().__init__()
        self.gpt, self.head = gpt, head

    def forward(self, seq, mask, first_action):
        from rlhf_fast.trainers.rollout import action_values

        return action_values(self.gpt, self.head, seq, mask, first_action=first_action)


class Actor(nn.Module):
    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, seq, mask, first_action):
        from rlhf_fast.trainers.rollout import action_logprobs

        return action_logprobs(self.gpt, seq, mask, first_action=first_action)


def ppo_iteration(policy_fn, value_fn, ref_fn, reward_fn, generate_fn, update, args, device):
    """One iteration; returns {phase: (seconds, peak GiB)}."""
    from rlhf_fast.kernels import gae

    phases = {}

    def phase(name, fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else float("nan")
        phases[name] = (time.perf_counter() - t0, peak)
        return out

    g = torch.Generator(device).manual_seed(0)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_len), device=device, generator=g)
    mask = torch.ones_like(prompts)
    out = phase("generate", lambda: generate_fn(prompts, mask))
    seq, attn = out.sequences, out.attention_mask
    fa = args.prompt_len - 1
    action_mask = torch.zeros(seq.shape[0], seq.shape[1] - 1, device=device)
    action_mask[:, fa:] = out.response_mask.float()

    @torch.no_grad()
    def score():
        chunks = [slice(i, i + args.score_chunk) for i in range(0, args.batch, args.score_chunk)]
        cat = lambda fn: torch.cat([fn(seq[c], attn[c], fa).float() for c in chunks])  # noqa: E731
        return cat(policy_fn), cat(ref_fn), cat(value_fn), cat(reward_fn)

    old_lp, ref_lp, old_v, rewards = phase("score", score)
    token_rewards = torch.zeros_like(old_lp)
    last = action_mask.cumsum(1).argmax(1)
    token_rewards[torch.arange(args.batch, device=device), last] = rewards[:, -1]
    adv, ret = gae(token_rewards, old_v, action_mask, 1.0, 0.95)
    phase("update", lambda: update(seq, attn, fa, old_lp, ref_lp, old_v, adv, ret, action_mask))
    return phases


def run_config(args) -> dict:
    from rlhf_fast.generation import generate
    from rlhf_fast.kernels import ppo_loss
    from rlhf_fast.model import GPT, ValueHead, add_lora

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * GIB / torch.cuda.get_device_properties(0)
                                                       .total_memory))
    preset = args.preset or ("gpt2-xl" if args.config == "lora-xl" else "gpt2-large")
    dtype = torch.bfloat16
    n_micro = args.batch // args.micro
    gen = lambda m: (lambda p, msk: generate(m, p, msk, max_new_tokens=args.seq - args.prompt_len,  # noqa: E731
                                             do_sample=True, generator=torch.Generator(device).manual_seed(1)))

    def losses(lp, v, sl, old_lp, ref_lp, old_v, adv, ret, am):
        return ppo_loss(lp, old_lp[sl], adv[sl], v, old_v[sl], ret[sl], am[sl], ref_logprobs=ref_lp[sl],
                        kl_coef=0.05).loss

    if args.config == "lora-xl":
        from rlhf_fast.distributed import SingleDeviceStrategy

        gpt = GPT.from_preset(preset).to(device=device, dtype=dtype)
        for name in ("policy", "value", "reward"):
            add_lora(gpt, name, rank=8)
        value_head, reward_head = ValueHead(gpt.config.n_embd).to(device), ValueHead(gpt.config.n_embd).to(device)
        reward_head.requires_grad_(False)
        actor, critic = Actor(gpt), Critic(gpt, value_head)

        def adapter(name, fn):
            def run(*a):
                gpt.set_adapter(name)
                return fn(*a)
            return run

        def ref_fn(*a):
            with gpt.disable_adapters():
                return actor(*a)

        params = [p for n, p in gpt.named_parameters() if ".policy" in n or ".value" in n]
        opt = torch.optim.AdamW(params + list(value_head.parameters()), lr=1e-5)
        strategy = SingleDeviceStrategy(device, "fp32")
        strategy.prepare(nn.ModuleList([gpt, value_head]), opt)

        def update(seq, attn, fa, *rest):
            for i in range(n_micro):
                sl = slice(i * args.micro, (i + 1) * args.micro)
                lp = adapter("policy", actor)(seq[sl], attn[sl], fa)
                v = adapter("value", critic)(seq[sl], attn[sl], fa)
                strategy.backward(losses(lp, v, sl, *rest) / n_micro)
            strategy.step()

        fns = (adapter("policy", actor), adapter("value", critic), ref_fn,
               adapter("reward", Critic(gpt, reward_head)), adapter("policy", gen(gpt)))
    else:
        from rlhf_fast.distributed import DeepSpeedSettings, DeepSpeedStrategy

        ds = DeepSpeedSettings(zero_stage=2, offload_optimizer=args.config == "full-large-offload")
        strategy = DeepSpeedStrategy(ds, "bf16" if device.type == "cuda" else "fp32", 1.0, args.micro, n_micro)
        torch.manual_seed(0)
        actor_gpt, critic_gpt = GPT.from_preset(preset), GPT.from_preset(preset)
        critic_module = Critic(critic_gpt, ValueHead(critic_gpt.config.n_embd))
        actor, _, _ = strategy.prepare(Actor(actor_gpt), torch.optim.AdamW(actor_gpt.parameters(), lr=1e-6))
        critic, _, _ = strategy.prepare(critic_module, torch.optim.AdamW(critic_module.parameters(), lr=1e-6))
        ref = strategy.prepare_frozen(Actor(GPT.from_preset(preset))).to("cpu")
        reward = strategy.prepare_frozen(Critic(GPT.from_preset(preset), ValueHead(actor_gpt.config.n_embd))).to("cpu")

        def parked(model):
            def run(*a):
                with strategy.on_device(model):
                    return model(*a)
            return run

        def update(seq, attn, fa, *rest):
            for engine, pick in ((actor, "policy"), (critic, "value")):
                for i in range(n_micro):
                    sl = slice(i * args.micro, (i + 1) * args.micro)
                    out = engine(seq[sl], attn[sl], fa).float()
                    lp = out if pick == "policy" else rest[0][sl]
                    v = out if pick == "value" else rest[2][sl]
                    strategy.backward(losses(lp, v, sl, *rest) / n_micro, model=engine)
                strategy.step(model=engine)

        fns = (actor, critic, parked(ref), parked(reward), gen(actor.module.gpt))

    rows = []
    for it in range(args.iters + 1):  # iteration 0 warms up (compile, CUDA graphs, allocator)
        phases = ppo_iteration(*fns, update, args, device)
        if it:
            rows.append(phases)
    time_s = sum(sum(t for t, _ in p.values()) for p in rows) / len(rows)
    peaks = {k: max(p[k][1] for p in rows) for k in rows[0]}
    cfg = GPT.from_preset(preset).config if args.smoke else None
    L, C = (cfg.n_layer, cfg.n_embd) if cfg else {"gpt2-xl": (48, 1600), "gpt2-large": (36, 1280)}[preset]
    return {"config": args.config, "model": preset, "status": "ok", "iter_s": time_s,
            "peak_gib": max(peaks.values()), **{f"peak_{k}_gib": v for k, v in peaks.items()},
            "predicted_peak_gib": predicted_peak_gib(args.config, L, C, args.batch, args.seq, args.micro,
                                                     V=cfg.vocab_size if cfg else 50257)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU plumbing check on the tiny preset")
    p.add_argument("--config", choices=CONFIGS, help="run one configuration in this process (internal)")
    p.add_argument("--iters", type=int, default=2, help="measured iterations after one warm-up")
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.batch, args.prompt_len, args.seq, args.micro, args.score_chunk = "tiny", 4, 6, 14, 2, 2
        args.vocab = 256
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        if not torch.cuda.is_available():
            print("bench_memory_16gb needs a CUDA GPU (it caps GPU memory at 16 GiB); "
                  "run with --smoke for the CPU plumbing check", file=sys.stderr)
            return 2
        args.preset, args.batch, args.prompt_len, args.seq, args.micro, args.score_chunk = None, 64, 128, 384, 4, 16
        args.vocab = 50257
    if args.config:  # child: one configuration
        try:
            row = run_config(args)
        except torch.OutOfMemoryError as e:
            row = {"config": args.config, "status": "OOM under the 16 GiB cap", "error": str(e).splitlines()[0]}
        Path(args.json).write_text(json.dumps(row))
        return 0
    rows = []
    out_dir = Path(__file__).resolve().parent / "results" if not args.smoke else Path(".benchmarks/smoke")
    out_dir.mkdir(parents=True, exist_ok=True)
    for config in CONFIGS:
        out = out_dir / f".memory-{config}.json"
        cmd = [sys.executable, __file__, "--config", config, "--iters", str(args.iters), "--json", str(out)]
        proc = subprocess.run(cmd + (["--smoke"] if args.smoke else []), capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            rows.append({"config": config, "status": f"failed (rc {proc.returncode})",
                         "error": proc.stderr.strip().splitlines()[-1:] or ""})
            continue
        rows.append(json.loads(out.read_text()))
        out.unlink()
    print_table(rows, ["config", "model", "status", "iter_s", "peak_gib", "predicted_peak_gib",
                       "peak_generate_gib", "peak_score_gib", "peak_update_gib"])
    path = write_record("memory_16gb" + ("-smoke" if args.smoke else ""), rows, {"cap_gib": CAP_GIB},
                        out_dir=out_dir)
    print(f"record: {path}")
    return 0 if all(r.get("status") == "ok" or r["config"] == "full-large-gpu" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
