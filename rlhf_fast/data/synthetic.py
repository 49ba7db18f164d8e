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
"""

from __future__ import annotations

import random

from .examples import PreferenceExample

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
