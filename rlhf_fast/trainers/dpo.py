"""Direct preference optimisation: DPO, IPO, robust/conservative DPO, SimPO and ORPO (`rl.PREFERENCE_LOSSES`)
on the SFT/RM loop (`loop.Trainer`: gradient accumulation, checkpoints, exact resume, DeepSpeed).

Starts from an SFT export. LoRA (the default) trains the `policy` adapter and the reference is the same
base with adapters off, so DPO holds one model; full-parameter DPO keeps a frozen reference copy (on the
CPU between uses with `--offload-reference`). Chosen and rejected run in one forward (a concatenated
batch); a sequence's log-prob is the sum over its response tokens (EOS included, the length/EOS rule of
docs/lengths.md: a side cut to fit ends in a forced EOS), in fp32 whatever the precision. SimPO and ORPO
need no reference pass.

Metrics per step: loss, rewards/{chosen,rejected,margins}, accuracy (chosen reward > rejected; a tie is
not a win) and ties, logps/{chosen,rejected} (summed), and logps/chosen_drift: the per-token change of the
chosen side's log-prob from the reference (negative and falling while the margin grows is DPO's "both
sides go down" failure).
"""

from __future__ import annotations

import torch

from rlhf_fast.data import PreferenceCollator, PreferenceDataset, ResumableBatches, load_preference_splits
from rlhf_fast.model import GPT, disable_adapters
from rlhf_fast.rl import REFERENCE_FREE, preference_loss_fn, preference_metrics

from .builders import build_model, export_model, export_peft_adapter, train_strategy
from .config import TrainConfig
from .loop import Trainer, TrainModule
from .metrics import log
from .rollout import action_logprobs
from .sft import check_max_len


