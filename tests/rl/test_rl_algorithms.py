"""Advantage estimators, weighted policy loss and DAPO reward helpers against fp64 references.

The references are plain Python loops over rows and tokens (floats, or fp64 scalars for autograd) that
share nothing with the implementation. Inputs have odd shapes, ragged masks (one row with a single
token, one with a hole) and garbage (1e4 * randn, NaN) in masked positions.
"""

import math

import pytest
import torch

from rlhf_fast.rl import (
    ADVANTAGE_ESTIMATORS,
    CRITIC_ESTIMATORS,
    GROUP_ESTIMATORS,
    LOSS_AGGREGATIONS,
    AdvantageConfig,
    compute_advantages,
    groups_with_signal,
    loss_weights,
    overlong_penalty,
    weighted_policy_loss,
)

ROWS = [  # (B=8, T=11) action masks: ragged, a single-token row, a hole
    "00111111111",
    "00111000000",
    "00100000000",
    "11111011111",
    "00011111100",
    "01111111111",
    "11111111111",
    "00000111000",
]
ATOL = RTOL = 1e-5
MAX_NEW_TOKENS = 13


def _mask(B=6):
    return torch.tensor([[c == "1" for c in row] for row in ROWS[:B]])


def _with_garbage(x, mask, gen):
    """x where mask, else NaN or 1e4 * randn."""
    junk = 1e4 * torch.randn(x.shape, generator=gen)
    junk = torch.where(torch.rand(x.shape, generator=gen) < 0.5, float("nan"), junk)
    return torch.where(mask, x, junk.to(x.dtype))


def _positions(mask_row):
    return [t for t, on in enumerate(mask_row.tolist()) if on]


# ------------------------------------------------------------------------------------------------
# fp64 references


def _ref_scores(rewards, mask):
    return [sum(float(rewards[b, t]) for t in _positions(mask[b])) for b in range(mask.shape[0])]


def _ref_group(rewards, mask, k, estimator, std_eps):
    scores = _ref_scores(rewards, mask)
    adv = []
    for b, s in enumerate(scores):
        group = scores[b // k * k : b // k * k + k]
        mean = sum(group) / k
        if estimator == "grpo":
            std = math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1))
            adv.append((s - mean) / (std + std_eps))
        elif estimator == "dr_grpo":
            adv.append(s - mean)
        else:  # rloo
            adv.append(s - (sum(group) - s) / (k - 1))
    return adv, scores  # per row; broadcast over the row's tokens


def _ref_gae(rewards, values, mask, gamma, lam):
    B, T = mask.shape
    adv, ret = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for b in range(B):
        running, next_value = 0.0, 0.0
        for t in reversed(_positions(mask[b])):
            r, v = float(rewards[b, t]), float(values[b, t])
            running = r + gamma * next_value - v + gamma * lam * running
            next_value = v
            adv[b][t], ret[b][t] = running, running + v
    return adv, ret


def _ref_reinforce_pp(rewards, mask, gamma, std_eps):
    B, T = mask.shape
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        running = 0.0
        for t in reversed(_positions(mask[b])):
            running = float(rewards[b, t]) + gamma * running
            ret[b][t] = running
    tokens = [ret[b][t] for b in range(B) for t in _positions(mask[b])]
    mean = sum(tokens) / len(tokens)
    var = sum((g - mean) ** 2 for g in tokens) / (len(tokens) - 1)
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in _positions(mask[b]):
            adv[b][t] = (ret[b][t] - mean) / math.sqrt(var + std_eps**2)
    return adv, ret


def _ref_weights(mask, aggregation, max_new_tokens=MAX_NEW_TOKENS):
    B, T = mask.shape
    lengths = [len(_positions(mask[b])) for b in range(B)]
    rows_with_tokens = sum(1 for n in lengths if n > 0)
    w = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in _positions(mask[b]):
            if aggregation == "token_mean":
                w[b][t] = 1.0 / sum(lengths)
            elif aggregation == "seq_mean":
                w[b][t] = 1.0 / (rows_with_tokens * lengths[b])
            else:
                w[b][t] = 1.0 / (B * max_new_tokens)
    return w


