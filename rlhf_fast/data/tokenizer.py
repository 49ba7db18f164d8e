"""Tokenizers behind one small interface: encode / decode / pad, plus eos/pad ids and vocab size.

- `ByteTokenizer`: offline, dependency-free; bytes 0-255 plus special tokens. Used by the small
  random-init presets (`tiny`, `demo`) and the offline demo.
- `HFTokenizer`: the GPT-2 BPE tokenizer through transformers, from a local directory or hub name.
"""

from __future__ import annotations

import torch


class Tokenizer:
    """Interface shared by all tokenizers. Subclasses set the ids and implement encode/decode."""

    vocab_size: int
    eos_token_id: int
    pad_token_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def pad(self, sequences: list[list[int]], side: str = "left", max_length: int | None = None):
        """Pad token-id lists into (input_ids, attention_mask), both (B, T) long. Left by default."""
        if side not in ("left", "right"):
            raise ValueError(f"pad side must be 'left' or 'right', got {side!r}")
        if not sequences:
            raise ValueError("pad: no sequences given")
        T = max(len(s) for s in sequences) if max_length is None else max_length
        if any(len(s) > T for s in sequences):
            raise ValueError(f"pad: a sequence is longer than max_length={T}")
        ids = torch.full((len(sequences), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), T), dtype=torch.long)
        for i, s in enumerate(sequences):
            if not s:
                continue
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            ids[i, sl] = torch.tensor(s, dtype=torch.long)
            mask[i, sl] = 1
        return ids, mask

    def batch_encode(self, texts: list[str], side: str = "left"):
        return self.pad([self.encode(t) for t in texts], side=side)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens 0-255; 256 = <|endoftext|> (EOS), 257 = <|pad|>."""

    eos_token_id = 256
    pad_token_id = 257
    vocab_size = 258
    special_tokens = {256: "<|endoftext|>", 257: "<|pad|>"}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(self.special_tokens.get(i, f"<|{i}|>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer(Tokenizer):
    """A transformers tokenizer (GPT-2 BPE). GPT-2 has no pad token, so EOS doubles as pad."""

    def __init__(self, name_or_path: str):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as e:
            raise FileNotFoundError(f"could not load a tokenizer from {name_or_path!r} "
                                    f"({type(e).__name__}: {e})") from e
        if self.tok.eos_token_id is None:
            raise ValueError(f"tokenizer {name_or_path!r} has no EOS token")
        self.eos_token_id = self.tok.eos_token_id
        self.pad_token_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_token_id
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """"byte" for the offline byte tokenizer; anything else is an HF tokenizer directory or hub name."""
    if name_or_path == "byte":
        return ByteTokenizer()
    return HFTokenizer(name_or_path)
