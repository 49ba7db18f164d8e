"""Offline preference losses (the DPO family) as registered free functions on per-pair log-probs.

Every loss takes (B,) tensors: pc, pr the policy's SUMMED response log-probs of the chosen and rejected
sequences, rc, rr the reference's (None for the reference-free losses), len_c, len_r the response
token counts, and returns `(losses, chosen_rewards, rejected_rewards)`, all (B,) fp32: per-pair losses
(the trainer reduces them) and detached implicit rewards for metrics. a_c = pc / len_c, a_r = pr / len_r.

  name    optimises (per pair)                                             knobs                   rewards
  dpo     -(1-e) logsig(z) - e logsig(-z),  z = beta((pc-rc) - (pr-rr))    beta, e = label_smooth  beta(pc-rc)
          (Rafailov et al. 2023; e > 0 is conservative DPO, Mitchell 2023)
  robust  (-(1-e) logsig(z) + e logsig(-z)) / (1 - 2e), 0 <= e < 0.5       beta, e                 beta(pc-rc)
          (Chowdhury et al. 2024: unbiased under labels flipped with probability e)
  ipo     (h - 1/(2 beta))^2,  h = (pc-rc)/len_c - (pr-rr)/len_r           beta                    beta(pc-rc)/len_c
          (Azar et al. 2023; length-averaged log-probs as in TRL)
  simpo   -(1-e) logsig(z) - e logsig(-z),  z = beta(a_c - a_r) - gamma    beta, gamma, e          beta a_c
          (Meng et al. 2024; no reference model)
  orpo    nll_c - beta logsig(log odds(a_c) - log odds(a_r))               beta (ORPO's lambda)    beta a_c
          (Hong et al. 2024; log odds(a) = a - log(1 - exp(a)); no reference model)

A loss rejects a knob it does not use (label_smoothing for ipo/orpo, gamma outside simpo) rather than
ignore a setting the user believes is active; tensors it does not use (reference log-probs for
simpo/orpo, chosen_nll outside orpo) are ignored, so one call site serves every loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

PreferenceLoss = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {}
REFERENCE_FREE = ("simpo", "orpo")  # a trainer skips the reference forward pass for these
LOG1MEXP_MAX = -1e-6  # ORPO: mean log-probs are clamped to <= this so log(1 - exp(a)) stays finite


def register_preference_loss(name: str):
    def register(fn: PreferenceLoss) -> PreferenceLoss:
        if name in PREFERENCE_LOSSES:
            raise ValueError(f"preference loss {name!r} is already registered")
        PREFERENCE_LOSSES[name] = fn
        return fn

    return register


def preference_loss_fn(name: str) -> PreferenceLoss:
    try:
        return PREFERENCE_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown preference loss {name!r}; choose one of {sorted(PREFERENCE_LOSSES)}") from None


def _prepare(
    name, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, chosen_lengths,
    rejected_lengths, label_smoothing, gamma, chosen_nll, *, smoothing_max=None, smoothing_closed=True,
    uses_gamma=False,
):  # fmt: skip
    """Validate the shared arguments; return the used tensors cast to fp32 (pc, pr, rc, rr, len_c, len_r, nll)."""
    if not beta > 0:
        raise ValueError(f"{name}: beta must be > 0, got {beta}")
    if smoothing_max is None:
        if label_smoothing != 0:
            raise ValueError(f"{name} does not use label_smoothing; got {label_smoothing}, leave it at 0")
    elif not (0 <= label_smoothing <= smoothing_max if smoothing_closed else 0 <= label_smoothing < smoothing_max):
        bracket = "]" if smoothing_closed else ")"
        raise ValueError(f"{name}: label_smoothing must be in [0, {smoothing_max}{bracket}, got {label_smoothing}")
    if not uses_gamma and gamma != 0:
        raise ValueError(f"{name} does not use gamma (SimPO's margin); got {gamma}, leave it at 0")
    needs_ref, needs_nll = name not in REFERENCE_FREE, name == "orpo"
    if needs_ref and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"{name} needs ref_chosen_logps and ref_rejected_logps (only {list(REFERENCE_FREE)} do not)")
    if needs_nll and chosen_nll is None:
        raise ValueError("orpo needs chosen_nll, the mean NLL of each chosen response (its SFT term)")
    named = {
        "chosen_logps": chosen_logps,
        "rejected_logps": rejected_logps,
        "ref_chosen_logps": ref_chosen_logps if needs_ref else None,
        "ref_rejected_logps": ref_rejected_logps if needs_ref else None,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
        "chosen_nll": chosen_nll if needs_nll else None,
    }
    named = {k: v for k, v in named.items() if v is not None}
    shapes = {k: tuple(v.shape) for k, v in named.items()}
    if chosen_logps.dim() != 1 or len(set(shapes.values())) != 1:
        raise ValueError(f"{name}: inputs must all be (B,) with the same B, got {shapes}")
    if (chosen_lengths <= 0).any() or (rejected_lengths <= 0).any():  # host sync: a cheap guard against /0
        raise ValueError(f"{name}: chosen_lengths and rejected_lengths must be > 0 (response token counts)")
    t = {k: v.float() for k, v in named.items()}
    return (
        t["chosen_logps"], t["rejected_logps"], t.get("ref_chosen_logps"), t.get("ref_rejected_logps"),
        t["chosen_lengths"], t["rejected_lengths"], t.get("chosen_nll"),
    )  # fmt: skip


def _smoothed_sigmoid_loss(logits, eps):
    """-(1 - eps) logsig(z) - eps logsig(-z): the Bradley-Terry NLL with labels flipped w.p. eps."""
    return -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


@register_preference_loss("dpo")
def dpo_loss(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, chosen_lengths, rejected_lengths,
    label_smoothing=0.0, gamma=0.0, chosen_nll=None,
):  # fmt: skip
    """DPO (Rafailov et al. 2023); label_smoothing = e > 0 gives conservative DPO (cDPO)."""
    pc, pr, rc, rr, _, _, _ = _prepare(
        "dpo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, chosen_lengths,
        rejected_lengths, label_smoothing, gamma, chosen_nll, smoothing_max=0.5,
    )  # fmt: skip
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    losses = _smoothed_sigmoid_loss(chosen_rewards - rejected_rewards, label_smoothing)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


@register_preference_loss("robust")
def robust_dpo_loss(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, chosen_lengths, rejected_lengths,
    label_smoothing=0.0, gamma=0.0, chosen_nll=None,
):  # fmt: skip
    """Robust DPO (Chowdhury et al. 2024): label_smoothing = e is the assumed label-flip rate, and
    (1 - e) loss(z) + e loss(-z) = -logsig(z), so the loss is unbiased under such noise. It can be < 0."""
    pc, pr, rc, rr, _, _, _ = _prepare(
        "robust", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, chosen_lengths,
        rejected_lengths, label_smoothing, gamma, chosen_nll, smoothing_max=0.5, smoothing_closed=False,
    )  # fmt: skip
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    logits = chosen_rewards - rejected_rewards
    eps = label_smoothing
    losses = (-(1.0 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


@register_preference_loss("ipo")
def ipo_loss(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, chosen_lengths, rejected_lengths,
    label_smoothing=0.0, gamma=0.0, chosen_nll=None,
):  # fmt: skip
    """IPO (Azar et al. 2023): regress the length-averaged log-ratio margin h onto 1 / (2 beta)."""
    pc, pr, rc, rr, len_c, len_r, _ = _prepare(
        "ipo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, chosen_lengths,
        rejected_lengths, label_smoothing, gamma, chosen_nll,
    )  # fmt: skip
    chosen_ratio, rejected_ratio = (pc - rc) / len_c, (pr - rr) / len_r
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


@register_preference_loss("simpo")
def simpo_loss(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, chosen_lengths, rejected_lengths,
    label_smoothing=0.0, gamma=0.0, chosen_nll=None,
):  # fmt: skip
    """SimPO (Meng et al. 2024): reference-free DPO on mean log-probs with a target margin gamma."""
    pc, pr, _, _, len_c, len_r, _ = _prepare(
        "simpo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, chosen_lengths,
        rejected_lengths, label_smoothing, gamma, chosen_nll, smoothing_max=0.5, uses_gamma=True,
    )  # fmt: skip
    chosen_rewards, rejected_rewards = beta * (pc / len_c), beta * (pr / len_r)
    losses = _smoothed_sigmoid_loss(chosen_rewards - rejected_rewards - gamma, label_smoothing)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def _log1mexp(a):
    """log(1 - exp(a)) for a < 0 as log(-expm1(a)): exact near a = 0, where 1 - exp(a) would cancel.

    a is first clamped to <= LOG1MEXP_MAX: a mean log-prob of exactly 0 (or > 0 from rounding) would give
    log(0) = -inf and NaN gradients. The clamp zeroes this term's gradient above the cap, which only
    affects responses the policy already predicts with probability ~1. (For a << 0 the result rounds to
    0, off by ~exp(a): negligible next to the a it is subtracted from in the log odds.)
    """
    return torch.log(-torch.expm1(a.clamp(max=LOG1MEXP_MAX)))


@register_preference_loss("orpo")
def orpo_loss(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, chosen_lengths, rejected_lengths,
    label_smoothing=0.0, gamma=0.0, chosen_nll=None,
):  # fmt: skip
    """ORPO (Hong et al. 2024): SFT NLL on the chosen response plus beta (= lambda) times the odds-ratio
    loss -logsig(log odds(a_c) - log odds(a_r)) on mean log-probs; reference-free."""
    pc, pr, _, _, len_c, len_r, nll = _prepare(
        "orpo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, chosen_lengths,
        rejected_lengths, label_smoothing, gamma, chosen_nll,
    )  # fmt: skip
    a_c, a_r = pc / len_c, pr / len_r
    log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
    losses = nll - beta * F.logsigmoid(log_odds)
    return losses, (beta * a_c).detach(), (beta * a_r).detach()


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """Detached fp32 SUMS over the pairs (the trainer divides by the global pair count):
    rewards/chosen, rewards/rejected, rewards/margins, accuracy (chosen > rejected; ties count 0), ties."""
    if chosen_rewards.dim() != 1 or chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen and rejected rewards must both be (B,), got {tuple(chosen_rewards.shape)} "
            f"and {tuple(rejected_rewards.shape)}"
        )
    with torch.no_grad():
        c, r = chosen_rewards.float(), rejected_rewards.float()
        return {
            "rewards/chosen": c.sum(),
            "rewards/rejected": r.sum(),
            "rewards/margins": (c - r).sum(),
            "accuracy": (c > r).float().sum(),
            "ties": (c == r).float().sum(),
        }
