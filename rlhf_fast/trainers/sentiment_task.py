"""A real-text task, offline: SFT on HH-RLHF dialogues, then GRPO toward positive sentiment on a KL leash.

1. Data: HH-RLHF dialogues from a local .jsonl(.gz) file or directory (every split in it), read by
   `data.load_hh`. Prompt = the dialogue up to its last "\\n\\nAssistant:" (its last `max_prompt_len` tokens);
   response = the chosen reply, cut after its last whole sentence within `max_response_len` tokens (so
   most replies keep their EOS and the policy learns to stop). A seeded draw holds out `eval_prompts`.
2. SFT: a small random-init GPT-2 with the GPT-2 BPE tokenizer (50,257 ids) learns the replies (full
   fine-tuning). The tied 50,257-wide lm-head is most of the CPU time, so the model is narrow and the loss
   runs the lm-head only on response tokens.
3. RL: the SFT model trained in full by the shared RL loop (`PPOTrainer` with a critic-free estimator, GRPO
   by default) on a registered reward function (`sentiment`: VADER's compound score) minus a per-token KL
   penalty to the SFT model (a frozen copy).
4. Summary: gold sentiment (VADER compound, whatever the training reward) of sampled responses to the
   held-out prompts, SFT policy vs RL policy; KL to the SFT policy; samples side by side; `summary.json`.
   The gold metric is the training reward here, so a second held-out measure that nothing trains on goes
   beside it: the MiniLM (all-MiniLM-L6-v2) cosine similarity of each reply to its prompt's own chosen HH
   reply. A sentiment gain made of word salad ("great great happy") shows up as a fall there.
"""

from __future__ import annotations

import copy
import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhf_fast.data import ResumableBatches, SFTCollator, SFTDataset, SFTExample, load_hh, load_tokenizer
from rlhf_fast.model import GPT

from .builders import export_model
from .config import OptimSettings
from .loop import adamw, lr_lambda
from .metrics import log
from .models import PPOModels
from .ppo import PPOConfig, PPOTrainer, prompt_batches
from .reward_functions import FunctionScorer, reward_function, sentence_model, sentiment_analyzer, sentiment_reward

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")  # critic-free: the SFT model is the only model
POSITIVE = 0.05  # VADER's own threshold: compound >= 0.05 is "positive"