def sequence_logprobs(model, input_ids, attention_mask, loss_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob (N,), token count (N,)) of each row's loss_mask tokens, fp32. Only the columns from
    the first response token on go through the lm-head."""
    first = max(int(loss_mask.any(dim=0).to(torch.uint8).argmax()) - 1, 0)
    lp = action_logprobs(model, input_ids, attention_mask, first_action=first)  # (N, T - 1)
    mask = loss_mask[:, 1:].bool()
    return torch.where(mask, lp, 0.0).sum(dim=1), mask.sum(dim=1).float()


class DPOTrainer(Trainer):
    """DPO on built objects; `reference`: a separate frozen GPT, or None for the policy with adapters off."""

    stage = "dpo"

    def __init__(self, config, module, tokenizer, train_batches, eval_dataset, strategy, reference: GPT | None = None):
        d = config.dpo
        self.adapter = "policy" if config.lora.enabled else None
        self.model, self.reference = module.model, reference
        self.preference_loss = preference_loss_fn(d.loss)
        self.needs_reference = d.loss not in REFERENCE_FREE
        if self.needs_reference and self.adapter is None and reference is None:
            raise ValueError("full-parameter DPO needs a frozen reference model (build_dpo_trainer makes one)")
        super().__init__(config, module, tokenizer, train_batches, eval_dataset, strategy)
        if reference is not None:
            reference.eval().requires_grad_(False)
            self.strategy.prepare_frozen(reference)
            if d.offload_reference:
                reference.to("cpu")

    @torch.no_grad()
    def reference_logprobs(self, batch) -> torch.Tensor:
        args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        if self.reference is not None:
            with self.strategy.on_device(self.reference, offload=self.config.dpo.offload_reference):
                return sequence_logprobs(self.reference, *args)[0]
        with disable_adapters(self.model):
            return sequence_logprobs(self.model, *args)[0]

    def pair_terms(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses (B,) and summed metrics of a PreferenceCollator batch (chosen rows first)."""
        d = self.config.dpo
        logps, lengths = sequence_logprobs(self.model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        ref = self.reference_logprobs(batch) if self.needs_reference else None
        B = logps.shape[0] // 2
        pc, pr, lc, lr = logps[:B], logps[B:], lengths[:B], lengths[B:]
        rc, rr = (None, None) if ref is None else (ref[:B], ref[B:])
        losses, chosen_rewards, rejected_rewards = self.preference_loss(
            pc, pr, rc, rr, beta=d.beta, chosen_lengths=lc, rejected_lengths=lr, label_smoothing=d.label_smoothing,
            gamma=d.gamma, chosen_nll=-pc / lc)
        metrics = dict(preference_metrics(chosen_rewards, rejected_rewards))
        metrics["logps/chosen"], metrics["logps/rejected"] = pc.detach().sum(), pr.detach().sum()
        if rc is not None:
            metrics["logps/chosen_drift"] = ((pc.detach() - rc) / lc).sum()
        return losses, metrics

    def loss_count(self, batch):
        return torch.tensor(batch["input_ids"].shape[0] // 2, device=batch["input_ids"].device)

    def micro_loss(self, batch, count):
        losses, metrics = self.pair_terms(batch)
        return losses.sum() / count, {k: v / count for k, v in metrics.items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.module.eval()
        collate = PreferenceCollator(self.tokenizer)
        bs, n = self.config.optim.micro_batch_size, len(self.eval_dataset)
        sums: dict[str, float] = {}
        for i in range(0, n, bs):
            b = self._to_device(collate([self.eval_dataset[j] for j in range(i, min(i + bs, n))]))
            with self.strategy.autocast():
                losses, metrics = self.pair_terms(b)
            for k, v in {"loss": losses.sum(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {k: v / max(n, 1) for k, v in sums.items()}

    def export(self, directory):
        directory = export_model(self.model, self.tokenizer, directory, merge_adapter=self.adapter)
        export_peft_adapter(self.config, self.model, self.adapter, self.tokenizer, directory)
        return directory


def build_dpo_trainer(config: TrainConfig) -> DPOTrainer:
    """Everything a DPO run needs: the SFT export (+ adapter `policy`), its reference, pairs, strategy."""
    if config.stage != "dpo":
        raise ValueError(f"build_dpo_trainer needs a config with stage='dpo', got {config.stage!r}")
    m, d, p = config.model, config.data, config.dpo
    if m.model is None:
        raise ValueError("dpo starts from an SFT export: give --model (e.g. runs/sft/export)")
    model, tokenizer = build_model(config, adapter="policy")
    check_max_len(config, model)
    reference = None
    if p.reference_model is not None or (not config.lora.enabled and p.loss not in REFERENCE_FREE):
        reference = GPT.from_pretrained(p.reference_model or m.model, attn_backend=m.attn_backend,
                                        kernel_backend=m.kernel_backend)
        if reference.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"--reference-model {p.reference_model} has vocab_size {reference.config.vocab_size}, "
                             f"the policy {m.model} {model.config.vocab_size}: they need the same tokenizer")
    train, held_out, report = load_preference_splits(d.data, subset=d.subset, eval_size=d.eval_size,
                                                     synthetic_size=d.synthetic_size, seed=config.run.seed,
                                                     skip_bad_examples=d.skip_bad_examples,
                                                     chat_template=d.chat_template)
    train_ds = PreferenceDataset(train, tokenizer, d.max_prompt_len, d.max_len, drop_identical=True)
    eval_ds = PreferenceDataset(held_out, tokenizer, d.max_prompt_len, d.max_len, drop_identical=True)
    if not len(train_ds) or not len(eval_ds):
        raise ValueError(f"{d.data}: no training or held-out pair left after dropping {train_ds.n_identical} + "
                         f"{eval_ds.n_identical} whose chosen and rejected responses are identical")
    batches = ResumableBatches(train_ds, config.optim.micro_batch_size, PreferenceCollator(tokenizer),
                               seed=config.run.seed)
    trainer = DPOTrainer(config, TrainModule(model), tokenizer, batches, eval_ds, train_strategy(config), reference)
    trainer.logger.event(0, data=d.data, train_pairs=len(train_ds), eval_pairs=len(eval_ds),
                         skipped_bad_examples=report.skipped, identical_pairs_dropped=train_ds.n_identical
                         + eval_ds.n_identical, truncated_train_pairs=train_ds.n_truncated)
    if trainer.strategy.is_main and train_ds.n_identical + eval_ds.n_identical:
        log.warning("%s: dropped %d pair(s) whose chosen and rejected responses are identical", d.data,
                    train_ds.n_identical + eval_ds.n_identical)
    return trainer
