"""Exports the Hugging Face ecosystem loads as they are: the tokenizer (`AutoTokenizer`, same ids as ours, for
the byte and the GPT-2 tokenizer), config.json's token ids (HF `generate` stops at EOS), a reward model as
`GPT2ForSequenceClassification` (same scores as ours) and a LoRA adapter as a PEFT directory (same logits)."""

import json

import pytest
import torch

from rlhf_fast.data.tokenizer import TOKENIZER_MARKER, ByteTokenizer, load_tokenizer, save_tokenizer
from rlhf_fast.model import GPT, RewardHead, add_lora, reward_scores, set_adapter
from rlhf_fast.model.hf import save_hf_gpt2
from rlhf_fast.model.peft_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_peft_adapter
from rlhf_fast.trainers.builders import export_model
from rlhf_fast.trainers.reward import load_reward_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["Hello world", "\n\nHuman: Tell me about Dogs.\n\nAssistant:", "héllo 🐶 日本語\tx  y ", " a\r\n b\n", ""]


def _tiny(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT.from_preset("tiny", attn_backend="sdpa", **overrides).eval()


@pytest.mark.parametrize("which", ["byte", "gpt2"])
def test_export_tokenizer_loads_in_transformers_with_our_ids(tmp_path, which):
    ours = load_tokenizer(which)
    save_tokenizer(ours, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text), text
        assert hf.decode(ids) == text == ours.decode(ids)
    assert hf.eos_token_id == ours.eos_token_id
    assert hf.pad_token_id == (257 if which == "byte" else None)  # GPT-2 has none of its own (ours pads with EOS)
    assert hf.decode([*ours.encode("hi"), ours.eos_token_id], skip_special_tokens=True) == "hi"
    back = load_tokenizer(tmp_path)  # what every command loads for an export
    assert type(back) is type(ours) and back.encode(TEXTS[2]) == ours.encode(TEXTS[2])


def test_byte_tokenizer_as_hf_has_the_byte_ids():
    hf = ByteTokenizer().to_hf()
    assert len(hf) == 258 and hf.convert_tokens_to_ids(["<|endoftext|>", "<|pad|>"]) == [256, 257]
    every_byte = bytes(range(256)).decode("latin-1")  # 256 characters, UTF-8 of 1 or 2 bytes each
    assert hf.encode(every_byte, add_special_tokens=False) == list(every_byte.encode("utf-8"))


def test_marker_only_export_still_gives_the_byte_tokenizer(tmp_path):
    (tmp_path / TOKENIZER_MARKER).write_text(json.dumps({"tokenizer": "byte"}))  # an export of older versions
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    (tmp_path / TOKENIZER_MARKER).write_text("{}")
    with pytest.raises(ValueError, match=TOKENIZER_MARKER):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("which, ids", [("byte", (256, 256, 257)), ("gpt2", (50256, 50256, 50256))])
def test_export_config_has_the_tokenizer_ids(tmp_path, which, ids):
    tok = load_tokenizer(which)
    model = _tiny(vocab_size=max(320, tok.vocab_size))
    export_model(model, tok, tmp_path, merge_adapter=None)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == ids


def test_hf_generate_stops_at_eos_of_a_byte_export(tmp_path):
    model = _tiny()
    with torch.no_grad():  # every position's hidden state is ln_f.bias, whose best logit is EOS (256)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.randn(32))
        model.transformer.wte.weight[256] = 5 * model.transformer.ln_f.bias
    export_model(model, ByteTokenizer(), tmp_path, merge_adapter=None)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    prompt = tok("Hi there", return_tensors="pt")
    out = hf.generate(**prompt, max_new_tokens=20, do_sample=False)
    assert out[0, prompt["input_ids"].shape[1]:].tolist() == [256]  # stopped at the first EOS


def _score_batch(tok, ends_in_eos=True):
    texts = ["Human: hi. Assistant: hello!", "ok", "Human: tell me about dogs. Assistant: they bark."]
    return [tok.encode(t) + [tok.eos_token_id] * ends_in_eos for t in texts]


@pytest.mark.parametrize("which", ["byte", "gpt2"])
@pytest.mark.parametrize("bias", [0.0, 0.75])
def test_reward_export_is_a_gpt2_sequence_classifier_with_our_scores(tmp_path, which, bias):
    """HF scores the rightmost token that is not config.pad_token_id; ours the last real token, the EOS a
    response ends in. Byte: right padding with <|pad|>. GPT-2 (pad = EOS): left padding with position ids, as
    README says; its config pad id is outside the vocabulary, so the trailing EOS is scored."""
    tok = load_tokenizer(which)
    model, head = _tiny(vocab_size=max(320, tok.vocab_size)), RewardHead(32)
    with torch.no_grad():
        head.proj.weight.normal_()
        head.proj.bias.fill_(bias)
    export_model(model, tok, tmp_path, merge_adapter=None, score_head=head)
    seqs = _score_batch(tok)
    ids, mask = tok.pad(seqs, side="left")
    with torch.no_grad():
        ours = reward_scores(model, head, ids, mask)
        again = reward_scores(*load_reward_model(tmp_path, attn_backend="sdpa"), ids, mask)
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1).eval()
        assert type(hf).__name__ == "GPT2ForSequenceClassification"
        if which == "byte":
            hf_ids, hf_mask = tok.pad(seqs, side="right")
            theirs = hf(input_ids=hf_ids, attention_mask=hf_mask).logits.squeeze(-1)
        else:
            theirs = hf(input_ids=ids, attention_mask=mask,
                        position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.squeeze(-1)
    torch.testing.assert_close(again, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert len(set(ours.tolist())) == 3


def _random_lora(model, name="policy", rank=4, alpha=8.0, targets=None):
    kwargs = {} if targets is None else {"targets": targets}
    add_lora(model, name, rank=rank, alpha=alpha, **kwargs)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.2)  # B = 0 would make the adapter a no-op and the test blind
    set_adapter(model, name)
    return model


@pytest.mark.parametrize("targets", [None, ("attn.c_proj",)])
def test_peft_adapter_directory_gives_our_logits(tmp_path, targets):
    peft = pytest.importorskip("peft")
    model = _random_lora(_tiny(), targets=targets)
    save_hf_gpt2(model, tmp_path / "base")  # the unmerged base
    save_peft_adapter(model, "policy", tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS).is_file()
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    hf = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    wrapped = {n for n, m in hf.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc")) and hasattr(m, "lora_A")}
    assert len(wrapped) == (8 if targets is None else 2)  # "attn.c_proj" did not also catch mlp.c_proj
    ids = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), atol=1e-5, rtol=0)
        with hf.disable_adapter():
            assert not torch.allclose(hf(input_ids=ids).logits, model(ids), atol=1e-3)


