"""Training strategies: how a trainer places the model, runs backward and steps the optimizer.

Trainers talk only to this interface, so the same loop runs on one device (`SingleDeviceStrategy`)
and under DeepSpeed (`deepspeed.DeepSpeedStrategy`, same members). `build_strategy` is the one place
that picks and builds a strategy. Contract for one optimizer step of `grad_accum_steps` micro-batches:

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
no-op unless `partitions_parameters`). Several models can be prepared when `engine_per_model` (PPO:
actor, critic); `backward` and `step` then take `model=`. Frozen models go through `prepare_frozen`
and may be moved off the device between uses with `on_device`. This package takes plain nn.Modules
and imports nothing else from rlhf_fast.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from .deepspeed import DeepSpeedSettings

PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("single", "deepspeed")


class BatchLayout(NamedTuple):
    """The micro-batch size and accumulation steps of one optimizer step that a strategy was built for."""

    micro_batch_size: int
    grad_accum_steps: int


class Strategy:
    """Everything a trainer calls. Defaults are those of one process holding whole parameters."""

    kind: str  # the `build_strategy` kind that builds it: "single" or "deepspeed"
    # classes (module.qualname) that the files `save_checkpoint` writes under its directory pickle beyond tensors
    # and plain containers; the trainer refuses any other on --resume (a crafted file), see trainers/checkpoint.py
    checkpoint_globals: tuple[str, ...] = ()
    device: torch.device  # where the trained models' forwards run
    precision: str = "fp32"  # one of PRECISIONS

    # --- processes ------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This process's index in the data-parallel group."""
        return 0

    @property
    def world_size(self) -> int:
        """Processes in the data-parallel group."""
        return 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs and checkpoints."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for in one process)."""

    def all_reduce_sum(self, value):
        """Sum of a number or tensor over processes (identity in one process)."""
        return value

    def all_reduce_mean(self, value: float) -> float:
        """Mean of a Python number over processes (identity in one process), for logged metrics."""
        return value

    # --- what a trainer must adapt to -------------------------------------------------------------
    @property
    def partitions_parameters(self) -> bool:
        """True when parameters are sharded over ranks (ZeRO-3): a model can then only be run through its
        prepared wrapper, and its weights read inside `gathered`."""
        return False

    @property
    def engine_per_model(self) -> bool:
        """True: `prepare` may be called once per trained model, each getting its own optimizer (and
        `backward`/`step` take `model=`), so full-parameter actor and critic are prepared separately.
        False: one model/optimizer pair; a trainer of several models prepares one module holding them all."""
        return False

    @property
    def batch_layout(self) -> BatchLayout | None:
        """The (micro-batch, accumulation) layout the strategy was built for and counts backward calls by;
        None: it follows whatever layout the trainer runs."""
        return None

    @property
    def offloads_optimizer(self) -> bool:
        """True when optimizer states and step live on the CPU (ZeRO-Offload)."""
        return False

    # --- models ---------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None):
        """Place/wrap model and optimizer; returns (model, optimizer, scheduler). The returned model may be a
        wrapper (DeepSpeed's engine) that passes attribute access through: run training forwards through it."""
        raise NotImplementedError

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

    def gathered(self, params, modify: bool = False):
        """Context in which `params` hold their full values (gathered when `partitions_parameters`);
        `modify`: writes made inside are kept."""
        return contextlib.nullcontext()

    # --- one optimizer step -----------------------------------------------------------------------
    def autocast(self):
        """Context manager for the forward pass (mixed precision when configured)."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor, model: nn.Module | None = None) -> None:
        """Accumulate the gradients of `loss` (already normalised over the whole optimizer step) into the
        prepared `model` (None: the only one prepared)."""
        raise NotImplementedError

    def step(self, model: nn.Module | None = None) -> float:
        """After the step's backward calls: clip gradients, step optimizer and scheduler, zero gradients of
        the prepared `model` (None: the only one prepared); returns the pre-clip gradient norm."""
        raise NotImplementedError

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Optimizer, scheduler and loss-scaler state, for checkpoints (`load_state_dict` restores it)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        raise NotImplementedError

    def save_checkpoint(self, directory) -> dict:
        """Called on every process at a checkpoint (a strategy may write its own, sharded state under
        `directory`); returns the state the main process stores with the trainer's files."""
        return self.state_dict()

    def load_checkpoint(self, state: dict, directory) -> None:
        """Restore what `save_checkpoint(directory)` wrote and returned."""
        self.load_state_dict(state)


class SingleDeviceStrategy(Strategy):
    """CPU or one GPU; fp32, or bf16/fp16 autocast (fp16 with a gradient scaler)."""

    kind = "single"

    def __init__(self, device: str | torch.device = "cpu", precision: str = "fp32",
                 max_grad_norm: float | None = 1.0):
        self.device = torch.device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.precision = precision
        self.max_grad_norm = max_grad_norm
        if precision == "fp16" and self.device.type != "cuda":  # runs (the kernel tests use it), but say so
            logging.getLogger("rlhf_fast").warning(
                "--precision fp16 on %s: fp16 autocast is meant for CUDA (slow here, and its loss scaling buys "
                "nothing); bf16 or fp32 is the CPU choice", self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.model = self.optimizer = self.scheduler = None

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


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_strategy(kind: str = "single", *, device: str | torch.device | None = None, precision: str = "fp32",
                   max_grad_norm: float | None = 1.0, deepspeed: DeepSpeedSettings | None = None,
                   micro_batch_size: int = 1,
                   grad_accum_steps: int = 1) -> Strategy:
    """The strategy a run asks for.

    kind "single": `SingleDeviceStrategy` on `device` (None: cuda when available), the batch layout is
    the trainer's. kind "deepspeed": `DeepSpeedStrategy` with `deepspeed` (a `DeepSpeedSettings`; None:
    the defaults), on the device of DeepSpeed's accelerator and launcher (a `device` given must agree),
    built for `micro_batch_size` x `grad_accum_steps` micro-batches per optimizer step.
    """
    if kind not in STRATEGIES:
        raise ValueError(f"strategy must be 'single' or 'deepspeed', got {kind!r}")
    if kind == "single":
        if deepspeed is not None:
            raise ValueError("DeepSpeed settings (--zero-stage, --offload-*, --deepspeed-config) need "
                             "--strategy deepspeed")
        return SingleDeviceStrategy(device if device is not None else _default_device(), precision, max_grad_norm)
    from .deepspeed import DeepSpeedSettings, DeepSpeedStrategy  # keeps `import rlhf_fast.distributed` cheap

    strategy = DeepSpeedStrategy(deepspeed or DeepSpeedSettings(), precision, max_grad_norm,
                                 micro_batch_size, grad_accum_steps)
    if device is not None and torch.device(device).type != strategy.device.type:
        raise ValueError(f"run.device={device!r}, but DeepSpeed's accelerator is {strategy.device.type}: "
                         "drop --device (set DS_ACCELERATOR=cpu to force the CPU)")
    return strategy
