"""The main job: SFT -> reward model -> PPO (or DPO) on the built-in synthetic task, end to end, offline.

The data are built as RLHF's are (the design: `rlhf_fast.data.synthetic`'s docstring, README's demo section):
1. SFT: the random-init `demo` preset imitates demonstrations of mixed quality (most close curtly, some lack the
   closing, are rude, off-topic or vague), so the SFT policy is a mixed demonstrator, not the optimum.
2. Pairs: `pair_samples` samples of the SFT policy per prompt, every two the task's gold rule scores differently
   labelled by it (the rule stands in for the human labeller, as in Gao et al. 2022), plus pairs of two
   demonstration-like replies: the reward model learns to rank the policy's own samples, on content and form.
3. RM: a LoRA adapter `reward` + reward head on the SFT export, trained on those pairs.
4. PPO: LoRA adapters `policy` and `value` on the same frozen SFT base, with the RM's adapter loaded
   beside them (one base for all four roles; the reference is "adapters off").
   `algo="dpo"` instead trains the `policy` adapter with DPO on the same pairs (reference: adapters off); the
   RM then only judges: the DPO adapter is put beside the RM's on the SFT base for the same evaluation.
The gold rule labels pairs and judges; it never trains the policy, tunes a run or picks a checkpoint.
Then a summary table (SFT loss, RM accuracy, held-out RM reward of the SFT vs the trained policy, their gold
reward, sampled and greedy, the gold win-rate of the trained policy over the SFT policy with a 95% bootstrap
interval, sampled and greedy, the RM win-rate, KL, time per phase), `summary.json`, and `ppo_curves.png`.
Each stage leaves its config, metrics.jsonl, curves.png, checkpoints and export under <output_dir>/{sft,rm,ppo};
the data it trained on are <output_dir>/data/{demonstrations,pairs}.jsonl.

The task has 8 subjects x 4 question templates, so "held-out prompts" are a separate seeded draw of
prompts (the prompt space is small); the responses scored are fresh samples of each policy.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhf_fast.data import PreferenceExample, load_tokenizer, synthetic_prompts
from rlhf_fast.data.synthetic import (
    gold_labelled_pairs,
    synthetic_demonstrations,
    synthetic_gold_reward,
    synthetic_reply_pairs,
)
from rlhf_fast.model import GPT, load_adapter, save_adapter
from rlhf_fast.rl import AdvantageConfig
from rlhf_fast.rl.winrate import win_rate

from .config import DataSettings, DPOSettings, LoRASettings, ModelSettings, OptimSettings, RunSettings, TrainConfig
from .curves import RL_PANELS, plot_gold_vs_kl, write_curves
from .dpo import build_dpo_trainer
from .experience import ExperienceMaker
from .heldout import held_out_responses, sample_completions
from .models import POLICY
from .ppo import PPOConfig, PPOTrainer, load_ppo_models, prompt_batches
from .reward import build_reward_trainer
from .sft import build_sft_trainer

ALGOS = ("ppo", "dpo")

HELD_OUT_SEED_OFFSET = 7919  # held-out prompt draws never reuse the training prompt stream's seed
PAIR_SEED_OFFSET = 104_729  # the prompts whose SFT samples become pairs: a draw of their own


@dataclass(frozen=True)
class DemoConfig:
    output_dir: str = "runs/demo"
    algo: str = "ppo"  # ppo | dpo
    device: str | None = None  # None: cuda when available
    seed: int = 0
    preset: str = "demo"
    sft_steps: int = 400
    sft_batch_size: int = 16  # 400 x 16: the demonstrations' facts are learnt (eval loss ~0.14)
    # Sampling temperature of the SFT samples that become pairs, of PPO's rollouts and of the evaluation: at 1.0
    # the byte-level policy garbles about half of its facts (gold counts only exact ones); 0.7 keeps them
    temperature: float = 0.7
    pair_prompts: int = 512  # x pair_samples SFT samples, gold-labelled into ~1,900 pairs
    pair_samples: int = 4
    reply_pairs: int = 2000  # pairs of two demonstration-like replies, beside the SFT-sample pairs
    rm_steps: int = 200
    ppo_iterations: int = 40
    # DPO on the demo's pairs: at lr 1e-4..1e-3 it separates the pairs perfectly while the policy drifts far
    # (KL 10-80 nats); 3e-5 with beta 0.5 gains at KL < 1
    dpo_steps: int = 200
    dpo_lr: float = 3e-5
    dpo_beta: float = 0.5
    # KL penalty per token (docs: README's demo section has the experiments that chose it)
    kl_coef: float = 0.1
    rollout_batch_size: int = 32
    eval_prompts: int = 128
    eval_size: int = 200  # held-out SFT examples / RM pairs
    progress: bool = True

    def __post_init__(self):
        for name in ("sft_steps", "sft_batch_size", "pair_prompts", "reply_pairs", "rm_steps", "ppo_iterations",
                     "dpo_steps", "rollout_batch_size", "eval_prompts", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo: {name} must be >= 1, got {getattr(self, name)}")
        if self.pair_samples < 2:
            raise ValueError(f"demo: pair_samples must be >= 2 (pairs are drawn among them), got {self.pair_samples}")
        if self.temperature <= 0:
            raise ValueError(f"demo: temperature must be > 0, got {self.temperature}")
        if self.algo not in ALGOS:
            raise ValueError(f"demo: algo must be one of {ALGOS}, got {self.algo!r}")

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """Tiny sizes: the whole pipeline in seconds (a smoke test, not a result)."""
        sizes = dict(preset="tiny", sft_steps=8, sft_batch_size=8, pair_prompts=8, reply_pairs=40, rm_steps=6,
                     ppo_iterations=3, dpo_steps=6, rollout_batch_size=8, eval_prompts=8, eval_size=16)
        return cls(**{**sizes, **overrides})


def _stage_config(cfg: DemoConfig, stage: str, steps: int, data: Path, **model) -> TrainConfig:
    lora = LoRASettings(enabled=stage != "sft")  # SFT: full fine-tuning of the random init
    optim = {"lr": cfg.dpo_lr} if stage == "dpo" else {"micro_batch_size": cfg.sft_batch_size} if stage == "sft" else {}
    return TrainConfig(
        stage=stage,
        model=ModelSettings(**(model or {"preset": cfg.preset})),
        lora=lora,
        data=DataSettings(data=str(data), eval_size=cfg.eval_size),
        optim=OptimSettings(max_steps=steps, warmup_steps=min(10, steps), **optim),
        run=RunSettings(output_dir=str(Path(cfg.output_dir) / stage), device=cfg.device, seed=cfg.seed,
                        eval_every=0, save_every=0, progress=cfg.progress),
        dpo=DPOSettings(beta=cfg.dpo_beta),
    )


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _pairs(cfg: DemoConfig, sft_dir: Path, device: torch.device) -> tuple[list[PreferenceExample], float]:
    """The RM's (and DPO's) pairs: gold-labelled pairs among the SFT policy's samples, then pairs of
    demonstration-like replies, shuffled; and the mean gold reward of those SFT samples."""
    model, tokenizer = GPT.from_pretrained(str(sft_dir)).to(device), load_tokenizer(str(sft_dir))
    prompts = synthetic_prompts(cfg.pair_prompts, cfg.seed + PAIR_SEED_OFFSET)
    samples = sample_completions(model, tokenizer, prompts, samples=cfg.pair_samples,
                                 max_new_tokens=PPOConfig().rl.max_new_tokens, temperature=cfg.temperature,
                                 seed=cfg.seed, batch_size=cfg.rollout_batch_size)
    gold = _mean(synthetic_gold_reward([p for p in prompts for _ in range(cfg.pair_samples)], samples))
    pairs = gold_labelled_pairs(prompts, samples, cfg.pair_samples)
    pairs += synthetic_reply_pairs(cfg.reply_pairs, cfg.seed + PAIR_SEED_OFFSET)
    random.Random(cfg.seed).shuffle(pairs)
    return pairs, gold


def run_demo(cfg: DemoConfig) -> dict:
    """Run the three stages; returns the summary (also written to <output_dir>/summary.json)."""
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    n_demos = max(4000, cfg.sft_steps * cfg.sft_batch_size) + cfg.eval_size  # the file's tail is held out
    demos = _write_jsonl(root / "data" / "demonstrations.jsonl", [
        {"prompt": ex.prompt, "completion": ex.response} for ex in synthetic_demonstrations(n_demos, cfg.seed)])
    sft = build_sft_trainer(_stage_config(cfg, "sft", cfg.sft_steps, demos))
    sft.train()
    sft_loss = sft.evaluate()["loss"]
    sft_dir = sft.export(root / "sft" / "export")
    times["sft"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pairs, sample_gold = _pairs(cfg, sft_dir, device)
    pairs_file = _write_jsonl(root / "data" / "pairs.jsonl", [vars(ex) for ex in pairs])
    times["pairs"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rm = build_reward_trainer(_stage_config(cfg, "rm", cfg.rm_steps, pairs_file, preset=None, model=str(sft_dir)))
    rm.train()
    rm_accuracy = rm.evaluate()["accuracy"]
    rm_dir = rm.export(root / "rm" / "export")
    times["rm"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    models, tokenizer = load_ppo_models(sft_dir, rm_dir, seed=cfg.seed, critic=cfg.algo == "ppo")
    held_out_texts = synthetic_prompts(cfg.eval_prompts, cfg.seed + HELD_OUT_SEED_OFFSET)
    held_out = [tokenizer.encode(p) for p in held_out_texts]
    summary = {"algo": cfg.algo, "sft_eval_loss": sft_loss, "pairs": len(pairs), "pair_samples_gold": sample_gold,
               "rm_heldout_accuracy": rm_accuracy, "reward_model_shares_base": models.reward_model is None}
    if cfg.algo == "dpo":
        summary.update(_dpo(cfg, root, sft_dir, pairs_file, models, tokenizer, held_out, held_out_texts))
        times["dpo"] = time.perf_counter() - t0
        summary.update(time_s={**times, "total": sum(times.values())}, config=asdict(cfg))
        (root / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
    ppo_cfg = PPOConfig.from_dict({
        "rl": {"iterations": cfg.ppo_iterations, "rollout_batch_size": cfg.rollout_batch_size,
               "mini_batch_size": max(1, cfg.rollout_batch_size // 2), "init_kl_coef": cfg.kl_coef,
               "temperature": cfg.temperature, "eval_prompts": cfg.eval_prompts},
        "run": {"device": cfg.device, "seed": cfg.seed, "output_dir": str(root / "ppo"), "progress": cfg.progress,
                "eval_every": max(1, cfg.ppo_iterations // 8)}})
    prompts = prompt_batches(synthetic_prompts(64 * cfg.rollout_batch_size, cfg.seed), tokenizer,
                             cfg.rollout_batch_size, 48, cfg.seed)
    ppo = PPOTrainer(ppo_cfg, models, tokenizer, prompts, held_out)
    ppo.gold = synthetic_gold_reward  # measured at each evaluation (the gold-vs-KL curve), never trained on
    judge = dict(tokenizer=tokenizer, prompt_ids=held_out, texts=held_out_texts, batch_size=cfg.rollout_batch_size,
                 greedy=True, autocast=ppo.strategy.autocast)
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
        "gold_vs_kl": [{k: p[k] for k in ("iteration", "kl", "gold", "greedy_gold")}
                       for p in [{"iteration": 0, **sft_policy}, *ppo.eval_history]],
        "config": asdict(cfg),
    })
    write_curves(root / "ppo", RL_PANELS, title="demo: PPO", xlabel="PPO iteration", path=root / "ppo_curves.png")
    plot_gold_vs_kl(summary["gold_vs_kl"], root / "gold_vs_kl.png", title="demo: PPO, held-out gold vs KL")
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _dpo(cfg: DemoConfig, root: Path, sft_dir: Path, pairs: Path, models, tokenizer, held_out, held_out_texts) -> dict:
    """DPO's `policy` adapter on the SFT export, then judged as PPO's: the same held-out prompts, sampled
    responses scored by the RM adapter on the same base, KL to the SFT policy (adapters off)."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    maker = ExperienceMaker(models, max_new_tokens=PPOConfig().rl.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, advantage=AdvantageConfig("reinforce_pp"),
                            temperature=cfg.temperature)

    def evaluate() -> dict:
        return maker.evaluate(tokenizer, held_out, batch_size=cfg.rollout_batch_size)

    def judged():  # the responses evaluate() scored (same seed and batches), kept one by one
        return held_out_responses(maker, tokenizer, held_out, held_out_texts, batch_size=cfg.rollout_batch_size,
                                  greedy=True)

    models.to(device)
    sft_policy = evaluate()  # the fresh policy adapter is a no-op: the SFT policy
    sft_judged = judged()
    dpo = build_dpo_trainer(_stage_config(cfg, "dpo", cfg.dpo_steps, pairs, preset=None, model=str(sft_dir)))
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
    responses (`HeldOutResponses`, sampled and, when kept, greedy), the gold win-rate of the policy over the SFT
    policy, prompt by prompt, with its 95% bootstrap interval, and the RM win-rate. reward_hacking: `rlhf-fast
    eval`'s alarm (the RM win-rate interval above 1/2 while the gold one lies below 1/2, sampled or greedy)."""
    out, hacking = {}, False
    for kind, a, b, rm_a, rm_b in (("", policy.completions, sft.completions, policy.scores, sft.scores),
                                   ("greedy_", policy.greedy, sft.greedy, policy.greedy_scores, sft.greedy_scores)):
        if a is None:
            continue
        g_sft, g_policy = gold(prompts, b), gold(prompts, a)
        gold_wr, rm_wr = win_rate(g_policy, g_sft, seed=seed), win_rate(rm_a, rm_b, seed=seed)
        hacking |= rm_wr.low > 0.5 and gold_wr.high < 0.5
        out.update({f"sft_policy_{kind}gold": _mean(g_sft), f"{algo}_policy_{kind}gold": _mean(g_policy),
                    f"{algo}_vs_sft_{kind}gold_win_rate": gold_wr.rate,
                    f"{algo}_vs_sft_{kind}gold_win_rate_ci": [gold_wr.low, gold_wr.high],
                    f"{algo}_vs_sft_{kind}win_rate": rm_wr.rate,
                    f"{algo}_vs_sft_{kind}win_rate_ci": [rm_wr.low, rm_wr.high]})
    return {**out, "reward_hacking": hacking}


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
        for kind, label in (("", "sampled"), ("greedy_", "greedy")):
            if f"sft_policy_{kind}gold" not in summary:
                continue
            low, high = summary[f"{algo}_vs_sft_{kind}gold_win_rate_ci"]
            rows += [
                ("", f"gold reward, SFT / {A} policy ({label})",
                 f"{summary[f'sft_policy_{kind}gold']:+.3f} / {summary[f'{algo}_policy_{kind}gold']:+.3f}"),
                ("", f"gold win-rate, {A} vs SFT ({label})",
                 f"{summary[f'{algo}_vs_sft_{kind}gold_win_rate']:.3f} [{low:.3f}, {high:.3f}]"),
            ]
        low, high = summary[f"{algo}_vs_sft_win_rate_ci"]
        rows += [("", f"RM win-rate, {A} vs SFT (sampled)", f"{summary[f'{algo}_vs_sft_win_rate']:.3f} "
                  f"[{low:.3f}, {high:.3f}]"),
                 ("", "reward-hacking alarm", "FIRES" if summary["reward_hacking"] else "silent")]
    if algo == "ppo":
        p = summary["ppo_phase_time_s"]
        rows += [
            ("", "max |gen - train log-prob|", f"{summary['max_gen_logprob_gap']:.1e}"),
            ("", "one frozen base for all roles", "yes" if summary["reward_model_shares_base"] else "no"),
            ("time", "sft / pairs / rm / ppo / total",
             f"{t['sft']:.0f} / {t['pairs']:.0f} / {t['rm']:.0f} / {t['ppo']:.0f} / {t['total']:.0f} s"),
            ("", "ppo: generate / score / adv / train",
             f"{p['generate']:.1f} / {p['score']:.1f} / {p['advantages']:.2f} / {p['train']:.1f} s"),
        ]
    else:
        rows += [
            ("", "held-out pairs: accuracy / margin",
             f"{summary['dpo_heldout_pair_accuracy']:.3f} / {summary['dpo_heldout_margin']:+.3f}"),
            ("time", "sft / pairs / rm / dpo / total",
             f"{t['sft']:.0f} / {t['pairs']:.0f} / {t['rm']:.0f} / {t['dpo']:.0f} / {t['total']:.0f} s"),
        ]
    lines = ["", "rlhf-fast demo summary (held-out prompts; gold: the task's rule, evaluation only)"]
    lines += [f"  {a:<5} {b:<40} {c}" for a, b, c in rows]
    return "\n".join(lines)
