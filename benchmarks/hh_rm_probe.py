"""HH-RLHF reward-model probe: does the RM learn the preferences, or only length (and truncation artefacts)?

    python -m benchmarks.hh_rm_probe --data HH.jsonl.gz                    # ~8 min, 1 CPU thread
    python -m benchmarks.hh_rm_probe --data HH.jsonl.gz --old-eos-rule     # the old EOS rule, to compare
    python -m benchmarks.hh_rm_probe --data HH.jsonl.gz --smoke            # a few steps: plumbing only

Trains a reward model (`rlhf-fast rm`'s RewardTrainer) on a real HH-RLHF file (BENCHMARKS.md names the
harmless-base test split it was run on) with the real GPT-2 tokenizer (resolved offline: see
rlhf_fast/data/tokenizer.py), the file's last --eval-size pairs held out, and reports its held-out pairwise
accuracy next to trivial rules on the very same pairs, each with a 95% bootstrap interval (pairs resampled, the
same resamples for every method, so the RM-minus-rule differences are paired):

  shorter reply wins   the response with fewer tokens (before any cut) is chosen; ties count 0.5
  longer reply wins    the opposite rule (its accuracy is 1 - shorter's)
  kept EOS wins        the old rule's artefact: when exactly one side was cut (and so, under the old rule,
                       lost its EOS) the other side is chosen; every other pair counts 0.5

The model is a random-init small preset (`demo`: 4 layers, 128 wide; its embedding widened to the tokenizer's
50,257 ids), because that is what trains in minutes on a CPU and pretrained GPT-2 weights are not reachable
offline: it measures the pipeline and what a from-scratch RM picks up from 2,000 pairs, not what a pretrained
GPT-2 RM reaches. `--tokenizer byte` gives the earlier byte-level run.

Also reported, on the held-out pairs with exactly one side cut: how often each method prefers the uncut side,
next to how often the uncut side really is the chosen one. A cut side is always the longer one, so
"agrees_with_shorter" (on pairs of unequal length) tells a length detector from an EOS detector;
margin_to_uncut / abs_margin_other say how much more sure the RM is on one-side-cut pairs. --old-eos-rule
trains the same RM (same init, data order and steps) on pairs encoded with the old rule instead (response +
EOS cut to the budget: a cut response loses its EOS); the two runs are independent, so they can run side by
side, one thread each. See docs/lengths.md.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch

from rlhf_fast.benchmarking.harness import environment, print_table, suite_parser, write_record
from rlhf_fast.data import (
    PreferenceCollator,
    PreferenceDataset,
    ResumableBatches,
    load_preference_splits,
    load_tokenizer,
)
from rlhf_fast.model import GPT, RewardHead, preset_config
from rlhf_fast.trainers import (
    DataSettings,
    LoRASettings,
    ModelSettings,
    OptimSettings,
    RunSettings,
    TrainConfig,
)
from rlhf_fast.trainers.builders import train_strategy
from rlhf_fast.trainers.loop import TrainModule
from rlhf_fast.trainers.reward import RewardTrainer
from rlhf_fast.trainers.sft import check_max_len

SMOKE = dict(train_pairs=32, eval_size=16, steps=2, micro_batch_size=4, bootstrap=200, max_len=64, max_prompt_len=32)


def old_rule_items(examples, tok, max_prompt_len: int, max_len: int) -> list[dict]:
    """Pairs encoded with the rule docs/lengths.md replaced: response + EOS cut to the budget."""
    def encode(prompt, response):
        p = tok.encode(prompt)[-max_prompt_len:]
        return p + (tok.encode(response) + [tok.eos_token_id])[: max_len - len(p)]

    return [{"chosen_ids": encode(ex.prompt, ex.chosen), "rejected_ids": encode(ex.prompt, ex.rejected),
             "chosen_prompt_len": len(tok.encode(ex.prompt)[-max_prompt_len:]),
             "rejected_prompt_len": len(tok.encode(ex.prompt)[-max_prompt_len:])}
            for ex in examples]


@torch.no_grad()
def margins(trainer: RewardTrainer, items, batch_size: int) -> torch.Tensor:
    """score(chosen) - score(rejected) per pair, (N,)."""
    trainer.module.eval()
    collate, out = PreferenceCollator(trainer.tokenizer), []
    for i in range(0, len(items), batch_size):
        b = trainer._to_device(collate([items[j] for j in range(i, min(i + batch_size, len(items)))]))
        chosen, rejected = trainer.scores(b)
        out.append((chosen - rejected).float().cpu())
    return torch.cat(out)


def accuracy(prefers_chosen: torch.Tensor, subset: torch.Tensor | None = None) -> float:
    """Mean of per-pair credit (1 right, 0 wrong, 0.5 tie) over `subset` (bool mask) or all pairs."""
    credit = prefers_chosen if subset is None else prefers_chosen[subset]
    return float(credit.mean()) if credit.numel() else float("nan")


def credit_of(margin: torch.Tensor) -> torch.Tensor:
    return (margin > 0).float() + 0.5 * (margin == 0).float()


def bootstrap_means(credit: torch.Tensor, resamples: torch.Tensor) -> torch.Tensor:
    """Mean credit of each resample of the pairs: credit (N,), resamples (R, N) indices -> (R,)."""
    return credit[resamples].mean(1)


def interval(samples: torch.Tensor) -> list[float]:
    """Percentile 95% interval of bootstrap samples (R,)."""
    lo, hi = torch.quantile(samples.double(), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return [round(float(lo), 4), round(float(hi), 4)]


def config(args, out_dir: str) -> TrainConfig:
    return TrainConfig(
        stage="rm",
        model=ModelSettings(preset=args.preset, tokenizer=args.tokenizer, attn_backend="sdpa"),
        lora=LoRASettings(enabled=False),
        data=DataSettings(data=str(args.data), max_prompt_len=args.max_prompt_len, max_len=args.max_len,
                          eval_size=args.eval_size, skip_bad_examples=True),
        optim=OptimSettings(lr=args.lr, max_steps=args.steps, warmup_steps=10, micro_batch_size=args.micro_batch_size),
        run=RunSettings(output_dir=out_dir, device=args.device, seed=args.seed, compile=False, log_every=25,
                        eval_every=0, save_every=0, progress=False),
    )


def build_trainer(cfg: TrainConfig, tok, train_items, eval_items) -> RewardTrainer:
    """A random-init RM of the preset's shape, its vocabulary widened to the tokenizer's (rounded up to 64) when
    the preset's is smaller (demo holds 320 byte ids, GPT-2 BPE has 50,257): same seed, same init under either
    rule. Built here rather than by build_reward_trainer, which keeps a preset's vocabulary as it is."""
    preset = cfg.model.preset
    vocab = max(preset_config(preset).vocab_size, -(-tok.vocab_size // 64) * 64)
    torch.manual_seed(cfg.run.seed)
    model = GPT.from_preset(preset, vocab_size=vocab, attn_backend=cfg.model.attn_backend)
    check_max_len(cfg, model)
    module = TrainModule(model, RewardHead(model.config.n_embd))
    batches = ResumableBatches(train_items, cfg.optim.micro_batch_size, PreferenceCollator(tok), seed=cfg.run.seed)
    return RewardTrainer(cfg, module, tok, batches, eval_items, train_strategy(cfg))


def train(trainer: RewardTrainer, label: str) -> float:
    t0 = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - t0
    last = history[-25:]
    loss, acc = (sum(h[k] for h in last) / len(last) for k in ("loss", "accuracy"))
    print(f"{label}: {len(history)} steps in {seconds:.0f} s; last 25 steps: train loss {loss:.4f}, accuracy {acc:.3f}")
    return seconds


def main(argv=None) -> int:
    p = suite_parser(__doc__)
    p.add_argument("--data", type=Path, default=None, help="HH-RLHF .jsonl(.gz) file (required: the probe needs "
                   "real preference pairs)")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 (GPT-2 BPE, offline) or byte")
    p.add_argument("--preset", default="demo", help="random-init model preset (tiny, demo)")
    p.add_argument("--max-prompt-len", type=int, default=128, help="prompt tokens kept (from the end)")
    p.add_argument("--max-len", type=int, default=256, help="prompt + response tokens kept")
    p.add_argument("--eval-size", type=int, default=303, help="held-out pairs (the file's last ones)")
    p.add_argument("--train-pairs", type=int, default=None,
                   help="train on only the first N training pairs (default: all, 2,000 with the defaults)")
    p.add_argument("--steps", type=int, default=120,
                   help="optimizer steps (120 x 16 pairs: about one pass over 2,000 pairs, ~10 min on 2 busy cores)")
    p.add_argument("--micro-batch-size", type=int, default=16, help="pairs per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on 2 shared cores)")
    p.add_argument("--old-eos-rule", action="store_true",
                   help="train on pairs encoded with the old rule instead (a cut response loses its EOS)")
    args = p.parse_args(argv)
    if args.data is None or not args.data.is_file():
        p.error(f"needs an HH-RLHF .jsonl(.gz) file: --data PATH ({args.data} not found)" if args.data else
                "needs an HH-RLHF .jsonl(.gz) file: --data PATH (e.g. the harmless-base test split)")
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    torch.set_num_threads(args.threads)
    env = environment()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    tok = load_tokenizer(args.tokenizer)
    train_ex, held_out, report = load_preference_splits(str(args.data), eval_size=args.eval_size,
                                                        skip_bad_examples=True)
    train_ex = train_ex[: args.train_pairs]
    # The product rule (forced EOS on a cut response); its cut flags hold under either rule.
    train_ds = PreferenceDataset(train_ex, tok, args.max_prompt_len, args.max_len)
    eval_ds = PreferenceDataset(held_out, tok, args.max_prompt_len, args.max_len)
    print(f"{args.data.name}: {report.kept} pairs ({report.skipped} unparsable skipped), {len(train_ds)} train / "
          f"{len(eval_ds)} held out; tokenizer {args.tokenizer} ({getattr(tok, 'source', 'built in')}); preset "
          f"{args.preset}, max_prompt_len {args.max_prompt_len}, max_len {args.max_len}")
    print(f"cut responses: {train_ds.n_truncated} train pairs with a cut side, {train_ds.n_one_side_truncated} "
          f"with one side only; held out: {eval_ds.n_truncated}, {eval_ds.n_one_side_truncated}")
    cut = torch.tensor(eval_ds.truncated)  # (N, 2): chosen cut, rejected cut (the same under either rule)
    train_items, eval_items, rule = train_ds, eval_ds, "forced EOS"
    if args.old_eos_rule:
        rule = "old rule, EOS dropped"
        train_items = old_rule_items(train_ex, tok, args.max_prompt_len, args.max_len)
        eval_items = old_rule_items(held_out, tok, args.max_prompt_len, args.max_len)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(config(args, tmp), tok, train_items, eval_items)
        seconds = train(trainer, f"RM ({rule})")
        m = margins(trainer, eval_items, args.micro_batch_size)
    vocab_size = trainer.module.model.config.vocab_size

    one_side = cut[:, 0] != cut[:, 1]
    uncut_is_chosen = one_side & ~cut[:, 0]
    n_chosen = torch.tensor([len(tok.encode(ex.chosen)) for ex in held_out])
    n_rejected = torch.tensor([len(tok.encode(ex.rejected)) for ex in held_out])
    shorter = credit_of((n_rejected - n_chosen).float())
    kept_eos = torch.where(one_side, uncut_is_chosen.float(), torch.full_like(shorter, 0.5))
    distinct = n_chosen != n_rejected
    resamples = torch.randint(len(held_out), (args.bootstrap, len(held_out)),
                              generator=torch.Generator().manual_seed(args.seed))
    rm_credit = credit_of(m)

    def row(method, credit, towards_uncut, margin=None):
        """credit: per pair, 1 if the method picks the chosen side (0.5 tie); towards_uncut: the same for
        picking the uncut side (read on one-side-cut pairs only); margin: chosen - rejected (RMs only)."""
        towards_shorter = torch.where(n_chosen < n_rejected, credit, 1 - credit)
        r = {"method": method, "accuracy": accuracy(credit), "ci95": interval(bootstrap_means(credit, resamples)),
             "rm_minus_this": interval(bootstrap_means(rm_credit - credit, resamples)),
             "acc_one_side_cut": accuracy(credit, one_side), "prefers_uncut_side": accuracy(towards_uncut, one_side),
             "agrees_with_shorter": accuracy(towards_shorter, distinct)}
        if margin is not None:  # how strongly: mean margin towards the uncut side vs |margin| elsewhere
            r["margin_to_uncut"] = float(torch.where(cut[:, 0], -margin, margin)[one_side].mean())
            r["abs_margin_other"] = float(margin[~one_side].abs().mean())
            del r["rm_minus_this"]
        return r

    rows = [row("chance", torch.full_like(shorter, 0.5), torch.full_like(shorter, 0.5)),
            row("shorter reply wins", shorter, torch.where(cut[:, 0], 1 - shorter, shorter)),
            row("longer reply wins", 1 - shorter, torch.where(cut[:, 0], shorter, 1 - shorter)),
            row("kept EOS wins (old rule)", kept_eos, torch.ones_like(shorter)),
            row(f"RM ({rule})", rm_credit, credit_of(torch.where(cut[:, 0], -m, m)), m)]
    print()
    print(f"held-out pairs: {len(held_out)}; exactly one side cut: {int(one_side.sum())}, of which the uncut side "
          f"is the chosen one in {int(uncut_is_chosen.sum())} ({accuracy(uncut_is_chosen.float(), one_side):.3f}); "
          f"95% intervals: percentile bootstrap, {args.bootstrap} paired resamples of the held-out pairs")
    print_table(rows, ["method", "accuracy", "ci95", "rm_minus_this", "acc_one_side_cut", "prefers_uncut_side",
                       "agrees_with_shorter", "margin_to_uncut", "abs_margin_other"])
    extra = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "tokenizer_source": getattr(tok, "source", "built in"),
        "model": {"preset": args.preset, "init": "random", "vocab_size": vocab_size},
        "rule": rule,
        "pairs": {"kept": report.kept, "skipped": report.skipped, "train": len(train_ds), "held_out": len(held_out)},
        "truncation": {"train_any": train_ds.n_truncated, "train_one_side": train_ds.n_one_side_truncated,
                       "held_out_any": int(cut.any(1).sum()), "held_out_one_side": int(one_side.sum()),
                       "held_out_one_side_uncut_chosen": int(uncut_is_chosen.sum())},
        "train_seconds": seconds,
    }
    path = write_record("hh_rm_probe" + ("-old-eos-rule" if args.old_eos_rule else ""), rows, extra,
                        out_dir=args.out_dir, env=env)
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