@dataclass(frozen=True)
class SentimentTaskConfig:
    """Sizes for a 2-core CPU in minutes (README: the sentiment task)."""

    output_dir: str = "runs/demo-sentiment"
    data: str = "../shared/data/hh-rlhf"  # an HH-RLHF .jsonl(.gz) file or a directory of them
    max_dialogues: int = 5000  # a seeded draw of at most this many (SFT sees <= sft_steps * sft_batch_size)
    tokenizer: str = "gpt2"
    device: str | None = None  # None: cuda when available
    seed: int = 0
    # a narrow model: the tied (50257, n_embd) lm-head costs more CPU time than the blocks
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 2
    max_prompt_len: int = 32  # prompt tokens kept (from the end of the dialogue)
    max_response_len: int = 16  # SFT replies are cut to fit (whole sentences); RL samples at most this many
    sft_steps: int = 250  # held-out loss 10.8 -> 4.6: word salad with dialogue words, not sentences
    sft_batch_size: int = 16
    sft_lr: float = 3e-3
    reward: str = "sentiment"  # the training reward: a registered reward function spec (gold stays VADER)
    estimator: str = "grpo"
    rl_iterations: int = 24
    rollout_batch_size: int = 8  # prompts per rollout; rows = rollout_batch_size * group_size
    group_size: int = 8  # most short replies score 0: groups of 8 usually hold a non-zero score
    rl_epochs: int = 1
    rl_mini_batch_size: int = 16  # rows per optimizer step: 4 steps per iteration
    # all weights train: at 3e-3 (8 steps an iteration) the first iteration clipped 62% of the tokens and the
    # replies collapsed to 3-4-token exclamations ("Wow?", "Well."); 1e-3 keeps their length, KL ~3 nats
    rl_lr: float = 1e-3
    kl_coef: float = 0.1  # per-token KL penalty in the reward (nats -> reward units)
    eval_prompts: int = 96
    eval_samples: int = 2  # sampled responses per held-out prompt for the gold sentiment
    show_samples: int = 4
    progress: bool = True

    def __post_init__(self):
        for name in ("n_embd", "n_layer", "n_head", "max_prompt_len", "max_response_len", "sft_steps",
                     "sft_batch_size", "rl_iterations", "rollout_batch_size", "group_size", "rl_epochs",
                     "rl_mini_batch_size", "eval_prompts", "eval_samples", "max_dialogues"):
            if getattr(self, name) < 1:
                raise ValueError(f"sentiment task: {name} must be >= 1, got {getattr(self, name)}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"sentiment task: estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.max_dialogues <= self.eval_prompts:
            raise ValueError(f"sentiment task: max_dialogues ({self.max_dialogues}) must exceed eval_prompts "
                             f"({self.eval_prompts})")
        if min(self.sft_lr, self.rl_lr) <= 0 or self.kl_coef < 0:
            raise ValueError("sentiment task: need sft_lr > 0, rl_lr > 0 and kl_coef >= 0")

    @property
    def n_positions(self) -> int:
        return self.max_prompt_len + self.max_response_len + 1  # + the EOS appended to a truncated rollout

    @classmethod
    def quick(cls, **overrides) -> SentimentTaskConfig:
        """Tiny sizes: the whole pipeline in seconds (a smoke test, not a result)."""
        sizes = dict(n_embd=16, n_layer=1, n_head=2, max_prompt_len=16, max_response_len=8, sft_steps=3,
                     sft_batch_size=4, rl_iterations=2, rollout_batch_size=2, group_size=2, eval_prompts=4,
                     eval_samples=1, show_samples=2)
        return cls(**{**sizes, **overrides})


# --- data -------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def cut_reply(reply: str, tokenizer, max_tokens: int) -> str:
    """The reply, or its longest prefix of whole sentences whose tokens + EOS fit `max_tokens` (the
    reply unchanged when no sentence end fits: SFT then trains on the tokens that fit, without EOS)."""
    if len(tokenizer.encode(reply)) < max_tokens:
        return reply
    ends = [m.end() for m in _SENTENCE_END.finditer(reply)]
    for end in reversed(ends):
        if len(tokenizer.encode(reply[:end])) < max_tokens:
            return reply[:end]
    return reply


def load_dialogues(source: str, tokenizer, cfg: SentimentTaskConfig) -> tuple[list[SFTExample], list[SFTExample]]:
    """(train, held-out) SFT examples of an HH file or directory (its train and test splits together): a
    seeded draw of `cfg.max_dialogues`, of which `cfg.eval_prompts` are held out. Unparseable lines are
    skipped (and logged)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"HH-RLHF dialogues not found: {source} (give an HH .jsonl(.gz) file or a "
                                "directory of them with --data)")
    if path.is_file():
        examples, _ = load_hh(str(path), skip_bad_examples=True)
    else:
        examples = []
        for split in ("train", "test"):
            try:
                examples += load_hh(str(path), split, skip_bad_examples=True)[0]
            except FileNotFoundError:
                continue  # a directory may hold one split only (the shared sample: test)
        if not examples:
            raise FileNotFoundError(f"no *train.jsonl[.gz] or *test.jsonl[.gz] HH-RLHF files in {path}")
    if len(examples) <= cfg.eval_prompts:
        raise ValueError(f"{source}: {len(examples)} dialogues, need more than eval_prompts={cfg.eval_prompts}")
    random.Random(cfg.seed).shuffle(examples)
    sft = [SFTExample(ex.prompt, cut_reply(ex.chosen, tokenizer, cfg.max_response_len))
           for ex in examples[: cfg.max_dialogues]]
    return sft[cfg.eval_prompts:], sft[: cfg.eval_prompts]


# --- SFT ---------------------------------------------------------------------------------------------


def response_loss(model: GPT, batch: dict) -> torch.Tensor:
    """Mean NLL of the response (+ EOS) tokens; the lm-head runs on those rows only, not on prompt and
    padding positions (with a 50,257-wide head that is most of an SFT step's time)."""
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])[:, :-1]  # (B, T - 1, C)
    rows = batch["loss_mask"][:, 1:].bool()
    return -model.lm_head(hidden[rows], batch["input_ids"][:, 1:][rows]).logprobs.mean()


