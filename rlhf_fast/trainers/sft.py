"""Supervised fine-tuning: next-token NLL on response (+ EOS) tokens only; prompt and padding excluded.

Also GRPO's R1-style cold start (`cold_start`): the same loss, as a short warm-up of the base weights.
"""

from __future__ import annotations

import torch

from rlhf_fast.data import ResumableBatches, SFTCollator, SFTDataset, load_sft_splits
from rlhf_fast.model import GPT, set_adapter
from rlhf_fast.model.lora import adapter_names

from .builders import build_model, export_model, export_peft_adapter, train_strategy
from .config import TrainConfig
from .loop import Trainer, TrainModule
from .metrics import log


def response_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed NLL (fp32 scalar) of the tokens with loss_mask 1, each predicted from the tokens before it.

    input_ids, attention_mask, loss_mask (B, T). Position t predicts token t + 1, so the targets are
    input_ids[:, 1:] weighted by loss_mask[:, 1:]; prompt and padding targets are ignored by the fused
    lm-head log-prob kernel (no (B, T, V) logits, no gradient from them).
    """
    hidden = model.hidden_states(input_ids, attention_mask)[:, :-1]  # (B, T - 1, C)
    weight = loss_mask[:, 1:]
    targets = torch.where(weight.bool(), input_ids[:, 1:], -1)
    logprobs = model.lm_head(hidden, targets).logprobs  # (B, T - 1) fp32, 0 where ignored
    return -(logprobs * weight.to(logprobs.dtype)).sum()


class SFTTrainer(Trainer):
    stage = "sft"

    def __init__(self, config, module, tokenizer, train_batches, eval_dataset, strategy):
        self.adapter = "policy" if config.lora.enabled else None
        super().__init__(config, module, tokenizer, train_batches, eval_dataset, strategy)

    def loss_count(self, batch):
        return batch["loss_mask"][:, 1:].sum()

    def micro_loss(self, batch, count):
        loss = response_nll(self.module.model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        loss = loss / count
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
                total += float(response_nll(self.module.model, b["input_ids"], b["attention_mask"], b["loss_mask"]))
            count += int(b["loss_mask"][:, 1:].sum())
        return {"loss": total / max(count, 1)}

    def export(self, directory):
        directory = export_model(self.module.model, self.tokenizer, directory, merge_adapter=self.adapter)
        export_peft_adapter(self.config, self.module.model, self.adapter, self.tokenizer, directory)
        return directory


def check_max_len(config: TrainConfig, model: GPT) -> None:
    """Refuse before step 1 (not at the first long batch, many steps in) a --max-len the model cannot hold."""
    n_positions, max_len = model.config.n_positions, config.data.max_len
    if max_len > n_positions:
        name = config.model.model or config.model.preset
        raise ValueError(f"--max-len {max_len} exceeds the model's n_positions={n_positions} ({name}): "
                         "lower --max-len")


def build_sft_trainer(config: TrainConfig) -> SFTTrainer:
    """Everything an SFT run needs, from its config: model (+ LoRA adapter `policy`), data, strategy."""
    if config.stage != "sft":
        raise ValueError(f"build_sft_trainer needs a config with stage='sft', got {config.stage!r}")
    model, tokenizer = build_model(config, adapter="policy")
    check_max_len(config, model)
    d = config.data
    train, held_out, report = load_sft_splits(d.data, subset=d.subset, eval_size=d.eval_size,
                                              synthetic_size=d.synthetic_size, seed=config.run.seed,
                                              skip_bad_examples=d.skip_bad_examples, chat_template=d.chat_template)
    train_ds = SFTDataset(train, tokenizer, d.max_prompt_len, d.max_len)
    eval_ds = SFTDataset(held_out, tokenizer, d.max_prompt_len, d.max_len)
    batches = ResumableBatches(train_ds, config.optim.micro_batch_size, SFTCollator(tokenizer),
                               seed=config.run.seed)
    trainer = SFTTrainer(config, TrainModule(model), tokenizer, batches, eval_ds, train_strategy(config))
    trainer.logger.event(0, data=d.data, train_examples=len(train_ds), eval_examples=len(eval_ds),
                         skipped_bad_examples=report.skipped, truncated_train_examples=train_ds.n_truncated,
                         truncated_eval_examples=eval_ds.n_truncated)
    if trainer.strategy.is_main:
        log.info("sft data: %d of %d train and %d of %d eval responses cut to --max-len %d (no EOS: "
                 "trained on the tokens that fit)", train_ds.n_truncated, len(train_ds), eval_ds.n_truncated,
                 len(eval_ds), d.max_len)
    if report.skipped:
        log.warning("%s: skipped %d bad example(s)", d.data, report.skipped)
    return trainer


def cold_start(
    model: GPT,
    tokenizer,
    examples,
    *,
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
    max_prompt_len: int = 48,
    max_len: int = 112,
) -> list[float]:
    """The R1-style cold start used by GRPO: SFT warm-up on formatted answers (DeepSeek-R1's "cold start")
    so the policy emits the format sometimes and GRPO has a signal. Trains the *base* weights (adapters
    off, then a no-op adapter again), so a KL reference (adapters off) is the warmed-up model. Returns the
    per-step losses."""
    if steps < 1:
        raise ValueError(f"cold_start: steps must be >= 1, got {steps}")
    device = model.transformer.wte.weight.device
    batches = ResumableBatches(
        SFTDataset(examples, tokenizer, max_prompt_len, max_len),
        batch_size,
        SFTCollator(tokenizer),
        seed=seed,
    )
    adapters = adapter_names(model)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    if adapters:
        set_adapter(model, None)
    base = [p for n, p in model.named_parameters() if ".lora_A." not in n and ".lora_B." not in n]
    for p in base:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(base, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        b = {k: v.to(device) for k, v in next(batches).items()}
        loss = response_nll(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
        loss = loss / b["loss_mask"][:, 1:].sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(base, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    for p in frozen:
        p.requires_grad_(False)
    if adapters:
        set_adapter(model, "policy" if "policy" in adapters else adapters[0])
    return losses
