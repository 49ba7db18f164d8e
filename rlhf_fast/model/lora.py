"""LoRA adapters: several named adapters on one frozen base model.

One base GPT serves every RLHF role: `policy`, `value` and `reward` adapters sit side by side on the
same linears, `set_adapter(name)` picks the one in use, and `with disable_adapters(model):` gives the
frozen base (the reference model). A `LoRALinear` is an `nn.Linear` whose `weight`/`bias` keep their
names, so base checkpoints map 1:1; its adapted forward goes through `rlhf_fast.kernels.lora_linear`.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlhf_fast import kernels

DEFAULT_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0  # scale = alpha / rank, as in the LoRA paper and PEFT
    dropout: float = 0.0  # on the adapter's input; > 0 takes the torch (cuBLAS-first) path while training
    targets: tuple[str, ...] = DEFAULT_TARGETS  # suffixes of the nn.Linear module names to adapt

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be a positive int, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("LoRAConfig.targets must name at least one module")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """nn.Linear + named low-rank adapters: y = x W^T + b + (alpha/r) (x A^T) B^T for the active one."""

    def __init__(self, base: nn.Linear, kernel_backend: str = "auto"):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: no copy, tying kept
        self.bias = base.bias
        self.kernel_backend = kernel_backend
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.adapters_disabled = False
        self.merged_adapter: str | None = None  # folded into self.weight
        self._zero_adapter: dict = {}  # (rank, dtype, device) -> zero (A, B): `region_adapter` when the base runs

    def add_adapter(self, name: str, cfg: LoRAConfig) -> None:
        w = self.weight
        a = torch.empty(cfg.rank, self.in_features, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's init; B = 0 makes the adapter start as a no-op
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=w.device, dtype=w.dtype))
        self.lora_dropout[name] = nn.Dropout(cfg.dropout)
        self.scaling[name] = cfg.scale

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.scaling[name] * (self.lora_B[name] @ self.lora_A[name])  # (out, in)

    def _runs_base(self) -> bool:
        name = self.active_adapter
        return name not in self.scaling or self.adapters_disabled or name == self.merged_adapter

    def forward(self, x, adapter: tuple | None = None):
        """adapter: None = this module's active adapter; else (A, B, scale, dropout p) as `region_adapter`
        hands it to the compiled block region."""
        if adapter is None:
            if self._runs_base():
                return F.linear(x, self.weight, self.bias)
            name = self.active_adapter
            adapter = (self.lora_A[name], self.lora_B[name], self.scaling[name], self.lora_dropout[name].p)
        a, b, scale, p = adapter
        if self.training and p > 0:  # the adapter sees dropout(x): the cuBLAS-first torch path takes it
            return kernels.lora_linear(x, self.weight, self.bias, a, b, scale, lora_input=F.dropout(x, p),
                                       backend="torch" if self.kernel_backend == "triton" else self.kernel_backend)
        return kernels.lora_linear(x, self.weight, self.bias, a, b, scale, backend=self.kernel_backend)

    def region_adapter(self) -> tuple:
        """The active adapter as explicit inputs of the compiled block region (`rlhf_fast.model.compile`):
        (A, B, scale, dropout p). Read inside the region, `active_adapter` would make dynamo compile one graph
        per adapter (policy, value, reward, none); as inputs, one graph serves them all. Running the base
        (adapters off, merged or none active) passes zero A and B: an exact no-op, y + s (x 0) 0 = y, at the
        cost of two rank-r GEMMs. Under no_grad the tensors are detached, so scoring passes share one graph
        whichever adapter's parameters train."""
        if self._runs_base():
            first = next(iter(self.lora_A.values()))  # the rank of this module's adapters: same graph shape
            key = (first.shape[0], first.dtype, first.device)
            if key not in self._zero_adapter:
                self._zero_adapter[key] = (torch.zeros_like(first, requires_grad=False),
                                           first.new_zeros(self.out_features, first.shape[0]))
            return (*self._zero_adapter[key], next(iter(self.scaling.values())), 0.0)
        name = self.active_adapter
        a, b = self.lora_A[name], self.lora_B[name]
        if not torch.is_grad_enabled():
            a, b = a.detach(), b.detach()
        return a, b, self.scaling[name], self.lora_dropout[name].p

    def extra_repr(self) -> str:
        ranks = {n: p.shape[0] for n, p in self.lora_A.items()}
        return f"{super().extra_repr()}, adapters={ranks}, active={self.active_adapter!r}"


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def adapter_names(model: nn.Module) -> list[str]:
    return list(getattr(model, "lora_configs", {}))


