"""The main job: SFT -> reward model -> PPO (or DPO) on the built-in synthetic task, end to end, offline.

1. SFT: the random-init `demo` preset learns the task's preferred responses (full fine-tuning).
2. RM: a LoRA adapter `reward` + reward head on the SFT export, trained on the preference pairs.
3. PPO: LoRA adapters `policy` and `value` on the same frozen SFT base, with the RM's adapter loaded
   beside them (one base for all four roles; the reference is "adapters off").
   `algo="dpo"` instead trains the `policy` adapter with DPO on the pairs (reference: adapters off); the
   RM then only judges: the DPO adapter is put beside the RM's on the SFT base for the same evaluation.
Then a summary table (SFT loss, RM accuracy, held-out reward of the SFT vs the PPO policy, their gold
reward by the task's own rule (`synthetic_gold_reward`: reward hacking shows up as RM reward up, gold
down), the RM win-rate of the PPO policy over the SFT policy with a 95% bootstrap interval, KL, time per
phase), `summary.json`, and `ppo_curves.png` (the PPO stage's curves: reward, KL and loss per iteration).
Each stage leaves its config, metrics.jsonl, curves.png, checkpoints and export under <output_dir>/{sft,rm,ppo}.

The task has 8 subjects x 4 question templates, so "held-out prompts" are a separate seeded draw of
prompts (the prompt space is small); the responses scored are fresh samples of each policy.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhf_fast.data import synthetic_prompts
from rlhf_fast.data.synthetic import synthetic_gold_reward
from rlhf_fast.model import load_adapter, save_adapter
from rlhf_fast.rl import AdvantageConfig
from rlhf_fast.rl.winrate import win_rate

from .config import DataSettings, DPOSettings, LoRASettings, ModelSettings, OptimSettings, RunSettings, TrainConfig
from .curves import RL_PANELS, write_curves
from .dpo import build_dpo_trainer
from .experience import ExperienceMaker
from .heldout import held_out_responses
from .models import POLICY
from .ppo import PPOConfig, PPOTrainer, load_ppo_models, prompt_batches
from .reward import build_reward_trainer
from .sft import build_sft_trainer

ALGOS = ("ppo", "dpo")

HELD_OUT_SEED_OFFSET = 7919  # held-out prompt draws never reuse the training prompt stream's seed


@dataclass(frozen=True)
class DemoConfig:
    output_dir: str = "runs/demo"
    algo: str = "ppo"  # ppo | dpo
    device: str | None = None  # None: cuda when available
    seed: int = 0
    preset: str = "demo"
    sft_steps: int = 300  # eval loss ~1.2 -> ~0.3 on the synthetic task
    rm_steps: int = 200
    ppo_iterations: int = 40
    # DPO on the demo's pairs: at lr 1e-4..1e-3 it separates the pairs perfectly while the policy drifts far
    # (KL 10-80 nats) and the RM score falls below the SFT policy's; 3e-5 with beta 0.5 gains at KL < 1
    dpo_steps: int = 200
    dpo_lr: float = 3e-5
    dpo_beta: float = 0.5
    # KL penalty per token: at 0.05 the policy reaches ~13 nats/sequence and games the byte-level RM
    # (polite-word salad); at 0.2 it stays near ~5 nats and still raises the held-out reward clearly.
    kl_coef: float = 0.2
    rollout_batch_size: int = 32
    eval_prompts: int = 128
    eval_size: int = 200  # held-out SFT examples / RM pairs
    progress: bool = True

    def __post_init__(self):
        for name in ("sft_steps", "rm_steps", "ppo_iterations", "dpo_steps", "rollout_batch_size", "eval_prompts",
                     "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo: {name} must be >= 1, got {getattr(self, name)}")
        if self.algo not in ALGOS:
            raise ValueError(f"demo: algo must be one of {ALGOS}, got {self.algo!r}")

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """Tiny sizes: the whole pipeline in seconds (a smoke test, not a result)."""
        sizes = dict(preset="tiny", sft_steps=8, rm_steps=6, ppo_iterations=3, dpo_steps=6, rollout_batch_size=8,
                     eval_prompts=8, eval_size=16)
        return cls(**{**sizes, **overrides})


def _stage_config(cfg: DemoConfig, stage: str, steps: int, **model) -> TrainConfig:
    lora = LoRASettings(enabled=stage != "sft")  # SFT: full fine-tuning of the random init
    return TrainConfig(
        stage=stage,
        model=ModelSettings(**(model or {"preset": cfg.preset})),
        lora=lora,
        data=DataSettings(eval_size=cfg.eval_size, synthetic_size=max(4000, 8 * steps)),
        optim=OptimSettings(max_steps=steps, warmup_steps=min(10, steps),
                            **({"lr": cfg.dpo_lr} if stage == "dpo" else {})),
        run=RunSettings(output_dir=str(Path(cfg.output_dir) / stage), device=cfg.device, seed=cfg.seed,
                        eval_every=0, save_every=0, progress=cfg.progress),
        dpo=DPOSettings(beta=cfg.dpo_beta),
    )


def run_demo(cfg: DemoConfig) -> dict:
    """Run the three stages; returns the summary (also written to <output_dir>/summary.json)."""
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    sft = build_sft_trainer(_stage_config(cfg, "sft", cfg.sft_steps))
    sft.train()
    sft_loss = sft.evaluate()["loss"]
    sft_dir = sft.export(root / "sft" / "export")
    times["sft"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rm = build_reward_trainer(_stage_config(cfg, "rm", cfg.rm_steps, preset=None, model=str(sft_dir)))
    rm.train()
    rm_accuracy = rm.evaluate()["accuracy"]
    rm_dir = rm.export(root / "rm" / "export")
    times["rm"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    models, tokenizer = load_ppo_models(sft_dir, rm_dir, seed=cfg.seed, critic=cfg.algo == "ppo")
    held_out_texts = synthetic_prompts(cfg.eval_prompts, cfg.seed + HELD_OUT_SEED_OFFSET)
    held_out = [tokenizer.encode(p) for p in held_out_texts]
    summary = {"algo": cfg.algo, "sft_eval_loss": sft_loss, "rm_heldout_accuracy": rm_accuracy,
               "reward_model_shares_base": models.reward_model is None}
    if cfg.algo == "dpo":
        summary.update(_dpo(cfg, root, sft_dir, models, tokenizer, held_out, held_out_texts))
        times["dpo"] = time.perf_counter() - t0
        summary.update(time_s={**times, "total": sum(times.values())}, config=asdict(cfg))
        (root / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
    ppo_cfg = PPOConfig.from_dict({
        "rl": {"iterations": cfg.ppo_iterations, "rollout_batch_size": cfg.rollout_batch_size,
               "mini_batch_size": max(1, cfg.rollout_batch_size // 2), "init_kl_coef": cfg.kl_coef,
               "eval_prompts": cfg.eval_prompts},
        "run": {"device": cfg.device, "seed": cfg.seed, "output_dir": str(root / "ppo"), "progress": cfg.progress}})
    prompts = prompt_batches(synthetic_prompts(64 * cfg.rollout_batch_size, cfg.seed), tokenizer,
                             cfg.rollout_batch_size, 48, cfg.seed)
    ppo = PPOTrainer(ppo_cfg, models, tokenizer, prompts, held_out)
    judge = dict(tokenizer=tokenizer, prompt_ids=held_out, texts=held_out_texts, batch_size=cfg.rollout_batch_size,
                 autocast=ppo.strategy.autocast)
    sft_policy = ppo.evaluate()  # before any update the policy adapter is a no-op: the SFT policy
    sft_judged = held_out_responses(ppo.maker, **judge)  # the responses evaluate() scored, kept one by one
    ppo.train()
    ppo_policy = ppo.eval_history[-1]
    ppo_judged = held_out_responses(ppo.maker, **judge)
    ppo.export(root / "ppo" / "export")
    times["ppo"] = time.perf_counter() - t0

    phases = ("generate", "score", "advantages", "train")
    summary.update({
        "sft_policy_reward": sft_policy["reward"],
        "ppo_policy_reward": ppo_policy["reward"],
        "sft_policy_kl": sft_policy["kl"],
        "ppo_policy_kl": ppo_policy["kl"],
        **gold_and_win_rate(held_out_texts, sft_judged, ppo_judged, "ppo", cfg.seed),
        "time_s": {**times, "total": sum(times.values())},
        "ppo_phase_time_s": {p: sum(h[f"time/{p}"] for h in ppo.history) for p in phases},
        "max_gen_logprob_gap": max(h["gen_logprob_gap_max"] for h in ppo.history),
        "config": asdict(cfg),
    })
    write_curves(root / "ppo", RL_PANELS, title="demo: PPO", xlabel="PPO iteration", path=root / "ppo_curves.png")
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _dpo(cfg: DemoConfig, root: Path, sft_dir: Path, models, tokenizer, held_out, held_out_texts) -> dict:
    """DPO's `policy` adapter on the SFT export, then judged as PPO's: the same held-out prompts, sampled
    responses scored by the RM adapter on the same base, KL to the SFT policy (adapters off)."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    maker = ExperienceMaker(models, max_new_tokens=PPOConfig().rl.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, advantage=AdvantageConfig("reinforce_pp"))

    def evaluate() -> dict:
        return maker.evaluate(tokenizer, held_out, batch_size=cfg.rollout_batch_size)

    def judged():  # the responses evaluate() scored (same seed and batches), kept one by one
        return held_out_responses(maker, tokenizer, held_out, held_out_texts, batch_size=cfg.rollout_batch_size)

    models.to(device)
    sft_policy = evaluate()  # the fresh policy adapter is a no-op: the SFT policy
    sft_judged = judged()
    dpo = build_dpo_trainer(_stage_config(cfg, "dpo", cfg.dpo_steps, preset=None, model=str(sft_dir)))
    dpo.train()
    pairs = dpo.evaluate()
    dpo.export(root / "dpo" / "export")
    save_adapter(dpo.model, POLICY, root / "dpo" / "policy_adapter.pt")
    load_adapter(models.policy, root / "dpo" / "policy_adapter.pt", POLICY)
    models.to(device)
    dpo_policy = evaluate()
    return {"sft_policy_reward": sft_policy["reward"], "dpo_policy_reward": dpo_policy["reward"],
            "sft_policy_kl": sft_policy["kl"], "dpo_policy_kl": dpo_policy["kl"],
            **gold_and_win_rate(held_out_texts, sft_judged, judged(), "dpo", cfg.seed),
            "dpo_heldout_pair_accuracy": pairs["accuracy"], "dpo_heldout_margin": pairs["rewards/margins"]}


