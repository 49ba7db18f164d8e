import math

import pytest
import torch

from rlhf_fast import kernels
from rlhf_fast.rl import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimator,
    kl_k1,
    kl_k2,
    kl_k3,
    make_kl_controller,
    masked_mean,
)


def test_k1_k3_are_unbiased_and_k2_k3_nonnegative():
    """Exact expectations over a categorical policy: E_p[k1] = E_p[k3] = KL(p || q)."""
    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(17, generator=gen, dtype=torch.float64), 0)
    logq = torch.log_softmax(torch.randn(17, generator=gen, dtype=torch.float64), 0)
    p = logp.exp()
    kl = (p * (logp - logq)).sum()
    torch.testing.assert_close((p * kl_k1(logp, logq)).sum(), kl)
    torch.testing.assert_close((p * kl_k3(logp, logq)).sum(), kl)
    assert (kl_k2(logp, logq) >= 0).all() and (kl_k3(logp, logq) >= -1e-12).all()
    assert kl_estimator("k2") is kl_k2
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimator("k4")


def test_k3_is_the_ppo_kernel_kl_term():
    gen = torch.Generator().manual_seed(1)
    lp, ref = -torch.rand(3, 11, generator=gen) * 2, -torch.rand(3, 11, generator=gen) * 2
    mask = torch.rand(3, 11, generator=gen) > 0.3
    z = torch.zeros(3, 11)
    out = kernels.ppo_loss(lp, lp, z, z, z, z, mask, ref_logprobs=ref, backend="torch")
    torch.testing.assert_close(out.kl, masked_mean(kl_k3(lp, ref), mask))


def test_adaptive_controller_follows_ziegler():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 256)  # error 1.0, clipped to +0.2
    assert math.isclose(ctl.value, 0.1 * (1 + 0.2 * 256 / 10000))
    before = ctl.value
    ctl.update(6.6, 100)  # error +0.1
    assert math.isclose(ctl.value, before * (1 + 0.1 * 100 / 10000))
    before = ctl.value
    ctl.update(0.0, 1000)  # error -1, clipped to -0.2
    assert math.isclose(ctl.value, before * (1 - 0.2 * 1000 / 10000))
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 10) == 0.05 == fixed.value
    assert isinstance(make_kl_controller(0.1), FixedKLController)
    assert isinstance(make_kl_controller(0.1, target=6.0), AdaptiveKLController)
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, target=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        FixedKLController(-1.0)


def test_default_kl_horizon_lets_the_coefficient_move_over_the_run():
    """The default horizon scales with the run: a run whose KL stays far above target can raise the coefficient
    several-fold (the old fixed 10,000 moved it ~2.6% over the demo's 40 x 32 samples), and far below it lower it."""
    from rlhf_fast.trainers.rl_config import RLSettings

    rl = RLSettings(iterations=40, rollout_batch_size=32)
    assert rl.kl_horizon_samples() == 128 and rl.kl_horizon_samples(world_size=2) == 256
    assert RLSettings(kl_horizon=10000).kl_horizon_samples() == 10000
    up, down = (make_kl_controller(0.1, target=2.0, horizon=rl.kl_horizon_samples()) for _ in range(2))
    for _ in range(rl.iterations):
        up.update(20.0, n_steps=rl.rows)
        down.update(0.0, n_steps=rl.rows)
    assert up.value > 0.5 and down.value < 0.02