def add_lora(model: nn.Module, name: str, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: tuple[str, ...] = DEFAULT_TARGETS) -> LoRAConfig:
    """Add adapter `name` to every nn.Linear whose module name ends with one of `targets`.

    Freezes every non-adapter parameter of the model. The first adapter added becomes active.
    """
    cfg = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=tuple(targets))
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"adapter name must be a Python identifier, got {name!r}")
    configs: dict[str, LoRAConfig] = model.__dict__.setdefault("lora_configs", {})
    if name in configs:
        raise ValueError(f"adapter {name!r} already exists on this model")
    backend = getattr(getattr(model, "config", None), "kernel_backend", "auto")
    matched = 0
    for mod_name, module in list(model.named_modules()):
        if not any(mod_name == t or mod_name.endswith("." + t) for t in cfg.targets):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"LoRA target {mod_name!r} is a {type(module).__name__}, not an nn.Linear")
        if not isinstance(module, LoRALinear):
            parent_name, _, child = mod_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            module = LoRALinear(module, backend)
            setattr(parent, child, module)
        module.add_adapter(name, cfg)
        matched += 1
    if matched == 0:
        raise ValueError(f"no nn.Linear module matches the LoRA targets {cfg.targets}")
    configs[name] = cfg
    for pname, p in model.named_parameters():
        if ".lora_A." not in pname and ".lora_B." not in pname:
            p.requires_grad_(False)
    if all(m.active_adapter is None for _, m in lora_modules(model)):
        set_adapter(model, name)
    return cfg


def _check_adapter(model: nn.Module, name: str) -> None:
    if name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r}; this model has {adapter_names(model) or 'none'}")


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` the active one (None: run the base model)."""
    if name is not None:
        _check_adapter(model, name)
    for _, m in lora_modules(model):
        if m.merged_adapter is not None and m.merged_adapter != name:
            raise RuntimeError(f"adapter {m.merged_adapter!r} is merged into the base weights; "
                               "unmerge_adapter() before switching adapters")
        m.active_adapter = name


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the frozen base model inside the block (how reference log-probs are computed)."""
    modules = [m for _, m in lora_modules(model)]
    if any(m.merged_adapter is not None for m in modules):
        raise RuntimeError("cannot disable adapters while one is merged into the base weights; "
                           "unmerge_adapter() first")
    previous = [m.adapters_disabled for m in modules]
    for m in modules:
        m.adapters_disabled = True
    try:
        yield model
    finally:
        for m, prev in zip(modules, previous):
            m.adapters_disabled = prev


@torch.no_grad()
def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold adapter `name` into the base weights (W += scale * B A) and make it active."""
    _check_adapter(model, name)
    modules = [m for _, m in lora_modules(model)]
    if any(m.merged_adapter is not None for m in modules):
        raise RuntimeError("an adapter is already merged; unmerge_adapter() first")
    set_adapter(model, name)
    for m in modules:
        if name in m.lora_A:
            m.weight += m.delta_weight(name).to(m.weight.dtype)
            m.merged_adapter = name


@torch.no_grad()
def unmerge_adapter(model: nn.Module) -> None:
    """Undo merge_adapter (W -= scale * B A); the adapter stays active, unfused."""
    for _, m in lora_modules(model):
        if m.merged_adapter is not None:
            m.weight -= m.delta_weight(m.merged_adapter).to(m.weight.dtype)
            m.merged_adapter = None


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    _check_adapter(model, name)
    params = []
    for _, m in lora_modules(model):
        if name in m.lora_A:
            params += [m.lora_A[name], m.lora_B[name]]
    return params


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)} for adapter `name` (name-agnostic keys)."""
    _check_adapter(model, name)
    state = {}
    for mod_name, m in lora_modules(model):
        if name in m.lora_A:
            state[f"{mod_name}.lora_A"] = m.lora_A[name].detach().clone()
            state[f"{mod_name}.lora_B"] = m.lora_B[name].detach().clone()
    return state


def save_adapter(model: nn.Module, name: str, path) -> None:
    """Save one adapter (weights + its LoRAConfig) to a file."""
    state = adapter_state_dict(model, name)
    cfg = model.lora_configs[name]
    torch.save({"format": "rlhf_fast.lora/1", "config": asdict(cfg), "state": state}, Path(path))


def load_adapter(model: nn.Module, path, name: str | None = None) -> str:
    """Load an adapter saved by save_adapter under `name` (default: the file's stem); returns the name.

    The adapter is created if the model does not have it yet; shapes and module names must match.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "rlhf_fast.lora/1":
        raise ValueError(f"{path} is not an rlhf_fast LoRA adapter file")
    name = name or path.stem
    cfg = LoRAConfig(**blob["config"])
    if name not in adapter_names(model):
        add_lora(model, name, cfg.rank, cfg.alpha, cfg.dropout, cfg.targets)
    own = {mod_name: m for mod_name, m in lora_modules(model) if name in m.lora_A}
    expected = {f"{n}.lora_{ab}" for n in own for ab in "AB"}
    if set(blob["state"]) != expected:
        missing, extra = sorted(expected - set(blob["state"])), sorted(set(blob["state"]) - expected)
        raise ValueError(f"adapter file {path} does not fit this model: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}")
    with torch.no_grad():
        for key, value in blob["state"].items():
            mod_name, _, ab = key.rpartition(".")
            param = (own[mod_name].lora_A if ab == "lora_A" else own[mod_name].lora_B)[name]
            if param.shape != value.shape:
                raise ValueError(f"adapter file {path}: {key} has shape {tuple(value.shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            param.copy_(value)
    return name
