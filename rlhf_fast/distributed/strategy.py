"""Training strategies: how a trainer places the model, runs backward and steps the optimizer.

Trainers talk only to this interface, so the same loop runs on one device (`SingleDeviceStrategy`)
and under DeepSpeed (a later strategy with the same methods). Contract for one optimizer step of
`grad_accum_steps` micro-batches:

    for micro in micro_batches:
        with strategy.autocast():
            loss = ...            # already normalised over the whole optimizer step (see trainers)
        strategy.backward(loss)
    grad_norm = strategy.step()   # unscale (fp16), clip after all backwards, optimizer + scheduler step

Data parallel (DeepSpeed with N processes): each rank runs its share of the global step; the loss
count is summed over ranks (`all_reduce_sum`) so every rank's loss is its share of the global mean.

Checkpoints: every process calls `save_checkpoint(directory)` (a strategy may write sharded state
there, collectively); the main process stores the dict it returns with the trainer's files and
`load_checkpoint(state, directory)` restores it. Parameters are read inside `gathered(params)` (a
no-op except under ZeRO-3). Several models can be prepared (PPO: actor, critic); `backward` and
`step` then take `model=`. Frozen models go through `prepare_frozen` and may be moved off the device
between uses with `on_device`. This package takes plain nn.Modules and imports nothing else from
rlhf_fast.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

PRECISIONS = ("fp32", "bf16", "fp16")


class Strategy:
    """Interface shared by all strategies."""

    device: torch.device
    precision: str = "fp32"

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs and checkpoints."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None):
        """Place/wrap model and optimizer; returns (model, optimizer, scheduler). The returned model may be a
        wrapper (DeepSpeed's engine) that passes attribute access through: run training forwards through it."""
        raise NotImplementedError

    def autocast(self):
        """Context manager for the forward pass (mixed precision when configured)."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> float:
        """Clip gradients, step optimizer and scheduler, zero gradients; returns the pre-clip grad norm."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Optimizer, scheduler and loss-scaler state, for checkpoints (`load_state_dict` restores it)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def all_reduce_mean(self, value: float) -> float:
        """Mean of a Python number over processes (identity on one device), for logged metrics."""
        raise NotImplementedError

    # --- defaults shared by single-process strategies -------------------------------------------
    rank: int = 0
    world_size: int = 1

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for in one process)."""

    def all_reduce_sum(self, value):
        """Sum of a number or tensor over processes (identity in one process)."""
        return value

    def save_checkpoint(self, directory) -> dict:
        """Called on every process at a checkpoint; returns the state the main process stores."""
        return self.state_dict()

    def load_checkpoint(self, state: dict, directory) -> None:
        self.load_state_dict(state)

    def gathered(self, params, modify: bool = False):
        """Context in which `params` hold their full values (ZeRO-3 gathers them); `modify`: writes kept."""
        return contextlib.nullcontext()

    def prepare_frozen(self, model: nn.Module) -> nn.Module:
        """A model that is only evaluated (reference, reward model): eval mode, no grads, on the device."""
        return model.requires_grad_(False).eval().to(self.device)

    @contextlib.contextmanager
    def on_device(self, model: nn.Module, offload: bool = True):
        """Run a frozen model on the device, then (offload=True) move it back to the CPU to free memory."""
        model.to(self.device)
        try:
            yield model
        finally:
            if offload:
                model.to("cpu")


class SingleDeviceStrategy(Strategy):
    """CPU or one GPU; fp32, or bf16/fp16 autocast (fp16 with a gradient scaler)."""

    def __init__(self, device: str | torch.device = "cpu", precision: str = "fp32",
                 max_grad_norm: float | None = 1.0):
        self.device = torch.device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.precision = precision
        self.max_grad_norm = max_grad_norm
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.model = self.optimizer = self.scheduler = None

    @property
    def is_main(self) -> bool:
        return True

    def prepare(self, model, optimizer, scheduler=None):
        model.to(self.device)  # in place: the optimizer keeps pointing at the same Parameters
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        return model, optimizer, scheduler

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _check(self, model):
        if self.optimizer is None:
            raise RuntimeError("SingleDeviceStrategy.backward before prepare()")
        if model is not None and model is not self.model:
            raise ValueError("SingleDeviceStrategy holds one model/optimizer pair: this model was not prepared")

    def backward(self, loss, model=None):
        self._check(model)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _params(self):
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def step(self, model=None) -> float:
        self._check(model)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        params = self._params()
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])

    def all_reduce_mean(self, value: float) -> float:
        return value
