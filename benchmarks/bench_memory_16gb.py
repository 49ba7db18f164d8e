"""Peak GPU memory and iteration time of one PPO iteration under a 16 GiB cap, next to what the memory
plan (rlhf_fast/trainers/memory_plan.py, docs/memory.md) predicts for exactly what runs.

Configurations (each in its own subprocess, so an OOM or DeepSpeed's process group cannot leak into the
next):
  lora-xl            LoRA PPO of gpt2-xl: one base stored in bf16 (adapters too), adapters policy / value /
                     reward (reference = adapters off), SingleDeviceStrategy without autocast, no offload.
                     Its micro-batch and activation checkpointing are the plan's decision for 16 GiB
                     (`decide`, asked for docs/memory.md's headline micro-batch of 8).
  full-large-offload full-parameter PPO of gpt2-large: actor and critic are DeepSpeed ZeRO-2 engines with
                     the optimizer offloaded to the CPU (DeepSpeedCPUAdam); reference and reward model are
                     frozen bf16 copies moved to the GPU only while they score. Micro-batches of 4.
  full-large-gpu     baseline: the same without optimizer offload (fp32 master + Adam state on the GPU);
                     the plan predicts it does not fit, and the record says whether it did.

One PPO iteration = generate (64 prompts of 256 tokens + 128 new tokens, static KV cache) -> score (policy
and reference log-probs, values, rewards; no-grad, 16 rows at a time) -> update (PPO loss over
micro-batches, one optimizer step; lora-xl: policy and value forward, one backward; full-large: actor,
then critic). Each row records the measured peak per phase (peak_generate/score/update_gib) beside the
plan's (predicted_generate/score/update_gib) and the settings the plan was given or chose (plan_*).
Weights are random (no hub here); memory and time do not depend on them.

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
LORA_RANK = 8
PHASES = {"generate": "generation", "score": "scoring", "update": "update"}  # this script's -> the plan's


def planned(args):
    """(the memory plan of what this configuration runs, the row's plan fields). lora-xl runs the plan's
    decision for CAP_GIB; the full-large configurations run as given and the plan only predicts."""
    from rlhf_fast.trainers.memory_plan import HEADLINE, ModelShape, PlanSettings, decide

    layout = dict(algo="ppo", rollout_batch_size=args.batch, prompt_len=args.prompt_len,
                  response_len=args.response_len, score_rows=args.score_chunk)
    if args.config == "lora-xl":  # no autocast: activations in the weights' bf16, no 16-bit copies
        asked = PlanSettings(lora=True, lora_rank=LORA_RANK, precision="fp32", strategy="single",
                             weight_dtype="bf16", micro_batch_size=min(HEADLINE.micro_batch_size, args.batch),
                             **layout)
    else:  # the reference and reward model are separate frozen copies, on the GPU only for their pass
        asked = PlanSettings(lora=False, precision=args.precision, strategy="deepspeed",
                             offload_optimizer=args.config == "full-large-offload", offload_frozen=True,
                             micro_batch_size=args.micro, separate_updates=True, **layout)
    verdict = decide(ModelShape.from_preset(args.preset), asked, CAP_GIB)
    chosen = args.config == "lora-xl" and verdict.proposal is not None
    plan = verdict.proposal if chosen else verdict.plan
    phases = {p.name: p for p in plan.phases}
    return plan, {"plan_micro_batch": plan.settings.micro_batch_size,
                  "plan_grad_checkpoint": plan.settings.grad_checkpoint, "plan_fits": plan.fits,
                  "plan_flags": verdict.flags() if chosen else "", "plan": verdict.message(),
                  "predicted_peak_gib": plan.peak_gib, "predicted_resident_gib": plan.resident.nbytes / GIB,
                  **{f"predicted_{k}_gib": plan.phase_gib(phases[v]) for k, v in PHASES.items()}}


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


def run_config(args, plan, device) -> dict:
    """Run one configuration at `plan`'s micro-batch (and, lora-xl, its checkpointing); the measured row."""
    from rlhf_fast.generation import generate
    from rlhf_fast.kernels import ppo_loss
    from rlhf_fast.model import GPT, ValueHead, add_lora

    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * GIB / torch.cuda.get_device_properties(0)
                                                       .total_memory))
    preset, micro, ckpt = args.preset, plan.settings.micro_batch_size, plan.settings.grad_checkpoint
    micro_batches = [slice(i, i + micro) for i in range(0, args.batch, micro)]
    n_micro = len(micro_batches)
    gen = lambda m: (lambda p, msk: generate(m, p, msk, max_new_tokens=args.response_len,  # noqa: E731
                                             do_sample=True, generator=torch.Generator(device).manual_seed(1)))

    def losses(lp, v, sl, old_lp, ref_lp, old_v, adv, ret, am):
        return ppo_loss(lp, old_lp[sl], adv[sl], v, old_v[sl], ret[sl], am[sl], ref_logprobs=ref_lp[sl],
                        kl_coef=0.05).loss

    if args.config == "lora-xl":
        from rlhf_fast.distributed import SingleDeviceStrategy

        gpt = GPT.from_preset(preset, grad_checkpoint=ckpt).to(device=device, dtype=torch.bfloat16)
        for name in ("policy", "value", "reward"):
            add_lora(gpt, name, rank=LORA_RANK)  # in the base's dtype: bf16
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
            for sl in micro_batches:
                lp = adapter("policy", actor)(seq[sl], attn[sl], fa)
                v = adapter("value", critic)(seq[sl], attn[sl], fa)
                strategy.backward(losses(lp, v, sl, *rest) / n_micro)
            strategy.step()

        fns = (adapter("policy", actor), adapter("value", critic), ref_fn,
               adapter("reward", Critic(gpt, reward_head)), adapter("policy", gen(gpt)))
    else:
        from rlhf_fast.distributed import DeepSpeedSettings, DeepSpeedStrategy

        ds = DeepSpeedSettings(zero_stage=2, offload_optimizer=args.config == "full-large-offload")
        strategy = DeepSpeedStrategy(ds, args.precision, 1.0, micro, n_micro)
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
                for sl in micro_batches:
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
    return {"status": "ok", "iter_s": time_s, "peak_gib": max(peaks.values()),
            **{f"peak_{k}_gib": v for k, v in peaks.items()}}


