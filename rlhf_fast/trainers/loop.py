"""The loop shared by the SFT, reward-model and DPO trainers, and what every trainer builds its optimizer from.

`Trainer.train()` runs optimizer steps of `grad_accum_steps` micro-batches. Each micro-batch loss is a
*sum* divided by the count (tokens or pairs) of the whole optimizer step, so 4 x 2 accumulates exactly
the gradient of 1 x 8. Subclasses provide `loss_count(batch)`, `micro_loss(batch, count)` and
`evaluate()`. With `run.compile`, the model's blocks are compiled regionally (`RunCompiler`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from rlhf_fast.data import ResumableBatches
from rlhf_fast.distributed import Strategy
from rlhf_fast.model import GPT

from .checkpoint import CheckpointManager, restore_collective, resume_or_start, save_collective
from .compiling import RunCompiler
from .config import TrainConfig
from .curves import LOSS, STAGE_PANELS, write_curves
from .memory_plan import check_trainer_memory
from .metrics import MetricsLogger, log


class TrainModule(nn.Module):
    """The model and (for reward/value training) its scalar head, as one module for the strategy."""

    def __init__(self, model: GPT, head: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, step_fn, *args, **kwargs):
        """Run `step_fn` (a trainer's forward + loss) as this module's forward pass, so that a wrapping
        engine sees every training forward (DeepSpeed ZeRO-3 counts micro-steps there)."""
        return step_fn(*args, **kwargs)


def lr_lambda(optim) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 10% of the peak (or constant)."""

    def f(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        progress = (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


def adamw(params, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms or heads' scalars)."""
    params = list(params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # no empty group: DeepSpeed drops them, and an LR scheduler built on the full list then fails to zip
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas))


class Trainer:
    """Base loop: step, log, evaluate, checkpoint, resume. See the module docstring for the contract."""

    stage = "base"
    adapter: str | None = None  # the LoRA adapter this stage trains (None: full fine-tuning)

    def __init__(self, config: TrainConfig, module: TrainModule, tokenizer, train_batches: ResumableBatches,
                 eval_dataset, strategy: Strategy):
        self.config, self.module, self.tokenizer, self.strategy = config, module, tokenizer, strategy
        self.batches, self.eval_dataset = train_batches, eval_dataset
        self.run_dir = Path(config.run.output_dir)
        self.trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ValueError("nothing to train: no parameter requires grad")
        check_trainer_memory(self)  # CUDA: refuse a run whose memory plan does not fit
        o = config.optim
        optimizer = adamw(self.trainable.values(), o.lr, o.weight_decay, o.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o))
        self.module, self.optimizer, self.scheduler = strategy.prepare(module, optimizer, scheduler)
        self.device = strategy.device
        self.compiler = RunCompiler(config.run, self.device, module, is_main=strategy.is_main,
                                    partitioned=strategy.partitions_parameters)
        self.checkpoints = CheckpointManager(self.run_dir, config.run.keep_last)
        self.logger = MetricsLogger(self.run_dir, enabled=strategy.is_main, report_to=config.run.report_to,
                                    config=config.to_dict())
        self.step = 0
        self.history: list[dict] = []  # per-step train metrics of this process (for tests and callers)

    # --- to implement -----------------------------------------------------------------------------
    def loss_count(self, batch) -> torch.Tensor:
        """What the step's loss is averaged over, for one micro-batch (tokens or pairs)."""
        raise NotImplementedError

    def micro_loss(self, batch, count: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics) of one micro-batch, both already divided by the step's total `count`."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def export(self, directory) -> Path:
        raise NotImplementedError

    # --- the loop -------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _next_batch(self) -> dict:
        """This rank's micro-batch: ranks take turns through one batch order, so N ranks x micro-batch m
        see exactly the examples of one process with grad_accum N (same global batch, same padding)."""
        batches = [next(self.batches) for _ in range(self.strategy.world_size)]
        return self._to_device(batches[self.strategy.rank])

    def train_step(self) -> dict[str, float]:
        self.module.train()
        micro = [self._next_batch() for _ in range(self.config.optim.grad_accum_steps)]
        # the count of the global step (all ranks): each rank's loss is its share of the global mean
        count = self.strategy.all_reduce_sum(sum(self.loss_count(b) for b in micro)).clamp(min=1)
        totals: dict[str, float] = {}
        for b in micro:
            with self.strategy.autocast():
                loss, metrics = self.module(self.micro_loss, b, count)
            self.strategy.backward(loss)
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach())
        totals = {k: self.strategy.all_reduce_sum(v) for k, v in totals.items()}  # shares -> global
        totals["grad_norm"] = self.strategy.step()
        totals["lr"] = self.scheduler.get_last_lr()[0]
        totals["tokens"] = int(self.strategy.all_reduce_sum(sum(float(b["attention_mask"].sum()) for b in micro)))
        return {**totals, **self.compiler.step_metrics()}

    def train(self, until_step: int | None = None) -> list[dict]:
        """Train to optim.max_steps (or stop early at `until_step`, saving a checkpoint there), then draw the run's
        curves.png from its metrics.jsonl. The metric sinks (TensorBoard, wandb) close however it ends."""
        try:
            self._train(until_step)
        finally:
            self.logger.close()
        if self.strategy.is_main:
            write_curves(self.run_dir, STAGE_PANELS.get(self.stage, LOSS), title=f"{self.stage}: {self.run_dir}")
        return self.history

    def _train(self, until_step: int | None) -> None:
        run, max_steps = self.config.run, self.config.optim.max_steps
        stop = max_steps if until_step is None else min(until_step, max_steps)
        resumed = resume_or_start(self.resume, run, self.checkpoints)
        self.logger.truncate(self.step if resumed else -1)  # metrics of re-run (or abandoned) steps go
        if self.strategy.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))
        from tqdm.auto import tqdm

        show = run.progress and self.strategy.is_main
        bar = tqdm(total=max_steps, initial=self.step, desc=self.stage, disable=not show, dynamic_ncols=True)
        tokens, t0 = 0, time.perf_counter()
        while self.step < stop:
            metrics = self.train_step()
            self.step += 1
            self.history.append(metrics)
            tokens += metrics["tokens"]
            tok_s = tokens / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tok_s:,.0f}")
            if run.log_every and self.step % run.log_every == 0:
                self.logger.log(self.step, {**metrics, "tokens_per_s": tok_s})
            if run.eval_every and self.step % run.eval_every == 0 and self.step < max_steps:
                self._log_eval()
            if run.save_every and self.step % run.save_every == 0 and self.step < stop:
                self.save()
        bar.close()
        if self.step >= max_steps:
            self._log_eval()
        self.save()
        self.compiler.save()

    def _log_eval(self) -> dict[str, float]:
        metrics = self.evaluate()
        self.logger.log(self.step, metrics, prefix="eval")
        if self.strategy.is_main:
            log.info("step %d eval: %s", self.step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    # --- checkpoints ----------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Collective: every process calls it (see `save_collective`)."""
        path = save_collective(self.strategy, self.checkpoints, self.step, self.trainable, {},
                               {"data": self.batches.state_dict(), "stage": self.stage})
        if path is not None:
            self.logger.event(self.step, checkpoint=str(path))
        return path

    def resume(self) -> bool:
        """Load the newest complete checkpoint of the run directory; False when there is none."""
        loaded = self.checkpoints.load_latest(self.stage, self.trainable)
        if loaded is None:
            return False
        path, blobs, state = loaded
        restore_collective(self.strategy, self.checkpoints, self.trainable, blobs, int(state["step"]))
        self.batches.load_state_dict(state["data"])
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", path, self.step)
        return True