@torch.no_grad()
def eval_loss(model: GPT, dataset: SFTDataset, tokenizer, batch_size: int = 32) -> float:
    model.eval()
    collate, device = SFTCollator(tokenizer), model.transformer.wte.weight.device
    total, count = 0.0, 0
    for i in range(0, len(dataset), batch_size):
        items = [dataset[j] for j in range(i, min(i + batch_size, len(dataset)))]
        b = {k: v.to(device) for k, v in collate(items).items()}
        n = int(b["loss_mask"][:, 1:].sum())
        total, count = total + float(response_loss(model, b)) * n, count + n
    return total / max(count, 1)


def train_sft(model: GPT, tokenizer, train: SFTDataset, cfg: SentimentTaskConfig) -> list[float]:
    """Full fine-tuning of the random init: AdamW, warmup then cosine decay; the per-step losses."""
    device = model.transformer.wte.weight.device
    optim = OptimSettings(lr=cfg.sft_lr, max_steps=cfg.sft_steps, warmup_steps=min(20, cfg.sft_steps))
    optimizer = adamw(model.parameters(), optim.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim))
    batches = ResumableBatches(train, cfg.sft_batch_size, SFTCollator(tokenizer), seed=cfg.seed)
    from tqdm.auto import tqdm

    losses = []
    model.train()
    for _ in tqdm(range(cfg.sft_steps), desc="sft", disable=not cfg.progress, dynamic_ncols=True):
        loss = response_loss(model, {k: v.to(device) for k, v in next(batches).items()})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


# --- held-out evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def reference_similarity(completions: list[str], references: list[str]) -> torch.Tensor:
    """(N,) MiniLM cosine similarity of completion i to reference i (its prompt's chosen HH reply); 0 for an
    empty completion."""
    emb = sentence_model().encode(list(completions) + list(references), convert_to_tensor=True,
                                  normalize_embeddings=True, show_progress_bar=False).float().cpu()
    sims = (emb[: len(completions)] * emb[len(completions):]).sum(dim=1)
    return torch.where(torch.tensor([bool(c.strip()) for c in completions]), sims, 0.0)


@torch.no_grad()
def held_out_gold(trainer: PPOTrainer, samples: int, references: list[str], seed: int = 4321) -> dict:
    """Gold sentiment of `samples` sampled responses of the current policy per held-out prompt (a generator
    of its own): mean, share of positive responses, mean length in tokens, the mean MiniLM similarity to the
    prompt's chosen reply (`references[i]`, never a training signal), and the completions (rows
    i*samples .. i*samples + samples - 1 answer prompt i)."""
    tok, B = trainer.tokenizer, trainer.rl.rollout_batch_size
    gen = torch.Generator(trainer.device).manual_seed(seed)
    completions, lengths = [], []
    for i in range(0, len(trainer.eval_prompts), B):
        ids, mask = (x.to(trainer.device) for x in tok.pad(trainer.eval_prompts[i: i + B]))
        rollout = trainer.maker.sample(ids, mask, trainer.eval_texts[i: i + B], generator=gen, group_size=samples,
                                       penalise=False)
        completions += rollout.completions(tok)
        lengths.append(rollout.response_mask.sum(dim=1).float().cpu())
    gold = torch.tensor(sentiment_reward([p for p in trainer.eval_texts for _ in range(samples)], completions))
    similarity = reference_similarity(completions, [r for r in references[: len(trainer.eval_texts)]
                                                    for _ in range(samples)])
    return {"sentiment": float(gold.mean()), "positive_frac": float((gold >= POSITIVE).float().mean()),
            "response_len": float(torch.cat(lengths).mean()), "reference_similarity": float(similarity.mean()),
            "completions": completions}


