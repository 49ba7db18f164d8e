"""Examples, tokenized datasets, collators and a resumable batch order.

- SFT: prompt + response + EOS; the loss covers response and EOS tokens only (`loss_mask`). An empty prompt
  (language modelling) is a lone EOS, so the loss covers every token of the text.
- Preference pairs: prompt + chosen / prompt + rejected, each ending in EOS.
- Prompts only (for RL): prompt token ids.

What is cut to fit `max_len`, and whether a cut response ends in EOS, is `lengths.encode_pair`'s rule
(docs/lengths.md): SFT cuts without EOS, preference data forces one. Datasets count what they cut.

Collators pad on the left by default (DESIGN.md: left padding everywhere; positions come from the mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lengths import check_lengths, encode_pair


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str

    def to_sft(self) -> SFTExample:
        return SFTExample(self.prompt, self.chosen)


def _encode(tokenizer, prompt: str, response: str, max_prompt_len: int, max_len: int, force_eos: bool):
    # An empty prompt (language-modelling data, {"text"}) becomes EOS, GPT-2's document separator, so that the
    # text's first token is predicted (and trained on) too: position t predicts token t + 1.
    prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_token_id]
    return encode_pair(prompt_ids, tokenizer.encode(response), eos_token_id=tokenizer.eos_token_id,
                       max_prompt_len=max_prompt_len, max_len=max_len, force_eos=force_eos)


class SFTDataset(torch.utils.data.Dataset):
    """Items: {"input_ids": list[int], "loss_mask": list[int]} (1 on response + EOS tokens).

    A response too long for `max_len` keeps the tokens that fit and gets no EOS (`truncated[i]`).
    """

    def __init__(self, examples, tokenizer, max_prompt_len: int = 48, max_len: int = 112):
        check_lengths(max_prompt_len, max_len)
        self.items, self.truncated = [], []
        for ex in examples:
            ex = ex.to_sft() if isinstance(ex, PreferenceExample) else ex
            e = _encode(tokenizer, ex.prompt, ex.response, max_prompt_len, max_len, force_eos=False)
            self.items.append({"input_ids": e.prompt_ids + e.response_ids,
                               "loss_mask": [0] * len(e.prompt_ids) + [1] * len(e.response_ids)})
            self.truncated.append(e.truncated)

    @property
    def n_truncated(self) -> int:
        """Examples whose response was cut (and so has no EOS)."""
        return sum(self.truncated)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class PreferenceDataset(torch.utils.data.Dataset):
    """Items: {"chosen_ids", "rejected_ids": prompt + response + EOS each, "chosen_prompt_len",
    "rejected_prompt_len"}.

    A response too long for `max_len` keeps its first tokens and a forced EOS; `truncated[i]` is
    (chosen cut, rejected cut). `drop_identical`: pairs whose two sides encode to the same tokens (no
    preference to learn; DPO's loss would be a constant) are left out and counted in `n_identical`.
    """

    def __init__(self, examples, tokenizer, max_prompt_len: int = 48, max_len: int = 112,
                 drop_identical: bool = False):
        check_lengths(max_prompt_len, max_len)
        self.items, self.truncated, self.n_identical = [], [], 0
        for ex in examples:
            c = _encode(tokenizer, ex.prompt, ex.chosen, max_prompt_len, max_len, force_eos=True)
            r = _encode(tokenizer, ex.prompt, ex.rejected, max_prompt_len, max_len, force_eos=True)
            if c.response_ids == r.response_ids:
                self.n_identical += 1
                if drop_identical:
                    continue
            self.items.append({"chosen_ids": c.prompt_ids + c.response_ids,
                               "rejected_ids": r.prompt_ids + r.response_ids,
                               "chosen_prompt_len": len(c.prompt_ids), "rejected_prompt_len": len(r.prompt_ids)})
            self.truncated.append((c.truncated, r.truncated))

    @property
    def n_truncated(self) -> int:
        """Pairs with at least one response cut."""
        return sum(c or r for c, r in self.truncated)

    @property
    def n_one_side_truncated(self) -> int:
        """Pairs with exactly one response cut: where a length/EOS artefact could tell the sides apart."""
        return sum(c != r for c, r in self.truncated)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class PromptDataset(torch.utils.data.Dataset):
    """Items: {"prompt_ids": list[int], "prompt": str} for RL rollouts."""

    def __init__(self, prompts, tokenizer, max_prompt_len: int = 48):
        self.items = []
        for p in prompts:
            p = p.prompt if isinstance(p, (SFTExample, PreferenceExample)) else p
            ids = tokenizer.encode(p)[-max_prompt_len:] if p else [tokenizer.eos_token_id]  # as in _encode
            self.items.append({"prompt_ids": ids, "prompt": p})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _pad(seqs, value: int, side: str) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            out[i, cols] = torch.tensor(s, dtype=torch.long)
    return out


class SFTCollator:
    """→ input_ids, attention_mask, loss_mask, all (B, T) long."""

    def __init__(self, tokenizer, side: str = "left"):
        if side not in ("left", "right"):
            raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
        self.pad_id, self.side = tokenizer.pad_token_id, side

    def __call__(self, items):
        ids = [it["input_ids"] for it in items]
        return {
            "input_ids": _pad(ids, self.pad_id, self.side),
            "attention_mask": _pad([[1] * len(s) for s in ids], 0, self.side),
            "loss_mask": _pad([it["loss_mask"] for it in items], 0, self.side),
        }


class PreferenceCollator:
    """→ input_ids, attention_mask, loss_mask (2B, T): rows 0..B-1 chosen, B..2B-1 rejected (one forward
    for both); loss_mask marks the response tokens (EOS included)."""

    def __init__(self, tokenizer, side: str = "left"):
        if side not in ("left", "right"):
            raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
        self.pad_id, self.side = tokenizer.pad_token_id, side

    def __call__(self, items):
        seqs = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
        prompts = [it["chosen_prompt_len"] for it in items] + [it["rejected_prompt_len"] for it in items]
        return {
            "input_ids": _pad(seqs, self.pad_id, self.side),
            "attention_mask": _pad([[1] * len(s) for s in seqs], 0, self.side),
            "loss_mask": _pad([[0] * p + [1] * (len(s) - p) for s, p in zip(seqs, prompts)], 0, self.side),
        }


class PromptCollator:
    """→ input_ids, attention_mask (B, T) left-padded (generation appends on the right), plus the texts."""

    def __init__(self, tokenizer):
        self.pad_id = tokenizer.pad_token_id

    def __call__(self, items):
        ids = [it["prompt_ids"] for it in items]
        return {
            "input_ids": _pad(ids, self.pad_id, "left"),
            "attention_mask": _pad([[1] * len(s) for s in ids], 0, "left"),
            "prompts": [it["prompt"] for it in items],
        }


class ResumableBatches:
    """Shuffled micro-batches, epoch after epoch, whose position can be saved and restored exactly.

    The order of epoch e is a permutation drawn from seed + e, so (epoch, position) is the whole state:
    no RNG stream to save, and a resumed run sees the very batches the uninterrupted run would.
    A last partial batch of an epoch is dropped so every micro-batch has the same size.
    """

    def __init__(self, dataset, batch_size: int, collate_fn, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) < batch_size:
            raise ValueError(f"dataset has {len(dataset)} examples, fewer than one batch of {batch_size}")
        self.dataset, self.batch_size, self.collate_fn = dataset, batch_size, collate_fn
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0  # position: batches already taken in this epoch

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.dataset)))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def __iter__(self):
        return self

    def __next__(self):
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.batch_size
        idx = self._order()[start: start + self.batch_size]
        self.position += 1
        return self.collate_fn([self.dataset[i] for i in idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
