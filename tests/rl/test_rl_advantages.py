import os

import pytest
import torch

from rlhf_fast import kernels
from rlhf_fast.rl import (
    ADVANTAGE_ESTIMATORS,
    AdvantageConfig,
    compute_advantages,
    masked_mean,
    masked_var,
    ppo_loss,
    register_advantage_estimator,
    shape_rewards,
)


def _batch(B=6, T=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(T).unsqueeze(0) >= torch.randint(0, 4, (B, 1), generator=gen)  # left padding
    mask &= torch.rand(B, T, generator=gen) > 0.15
    rewards = torch.where(mask, torch.randn(B, T, generator=gen), torch.tensor(float("nan")))
    values = torch.where(mask, torch.randn(B, T, generator=gen), torch.tensor(1e4))
    return rewards, values, mask


def test_registry_holds_the_three_estimators():
    assert {"gae", "grpo", "rloo"} <= set(ADVANTAGE_ESTIMATORS)
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("gae")(lambda *a: a)


def test_gae_estimator_calls_the_kernel_and_whitens():
    rewards, values, mask = _batch()
    cfg = AdvantageConfig("gae", gamma=0.99, lam=0.9, backend="torch")
    adv, ret = compute_advantages(cfg, rewards, mask, values)
    want_adv, want_ret = kernels.gae(rewards, values, mask, 0.99, 0.9, backend="torch")
    assert torch.equal(adv, want_adv) and torch.equal(ret, want_ret)
    white, _ = compute_advantages(AdvantageConfig("gae", whiten=True, backend="torch"), rewards, mask, values)
    assert torch.isfinite(white).all() and (white[~mask] == 0).all()
    assert abs(masked_mean(white, mask).item()) < 1e-5 and abs(masked_var(white, mask).item() - 1) < 1e-4
    with pytest.raises(ValueError, match="needs critic values"):
        compute_advantages(cfg, rewards, mask)


def test_grpo_group_normalises_sequence_scores():
    rewards, _, mask = _batch(B=6)
    adv, ret = compute_advantages(AdvantageConfig("grpo", group_size=3), rewards, mask)
    scores = torch.stack([rewards[b][mask[b]].sum() for b in range(6)]).view(2, 3)
    want = (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-4)
    for b in range(6):
        torch.testing.assert_close(adv[b][mask[b]], want.view(-1)[b].expand(int(mask[b].sum())))
        torch.testing.assert_close(ret[b][mask[b]], scores.view(-1)[b].expand(int(mask[b].sum())))
    assert (adv[~mask] == 0).all() and torch.isfinite(adv).all()
    # identical scores in a group: zero advantage, not NaN
    same = torch.where(mask, 1.0, 0.0) / mask.sum(1, keepdim=True).clamp(min=1)
    flat, _ = compute_advantages(AdvantageConfig("grpo", group_size=3), same, mask)
    assert flat.abs().max().item() < 1e-4


def test_rloo_leave_one_out_baseline():
    rewards, _, mask = _batch(B=8, seed=3)
    adv, _ = compute_advantages(AdvantageConfig("rloo", group_size=4), rewards, mask)
    scores = torch.stack([rewards[b][mask[b]].sum() for b in range(8)])
    for b in range(8):
        g = b // 4 * 4
        others = torch.cat([scores[g:b], scores[b + 1 : g + 4]])
        torch.testing.assert_close(adv[b][mask[b]], (scores[b] - others.mean()).expand(int(mask[b].sum())))
    per_seq = torch.stack([adv[b][mask[b]][0] for b in range(8)]).view(2, 4)
    torch.testing.assert_close(per_seq.sum(1), torch.zeros(2), atol=1e-5, rtol=0)  # baselines cancel


def test_config_validation():
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        AdvantageConfig("vtrace")
    with pytest.raises(ValueError, match="rloo needs group_size >= 2"):
        AdvantageConfig("rloo")
    with pytest.raises(ValueError, match="gamma and lam"):
        AdvantageConfig(gamma=1.5)
    rewards, _, mask = _batch(B=5)
    with pytest.raises(ValueError, match="whole number of groups"):
        compute_advantages(AdvantageConfig("grpo", group_size=2), rewards, mask)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="needs TRITON_INTERPRET=1")