# --- the task ---------------------------------------------------------------------------------------


def build_rl_trainer(cfg: SentimentTaskConfig, model: GPT, tokenizer, train: list[SFTExample],
                     held_out: list[SFTExample], reward_fn) -> PPOTrainer:
    """The shared RL loop on the SFT model: full-parameter policy, a frozen copy as the KL reference, the
    critic-free estimator, the reward function minus the per-token KL penalty.

    Full-parameter, not LoRA: this model's word choice lives in the tied embedding / lm-head, which LoRA
    leaves frozen (LoRA rank 16 at lr 5e-3 or 2e-2: held-out sentiment +0.07 -> +0.09 in 15 iterations; all
    weights: +0.07 -> +0.69 from the same SFT model)."""
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    rows = cfg.rollout_batch_size * cfg.group_size
    device = model.transformer.wte.weight.device
    rl_cfg = PPOConfig.from_dict({
        "rl": {"estimator": cfg.estimator, "iterations": cfg.rl_iterations,
               "rollout_batch_size": cfg.rollout_batch_size, "group_size": cfg.group_size,
               "mini_batch_size": min(rows, cfg.rl_mini_batch_size), "epochs": cfg.rl_epochs,
               "max_new_tokens": cfg.max_response_len, "init_kl_coef": cfg.kl_coef, "eval_prompts": cfg.eval_prompts},
        "optim": {"lr": cfg.rl_lr}, "lora": {"enabled": False},
        "run": {"device": str(device), "seed": cfg.seed, "output_dir": str(Path(cfg.output_dir) / "rl"),
                "progress": cfg.progress}})
    prompts = prompt_batches([ex.prompt for ex in train], tokenizer, cfg.rollout_batch_size, cfg.max_prompt_len,
                             cfg.seed)
    eval_ids = [tokenizer.encode(ex.prompt)[-cfg.max_prompt_len:] for ex in held_out]
    scorer = FunctionScorer(reward_fn, tokenizer)
    return PPOTrainer(rl_cfg, PPOModels(model, reference=reference), tokenizer, prompts, eval_ids, scorer=scorer)