def _ref_policy_loss(lp, old, adv, ref, mask, w, clip_low, clip_high, kl_coef):
    """fp64 scalar loop; lp is an fp64 leaf so autograd gives the reference gradient."""
    loss = torch.zeros((), dtype=torch.float64)
    n_clipped = n = 0
    approx_kl = 0.0
    for b in range(mask.shape[0]):
        for t in _positions(mask[b]):
            log_ratio = torch.clamp(lp[b, t] - float(old[b, t]), -20.0, 20.0)
            ratio = torch.exp(log_ratio)
            a = float(adv[b, t])
            pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
            loss = loss + w[b][t] * pg
            if ref is not None:
                d = float(ref[b, t]) - lp[b, t]
                loss = loss + kl_coef * w[b][t] * (torch.exp(d) - d - 1)
            r = float(ratio.detach())
            n_clipped += r < 1 - clip_low or r > 1 + clip_high
            approx_kl += 0.5 * float(log_ratio.detach()) ** 2
            n += 1
    return loss, n_clipped / n, approx_kl / n


def _close(got, want, atol=ATOL, rtol=RTOL):
    want = torch.as_tensor(want, dtype=torch.float64)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------------
# advantage estimators


def _rewards(B=6, T=11, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    mask = _mask(B)
    rewards = _with_garbage(torch.randn(B, T, generator=gen).to(dtype), mask, gen)
    values = _with_garbage(torch.randn(B, T, generator=gen).to(dtype), mask, gen)
    return rewards, values, mask


def test_registry_and_estimator_sets():
    assert set(ADVANTAGE_ESTIMATORS) >= {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"}
    assert set(CRITIC_ESTIMATORS) | set(GROUP_ESTIMATORS) <= set(ADVANTAGE_ESTIMATORS)
    assert CRITIC_ESTIMATORS == ("gae",) and set(GROUP_ESTIMATORS) == {"grpo", "dr_grpo", "rloo"}
    assert AdvantageConfig().std_eps == 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_match_fp64_reference(estimator, dtype):
    rewards, _, mask = _rewards(dtype=dtype)
    adv, ret = compute_advantages(AdvantageConfig(estimator, group_size=3), rewards, mask)
    want_adv, want_ret = _ref_group(rewards, mask, 3, estimator, std_eps=1e-4)
    full = lambda per_row: [[per_row[b] if on else 0.0 for on in mask[b].tolist()] for b in range(6)]
    _close(adv, full(want_adv))
    _close(ret, full(want_ret))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7)])
def test_gae_matches_fp64_reference(gamma, lam):
    rewards, values, mask = _rewards(seed=1)
    adv, ret = compute_advantages(AdvantageConfig("gae", gamma=gamma, lam=lam, backend="torch"), rewards, mask, values)
    want_adv, want_ret = _ref_gae(rewards, values, mask, gamma, lam)
    _close(adv, want_adv)
    _close(ret, want_ret)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_fp64_reference(gamma, dtype):
    rewards, _, mask = _rewards(seed=2, dtype=dtype)
    adv, ret = compute_advantages(AdvantageConfig("reinforce_pp", gamma=gamma), rewards, mask)
    want_adv, want_ret = _ref_reinforce_pp(rewards, mask, gamma, std_eps=1e-4)
    _close(adv, want_adv)
    _close(ret, want_ret)
    sel = adv[mask].double()  # globally whitened
    assert abs(sel.mean().item()) < 1e-5 and abs(sel.var().item() - 1) < 1e-4


def test_reinforce_pp_ignores_group_size_and_discounts():
    rewards, _, mask = _rewards(seed=3)
    base, _ = compute_advantages(AdvantageConfig("reinforce_pp"), rewards, mask)
    grouped, _ = compute_advantages(AdvantageConfig("reinforce_pp", group_size=4), rewards, mask)  # 6 % 4 != 0
    assert torch.equal(base, grouped)
    discounted, _ = compute_advantages(AdvantageConfig("reinforce_pp", gamma=0.5), rewards, mask)
    assert (discounted - base).abs().max().item() > 1e-2


