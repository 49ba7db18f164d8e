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
