import pytest
import torch
import torch.nn.functional as F

from rlhf_fast import kernels
from rlhf_fast.rl import (
    POLICY_LOSSES,
    clipped_policy_loss,
    dual_clip_policy_loss,
    entropy_loss,
    pairwise_ranking_loss,
    policy_loss_fn,
    ppo_loss,
    value_loss,
)


def _inputs(B=4, T=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=gen) > 0.3
    nan = torch.tensor(float("nan"))
    old_lp = -torch.rand(B, T, generator=gen) * 2
    t = dict(
        logprobs=old_lp + 0.3 * torch.randn(B, T, generator=gen),
        old_logprobs=old_lp,
        advantages=torch.randn(B, T, generator=gen),
        values=torch.randn(B, T, generator=gen),
        old_values=torch.randn(B, T, generator=gen),
        returns=torch.randn(B, T, generator=gen),
    )
    return {k: torch.where(mask, v, nan) for k, v in t.items()}, mask


def _reference(t, mask, **kw):
    lp = t["logprobs"].clone().requires_grad_(True)
    v = t["values"].clone().requires_grad_(True)
    out = kernels.ppo_loss(
        lp, t["old_logprobs"], t["advantages"], v, t["old_values"], t["returns"], mask, backend="torch", **kw
    )
    return out, lp, v


def test_clipped_policy_and_value_losses_match_kernel_reference():
    t, mask = _inputs()
    ref, ref_lp, ref_v = _reference(t, mask, clip_eps=0.2, value_clip_eps=0.2)
    (ref.policy_loss + ref.value_loss).backward()
    lp = t["logprobs"].clone().requires_grad_(True)
    v = t["values"].clone().requires_grad_(True)
    pl, pm = clipped_policy_loss(lp, t["old_logprobs"], t["advantages"], mask, clip_eps=0.2)
    vl, vm = value_loss(v, t["old_values"], t["returns"], mask, clip_eps=0.2)
    (pl + vl).backward()
    torch.testing.assert_close(pl, ref.policy_loss)
    torch.testing.assert_close(vl, ref.value_loss)
    torch.testing.assert_close(pm["clip_frac"], ref.clip_frac)
    torch.testing.assert_close(pm["approx_kl"], ref.approx_kl)
    torch.testing.assert_close(lp.grad, ref_lp.grad)
    torch.testing.assert_close(v.grad, ref_v.grad)
    assert 0 < vm["value_clip_frac"].item() < 1 and not pm["clip_frac"].requires_grad
    plain, _ = value_loss(v, t["old_values"], t["returns"], mask, clip_eps=None)
    sel = (t["values"] - t["returns"])[mask]
    torch.testing.assert_close(plain, 0.5 * (sel**2).mean())


def test_dual_clip_caps_negative_advantages():
    mask = torch.ones(1, 3, dtype=torch.bool)
    old = torch.zeros(1, 3)
    lp = torch.tensor([[5.0, 5.0, 0.1]])  # ratio e^5 on the first two tokens
    adv = torch.tensor([[-1.0, 1.0, -1.0]])
    loss, _ = dual_clip_policy_loss(lp, old, adv, mask, clip_eps=0.2, dual_clip=3.0)
    clip, _ = clipped_policy_loss(lp, old, adv, mask, clip_eps=0.2)
    ratio = torch.exp(torch.tensor(0.1))
    # token 0: max(e^5, 1.2) capped at 3; token 1: max(-e^5, -1.2) = -1.2; token 2: unclipped ratio
    torch.testing.assert_close(loss, (3.0 - 1.2 + ratio) / 3)
    torch.testing.assert_close(clip, (torch.exp(torch.tensor(5.0)) - 1.2 + ratio) / 3)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        dual_clip_policy_loss(lp, old, adv, mask, dual_clip=1.0)


def test_policy_loss_registry():
    assert policy_loss_fn("clip") is clipped_policy_loss and set(POLICY_LOSSES) >= {"clip", "dual_clip"}
    with pytest.raises(ValueError, match="unknown policy loss"):
        policy_loss_fn("ppo2")


def test_entropy_and_pairwise_ranking_losses():
    entropy = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    loss, m = entropy_loss(entropy, mask)
    assert loss.item() == -3.0 and m["entropy"].item() == 3.0
    chosen = torch.tensor([1.0, 0.5, -2.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.5, -3.0])
    loss, m = pairwise_ranking_loss(chosen, rejected)
    torch.testing.assert_close(loss, -F.logsigmoid(chosen - rejected).mean())
    assert abs(m["accuracy"].item() - 2 / 3) < 1e-6
    loss.backward()
    assert chosen.grad is not None and (chosen.grad < 0).all()
    with_margin, _ = pairwise_ranking_loss(chosen, rejected, margin=torch.ones(3))
    assert with_margin.item() > loss.item()
    with pytest.raises(ValueError, match=r"must both be \(B,\)"):
        pairwise_ranking_loss(chosen, rejected[:2])


def test_fused_ppo_loss_wrapper():
    t, mask = _inputs(seed=2)
    ref = kernels.ppo_loss(*t.values(), mask, ref_logprobs=t["old_logprobs"], kl_coef=0.1, backend="torch")
    loss, metrics = ppo_loss(*t.values(), mask, ref_logprobs=t["old_logprobs"], kl_coef=0.1, backend="torch")
    torch.testing.assert_close(loss, ref.loss)
    assert set(metrics) == {"policy_loss", "value_loss", "kl", "clip_frac", "approx_kl"}
    torch.testing.assert_close(metrics["kl"], ref.kl)
