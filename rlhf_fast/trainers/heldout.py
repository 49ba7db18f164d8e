"""Every response of a policy on held-out prompts, kept one by one for judging it after training.

`ExperienceMaker.evaluate` reports means. `held_out_responses` keeps each response: its text, reward
score, length, whether it was cut at max_new_tokens, and (when asked) its summed-k1 KL to the reference and
the greedy response. The demo judges these with the task's gold reward and a win-rate; `rlhf-fast eval`
with everything else. With the same seed and batch size it samples exactly the responses `evaluate`
scores: the generator is seeded the same way, and greedy decoding draws no random numbers.
`sample_completions` samples a bare model (no scorer): the demo's SFT policy, whose samples become RM pairs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from rlhf_fast.generation import generate
from rlhf_fast.rl import kl_k1

from .experience import ExperienceMaker

EVAL_SEED = 1234  # ExperienceMaker.evaluate's default seed (RLTrainer.evaluate passes it on)


@dataclass
class HeldOutResponses:
    """N prompts x K samples: sampled rows g*K .. g*K + K - 1 answer prompt g."""

    completions: list[str]  # (N*K,) decoded responses, EOS not included
    scores: torch.Tensor  # (N*K,) fp32: the maker's scorer
    lengths: torch.Tensor  # (N*K,) response tokens, EOS included
    truncated: torch.Tensor  # (N*K,) bool: cut at max_new_tokens
    kl: torch.Tensor | None = None  # (N*K,) summed k1 to the reference
    greedy: list[str] | None = None  # (N,) greedy responses
    greedy_scores: torch.Tensor | None = None  # (N,)


@torch.no_grad()
def held_out_responses(maker: ExperienceMaker, tokenizer, prompt_ids: list[list[int]], texts: list[str] | None, *,
                       batch_size: int = 32, samples: int = 1, seed: int = EVAL_SEED, greedy: bool = False,
                       kl: bool = False, autocast=contextlib.nullcontext) -> HeldOutResponses:
    """`samples` sampled responses per prompt (and the greedy one when `greedy`), scored by `maker`'s
    scorer, on the device of its policy; all results on the CPU. kl: the summed-k1 KL to the reference
    (the maker must have been built with reference=True)."""
    models, t = maker.models, maker.temperature
    device = next(models.policy.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    parts: dict[str, list] = {k: [] for k in ("scores", "lengths", "truncated", "kl", "greedy_scores")}
    completions, greedy_texts = [], []
    for i in range(0, len(prompt_ids), batch_size):
        ids, mask = (x.to(device) for x in tokenizer.pad(prompt_ids[i: i + batch_size], side="left"))
        chunk = None if texts is None else texts[i: i + batch_size]
        with autocast():
            r = maker.sample(ids, mask, chunk, generator=gen, group_size=samples, penalise=False)
            if greedy:
                g = maker.sample(ids, mask, chunk, greedy=True, group_size=1, penalise=False)
                greedy_texts += g.completions(tokenizer)
                parts["greedy_scores"].append(g.scores.float().cpu())
            if kl:
                first, seq, amask = ids.shape[1] - 1, r.sequences, r.attention_mask
                lp = models.policy_logprobs(seq, amask, first, temperature=t)[:, first:]
                with maker.frozen_on_device(models.reference):
                    ref = models.ref_logprobs(seq, amask, first, temperature=t)[:, first:]
                parts["kl"].append(torch.where(r.response_mask, kl_k1(lp.float(), ref.float()), 0.0).sum(dim=1).cpu())
        completions += r.completions(tokenizer)
        parts["scores"].append(r.scores.float().cpu())
        parts["lengths"].append(r.response_mask.sum(dim=1).cpu())
        parts["truncated"].append(r.truncated.cpu())
    cat = {k: torch.cat(v) if v else None for k, v in parts.items()}
    return HeldOutResponses(completions, cat["scores"], cat["lengths"], cat["truncated"], cat["kl"],
                            greedy_texts if greedy else None, cat["greedy_scores"])


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], *, samples: int, max_new_tokens: int,
                       temperature: float = 1.0, seed: int = 0, batch_size: int = 32) -> list[str]:
    """`samples` sampled responses per prompt (rows g*samples .. g*samples + samples - 1 answer prompts[g]),
    decoded without EOS, from `model` as it is (its adapters as set), on the device of its parameters."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    model.eval()
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = tokenizer.pad([tokenizer.encode(p) for p in prompts[i: i + batch_size]], side="left")
        ids, mask = ids.repeat_interleave(samples, 0).to(device), mask.repeat_interleave(samples, 0).to(device)
        r = generate(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, generator=gen,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        response, rmask = r.sequences[:, ids.shape[1]:].cpu(), r.response_mask.bool().cpu()
        out += [tokenizer.decode(row[m].tolist()) for row, m in zip(response, rmask)]
    return out