@pytest.mark.parametrize("estimator", sorted(ADVANTAGE_ESTIMATORS))
def test_every_estimator_is_fp32_finite_and_zero_off_mask(estimator):
    rewards, values, mask = _rewards(seed=4, dtype=torch.bfloat16)
    cfg = AdvantageConfig(estimator, group_size=3, backend="torch")
    adv, ret = compute_advantages(cfg, rewards, mask, values if estimator in CRITIC_ESTIMATORS else None)
    for x in (adv, ret):
        assert x.dtype == torch.float32 and x.shape == mask.shape
        assert torch.isfinite(x).all() and (x[~mask] == 0).all()


def test_dr_grpo_differs_from_grpo_by_the_group_std():
    rewards, _, mask = _rewards(seed=5)
    grpo, _ = compute_advantages(AdvantageConfig("grpo", group_size=3), rewards, mask)
    dr, _ = compute_advantages(AdvantageConfig("dr_grpo", group_size=3), rewards, mask)
    assert (grpo - dr).abs().max().item() > 1e-2
    scores = torch.tensor(_ref_scores(rewards, mask)).view(2, 3)
    std = scores.std(1, keepdim=True).expand(2, 3).reshape(6, 1).expand_as(mask)
    torch.testing.assert_close(grpo[mask], dr[mask] / (std[mask] + 1e-4))


def test_grpo_std_eps_keeps_score_noise_small():
    """Scores equal up to fp noise: std_eps 1e-4 gives ~1e-3 advantages where 1e-6 gave O(1) ones."""
    mask = torch.ones(3, 4, dtype=torch.bool)
    rewards = torch.zeros(3, 4)
    rewards[:, -1] = 1.0 + torch.tensor([0.0, 1e-7, -1e-7])
    adv, _ = compute_advantages(AdvantageConfig("grpo", group_size=3), rewards, mask)
    assert adv.abs().max().item() < 1e-2
    noisy, _ = compute_advantages(AdvantageConfig("grpo", group_size=3, std_eps=1e-6), rewards, mask)
    assert noisy.abs().max().item() > 0.1


def test_advantage_config_errors():
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'vtrace'.*reinforce_pp"):
        AdvantageConfig("vtrace")
    for name in GROUP_ESTIMATORS:
        with pytest.raises(ValueError, match=f"{name} needs group_size >= 2"):
            AdvantageConfig(name, group_size=1)
    with pytest.raises(ValueError, match="std_eps must be > 0"):
        AdvantageConfig("grpo", group_size=2, std_eps=0.0)
    rewards, _, mask = _rewards(B=6)
    with pytest.raises(ValueError, match="whole number of groups of 4"):
        compute_advantages(AdvantageConfig("dr_grpo", group_size=4), rewards, mask)


# ------------------------------------------------------------------------------------------------
# loss weights and the weighted policy loss


def _policy_inputs(B=6, T=11, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    mask = _mask(B)
    old = -2 * torch.rand(B, T, generator=gen)
    t = dict(
        logprobs=old + 0.3 * torch.randn(B, T, generator=gen),  # ratios on both sides of the clip range
        old_logprobs=old,
        advantages=torch.randn(B, T, generator=gen),
        ref_logprobs=old + 0.2 * torch.randn(B, T, generator=gen),
    )
    return {k: _with_garbage(v.to(dtype), mask, gen) for k, v in t.items()}, mask


@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_loss_weights_match_reference(aggregation):
    for B in (6, 8):
        mask = _mask(B)
        w = loss_weights(mask, aggregation, max_new_tokens=MAX_NEW_TOKENS)
        _close(w, _ref_weights(mask, aggregation), atol=1e-7)
    seq_mean = loss_weights(mask, "seq_mean")
    assert abs(seq_mean.sum().item() - 1) < 1e-6  # a mean of means: weights sum to 1


def test_seq_mean_counts_only_rows_with_tokens():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 0]], dtype=torch.bool)
    w = loss_weights(mask, "seq_mean")
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.25, 0], [0, 0, 0], [0, 0.5, 0]]))
    assert loss_weights(torch.zeros(2, 3, dtype=torch.bool), "token_mean").abs().sum().item() == 0


