"""Built-in synthetic preference task for the offline demo ("--data synthetic").

Prompt (HH dialogue format, <= 48 bytes): "\\n\\nHuman: Tell me about Dogs.\\n\\nAssistant:".
Preferred response: a fact about the prompt's subject (named first), then a polite closing
    " Dogs wag their tails. Happy to help!"
Rejected response: one of three faults, drawn with equal odds:
    off-topic   a fact about another subject, polite closing   " Owls hoot softly. Happy to help!"
    rude        a fact about the subject, rude closing          " Dogs wag their tails. Go away."
    both        off-topic and rude                              " Owls hoot softly. Go away."
So a reward model must learn two things from the text, "addresses the prompt's subject" (does the
response's first word repeat the subject named in the prompt?) and "ends politely"; a policy pushed by
it moves towards on-topic, polite answers. Everything is a deterministic function of the seed;
responses are <= 48 bytes (1 token per byte with the byte tokenizer).

Gold reward (`synthetic_gold_reward`): the preference rule above applied to any response text, so a
policy's samples can be checked against the task itself rather than against a learned reward model.
The response is split at its first ".", "!" or "?" into an opening sentence and the rest:
    topic    +1  the opening sentence is one of the task's facts about the prompt's subject and no other
                 subject is named anywhere;  -1  another subject is named;  0  otherwise (no fact)
    closing  +1  the rest is exactly one polite closing;  -1  a rude closing occurs anywhere;  0  otherwise
gold = topic + closing, in [-2, 2]. Every preferred response scores 2; rejected ones 0 (off-topic or rude)
or -2 (both), so the rule ranks the task's own pairs correctly every time. Word salad, repeated closings
and made-up facts earn at most 1: the polite-word salad a byte-level reward model may like is not gold.

The demo's data (`synthetic_demonstrations`, `synthetic_reply_pairs`, `gold_labelled_pairs`): demonstrations of
mixed quality, as human ones are. Each reply is one of the kinds in DEMO_MIX, drawn with its odds:
    good   fact + polite closing (gold 2)       terse  fact + curt closing, " Noted." (gold 1)
    bare   fact, no closing (1)                 rude   fact + rude closing (0)
    off    another subject's fact + polite (0)  vague  " I am not sure." + polite (1)
The most common kind is terse, so a policy that imitates them (SFT) closes curtly, greedy decoding included:
imitation cannot reach gold 2, preferences can show the way there. Pairs are labelled by the gold rule
(Gao et al. 2022's gold-reward-model setup: the rule that scores the policy is the one that labelled its data).
"""

from __future__ import annotations

import random
import re

from .examples import PreferenceExample, SFTExample

# Subjects are capitalised names whose capital letter occurs nowhere else in the task's text, so "does the
# response talk about the prompt's subject" is a matter of spotting one repeated token.
SUBJECTS = {
    "Bees": ("Bees make sweet honey.", "Bees visit flowers.", "Bees live in hives."),
    "Dogs": ("Dogs love long walks.", "Dogs wag their tails.", "Dogs guard the home."),
    "Frogs": ("Frogs jump far.", "Frogs live near ponds.", "Frogs eat flies."),
    "Kites": ("Kites fly in the wind.", "Kites have long tails.", "Kites are made of paper."),
    "Lemons": ("Lemons taste sour.", "Lemons are yellow.", "Lemons grow on trees."),
    "Moon": ("Moon light is soft.", "Moon phases repeat.", "Moon rocks are grey."),
    "Owls": ("Owls hunt at night.", "Owls can turn their heads.", "Owls hoot softly."),
    "Rain": ("Rain falls from clouds.", "Rain helps plants grow.", "Rain makes puddles."),
}
QUESTIONS = ("Tell me about {}.", "What about {}?", "Any facts on {}?", "Say something on {}.")
POLITE = ("Happy to help!", "Hope that helps!", "Thanks for asking!")
RUDE = ("Go away.", "Stop asking.", "Whatever.")
FAULTS = ("off-topic", "rude", "both")
CURT = ("Noted.", "Next question.", "Now you know.")  # neither polite nor rude: gold closing 0
VAGUE = "I am not sure."
# The demonstrations' kinds and odds (module docstring). Curt closings share a first letter that no polite
# closing has, so the most likely next byte after a fact (greedy decoding's pick) starts a curt closing.
DEMO_MIX = (("good", 0.2), ("terse", 0.4), ("bare", 0.1), ("rude", 0.1), ("off", 0.1), ("vague", 0.1))


def prompt_for(subject: str, question: str) -> str:
    return f"\n\nHuman: {question.format(subject)}\n\nAssistant:"


def synthetic_preferences(n: int, seed: int = 0) -> list[PreferenceExample]:
    """n preference pairs drawn deterministically from `seed`."""
    if n < 1:
        raise ValueError(f"synthetic_preferences: n must be >= 1, got {n}")
    rng = random.Random(seed)
    subjects = sorted(SUBJECTS)
    out = []
    for _ in range(n):
        subject = rng.choice(subjects)
        other = rng.choice([s for s in subjects if s != subject])
        prompt = prompt_for(subject, rng.choice(QUESTIONS))
        chosen = f" {rng.choice(SUBJECTS[subject])} {rng.choice(POLITE)}"
        fault = rng.choice(FAULTS)
        fact = rng.choice(SUBJECTS[other] if fault in ("off-topic", "both") else SUBJECTS[subject])
        ending = rng.choice(RUDE if fault in ("rude", "both") else POLITE)
        out.append(PreferenceExample(prompt=prompt, chosen=chosen, rejected=f" {fact} {ending}"))
    return out