def run_sentiment_task(cfg: SentimentTaskConfig) -> dict:
    """Data -> SFT -> RL -> held-out gold sentiment; returns the summary (also <output_dir>/summary.json)."""
    root = Path(cfg.output_dir)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    sentiment_analyzer()  # the gold scorers: a missing package fails here, not after SFT
    sentence_model()
    reward_fn = reward_function(cfg.reward)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(cfg.tokenizer)
    train_examples, held_out = load_dialogues(cfg.data, tokenizer, cfg)
    train = SFTDataset(train_examples, tokenizer, cfg.max_prompt_len, cfg.max_prompt_len + cfg.max_response_len)
    held_out_sft = SFTDataset(held_out, tokenizer, cfg.max_prompt_len, cfg.max_prompt_len + cfg.max_response_len)
    times["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = GPT.from_preset("tiny", vocab_size=tokenizer.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                            n_layer=cfg.n_layer, n_head=cfg.n_head).to(device)
    loss_before = eval_loss(model, held_out_sft, tokenizer)
    sft_losses = train_sft(model, tokenizer, train, cfg)
    sft_loss = eval_loss(model, held_out_sft, tokenizer)
    export_model(model, tokenizer, root / "sft" / "export", merge_adapter=None)
    times["sft"] = time.perf_counter() - t0
    log.info("sft: %d steps, held-out loss %.3f -> %.3f", cfg.sft_steps, loss_before, sft_loss)

    t0 = time.perf_counter()
    trainer = build_rl_trainer(cfg, model, tokenizer, train_examples, held_out, reward_fn)
    references = [ex.response for ex in held_out]  # each held-out prompt's chosen reply (as cut for SFT)
    sft_gold = held_out_gold(trainer, cfg.eval_samples, references)  # before any update: the SFT policy
    trainer.train()
    rl_eval = trainer.eval_history[-1]  # the loop's own held-out evaluation: training reward and KL
    rl_gold = held_out_gold(trainer, cfg.eval_samples, references)
    trainer.export(root / "rl" / "export")
    times["rl"] = time.perf_counter() - t0

    k = cfg.eval_samples
    samples = [{"prompt": trainer.eval_texts[i], "sft": sft_gold["completions"][i * k],
                "rl": rl_gold["completions"][i * k]} for i in range(min(cfg.show_samples, len(held_out)))]
    summary = {
        "task": "sentiment", "data": cfg.data, "train_dialogues": len(train), "held_out_prompts": len(held_out),
        "model_params": sum(p.numel() for p in model.parameters()),
        "sft_eval_loss_init": loss_before, "sft_eval_loss": sft_loss, "sft_train_loss_last": sft_losses[-1],
        **{f"{who}_policy_{key}": gold[key] for who, gold in (("sft", sft_gold), ("rl", rl_gold))
           for key in ("sentiment", "positive_frac", "response_len", "reference_similarity")},
        "rl_policy_kl": rl_eval["kl"], "rl_policy_reward": rl_eval["reward"],
        "rl_curve": [{"score": h["score"], "kl": h["kl"], "response_len": h["response_len"]}
                     for h in trainer.history],
        "samples": samples,
        "time_s": {**times, "total": sum(times.values())},
        "config": asdict(cfg),
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_sentiment_summary(summary: dict) -> str:
    c, t = summary["config"], summary["time_s"]
    algo = c["estimator"].upper()
    rows = [
        ("data", "dialogues: train / held-out", f"{summary['train_dialogues']} / {summary['held_out_prompts']}"),
        ("SFT", "held-out loss: init -> SFT", f"{summary['sft_eval_loss_init']:.3f} -> {summary['sft_eval_loss']:.3f}"),
        (algo, "gold sentiment, SFT policy", f"{summary['sft_policy_sentiment']:+.3f}"),
        ("", f"gold sentiment, {algo} policy", f"{summary['rl_policy_sentiment']:+.3f}"),
        ("", f"positive responses, SFT / {algo}",
         f"{summary['sft_policy_positive_frac']:.0%} / {summary['rl_policy_positive_frac']:.0%}"),
        ("", f"similarity to HH reply, SFT / {algo}",
         f"{summary['sft_policy_reference_similarity']:.3f} / {summary['rl_policy_reference_similarity']:.3f}"),
        ("", f"KL to SFT policy, {algo} policy", f"{summary['rl_policy_kl']:.3f} nats/seq"),
        ("", f"response tokens, SFT / {algo}",
         f"{summary['sft_policy_response_len']:.1f} / {summary['rl_policy_response_len']:.1f}"),
        ("time", "data / sft / rl / total", f"{t['data']:.0f} / {t['sft']:.0f} / {t['rl']:.0f} / {t['total']:.0f} s"),
    ]
    if c["reward"] != "sentiment":
        rows.insert(5, ("", f"training reward ({c['reward']}), {algo}", f"{summary['rl_policy_reward']:+.3f}"))
    lines = ["", f"rlhf-fast demo --task sentiment (held-out HH prompts, {c['eval_samples']} sampled response(s) "
             "each; gold = VADER compound; similarity = MiniLM cosine to the prompt's chosen reply, not trained "
             "on)"]
    lines += [f"  {a:<5} {b:<36} {v}" for a, b, v in rows]
    for s in summary["samples"]:
        lines += ["", f"  prompt ...{_one_line(s['prompt'][-90:], 93)}",
                  f"    SFT: {_one_line(s['sft'], 100)}", f"    {algo}: {_one_line(s['rl'], 100)}"]
    return "\n".join(lines)