def run_child(args) -> dict:
    """This process's configuration: the plan's fields, then what ran (or why it did not)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.preset = args.preset or ("gpt2-xl" if args.config == "lora-xl" else "gpt2-large")
    args.precision = "bf16" if device.type == "cuda" else "fp32"  # DeepSpeed's; lora-xl casts to bf16 itself
    plan, row = planned(args)
    row = {"config": args.config, "model": args.preset, **row}
    if args.config == "lora-xl" and not plan.fits:
        return {**row, "status": "refused by the plan"}
    try:
        return {**row, **run_config(args, plan, device)}
    except torch.OutOfMemoryError as e:
        return {**row, "status": "OOM under the 16 GiB cap", "error": str(e).splitlines()[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU plumbing check on the tiny preset")
    p.add_argument("--config", choices=CONFIGS, help="run one configuration in this process (internal)")
    p.add_argument("--iters", type=int, default=2, help="measured iterations after one warm-up")
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.batch, args.prompt_len, args.response_len = "tiny", 4, 6, 8
        args.micro, args.score_chunk, args.vocab = 2, 2, 256
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        if not torch.cuda.is_available():
            print("bench_memory_16gb needs a CUDA GPU (it caps GPU memory at 16 GiB); "
                  "run with --smoke for the CPU plumbing check", file=sys.stderr)
            return 2
        args.preset, args.batch, args.prompt_len, args.response_len = None, 64, 256, 128
        args.micro, args.score_chunk, args.vocab = 4, 16, 50257  # micro: full-large's; lora-xl's is the plan's
    if args.config:  # child: one configuration
        Path(args.json).write_text(json.dumps(run_child(args)))
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
    print_table(rows, ["config", "model", "status", "plan_micro_batch", "plan_grad_checkpoint", "iter_s", "peak_gib",
                       "predicted_peak_gib"] + [f"{w}_{k}_gib" for k in PHASES for w in ("peak", "predicted")])
    for r in rows:
        if r.get("plan"):
            print(f"plan {r['config']}: {r['plan']}")
    path = write_record("memory_16gb" + ("-smoke" if args.smoke else ""), rows, {"cap_gib": CAP_GIB},
                        out_dir=out_dir)
    print(f"record: {path}")
    return 0 if all(r.get("status") == "ok" or r["config"] == "full-large-gpu" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