def synthetic_split(n_train: int, n_eval: int, seed: int = 0):
    """(train, eval) pairs; eval pairs never repeat a training pair (held out by construction)."""
    train = synthetic_preferences(n_train, seed)
    seen = set(train)
    held_out, draw_seed = [], seed + 1_000_003
    while len(held_out) < n_eval:
        held_out += [ex for ex in synthetic_preferences(n_eval, draw_seed) if ex not in seen]
        draw_seed += 1
    return train, held_out[:n_eval]


def synthetic_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts of the task (for RL rollouts), deterministic from `seed`."""
    return [ex.prompt for ex in synthetic_preferences(n, seed)]


_OPENING = re.compile(r"\s*([^.!?]*[.!?]?)\s*(.*)", re.DOTALL)  # (opening sentence, the rest)


def prompt_subject(prompt: str) -> str:
    """The subject a task prompt asks about (ValueError for a prompt that is not one of the task's)."""
    named = [s for s in SUBJECTS if re.search(rf"\b{s}\b", prompt)]
    if len(named) != 1:
        raise ValueError(f"not a prompt of the synthetic task (it names {len(named)} subjects): {prompt!r}")
    return named[0]


def gold_components(prompt: str, response: str) -> tuple[int, int]:
    """(topic, closing) of the gold rule in the module docstring, each in {-1, 0, 1}."""
    subject = prompt_subject(prompt)
    opening, rest = _OPENING.fullmatch(response).groups()
    off_topic = any(re.search(rf"\b{s}\b", response) for s in SUBJECTS if s != subject)
    topic = -1 if off_topic else int(opening in SUBJECTS[subject])
    closing = -1 if any(r in response for r in RUDE) else int(rest.strip() in POLITE)
    return topic, closing


def synthetic_gold_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """The task's preference rule as a reward (a `RewardFunction`): topic + closing, in [-2, 2]."""
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    return [float(sum(gold_components(p, c))) for p, c in zip(prompts, completions)]


def _reply(rng: random.Random, subject: str, kind: str) -> str:
    fact = rng.choice(SUBJECTS[subject])
    if kind == "off":
        fact = rng.choice(SUBJECTS[rng.choice([s for s in sorted(SUBJECTS) if s != subject])])
    closing = {"good": POLITE, "off": POLITE, "vague": POLITE, "terse": CURT, "rude": RUDE, "bare": ("",)}[kind]
    return f" {VAGUE if kind == 'vague' else fact} {rng.choice(closing)}".rstrip()


def _mixed_reply(rng: random.Random, subject: str, mix) -> str:
    kinds, odds = zip(*mix)
    return _reply(rng, subject, rng.choices(kinds, odds)[0])


def _check_mix(mix) -> None:
    known = {"good", "terse", "bare", "rude", "off", "vague"}
    if not mix or any(k not in known or p < 0 for k, p in mix) or sum(p for _, p in mix) <= 0:
        raise ValueError(f"a demonstration mix is (kind, odds) pairs with kinds in {sorted(known)}, got {mix!r}")


def _task_prompt(rng: random.Random) -> tuple[str, str]:
    subject = rng.choice(sorted(SUBJECTS))
    return subject, prompt_for(subject, rng.choice(QUESTIONS))


def synthetic_demonstrations(n: int, seed: int = 0, mix=DEMO_MIX) -> list[SFTExample]:
    """n demonstrations of mixed quality (module docstring), as (prompt, reply) SFTExamples."""
    if n < 1:
        raise ValueError(f"synthetic_demonstrations: n must be >= 1, got {n}")
    _check_mix(mix)
    rng = random.Random(seed)
    return [SFTExample(prompt, _mixed_reply(rng, subject, mix)) for subject, prompt in
            (_task_prompt(rng) for _ in range(n))]


def synthetic_reply_pairs(n: int, seed: int = 0, mix=DEMO_MIX) -> list[PreferenceExample]:
    """n pairs of two replies of the demonstrations' mixture to one prompt, the one the gold rule scores
    higher chosen (draws the rule scores alike are skipped)."""
    if n < 1:
        raise ValueError(f"synthetic_reply_pairs: n must be >= 1, got {n}")
    _check_mix(mix)
    rng, out = random.Random(seed), []
    while len(out) < n:
        subject, prompt = _task_prompt(rng)
        out += gold_labelled_pairs([prompt], [_mixed_reply(rng, subject, mix), _mixed_reply(rng, subject, mix)], 2)
    return out


def gold_labelled_pairs(prompts: list[str], completions: list[str], group_size: int) -> list[PreferenceExample]:
    """Preference pairs from `group_size` responses per prompt (rows g*G .. g*G + G - 1 answer prompts[g]):
    every two responses of a prompt that the gold rule scores differently, the higher one chosen."""
    if group_size < 2 or len(completions) != len(prompts) * group_size:
        raise ValueError(f"gold_labelled_pairs: need group_size >= 2 and {len(prompts)} x {group_size} completions, "
                         f"got group_size={group_size} and {len(completions)} completions")
    out = []
    for g, prompt in enumerate(prompts):
        group = completions[g * group_size: (g + 1) * group_size]
        scores = synthetic_gold_reward([prompt] * group_size, group)
        for i in range(group_size):
            for j in range(i + 1, group_size):
                if scores[i] != scores[j]:
                    hi, lo = (i, j) if scores[i] > scores[j] else (j, i)
                    out.append(PreferenceExample(prompt, group[hi], group[lo]))
    return out
