"""DPO-family preference losses against fp64 references.

The references are written per pair from the papers' formulas and share nothing with the
implementation; each takes a maths module `m`: `math` on Python floats for values, `torch` on fp64
0-d tensors for autograd gradients. The B=7 pairs have ragged lengths, one-token responses, logits
near +50 and -50, and a pair with mean log-probs -4e-4 vs -6e-4: ORPO's log(1 - exp(a)) near its
pole (log1p(-exp(a)) loses ~4 digits there in fp32) with log odds that do not saturate.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast.rl import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE,
    preference_loss_fn,
    preference_metrics,
    register_preference_loss,
)

ATOL = RTOL = 1e-5
PAIRS = dict(  # (B=7,) summed response log-probs and response lengths
    chosen_logps=[-7.3, -4e-4, -41.5, -20.0, -3.1, -12.8, -150.0],
    rejected_logps=[-15.2, -1.2e-3, -38.0, -20.0, -35.0, -60.0, -2.1],
    ref_chosen_logps=[-8.0, -0.5, -40.0, -21.0, -6.0, -100.0, -40.0],
    ref_rejected_logps=[-14.0, -3.0, -39.5, -19.0, -5.0, -10.0, -5.0],
    chosen_lengths=[5, 1, 37, 12, 8, 64, 3],
    rejected_lengths=[9, 2, 30, 12, 4, 1, 7],
    chosen_nll=[1.5, 4e-4, 1.1, 1.7, 0.4, 0.2, 49.0],
)
CASES = [  # (loss, knobs); betas chosen so each loss sees logits beyond +-30
    ("dpo", dict(beta=0.4)),
    ("dpo", dict(beta=0.4, label_smoothing=0.1)),
    ("dpo", dict(beta=0.4, label_smoothing=0.5)),
    ("robust", dict(beta=0.4)),
    ("robust", dict(beta=0.4, label_smoothing=0.2)),
    ("ipo", dict(beta=0.1)),
    ("ipo", dict(beta=2.0)),
    ("simpo", dict(beta=2.0, gamma=0.5)),
    ("simpo", dict(beta=2.5, gamma=1.4, label_smoothing=0.1)),
    ("orpo", dict(beta=1.0)),
    ("orpo", dict(beta=0.1)),
]
IDS = [f"{name}-" + "-".join(f"{k}{v}" for k, v in kw.items()) for name, kw in CASES]


# ------------------------------------------------------------------------------------------------
# fp64 references, one pair at a time


def _logsig(x, m):
    """log(1 / (1 + exp(-x))) without overflow on either side."""
    return -m.log1p(m.exp(-x)) if x >= 0 else x - m.log1p(m.exp(x))


def _ref_dpo(pc, pr, rc, rr, lc, lr, nll, *, m, beta, label_smoothing=0.0, gamma=0.0):
    z = beta * (pc - rc) - beta * (pr - rr)
    e = label_smoothing
    return -(1 - e) * _logsig(z, m) - e * _logsig(-z, m), beta * (pc - rc), beta * (pr - rr), z


def _ref_robust(pc, pr, rc, rr, lc, lr, nll, *, m, beta, label_smoothing=0.0, gamma=0.0):
    z = beta * ((pc - rc) - (pr - rr))
    e = label_smoothing
    bt_nll, flipped_nll = -_logsig(z, m), -_logsig(-z, m)  # Bradley-Terry NLL of the label and of its flip
    return ((1 - e) * bt_nll - e * flipped_nll) / (1 - 2 * e), beta * (pc - rc), beta * (pr - rr), z


def _ref_ipo(pc, pr, rc, rr, lc, lr, nll, *, m, beta, label_smoothing=0.0, gamma=0.0):
    h = (pc / lc - pr / lr) - (rc / lc - rr / lr)
    return (h - 0.5 / beta) ** 2, beta * (pc / lc - rc / lc), beta * (pr / lr - rr / lr), h


def _ref_simpo(pc, pr, rc, rr, lc, lr, nll, *, m, beta, label_smoothing=0.0, gamma=0.0):
    z = beta * (pc / lc) - beta * (pr / lr) - gamma
    e = label_smoothing
    return -(1 - e) * _logsig(z, m) - e * _logsig(-z, m), beta * pc / lc, beta * pr / lr, z


def _ref_orpo(pc, pr, rc, rr, lc, lr, nll, *, m, beta, label_smoothing=0.0, gamma=0.0):
    def log_odds(a):  # log(p / (1 - p)) with p = exp(a)
        log_1mp = m.log(-m.expm1(a)) if a > -math.log(2) else m.log1p(-m.exp(a))
        return a - log_1mp

    z = log_odds(pc / lc) - log_odds(pr / lr)
    return nll - beta * _logsig(z, m), beta * pc / lc, beta * pr / lr, z


REFERENCES = {"dpo": _ref_dpo, "robust": _ref_robust, "ipo": _ref_ipo, "simpo": _ref_simpo, "orpo": _ref_orpo}
KEYS = list(PAIRS)


def _inputs(dtype=torch.float32, lengths_dtype=torch.int64, pairs=PAIRS):
    t = {k: torch.tensor(v, dtype=torch.float64).to(dtype) for k, v in pairs.items()}
    t["chosen_lengths"] = t["chosen_lengths"].to(lengths_dtype)
    t["rejected_lengths"] = t["rejected_lengths"].to(lengths_dtype)
    return t


def _call(name, t, **kw):
    return preference_loss_fn(name)(
        t["chosen_logps"], t["rejected_logps"], t.get("ref_chosen_logps"), t.get("ref_rejected_logps"),
        chosen_lengths=t["chosen_lengths"], rejected_lengths=t["rejected_lengths"],
        chosen_nll=t.get("chosen_nll"), **kw,
    )  # fmt: skip


def _reference(name, t, **kw):
    """Per-pair Python-float references of (losses, chosen_rewards, rejected_rewards, logits)."""
    rows = [REFERENCES[name](*(float(t[k][i]) for k in KEYS), m=math, **kw) for i in range(len(t["chosen_logps"]))]
    return [list(col) for col in zip(*rows)]


def _swap(t):
    """The same pairs with chosen and rejected exchanged (the label flipped)."""
    pairs = (
        ("chosen_logps", "rejected_logps"),
        ("ref_chosen_logps", "ref_rejected_logps"),
        ("chosen_lengths", "rejected_lengths"),
    )
    swapped = dict(t)
    for a, b in pairs:
        swapped[a], swapped[b] = t[b], t[a]
    return swapped


def _close(got, want, atol=ATOL, rtol=RTOL):
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------------
# every loss against its reference


def test_registry():
    assert set(PREFERENCE_LOSSES) == {"dpo", "robust", "ipo", "simpo", "orpo"}
    assert REFERENCE_FREE == ("simpo", "orpo")
    assert preference_loss_fn("ipo") is PREFERENCE_LOSSES["ipo"]
    with pytest.raises(ValueError, match=r"unknown preference loss 'kto'.*dpo.*ipo.*orpo.*robust.*simpo"):
        preference_loss_fn("kto")
    with pytest.raises(ValueError, match="'dpo' is already registered"):
        register_preference_loss("dpo")(lambda *a, **k: None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_loss_matches_fp64_reference(name, kw, dtype):
    t = _inputs(dtype)
    losses, chosen_rewards, rejected_rewards = _call(name, t, **kw)
    want_losses, want_chosen, want_rejected, logits = _reference(name, t, **kw)  # from the rounded inputs
    assert max(logits) > 30 and min(logits) < -30  # the data reach the saturated tails
    for got in (losses, chosen_rewards, rejected_rewards):
        assert got.shape == (7,) and got.dtype == torch.float32 and torch.isfinite(got).all()
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    _close(losses, want_losses)  # fp32 maths on the upcast inputs, whatever the input dtype
    _close(chosen_rewards, want_chosen)
    _close(rejected_rewards, want_rejected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_gradients_match_fp64_autograd(name, kw, dtype):
    t = _inputs(dtype)
    w = torch.rand(7, generator=torch.Generator().manual_seed(0)) * 2 + 0.1  # uneven upstream weights
    t["chosen_logps"].requires_grad_(True)
    t["rejected_logps"].requires_grad_(True)
    t["chosen_nll"].requires_grad_(True)
    losses, _, _ = _call(name, t, **kw)
    (losses * w).sum().backward()

    leaves = {k: t[k].detach().double().requires_grad_(True) for k in ("chosen_logps", "rejected_logps", "chosen_nll")}
    want = torch.zeros((), dtype=torch.float64)
    for i in range(7):
        args = [leaves[k][i] if k in leaves else float(t[k][i]) for k in KEYS]
        want = want + float(w[i]) * REFERENCES[name](*args, m=torch, **kw)[0]
    want.backward()

    atol, rtol = (ATOL, RTOL) if dtype == torch.float32 else (1e-5, 1e-2)  # bf16 grads are rounded
    for k, leaf in leaves.items():
        if name != "orpo" and k == "chosen_nll":
            assert t[k].grad is None  # only ORPO has the SFT term
            continue
        assert t[k].grad.dtype == dtype and torch.isfinite(t[k].grad).all()
        torch.testing.assert_close(t[k].grad.double(), leaf.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_extreme_inputs_stay_finite(name):
    pairs = dict(PAIRS)
    pairs["chosen_logps"] = [-1e-7, -1e4, 0.0, -3e3, -1e-3, -5e3, -1.0]  # 0.0: a certain response
    pairs["rejected_logps"] = [-1e4, -1e-7, -2e3, 0.0, -8e3, -1e-3, -1.0]
    t = _inputs()
    t.update({k: torch.tensor(pairs[k], requires_grad=True) for k in ("chosen_logps", "rejected_logps")})
    losses, chosen_rewards, rejected_rewards = _call(name, t, beta=0.5)
    losses.sum().backward()
    for x in (losses, chosen_rewards, rejected_rewards, t["chosen_logps"].grad, t["rejected_logps"].grad):
        assert torch.isfinite(x).all()


def test_float_and_int_lengths_agree():
    for name in PREFERENCE_LOSSES:
        a = _call(name, _inputs(lengths_dtype=torch.int64), beta=0.3)
        b = _call(name, _inputs(lengths_dtype=torch.float32), beta=0.3)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# properties of single losses


def test_dpo_without_smoothing_is_minus_logsigmoid_of_the_margin():
    t = _inputs()
    losses, chosen_rewards, rejected_rewards = _call("dpo", t, beta=0.4)
    logits = 0.4 * ((t["chosen_logps"] - t["ref_chosen_logps"]) - (t["rejected_logps"] - t["ref_rejected_logps"]))
    torch.testing.assert_close(losses, -F.logsigmoid(logits))
    torch.testing.assert_close(chosen_rewards - rejected_rewards, logits)


def test_conservative_dpo():
    """e = 0.5 makes the labels uninformative (swap-symmetric); e > 0 pushes back on saturated margins."""
    t = _inputs()
    swapped = _swap(t)
    torch.testing.assert_close(_call("dpo", swapped, beta=0.4, label_smoothing=0.5)[0],
                               _call("dpo", t, beta=0.4, label_smoothing=0.5)[0])  # fmt: skip
    for eps, sign in ((0.0, -1.0), (0.1, 1.0)):
        pc = t["chosen_logps"].clone().requires_grad_(True)
        _call("dpo", {**t, "chosen_logps": pc}, beta=0.4, label_smoothing=eps)[0].sum().backward()
        assert sign * pc.grad[5].item() > 0  # row 5 has logit ~ +55


def test_robust_without_noise_is_dpo_and_is_unbiased_under_label_flips():
    t = _inputs()
    torch.testing.assert_close(_call("robust", t, beta=0.4)[0], _call("dpo", t, beta=0.4)[0])
    swapped = _swap(t)
    eps = 0.2
    robust = _call("robust", t, beta=0.4, label_smoothing=eps)[0]
    robust_flipped = _call("robust", swapped, beta=0.4, label_smoothing=eps)[0]
    expected = (1 - eps) * robust + eps * robust_flipped  # E over a label flipped with probability eps
    torch.testing.assert_close(expected, _call("dpo", t, beta=0.4)[0], atol=1e-4, rtol=1e-5)
    assert (robust - _call("dpo", t, beta=0.4)[0]).abs().max().item() > 1.0


def test_ipo_minimum_is_at_margin_one_over_two_beta_of_length_averages():
    beta = 0.25  # target h = 2; chosen (pc - rc) / len_c = (-4 + 12) / 4 = 2, rejected 0
    base = dict(chosen_logps=[-4.0], rejected_logps=[-6.0], ref_chosen_logps=[-12.0], ref_rejected_logps=[-6.0],
                chosen_lengths=[4], rejected_lengths=[2], chosen_nll=[1.0])  # fmt: skip
    t = _inputs(pairs=base)
    t["chosen_logps"].requires_grad_(True)
    loss = _call("ipo", t, beta=beta)[0]
    loss.backward()
    assert loss.item() == 0 and t["chosen_logps"].grad.item() == 0
    for delta in (-0.5, 0.5):
        moved = _inputs(pairs={**base, "chosen_logps": [-4.0 + delta]})
        assert _call("ipo", moved, beta=beta)[0].item() == pytest.approx((delta / 4) ** 2, rel=1e-5)


def test_simpo_ignores_the_reference_and_gamma_shifts_the_logits():
    t = _inputs()
    with_ref = _call("simpo", t, beta=1.0, gamma=0.5)
    gen = torch.Generator().manual_seed(1)
    other_ref = {
        **t,
        "ref_chosen_logps": torch.randn(7, generator=gen),
        "ref_rejected_logps": torch.randn(7, generator=gen),
    }
    without_ref = {k: v for k, v in t.items() if not k.startswith("ref_")}
    for variant in (_call("simpo", other_ref, beta=1.0, gamma=0.5), _call("simpo", without_ref, beta=1.0, gamma=0.5)):
        for x, y in zip(variant, with_ref):
            assert torch.equal(x, y)
    no_margin = _call("simpo", t, beta=1.0)[0]
    assert (with_ref[0] > no_margin).all()  # a margin to beat raises every loss


def test_orpo_loss_falls_as_the_chosen_log_prob_rises():
    t = _inputs()
    pc = t["chosen_logps"].clone().requires_grad_(True)
    losses = _call("orpo", {**t, "chosen_logps": pc}, beta=1.0)[0]
    losses.sum().backward()
    higher = _call("orpo", {**t, "chosen_logps": 0.9 * t["chosen_logps"]}, beta=1.0)[0]  # still < 0
    log_odds = _reference("orpo", t, beta=1.0)[3]
    live = torch.tensor([abs(z) < 15 for z in log_odds])  # others saturate below fp32 resolution
    assert 0 < live.sum() < 7
    assert (higher <= losses.detach()).all() and (higher < losses.detach())[live].all()
    assert (pc.grad <= 0).all() and (pc.grad[live] < 0).all()
    nll_only = _call("orpo", {**t, "chosen_nll": t["chosen_nll"] + 1.0}, beta=1.0)[0]
    torch.testing.assert_close(nll_only - losses.detach(), torch.ones(7))


def test_orpo_at_a_certain_response_is_finite():
    """a = 0 (or > 0 from rounding) goes through log(1 - exp(a)) clamped at a = -1e-6, not log(0)."""
    t = _inputs()
    pc = torch.tensor([0.0, 1e-4, -1e-9, -1.0, -1.0, -1.0, -1.0], requires_grad=True)
    losses, _, _ = _call("orpo", {**t, "chosen_logps": pc}, beta=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
    assert (pc.grad <= 0).all() and (losses[:3] < losses[3]).all()  # still the right direction


# ------------------------------------------------------------------------------------------------
# metrics and errors


def test_preference_metrics_are_detached_sums():
    chosen = torch.tensor([1.0, 0.5, -2.0, 3.0, 0.25], requires_grad=True)
    rejected = torch.tensor([0.0, 0.5, -1.0, 3.0, -0.75], dtype=torch.bfloat16)
    m = preference_metrics(chosen, rejected)
    want = {"rewards/chosen": 2.75, "rewards/rejected": 1.75, "rewards/margins": 1.0, "accuracy": 2.0, "ties": 2.0}
    assert set(m) == set(want)
    for k, v in want.items():
        assert m[k].dtype == torch.float32 and m[k].shape == () and not m[k].requires_grad
        assert m[k].item() == pytest.approx(v, abs=1e-6), k
    with pytest.raises(ValueError, match="must both be"):
        preference_metrics(chosen, rejected[:3])


def test_errors_name_what_to_fix():
    t = _inputs()
    for name in PREFERENCE_LOSSES:
        for beta in (0.0, -0.1):
            with pytest.raises(ValueError, match=rf"{name}: beta must be > 0, got {beta}"):
                _call(name, t, beta=beta)
        with pytest.raises(ValueError, match=r"inputs must all be \(B,\) with the same B.*rejected_logps.*\(6,\)"):
            _call(name, {**t, "rejected_logps": t["rejected_logps"][:6]}, beta=0.1)
        with pytest.raises(ValueError, match=r"inputs must all be \(B,\)"):
            _call(name, {k: v[None] for k, v in t.items()}, beta=0.1)
        for bad in (0, -3):
            lengths = t["chosen_lengths"].clone()
            lengths[2] = bad
            with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths must be > 0"):
                _call(name, {**t, "chosen_lengths": lengths}, beta=0.1)
    for name in ("dpo", "simpo"):
        _call(name, t, beta=0.1, label_smoothing=0.5)
        for eps in (-0.1, 0.51):
            with pytest.raises(ValueError, match=rf"label_smoothing must be in \[0, 0.5\], got {eps}"):
                _call(name, t, beta=0.1, label_smoothing=eps)
    for eps in (0.5, -0.01):
        with pytest.raises(ValueError, match=rf"robust: label_smoothing must be in \[0, 0.5\), got {eps}"):
            _call("robust", t, beta=0.1, label_smoothing=eps)
    for name in ("ipo", "orpo"):
        with pytest.raises(ValueError, match=f"{name} does not use label_smoothing"):
            _call(name, t, beta=0.1, label_smoothing=0.1)
    for name in ("dpo", "robust", "ipo", "orpo"):
        with pytest.raises(ValueError, match=f"{name} does not use gamma"):
            _call(name, t, beta=0.1, gamma=0.5)
    for name in set(PREFERENCE_LOSSES) - set(REFERENCE_FREE):
        for missing in ("ref_chosen_logps", "ref_rejected_logps"):
            with pytest.raises(ValueError, match=f"{name} needs ref_chosen_logps and ref_rejected_logps"):
                _call(name, {k: v for k, v in t.items() if k != missing}, beta=0.1)
    with pytest.raises(ValueError, match="orpo needs chosen_nll"):
        _call("orpo", {k: v for k, v in t.items() if k != "chosen_nll"}, beta=0.1)
    no_ref_no_nll = {k: v for k, v in t.items() if not k.startswith("ref_") and k != "chosen_nll"}
    assert torch.isfinite(_call("simpo", no_ref_no_nll, beta=0.1)[0]).all()
