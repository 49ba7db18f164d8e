"""Supervised fine-tuning: next-token NLL on response (+ EOS) tokens only; prompt and padding excluded."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_fast.data import ResumableBatches, SFTCollator, SFTDataset, load_preference_splits

from .common import Trainer, TrainModule, build_model, build_strategy, export_model, resolve_tokenizer_name
from .config import TrainConfig
from .metrics import log


def response_nll(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed NLL (fp32 scalar) of the tokens with loss_mask 1, each predicted from the tokens before it.

    logits (B, T, V); input_ids, loss_mask (B, T). Position t's logits predict token t + 1, so the
    targets are input_ids[:, 1:] weighted by loss_mask[:, 1:]; prompt and padding tokens weigh 0.
    """
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    return (nll * loss_mask[:, 1:].flatten().to(nll.dtype)).sum()


class SFTTrainer(Trainer):
    stage = "sft"

    def __init__(self, config, module, tokenizer, train_batches, eval_dataset, strategy):
        self.adapter = "policy" if config.lora.enabled else None
        super().__init__(config, module, tokenizer, train_batches, eval_dataset, strategy)

    def loss_count(self, batch):
        return batch["loss_mask"][:, 1:].sum()

    def micro_loss(self, batch, count):
        logits = self.module.model(batch["input_ids"], batch["attention_mask"])  # (B, T, V)
        loss = response_nll(logits, batch["input_ids"], batch["loss_mask"]) / count
        return loss, {}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.module.eval()
        collate = SFTCollator(self.tokenizer)
        bs = self.config.optim.micro_batch_size
        total, count, n = 0.0, 0, len(self.eval_dataset)
        for i in range(0, n, bs):
            b = self._to_device(collate([self.eval_dataset[j] for j in range(i, min(i + bs, n))]))
            with self.strategy.autocast():
                logits = self.module.model(b["input_ids"], b["attention_mask"])
            total += float(response_nll(logits, b["input_ids"], b["loss_mask"]))
            count += int(b["loss_mask"][:, 1:].sum())
        return {"loss": total / max(count, 1)}

    def export(self, directory):
        name = resolve_tokenizer_name(self.config)
        return export_model(self.module.model, self.tokenizer, name, directory, merge_adapter=self.adapter)


def build_sft_trainer(config: TrainConfig) -> SFTTrainer:
    """Everything an SFT run needs, from its config: model (+ LoRA adapter `policy`), data, strategy."""
    if config.stage != "sft":
        raise ValueError(f"build_sft_trainer needs a config with stage='sft', got {config.stage!r}")
    model, tokenizer = build_model(config, adapter="policy")
    d = config.data
    train, held_out, report = load_preference_splits(d.data, subset=d.subset, eval_size=d.eval_size,
                                                     synthetic_size=d.synthetic_size, seed=config.run.seed,
                                                     skip_bad_examples=d.skip_bad_examples)
    train_ds = SFTDataset(train, tokenizer, d.max_prompt_len, d.max_len)
    eval_ds = SFTDataset(held_out, tokenizer, d.max_prompt_len, d.max_len)
    batches = ResumableBatches(train_ds, config.optim.micro_batch_size, SFTCollator(tokenizer),
                               seed=config.run.seed)
    trainer = SFTTrainer(config, TrainModule(model), tokenizer, batches, eval_ds, build_strategy(config))
    trainer.logger.event(0, data=d.data, train_examples=len(train_ds), eval_examples=len(eval_ds),
                         skipped_bad_examples=report.skipped)
    if report.skipped:
        log.warning("%s: skipped %d bad example(s)", d.data, report.skipped)
    return trainer