def test_aggregations_differ_on_ragged_lengths():
    mask = _mask()
    token, seq = loss_weights(mask, "token_mean"), loss_weights(mask, "seq_mean")
    assert (token - seq).abs().max().item() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clip_low,clip_high", [(0.2, None), (0.2, 0.28), (0.1, 0.4)])
@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_weighted_policy_loss_matches_fp64_reference(aggregation, clip_low, clip_high, dtype):
    t, mask = _policy_inputs(seed=1, dtype=dtype)
    w = loss_weights(mask, aggregation, max_new_tokens=MAX_NEW_TOKENS)
    w = _with_garbage(w, mask, torch.Generator().manual_seed(7))  # the loss must select, not trust the zeros
    lp = t["logprobs"].clone().requires_grad_(True)
    loss, metrics = weighted_policy_loss(
        lp, t["old_logprobs"], t["advantages"], mask, w,
        clip_low=clip_low, clip_high=clip_high, ref_logprobs=t["ref_logprobs"], kl_coef=0.1,
    )  # fmt: skip
    (1.7 * loss).backward()

    high = clip_low if clip_high is None else clip_high
    ref_lp = t["logprobs"].double().requires_grad_(True)
    args = (t["old_logprobs"], t["advantages"], t["ref_logprobs"], mask, _ref_weights(mask, aggregation))
    want, clip_frac, approx_kl = _ref_policy_loss(ref_lp, *args, clip_low, high, kl_coef=0.1)
    (1.7 * want).backward()
    policy_only, _, _ = _ref_policy_loss(ref_lp.detach(), *args, clip_low, high, kl_coef=0.0)
    no_ref = _ref_policy_loss(ref_lp.detach(), args[0], args[1], None, mask, args[4], clip_low, high, 0.0)[0]

    _close(loss, want)
    _close(metrics["policy_loss"], policy_only)
    _close(metrics["policy_loss"], no_ref)
    _close(metrics["kl"], (want - policy_only) / 0.1, atol=1e-4)
    _close(metrics["clip_frac"], clip_frac, atol=1e-6)
    _close(metrics["approx_kl"], approx_kl)
    assert 0 < clip_frac < 1 and all(not m.requires_grad for m in metrics.values())
    assert lp.grad.dtype == dtype
    assert torch.isfinite(lp.grad).all() and (lp.grad[~mask] == 0).all()
    _close(lp.grad.float(), ref_lp.grad, atol=1e-5 if dtype == torch.float32 else 1e-3)


def test_weighted_policy_loss_without_reference_has_zero_kl():
    t, mask = _policy_inputs(seed=2)
    w = loss_weights(mask, "token_mean")
    loss, metrics = weighted_policy_loss(t["logprobs"], t["old_logprobs"], t["advantages"], mask, w, kl_coef=0.5)
    assert metrics["kl"].item() == 0 and torch.equal(loss, metrics["policy_loss"])


