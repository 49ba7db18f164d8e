"""Reward-model training: pairwise loss -log sigmoid(r_chosen - r_rejected), score at the last real token."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf_fast.data import PreferenceCollator, PreferenceDataset, ResumableBatches, load_preference_splits
from rlhf_fast.model import GPT, RewardHead, reward_scores, save_adapter

from .builders import build_model, export_model, resolve_tokenizer_name, train_strategy
from .config import TrainConfig
from .loop import Trainer, TrainModule
from .metrics import log
from .sft import check_max_len

REWARD_HEAD_FILE = "reward_head.pt"
REWARD_ADAPTER_FILE = "reward_adapter.pt"  # LoRA RMs: the adapter itself, for PPO on the same frozen base
REWARD_META_FILE = "rlhf_fast_reward.json"


def weights_fingerprint(model: GPT) -> str:
    """sha256 of the base weights (LoRA adapters excluded): tells whether two models share one base."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if ".lora_" not in name:
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def pairwise_loss_terms(chosen: torch.Tensor, rejected: torch.Tensor):
    """Per-pair (loss, correct, margin) for scores (B,): loss = -log sigmoid(chosen - rejected)."""
    margin = chosen.float() - rejected.float()
    return -F.logsigmoid(margin), (margin > 0).float(), margin


class RewardTrainer(Trainer):
    stage = "rm"

    def __init__(self, config, module, tokenizer, train_batches, eval_dataset, strategy):
        if module.head is None:
            raise ValueError("RewardTrainer needs a TrainModule with a reward head")
        self.adapter = "reward" if config.lora.enabled else None
        super().__init__(config, module, tokenizer, train_batches, eval_dataset, strategy)

    def scores(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) scores (B,) of a PreferenceCollator batch (chosen rows first)."""
        s = reward_scores(self.module.model, self.module.head, batch["input_ids"], batch["attention_mask"])
        return s.chunk(2)

    def loss_count(self, batch):
        return torch.tensor(batch["input_ids"].shape[0] // 2, device=batch["input_ids"].device)

    def micro_loss(self, batch, count):
        loss, correct, margin = pairwise_loss_terms(*self.scores(batch))
        return loss.sum() / count, {"accuracy": correct.sum() / count, "margin": margin.sum() / count}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.module.eval()
        collate = PreferenceCollator(self.tokenizer)
        bs = self.config.optim.micro_batch_size
        sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
        n = len(self.eval_dataset)
        for i in range(0, n, bs):
            b = self._to_device(collate([self.eval_dataset[j] for j in range(i, min(i + bs, n))]))
            with self.strategy.autocast():
                terms = pairwise_loss_terms(*self.scores(b))
            for k, t in zip(sums, terms):
                sums[k] += float(t.sum())
        return {k: v / n for k, v in sums.items()}

    def export(self, directory):
        name = resolve_tokenizer_name(self.config)
        model, head = self.module.model, self.module.head
        directory = export_model(model, self.tokenizer, name, directory, merge_adapter=self.adapter)
        torch.save({k: v.cpu() for k, v in head.state_dict().items()}, directory / REWARD_HEAD_FILE)
        meta = {"head": REWARD_HEAD_FILE, "score": "last real token"}
        if self.adapter is not None:  # PPO can then put this adapter on the SFT base instead of a 2nd model
            save_adapter(model, self.adapter, directory / REWARD_ADAPTER_FILE)
            meta.update(adapter=REWARD_ADAPTER_FILE, base_fingerprint=weights_fingerprint(model))
        (directory / REWARD_META_FILE).write_text(json.dumps(meta))
        return directory


def load_reward_model(directory, **config_overrides) -> tuple[GPT, RewardHead]:
    """(model, head) of an exported reward model (merged HF GPT-2 directory + reward_head.pt)."""
    directory = Path(directory)
    head_path = directory / REWARD_HEAD_FILE
    if not head_path.is_file():
        raise FileNotFoundError(f"{directory} has no {REWARD_HEAD_FILE}: not an exported reward model")
    model = GPT.from_pretrained(str(directory), **config_overrides)
    head = RewardHead(model.config.n_embd)
    head.load_state_dict(torch.load(head_path, map_location="cpu", weights_only=True))
    return model, head


def build_reward_trainer(config: TrainConfig) -> RewardTrainer:
    """Everything an RM run needs: base model (+ adapter `reward`) with a reward head, pairs, strategy."""
    if config.stage != "rm":
        raise ValueError(f"build_reward_trainer needs a config with stage='rm', got {config.stage!r}")
    model, tokenizer = build_model(config, adapter="reward")
    check_max_len(config, model)
    head = RewardHead(model.config.n_embd)
    d = config.data
    train, held_out, report = load_preference_splits(d.data, subset=d.subset, eval_size=d.eval_size,
                                                     synthetic_size=d.synthetic_size, seed=config.run.seed,
                                                     skip_bad_examples=d.skip_bad_examples)
    train_ds = PreferenceDataset(train, tokenizer, d.max_prompt_len, d.max_len)
    eval_ds = PreferenceDataset(held_out, tokenizer, d.max_prompt_len, d.max_len)
    batches = ResumableBatches(train_ds, config.optim.micro_batch_size, PreferenceCollator(tokenizer),
                               seed=config.run.seed)
    module = TrainModule(model, head)
    trainer = RewardTrainer(config, module, tokenizer, batches, eval_ds, train_strategy(config))
    trainer.logger.event(0, data=d.data, train_pairs=len(train_ds), eval_pairs=len(eval_ds),
                         skipped_bad_examples=report.skipped, truncated_train_pairs=train_ds.n_truncated,
                         one_side_truncated_train_pairs=train_ds.n_one_side_truncated,
                         truncated_eval_pairs=eval_ds.n_truncated)
    if trainer.strategy.is_main:
        log.info("rm data: %d of %d train pairs (%d with one side only) and %d of %d eval pairs have a "
                 "response cut to --max-len %d (scored with a forced EOS)", train_ds.n_truncated, len(train_ds),
                 train_ds.n_one_side_truncated, eval_ds.n_truncated, len(eval_ds), d.max_len)
    if report.skipped:
        log.warning("%s: skipped %d bad example(s)", d.data, report.skipped)
    return trainer