def test_peft_reward_adapter_is_a_sequence_classifier_with_our_scores(tmp_path):
    peft = pytest.importorskip("peft")
    tok = ByteTokenizer()
    model, head = _random_lora(_tiny(), name="reward"), RewardHead(32)
    with torch.no_grad():
        head.proj.weight.normal_()
        head.proj.bias.fill_(-0.5)  # folded into the adapter's own ln_f (modules_to_save)
    save_hf_gpt2(model, tmp_path / "base")
    save_peft_adapter(model, "reward", tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"),
                      score_head=(head.proj.weight, head.proj.bias))
    seqs = _score_batch(tok)
    base = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=1,
                                                                       pad_token_id=tok.pad_token_id)
    hf = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = reward_scores(model, head, *tok.pad(seqs, side="left"))
        ids, mask = tok.pad(seqs, side="right")
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)



def test_hub_name_fails_fast_with_one_line_offline_or_without_an_answering_hub(monkeypatch):
    import socket
    import time

    from huggingface_hub import constants

    from rlhf_fast.model import hf

    name = "no-such-org/no-such-gpt2"
    monkeypatch.setattr(constants, "is_offline_mode", lambda: True)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face hub cache, and HF_HUB_OFFLINE is set"):
        hf.resolve_checkpoint_dir(name)
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    with socket.socket() as silent:  # accepts connections, never answers: a hub a download would wait on
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(hf, "HUB_PROBE_TIMEOUT_S", 0.5)
        start = time.monotonic()
        with pytest.raises(FileNotFoundError, match="the model hub did not provide it") as info:
            hf.resolve_checkpoint_dir(name)
        assert time.monotonic() - start < 5 and "\n" not in str(info.value)