@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_micro_batch_slices_sum_to_the_minibatch_loss(aggregation):
    t, mask = _policy_inputs(B=8, seed=3)
    w = loss_weights(mask, aggregation, max_new_tokens=MAX_NEW_TOKENS)
    kw = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05)

    def run(slices):
        total, grads = torch.zeros(()), []
        for sl in slices:
            lp = t["logprobs"][sl].clone().requires_grad_(True)
            args = (lp, t["old_logprobs"][sl], t["advantages"][sl], mask[sl], w[sl])
            loss, _ = weighted_policy_loss(*args, ref_logprobs=t["ref_logprobs"][sl], **kw)
            loss.backward()
            total, grads = total + loss.detach(), grads + [lp.grad]
        return total, torch.cat(grads)

    whole, whole_grad = run([slice(0, 8)])
    parts, parts_grad = run([slice(0, 3), slice(3, 6), slice(6, 8)])
    torch.testing.assert_close(parts, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(parts_grad, whole_grad, atol=1e-6, rtol=0)
    assert torch.isfinite(whole_grad).all() and (whole_grad[~mask] == 0).all()
    if aggregation != "seq_sum":  # weights recomputed per micro-batch break the invariance
        naive = 0
        for sl in (slice(0, 3), slice(3, 6), slice(6, 8)):
            w_sl = loss_weights(mask[sl], aggregation)
            args = (t["logprobs"][sl], t["old_logprobs"][sl], t["advantages"][sl], mask[sl], w_sl)
            naive = naive + weighted_policy_loss(*args, ref_logprobs=t["ref_logprobs"][sl], **kw)[0] / 3
        assert (naive - whole).abs().item() > 1e-4


def test_clip_high_matters_for_positive_advantages():
    mask = torch.ones(1, 2, dtype=torch.bool)
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    w = loss_weights(mask, "token_mean")
    ratio = 1.25
    lp_sym = torch.tensor([[math.log(ratio), 0.0]], requires_grad=True)
    lp_high = lp_sym.detach().clone().requires_grad_(True)
    sym, m_sym = weighted_policy_loss(lp_sym, old, adv, mask, w, clip_low=0.2)
    high, m_high = weighted_policy_loss(lp_high, old, adv, mask, w, clip_low=0.2, clip_high=0.28)
    (sym + high).backward()
    torch.testing.assert_close(sym, torch.tensor((-1.2 + 1.0) / 2))  # clipped at 1 + clip_low
    torch.testing.assert_close(high, torch.tensor((-1.25 + 1.0) / 2))  # inside 1 + clip_high
    assert lp_sym.grad[0, 0].item() == 0 and lp_high.grad[0, 0].item() < 0
    assert m_sym["clip_frac"].item() == 0.5 and m_high["clip_frac"].item() == 0


def test_loss_errors():
    mask = _mask()
    with pytest.raises(ValueError, match=r"unknown loss aggregation 'sum'.*token_mean.*seq_mean.*seq_sum"):
        loss_weights(mask, "sum")
    with pytest.raises(ValueError, match="seq_sum aggregation needs max_new_tokens"):
        loss_weights(mask, "seq_sum")
    x = torch.zeros(6, 11)
    w = loss_weights(mask, "token_mean")
    with pytest.raises(ValueError, match="0 < clip_low < 1"):
        weighted_policy_loss(x, x, x, mask, w, clip_low=1.0)
    with pytest.raises(ValueError, match="must share a"):
        weighted_policy_loss(x, x, x, mask, w[:, :5])


# ------------------------------------------------------------------------------------------------
# DAPO reward helpers


def _ref_overlong(lengths, truncated, max_new_tokens, buffer, factor):
    out = []
    for n, cut in zip(lengths.tolist(), truncated.tolist(), strict=True):
        if cut:
            out.append(-factor)
        elif n <= max_new_tokens - buffer:
            out.append(0.0)
        else:
            out.append((max_new_tokens - buffer - n) / buffer * factor)
    return out


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_overlong_penalty_matches_reference(factor):
    lengths = torch.tensor([0, 5, 11, 12, 13, 15, 16, 16, 9])
    truncated = torch.tensor([False] * 7 + [True, False])
    got = overlong_penalty(lengths, truncated, max_new_tokens=16, buffer=5, factor=factor)
    assert got.shape == (9,)
    _close(got, _ref_overlong(lengths, truncated, 16, 5, factor), atol=1e-6)
    assert got[6].item() == pytest.approx(-factor) and got[3].item() < 0 and got[2].item() == 0


def test_overlong_penalty_errors():
    n, cut = torch.tensor([3, 4]), torch.tensor([False, True])
    for buffer in (0, 16, 20):
        with pytest.raises(ValueError, match="0 < buffer < max_new_tokens"):
            overlong_penalty(n, cut, max_new_tokens=16, buffer=buffer)
    with pytest.raises(ValueError, match="must both be"):
        overlong_penalty(n, cut[:1], max_new_tokens=16, buffer=4)


def test_groups_with_signal():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.5, -1.0, -1.0, -1.0])
    want = [any(float(s) != float(scores[g * 3]) for s in scores[g * 3 : g * 3 + 3]) for g in range(4)]
    got = groups_with_signal(scores, 3)
    assert got.dtype == torch.bool and got.tolist() == want == [False, True, True, False]
    assert groups_with_signal(scores, 1).tolist() == [False] * 12
    with pytest.raises(ValueError, match="multiple of group_size"):
        groups_with_signal(scores, 5)
