"""Experience collection for every RL algorithm: sample -> score -> log-probs/values -> advantages.

`ExperienceMaker.sample` repeats each prompt `group_size` times, generates with the KV cache under the
policy adapter and scores the responses (`Rollout`); `ExperienceMaker.experience` runs the policy,
reference and critic passes over the full prompt + response batch (no loop over tokens), shapes per-token
rewards with the KL penalty and computes advantages with the configured estimator. It times each phase
and reports how far the generation-time log-probs are from the training-time ones.

The length/EOS rule (docs/lengths.md): a response cut at max_new_tokens is `truncated`; it is scored
with an EOS appended (`Rollout.scoring_inputs`), as the reward model saw every response in training.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from rlhf_fast.data import append_eos
from rlhf_fast.generation import generate
from rlhf_fast.rl import AdvantageConfig, Experience, compute_advantages, kl_k1, masked_mean, shape_rewards
from rlhf_fast.rl.rewards import groups_with_signal, overlong_penalty

from .models import REWARD, PPOModels
from .reward_functions import ModelScorer


@dataclass
class Rollout:
    """Sampled responses before the training passes. Prompts left-padded (B, P), responses (B, N) with pad
    after EOS; `truncated` rows reached max_new_tokens without EOS."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor  # (B, P) bool
    response_ids: torch.Tensor
    response_mask: torch.Tensor  # (B, N) bool, EOS included
    logprobs: torch.Tensor  # (B, N) generation-time log-probs of the sampled distribution
    truncated: torch.Tensor  # (B,) bool
    prompts: list[str] | None = None  # prompt texts (reward functions read them)
    scores: torch.Tensor | None = None  # (B,) fp32

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def scoring_inputs(self, eos_token_id: int | None, pad_token_id: int = 0):
        """(ids, mask) the reward model scores: a truncated row gets an EOS appended (the length/EOS rule)."""
        ids, mask = self.sequences, self.attention_mask
        if eos_token_id is None or not self.truncated.any():
            return ids, mask
        return append_eos(ids, mask, self.truncated, eos_token_id, pad_token_id)

    def completions(self, tokenizer) -> list[str]:
        return [tokenizer.decode(row[m].tolist()) for row, m in zip(self.response_ids.cpu(), self.response_mask.cpu())]

    def select(self, rows: torch.Tensor) -> Rollout:
        idx = rows.tolist()
        tensors = {k: getattr(self, k)[rows] for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask",
                                                        "logprobs", "truncated")}
        return replace(self, **tensors, prompts=None if self.prompts is None else [self.prompts[i] for i in idx],
                       scores=None if self.scores is None else self.scores[rows])

    @staticmethod
    def cat(parts: list[Rollout], pad_token_id: int) -> Rollout:
        """One rollout of several (prompts re-padded on the left, responses on the right)."""
        if len(parts) == 1:
            return parts[0]
        P = max(r.prompt_ids.shape[1] for r in parts)
        N = max(r.response_ids.shape[1] for r in parts)

        def cat(name, width, left, value):
            return torch.cat([F.pad(getattr(r, name), (width - getattr(r, name).shape[1], 0) if left else
                                    (0, width - getattr(r, name).shape[1]), value=value) for r in parts])

        return Rollout(cat("prompt_ids", P, True, pad_token_id), cat("prompt_mask", P, True, False),
                       cat("response_ids", N, False, pad_token_id), cat("response_mask", N, False, False),
                       cat("logprobs", N, False, 0.0), torch.cat([r.truncated for r in parts]),
                       None if parts[0].prompts is None else [p for r in parts for p in r.prompts],
                       None if parts[0].scores is None else torch.cat([r.scores for r in parts]))


