"""DeepSpeed strategy: ZeRO stages 0-3, bf16/fp16, CPU offload of optimizer states and parameters.

The only module of rlhf_fast that imports deepspeed, and only when a `DeepSpeedStrategy` is built, so
`import rlhf_fast` (and this module) stays cheap and works without deepspeed installed.

Launch: `deepspeed --num_gpus N <script>`, `torchrun --nproc_per_node N <script>`, or a plain single
process (the rendezvous variables are then set to a one-process group on 127.0.0.1). On a machine
without CUDA DeepSpeed uses its CPU accelerator and the gloo backend (that is how the tests run it).

Data parallel contract (see Trainer): every rank reads its own share of a global step, the step's loss
count (tokens / pairs) is summed over ranks, and each rank's loss is its share of the *global* sum.
DeepSpeed averages gradients over ranks, so `backward` multiplies by the world size to keep the sum.

Several models can be prepared (PPO: actor and critic), each becomes its own engine; `backward`,
`step` take `model=` to pick one (optional while only one is prepared). Frozen models (reference,
reward) go through `prepare_frozen` and can be moved off the device between uses (`on_device`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from rlhf_fast.config import option

from .strategy import PRECISIONS, BatchLayout, Strategy

INSTALL_HINT = "pip install 'rlhf_fast[deepspeed]'"
ZERO_STAGES = (0, 1, 2, 3)
BUCKET_ELEMENTS = 50_000_000


def import_deepspeed():
    """The deepspeed module, or an ImportError that says which extra to install."""
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(f"the deepspeed strategy needs DeepSpeed: {INSTALL_HINT} ({e})") from e
    return deepspeed


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What the generated DeepSpeed config says; `config_file` replaces it with a user's own JSON."""

    zero_stage: int | None = option(None, "DeepSpeed ZeRO stage 0-3 (default 2: optimizer states and gradients "
                                    "partitioned, weights replicated; RL: 0-2)", choices=ZERO_STAGES)
    offload_optimizer: bool = option(False, "DeepSpeed: optimizer states and step on the CPU (DeepSpeedCPUAdam; "
                                     "ZeRO >= 1)")
    offload_params: bool = option(False, "DeepSpeed: parameters on the CPU between uses (ZeRO-3)")
    config_file: str | None = option(None, "DeepSpeed JSON used instead of the generated config",
                                     flag="--deepspeed-config")

    def __post_init__(self):
        if self.zero_stage is not None and self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"deepspeed.zero_stage must be one of {ZERO_STAGES}, got {self.zero_stage!r}")
        if self.offload_params and self.stage != 3:
            raise ValueError("deepspeed.offload_params needs zero_stage=3 (only ZeRO-3 partitions parameters)")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1 (ZeRO-Offload)")

    @property
    def stage(self) -> int:
        """The ZeRO stage (zero_stage, 2 when unset: None tells "not given" from an explicit 2)."""
        return 2 if self.zero_stage is None else self.zero_stage

    def ds_config(self, *, micro_batch_size: int, grad_accum_steps: int, precision: str,
                  max_grad_norm: float | None) -> dict:
        """The DeepSpeed config dict for these settings and the trainer's batch / precision / clipping."""
        if self.config_file is not None:
            return self._user_config(micro_batch_size, grad_accum_steps)
        zero: dict = {"stage": self.stage}
        if self.stage in (1, 2):
            # 5e7-element buckets: ~100 MB of bf16 gradient buffers on the GPU instead of DeepSpeed's 5e8
            # (~1 GB each for reduce and all-gather), which the 16 GB plan (docs/memory.md) cannot spare.
            zero.update(reduce_bucket_size=BUCKET_ELEMENTS, allgather_bucket_size=BUCKET_ELEMENTS)
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if self.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        return {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": grad_accum_steps,
            "gradient_clipping": max_grad_norm if max_grad_norm is not None else 0.0,
            "zero_optimization": zero,
            "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
            "steps_per_print": 2**31 - 1,  # the trainer logs; keep DeepSpeed quiet
            "wall_clock_breakdown": False,
        }

    def _user_config(self, micro_batch_size: int, grad_accum_steps: int) -> dict:
        path = Path(self.config_file)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config file not found: {path}")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        # The trainer owns the batch layout: a file may repeat it ("auto" or the same numbers), not change it.
        for key, ours in (("train_micro_batch_size_per_gpu", micro_batch_size),
                          ("gradient_accumulation_steps", grad_accum_steps)):
            if cfg.get(key, "auto") not in ("auto", ours):
                raise ValueError(f"{path}: {key}={cfg[key]} disagrees with the trainer's {ours}; "
                                 "set it with the trainer's batch flags or write \"auto\"")
            cfg[key] = ours
        cfg.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
        return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """Rendezvous variables for a one-process group when no launcher set them (loopback only)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")


def _uses_lora(model: nn.Module) -> bool:
    return any(".lora_A." in n or ".lora_B." in n for n, _ in model.named_parameters())


class DeepSpeedStrategy(Strategy):
    """Trainer strategy backed by DeepSpeed engines (one per prepared model)."""

    kind = "deepspeed"
    # what DeepSpeed's optimizer-state files pickle (deepspeed 0.19; it loads them with weights_only=False itself)
    checkpoint_globals = ("deepspeed.utils.tensor_fragment.fragment_address",
                          "deepspeed.runtime.zero.config.ZeroStageEnum",
                          "deepspeed.runtime.fp16.loss_scaler.LossScaler")

    def __init__(self, settings: DeepSpeedSettings | None = None, precision: str = "fp32",
                 max_grad_norm: float | None = 1.0, micro_batch_size: int = 1, grad_accum_steps: int = 1):
        self.settings = settings or DeepSpeedSettings()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if micro_batch_size < 1 or grad_accum_steps < 1:
            raise ValueError("micro_batch_size and grad_accum_steps must be >= 1")
        self.deepspeed = import_deepspeed()
        accelerator = self.deepspeed.get_accelerator()
        if precision == "fp16" and accelerator.device_name() == "cpu":
            raise ValueError("precision='fp16' needs a CUDA device (use bf16 or fp32 on CPU)")
        self.precision, self.max_grad_norm = precision, max_grad_norm
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.ds_config = self.settings.ds_config(micro_batch_size=micro_batch_size,
                                                 grad_accum_steps=grad_accum_steps, precision=precision,
                                                 max_grad_norm=max_grad_norm)
        _single_process_env()
        backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
        self.deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if accelerator.device_name() == "cpu":
            self.device = torch.device("cpu")
        else:
            accelerator.set_device(self.local_rank)
            self.device = torch.device(accelerator.device_name(self.local_rank))
        self.engines: dict[int, object] = {}  # id(module) -> DeepSpeedEngine, in preparation order

    # --- processes ------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return torch.distributed.get_rank()

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size()

    def barrier(self) -> None:
        torch.distributed.barrier()

    def all_reduce_sum(self, value):
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).clone()
        torch.distributed.all_reduce(t)
        return float(t) if not torch.is_tensor(value) else t.to(value.dtype)

    def all_reduce_mean(self, value: float) -> float:
        return self.all_reduce_sum(value) / self.world_size

    # --- what a trainer must adapt to -------------------------------------------------------------
    def _stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    @property
    def partitions_parameters(self) -> bool:
        return self._stage() == 3

    @property
    def engine_per_model(self) -> bool:
        return True

    @property
    def batch_layout(self) -> BatchLayout:
        return BatchLayout(self.micro_batch_size, self.grad_accum_steps)

    @property
    def offloads_optimizer(self) -> bool:
        return self.ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"

    # --- models ---------------------------------------------------------------------------------
    def _check_model(self, model: nn.Module) -> None:
        stage = self._stage()
        if stage == 3 and _uses_lora(model):
            raise ValueError(
                "ZeRO-3 with LoRA adapters is not supported: it would partition the frozen base that the adapters "
                "(policy, value, reward; the reference = adapters off) share, so a second engine over that base "
                "would partition it again and direct weight reads (adapter merging) would see empty shards. Use "
                "zero_stage <= 2 with LoRA (the frozen base has no optimizer state, so ZeRO-1/2 already shard all "
                "that is trainable), or full-parameter training for ZeRO-3.")
        mine = {id(p) for p in model.parameters()}
        for other in self.engines.values():
            shared = mine & {id(p) for p in other.module.parameters()}
            if shared and (stage == 3 or any(p.requires_grad for p in model.parameters() if id(p) in shared)):
                raise ValueError(
                    f"{len(shared)} parameter(s) of this model already belong to another DeepSpeed engine: "
                    "engines may share only frozen parameters, and none under ZeRO-3 (each would partition them)")

    def _optimizer_for_engine(self, optimizer, scheduler):
        """ZeRO-Offload steps on the CPU with DeepSpeedCPUAdam: rebuild a torch Adam(W) as one, same groups."""
        if not self.offloads_optimizer:
            return optimizer
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        if isinstance(optimizer, DeepSpeedCPUAdam):
            return optimizer
        if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            raise ValueError(f"optimizer offload supports Adam/AdamW (run on the CPU as DeepSpeedCPUAdam), "
                             f"got {type(optimizer).__name__}")
        if optimizer.state:
            raise ValueError("prepare() the optimizer before its first step: its state cannot move to the CPU")
        d = optimizer.defaults
        groups = [dict(g) for g in optimizer.param_groups]  # keeps lr as the scheduler set it, initial_lr
        cpu_adam = DeepSpeedCPUAdam(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"],
                                    weight_decay=d["weight_decay"],
                                    adamw_mode=isinstance(optimizer, torch.optim.AdamW))
        if scheduler is not None:
            scheduler.optimizer = cpu_adam  # LR schedulers only read/write optimizer.param_groups
        return cpu_adam

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None):
        """Wrap (model, optimizer, scheduler) in a DeepSpeed engine; returns (engine, optimizer, scheduler).

        Training forwards must go through the engine (`engine(...)`: ZeRO-3 counts micro-steps there);
        the engine passes attribute access through to the model (`engine.model` is `model.model`)."""
        self._check_model(model)
        optimizer = self._optimizer_for_engine(optimizer, scheduler)
        if not self.partitions_parameters:  # ZeRO-3 places (with offload_params: keeps on the CPU) each shard
            model.to(self.device)
        engine, ds_optimizer, _, ds_scheduler = self.deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=dict(self.ds_config),
            dist_init_required=False)
        self.engines[id(engine.module)] = engine
        return engine, optimizer, ds_scheduler

    def prepare_frozen(self, model: nn.Module) -> nn.Module:
        """A model that is only evaluated (reference, reward): eval mode, no grads, in the training dtype."""
        model.requires_grad_(False).eval()
        if self.precision != "fp32":
            model.to(torch.bfloat16 if self.precision == "bf16" else torch.float16)
        return model.to(self.device)

    def engine(self, model: nn.Module | None = None):
        if not self.engines:
            raise RuntimeError("DeepSpeedStrategy: prepare() a model first")
        if model is None:
            if len(self.engines) > 1:
                raise ValueError("several models are prepared: pass model= to say which one")
            return next(iter(self.engines.values()))
        if id(model) in self.engines:
            return self.engines[id(model)]
        try:
            return self.engines[id(model.module)]  # the engine itself
        except (KeyError, AttributeError):
            raise ValueError(f"{type(model).__name__} was not prepared by this strategy") from None

    # --- one optimizer step -----------------------------------------------------------------------
    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts the module itself to bf16/fp16

    def backward(self, loss: torch.Tensor, model: nn.Module | None = None) -> None:
        engine = self.engine(model)
        # The trainer already normalised over the whole (global) step: no 1/gas here, and undo the
        # world-size averaging DeepSpeed applies to gradients.
        engine.backward(loss * self.world_size, scale_wrt_gas=False)
        if not engine.is_gradient_accumulation_boundary():
            engine.step()  # not a real step: DeepSpeed counts micro-steps to know the boundary

    def step(self, model: nn.Module | None = None) -> float:
        engine = self.engine(model)
        if not engine.is_gradient_accumulation_boundary():
            raise RuntimeError(f"step() after fewer than grad_accum_steps={self.grad_accum_steps} backward() calls")
        # ZeRO-0 in fp32 keeps plain .grad and reports no norm: measure it before the step clips it.
        grads = [p.grad.float() for p in engine.module.parameters() if p.grad is not None]
        local_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else None
        engine.step()
        norm = engine.get_global_grad_norm()
        if norm is None:
            norm = local_norm if local_norm is not None else 0.0
        return float(norm)

    # --- checkpoints ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def gathered(self, params, modify: bool = False):
        """Full parameters inside the block (ZeRO-3 gathers the shards; a no-op for stages 0-2)."""
        params = [p for p in params if hasattr(p, "ds_id")]
        if not params:
            yield
            return
        with self.deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield

    def save_checkpoint(self, directory) -> dict:
        """Every rank: DeepSpeed's own checkpoint of each engine (sharded optimizer state, fp32 masters,
        scheduler) under `directory`; returns what the main process stores with the trainer's files."""
        directory = Path(directory)
        for i, engine in enumerate(self.engines.values()):
            engine.save_checkpoint(str(directory), tag=f"engine{i}", save_latest=False)
        return {"deepspeed": {"engines": len(self.engines), "world_size": self.world_size}}

    def load_checkpoint(self, state: dict, directory) -> None:
        info = state.get("deepspeed")
        if info is None:
            raise ValueError("this checkpoint was not written by the deepspeed strategy: its optimizer state "
                             "cannot be restored here")
        if info["engines"] != len(self.engines):
            raise ValueError(f"checkpoint has {info['engines']} DeepSpeed engine(s), this run {len(self.engines)}")
        directory = Path(directory)
        for i, engine in enumerate(self.engines.values()):
            if not (directory / f"engine{i}").is_dir():
                raise FileNotFoundError(f"DeepSpeed checkpoint {directory / f'engine{i}'} is missing")
            path, _ = engine.load_checkpoint(str(directory), tag=f"engine{i}")
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load {directory / f'engine{i}'}")

    def state_dict(self) -> dict:
        raise NotImplementedError("DeepSpeed state is sharded over ranks: use save_checkpoint(directory)")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError("DeepSpeed state is sharded over ranks: use load_checkpoint(state, directory)")