def gold_and_win_rate(prompts: list[str], sft, policy, algo: str, seed: int, gold=synthetic_gold_reward) -> dict:
    """Gold reward (the task's own rule, a RewardFunction) of the SFT and the trained policy's held-out
    responses (`HeldOutResponses`), and the RM win-rate of the policy over the SFT policy, prompt by prompt,
    with its 95% bootstrap interval."""
    wr = win_rate(policy.scores, sft.scores, seed=seed)
    return {"sft_policy_gold": _mean(gold(prompts, sft.completions)),
            f"{algo}_policy_gold": _mean(gold(prompts, policy.completions)),
            f"{algo}_vs_sft_win_rate": wr.rate, f"{algo}_vs_sft_win_rate_ci": [wr.low, wr.high]}


def _mean(values) -> float:
    return float(sum(values)) / len(values)


def format_summary(summary: dict) -> str:
    algo, t = summary.get("algo", "ppo"), summary["time_s"]
    A = algo.upper()
    rows = [
        ("SFT", "eval loss (held-out)", f"{summary['sft_eval_loss']:.3f}"),
        ("RM", "accuracy (held-out pairs)", f"{summary['rm_heldout_accuracy']:.3f}"),
        (A, "mean reward, SFT policy", f"{summary['sft_policy_reward']:+.3f}"),
        ("", f"mean reward, {A} policy", f"{summary[f'{algo}_policy_reward']:+.3f}"),
        ("", f"KL to reference, {A} policy", f"{summary[f'{algo}_policy_kl']:.3f} nats/seq"),
    ]
    if "sft_policy_gold" in summary:
        low, high = summary[f"{algo}_vs_sft_win_rate_ci"]
        rows += [
            ("", f"gold reward, SFT / {A} policy",
             f"{summary['sft_policy_gold']:+.3f} / {summary[f'{algo}_policy_gold']:+.3f}"),
            ("", f"RM win-rate, {A} vs SFT (95% CI)",
             f"{summary[f'{algo}_vs_sft_win_rate']:.3f} [{low:.3f}, {high:.3f}]"),
        ]
    if algo == "ppo":
        p = summary["ppo_phase_time_s"]
        rows += [
            ("", "max |gen - train log-prob|", f"{summary['max_gen_logprob_gap']:.1e}"),
            ("", "one frozen base for all roles", "yes" if summary["reward_model_shares_base"] else "no"),
            ("time", "sft / rm / ppo / total",
             f"{t['sft']:.0f} / {t['rm']:.0f} / {t['ppo']:.0f} / {t['total']:.0f} s"),
            ("", "ppo: generate / score / adv / train",
             f"{p['generate']:.1f} / {p['score']:.1f} / {p['advantages']:.2f} / {p['train']:.1f} s"),
        ]
    else:
        rows += [
            ("", "held-out pairs: accuracy / margin",
             f"{summary['dpo_heldout_pair_accuracy']:.3f} / {summary['dpo_heldout_margin']:+.3f}"),
            ("time", "sft / rm / dpo / total",
             f"{t['sft']:.0f} / {t['rm']:.0f} / {t['dpo']:.0f} / {t['total']:.0f} s"),
        ]
    lines = ["", "rlhf-fast demo summary (held-out prompts, sampled responses)"]
    lines += [f"  {a:<5} {b:<36} {c}" for a, b, c in rows]
    return "\n".join(lines)