def test_ppo_pipeline_triton_matches_torch():
    """shape_rewards -> gae estimator -> fused ppo_loss: the triton backends agree with the torch ones."""
    B, T = 4, 19
    gen = torch.Generator().manual_seed(5)
    mask = torch.arange(T).unsqueeze(0) >= torch.randint(0, 6, (B, 1), generator=gen)
    logprobs, ref_logprobs = -torch.rand(B, T, generator=gen), -torch.rand(B, T, generator=gen)
    values = torch.randn(B, T, generator=gen)
    rewards, _ = shape_rewards(torch.randn(B, generator=gen), logprobs, ref_logprobs, mask, kl_coef=0.05)
    results = {}
    for backend in ("torch", "triton"):
        cfg = AdvantageConfig("gae", gamma=1.0, lam=0.95, whiten=True, backend=backend)
        adv, ret = compute_advantages(cfg, rewards, mask, values)
        new_lp = (
            logprobs + 0.1 * torch.randn(B, T, generator=torch.Generator().manual_seed(9))
        ).requires_grad_()
        loss, metrics = ppo_loss(new_lp, logprobs, adv, values, values, ret, mask, backend=backend)
        loss.backward()
        results[backend] = (adv, ret, loss, new_lp.grad, metrics["clip_frac"])
    for got, want in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_rows_the_mask_leaves_empty_are_no_members_of_their_group(estimator):
    """A row with no token in the mask is no sample: a group of 4 with row 1 empty gives its other rows the
    advantages a group of the 3 alone would (not a score of 0 in the baseline); one member alone gets none."""
    rewards, _, mask = _batch(B=8, T=7, seed=3)
    loss_mask = mask.clone()
    loss_mask[1] = False  # group 0 keeps rows 0, 2, 3
    loss_mask[5:8] = False  # group 1 keeps row 4 alone
    adv, _ = compute_advantages(AdvantageConfig(estimator, group_size=4), rewards, loss_mask)
    keep = [0, 2, 3]
    alone, _ = compute_advantages(AdvantageConfig(estimator, group_size=3), rewards[keep], loss_mask[keep])
    torch.testing.assert_close(adv[keep], alone, rtol=1e-5, atol=1e-6)
    assert not adv[1].any() and not adv[4:].any()


@pytest.mark.parametrize("estimator, whiten", [("gae", True), ("reinforce_pp", False)])
def test_rows_the_mask_leaves_empty_are_not_in_the_whitening_statistics(estimator, whiten):
    rewards, values, mask = _batch(B=6, T=9, seed=4)
    loss_mask = mask.clone()
    loss_mask[2] = False
    cfg = AdvantageConfig(estimator, whiten=whiten, backend="torch")
    vals = values if estimator == "gae" else None
    adv, _ = compute_advantages(cfg, rewards, loss_mask, vals)
    keep = [0, 1, 3, 4, 5]
    alone, _ = compute_advantages(cfg, rewards[keep], loss_mask[keep], None if vals is None else vals[keep])
    torch.testing.assert_close(adv[keep], alone, rtol=1e-5, atol=1e-6)
    assert not adv[2].any()


def _whiten_on_two_ranks(rank, world, init_file, rewards, mask, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        def all_reduce(t):
            t = t.clone()
            dist.all_reduce(t)
            return t

        rows = slice(rank * 3, rank * 3 + 3)
        for estimator in ("reinforce_pp", "gae"):
            cfg = AdvantageConfig(estimator, whiten=True, backend="torch")
            values = torch.zeros_like(rewards[rows]) if estimator == "gae" else None
            adv, _ = compute_advantages(cfg, rewards[rows], mask[rows], values, all_reduce=all_reduce)
            torch.save(adv, f"{out}.{estimator}.{rank}")
    finally:
        dist.destroy_process_group()


def test_whitening_statistics_are_those_of_every_rank(tmp_path):
    """2 CPU ranks (gloo), 3 rows each: each rank's whitened advantages are its rows of one process whitening
    all 6 rows (REINFORCE++'s batch baseline, GAE's whitening)."""
    import torch.multiprocessing as mp

    rewards, _, mask = _batch(B=6, T=9, seed=5)
    out = tmp_path / "adv"
    mp.spawn(_whiten_on_two_ranks, args=(2, tmp_path / "init", rewards, mask, out), nprocs=2, join=True)
    for estimator in ("reinforce_pp", "gae"):
        cfg = AdvantageConfig(estimator, whiten=True, backend="torch")
        values = torch.zeros_like(rewards) if estimator == "gae" else None
        whole, _ = compute_advantages(cfg, rewards, mask, values)
        split = torch.cat([torch.load(f"{out}.{estimator}.{r}") for r in range(2)])
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
        alone, _ = compute_advantages(cfg, rewards[:3], mask[:3], None if values is None else values[:3])
        assert not torch.allclose(alone, whole[:3], atol=1e-3)  # a rank on its own whitens differently
