"""Per-token KL estimators between the policy and the reference, and KL-coefficient controllers.

Estimators of KL(pi || ref) from samples of pi (Schulman, "Approximating KL divergence", 2020), with
log_ratio = logprobs - ref_logprobs:
  k1 = log_ratio                        unbiased, high variance, can be negative
  k2 = 0.5 * log_ratio**2               biased, low variance, >= 0
  k3 = exp(-log_ratio) + log_ratio - 1  unbiased, low variance, >= 0 (the PPO kernel's `kl` term)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimator(name: str) -> KLEstimator:
    try:
        return KL_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown KL estimator {name!r}; choose one of {sorted(KL_ESTIMATORS)}") from None


@dataclass
class FixedKLController:
    """A constant KL coefficient; `update` is a no-op so trainers treat both controllers alike."""

    value: float

    def __post_init__(self):
        if self.value < 0:
            raise ValueError(f"kl coefficient must be >= 0, got {self.value}")

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019 (Fine-Tuning LMs from Human Preferences), eq. 2: proportional control of
    the KL coefficient towards `target`, error clipped to +-20%, stepped by n_steps / horizon."""

    value: float
    target: float
    horizon: int = 10000

    def __post_init__(self):
        if self.value < 0 or self.target <= 0 or self.horizon <= 0:
            raise ValueError(
                f"adaptive KL needs value >= 0, target > 0, horizon > 0; got value={self.value}, "
                f"target={self.target}, horizon={self.horizon}"
            )

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def make_kl_controller(init_kl_coef: float, target: float | None = None, horizon: int = 10000):
    """Fixed controller when `target` is None, else the adaptive one."""
    if target is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, target, horizon)