class PhaseTimer:
    """Wall time per named phase (synchronising CUDA so the GPU work is counted where it happens)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - t0


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class ExperienceMaker:
    """Turns left-padded prompts into a scored `Rollout`, then an `Experience` (see the module docstring).

    scorer: a `reward_functions.Scorer` (rollout -> (B,) scores); None: the models' reward role.
    reference: compute reference log-probs (for a KL penalty in the reward or the loss, and its metric).
    """

    def __init__(self, models: PPOModels, *, max_new_tokens: int, eos_token_id: int | None,
                 pad_token_id: int | None, advantage: AdvantageConfig, temperature: float = 1.0,
                 kl_estimator: str = "k1", scorer=None, reference: bool = True, overlong_buffer: int = 0,
                 overlong_penalty: float = 1.0, compile: bool | None = None, frozen_on_device=None,
                 all_reduce=None):
        if advantage.estimator == "gae" and not models.has_critic:
            raise ValueError("the gae estimator needs a critic (PPOModels with a value head); pick a critic-free "
                             "estimator (grpo, dr_grpo, rloo, reinforce_pp) or add a critic")
        if advantage.estimator != "gae" and models.has_critic:
            raise ValueError(f"the models have a critic but the estimator is {advantage.estimator!r}: critic "
                             "values are used only by the gae estimator")
        if scorer is None and models.reward_head is None:
            raise ValueError("nothing scores the responses: give a scorer or PPOModels with a reward head")
        self.models, self.advantage, self.temperature = models, advantage, temperature
        self.group_size = advantage.group_size
        self.eos, self.pad = eos_token_id, pad_token_id if pad_token_id is not None else (eos_token_id or 0)
        self.generation = dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id, compile=compile)
        self.kl_estimator, self.reference = kl_estimator, reference
        self.all_reduce = all_reduce  # tensor -> sum over data-parallel ranks: whitening statistics of every rank
        self.overlong = (overlong_buffer, overlong_penalty)
        # model -> context in which a separate frozen model is on the device (the strategy's on_device:
        # offloading between uses); nullcontext for None (a role played by the shared base)
        self.frozen_on_device = frozen_on_device or (lambda model: contextlib.nullcontext())
        if scorer is None:  # the models' reward role: a separate reward model or the `reward` adapter
            rm = models.reward_model
            scorer = ModelScorer(rm if rm is not None else models.policy, models.reward_head, eos_token_id=self.eos,
                                 pad_token_id=self.pad, adapter=None if rm is not None else REWARD,
                                 placement=self.frozen_on_device)
        self.scorer = scorer

    @torch.no_grad()
    def sample(self, input_ids, attention_mask, prompts: list[str] | None = None, *,
               generator: torch.Generator | None = None, timer: PhaseTimer | None = None,
               group_size: int | None = None, greedy: bool = False, penalise: bool = True) -> Rollout:
        """Generate `group_size` responses per prompt (rows g*G .. g*G + G - 1 share prompt g; default: the
        estimator's group size), then score them (+ the overlong penalty when `penalise`)."""
        timer = timer or PhaseTimer(input_ids.device)
        G, N = group_size or self.group_size, self.generation["max_new_tokens"]
        input_ids, attention_mask = input_ids.repeat_interleave(G, 0), attention_mask.repeat_interleave(G, 0)
        self.models.eval()
        with timer("generate"), self.models.acting() as policy:
            out = generate(policy, input_ids, attention_mask, generator=None if greedy else generator,
                           return_logprobs=True, **{**self.generation, "do_sample": not greedy})
        P = input_ids.shape[1]
        response, rmask = out.sequences[:, P:], out.response_mask.bool()
        lengths = rmask.sum(dim=1)
        last = response.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        truncated = lengths == N
        if self.eos is not None:
            truncated &= last != self.eos
        rollout = Rollout(input_ids, attention_mask.bool(), response, rmask, out.logprobs, truncated,
                          None if prompts is None else [p for p in prompts for _ in range(G)])
        with timer("score"):
            scores = self.scorer(rollout).to(input_ids.device, torch.float32)
            if self.overlong[0] and penalise:
                scores = scores + overlong_penalty(lengths, truncated, N, *self.overlong)
        rollout.scores = scores
        return rollout

    def keep_groups_with_signal(self, rollout: Rollout) -> Rollout:
        """DAPO dynamic sampling: the groups whose scores are not all equal."""
        keep = groups_with_signal(rollout.scores, self.group_size).repeat_interleave(self.group_size)
        return rollout.select(keep.nonzero().squeeze(1))

    @torch.no_grad()
    def experience(self, rollout: Rollout, *, kl_coef: float, mask_truncated: bool = False,
                   timer: PhaseTimer | None = None) -> tuple[Experience, dict[str, float]]:
        """(Experience, stats) of a scored rollout: log-probs, reference, values, rewards, advantages."""
        device = rollout.prompt_ids.device
        timer = timer or PhaseTimer(device)
        m, t = self.models, self.temperature
        m.eval()
        first = rollout.prompt_ids.shape[1] - 1  # the last prompt column predicts the first response token
        seq, mask = rollout.sequences, rollout.attention_mask
        action_mask = F.pad(rollout.response_mask, (first, 0), value=False)  # (B, T)
        zero = torch.zeros((), device=device)
        with timer("score"):
            logprobs = torch.where(action_mask, m.policy_logprobs(seq, mask, first, temperature=t), zero)
            ref = None
            if self.reference:
                with self.frozen_on_device(m.reference):
                    ref = torch.where(action_mask, m.ref_logprobs(seq, mask, first, temperature=t), zero)
            values = m.values(seq, mask, first) if m.has_critic else None
        with timer("advantages"):
            rewards, kl = shape_rewards(rollout.scores, logprobs, ref if ref is not None else logprobs,
                                        action_mask, kl_coef, self.kl_estimator)
            # Baselines and whitening see every sampled response, as DAPO defines its group advantage; overlong
            # filtering masks only the loss. Leaving truncated responses out of the baselines too made truncation
            # a state no update ever pushes down: tests/trainers/test_grpo.py's task fell from 0.17 to 0.06 (the
            # reinforce_pp baseline) instead of rising to 0.40 (README: RL options, --mask-truncated)
            advantages, returns = compute_advantages(self.advantage, rewards, action_mask, values,
                                                     all_reduce=self.all_reduce)
            loss_mask = action_mask & ~rollout.truncated.unsqueeze(1) if mask_truncated else action_mask
        gap = torch.where(rollout.response_mask, (logprobs[:, first:] - rollout.logprobs).abs(), 0.0)
        n_tokens = rollout.response_mask.sum(dim=1).float()
        stats = {"score": rollout.scores.mean(), "score_std": rollout.scores.std() if len(n_tokens) > 1 else zero,
                 "kl": kl.sum(dim=1).mean(),  # per-sequence KL estimate to the reference
                 "response_len": n_tokens.mean(), "truncated_frac": rollout.truncated.float().mean(),
                 "gen_logprob_gap_max": gap.max(), "gen_logprob_gap_mean": gap.sum() / n_tokens.sum().clamp(min=1)}
        if values is not None:
            stats["value_mean"] = masked_mean(values, action_mask)
        if self.group_size > 1:
            signal = groups_with_signal(rollout.scores, self.group_size)
            stats["groups_without_signal"] = 1.0 - signal.float().mean()
        stats = {k: float(v) for k, v in stats.items()}
        stats.update(timer.times)
        stats["peak_mem_gb"] = peak_memory_gb(device)
        exp = Experience(sequences=seq, attention_mask=mask, action_mask=loss_mask, logprobs=logprobs,
                         advantages=advantages, returns=returns, ref_logprobs=ref, values=values,
                         rewards=rewards, scores=rollout.scores)
        return exp, stats

    @torch.no_grad()
    def evaluate(self, tokenizer, prompt_ids: list[list[int]], texts: list[str] | None = None, *, batch_size: int = 32,
                 samples: int = 1, seed: int = 1234, autocast=contextlib.nullcontext, gold=None) -> dict[str, float]:
        """On held-out prompts: mean score of `samples` sampled responses each (with its std, the summed-k1
        KL to the reference when there is one, and the length) and of the greedy response. A fixed-seed
        generator of its own: training RNG is untouched. `gold` (a RewardFunction of the prompt texts and
        completions, e.g. a task's own rule): also their mean gold reward, `gold` and `greedy_gold`, a measure
        only (never a training signal)."""
        m, t = self.models, self.temperature
        device = next(m.policy.parameters()).device
        gen = torch.Generator(device).manual_seed(seed)
        scores, greedy, kls, lengths, gold_scores = [], [], [], [], []
        for i in range(0, len(prompt_ids), batch_size):
            ids, mask = (x.to(device) for x in tokenizer.pad(prompt_ids[i: i + batch_size], side="left"))
            chunk = None if texts is None else texts[i: i + batch_size]
            with autocast():
                r = self.sample(ids, mask, chunk, generator=gen, group_size=samples, penalise=False)
                g = self.sample(ids, mask, chunk, greedy=True, group_size=1, penalise=False)
                greedy.append(g.scores)
                if self.reference:
                    first, seq, amask = ids.shape[1] - 1, r.sequences, r.attention_mask
                    lp = m.policy_logprobs(seq, amask, first, temperature=t)[:, first:]
                    with self.frozen_on_device(m.reference):
                        ref = m.ref_logprobs(seq, amask, first, temperature=t)[:, first:]
                    kls.append(torch.where(r.response_mask, kl_k1(lp.float(), ref.float()), 0.0).sum(dim=1))
            scores.append(r.scores)
            lengths.append(r.response_mask.sum(dim=1).float())
            if gold is not None and chunk is not None:
                gold_scores.append((gold([p for p in chunk for _ in range(samples)], r.completions(tokenizer)),
                                    gold(chunk, g.completions(tokenizer))))
        scores = torch.cat(scores)
        out = {"reward": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
               "greedy_reward": float(torch.cat(greedy).mean()), "response_len": float(torch.cat(lengths).mean())}
        if kls:
            out["kl"] = float(torch.cat(kls).mean())
        if gold_scores:
            for key, i in (("gold", 0), ("greedy_gold", 1)):
                values = [float(v) for part in gold_scores for v in part[i]]
                out[key] = sum(values) / len(values)
        return out

    def make(self, input_ids, attention_mask, prompts: list[str] | None = None, *, kl_coef: float,
             generator: torch.Generator | None = None) -> tuple[Experience, dict[str, float]]:
        """`sample` then `experience`, timed together: (Experience, stats)."""
        device = input_ids.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timer = PhaseTimer(device)
        rollout = self.sample(input_ids, attention_mask, prompts, generator=generator, timer=timer)
        return self.experience(rollout, kl_coef=kl_coef, timer=timer)
