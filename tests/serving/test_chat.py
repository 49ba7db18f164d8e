"""`rlhf-fast chat`: the conversation over one reused KV cache gives the replies that re-encoding the whole
conversation with `generate` gives; streaming, turn markers, context overflow, the REPL and the CLI."""

import io
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from rlhf_fast.cli import main
from rlhf_fast.data import ByteTokenizer, load_tokenizer
from rlhf_fast.data.tokenizer import TOKENIZER_MARKER
from rlhf_fast.generation import SamplingConfig, decode_graph, generate
from rlhf_fast.model import GPT
from rlhf_fast.serving.chat import ChatSession, run_repl
from rlhf_fast.serving.conversation import hh_prompt
from rlhf_fast.trainers.builders import export_model

N = 12  # max new tokens per reply


@pytest.fixture(scope="module")
def sharp():
    """`tiny` with its matrices scaled up: at init its replies barely depend on the conversation, scaled they
    hinge on all of it, so a cache that lost or misplaced any of the conversation changes them."""
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", attn_backend="torch").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20)
    return model, ByteTokenizer()


def reference(model, tok, context, sampling, seed, n=N):
    """The reply `generate` gives for the whole conversation `context` encoded from scratch."""
    out = generate(model, torch.tensor([context]), max_new_tokens=n, do_sample=sampling.do_sample,
                   temperature=sampling.temperature, eos_token_id=tok.eos_token_id,
                   generator=torch.Generator().manual_seed(seed))
    return out.sequences[0, len(context):][out.response_mask[0].bool()].tolist()


def turn(session, text, seed=0):
    """One streamed turn; (reply, pieces, the conversation the reply answered)."""
    session.generator.manual_seed(seed)
    reply = session.reply(text)
    pieces = list(reply)
    context = session.context_ids()
    return reply, pieces, context[:len(context) - len(reply.token_ids)]


def assert_matches_reencoding(session, reply, context, seed):
    model, tok = session.model, session.tokenizer
    expected = reference(model, tok, context, session.sampling, seed, session.max_new_tokens)
    got = reply.token_ids
    if reply.stop == "eos":
        assert expected == got + [tok.eos_token_id]
    elif reply.stop == "length":
        assert expected == got and len(got) == session.max_new_tokens
    else:  # "turn": the model went on past the turn marker that the chat cut
        assert expected[:len(got)] == got


@pytest.mark.parametrize("sampling", [SamplingConfig(do_sample=False), SamplingConfig(temperature=0.7)],
                         ids=["greedy", "sampled"])
def test_kv_reuse_matches_reencoding_every_turn(sharp, sampling):
    model, tok = sharp
    session = ChatSession(model, tok, sampling=sampling, max_new_tokens=N, system="Be brief.")
    messages = ["Hi", "Dogs?", "ok"]  # 9 + 3 * (21 + 2..5) + 2 * 12 tokens: inside the 128-token context
    replies = []
    for i, text in enumerate(messages):
        before = session.context_ids()
        reply, pieces, context = turn(session, text, seed=i)
        prompt = tok.encode(hh_prompt([{"role": "user", "content": text}]))
        assert reply.notice is None and context == before + prompt  # appended, not re-encoded
        assert "".join(pieces) == reply.text
        assert_matches_reencoding(session, reply, context, seed=i)
        replies.append(reply.token_ids)
    # Not vacuous: the last reply changes with one letter of the first message, and with every position
    # shifted by one, so a cache that lost or misplaced any of the conversation would show.
    other = tok.encode("Be brief." + hh_prompt([{"role": "user", "content": "Ho"}]))
    for changed in (other + context[len(other):], tok.encode(" ") + context):
        assert reference(model, tok, changed, sampling, seed=len(messages) - 1)[:len(replies[-1])] != replies[-1]
    assert [m["role"] for m in session.messages] == ["system"] + ["user", "assistant"] * len(messages)


def test_graph_path_matches_reencoding_and_recaptures_safely(sharp, monkeypatch):
    """The decode engine's graph code path on CPU (capture replaced by a fake whose replay runs the step): the same
    replies; a recapture mid-conversation (its warm-up scribbles on the cache) re-encodes the conversation."""
    model, tok = sharp
    captured = []

    def capture(step, device, generator):
        for _ in range(decode_graph.WARMUP_STEPS):
            step()
        captured.append(step)
        return SimpleNamespace(replay=step)

    monkeypatch.setattr(decode_graph, "capture_graph", capture)
    session = ChatSession(model, tok, sampling=SamplingConfig(temperature=0.7), max_new_tokens=N, cuda_graph=True)
    for i, text in enumerate(["Hi", "Dogs?", "ok"]):
        if i == 2:  # new weight storage, same values: the graph is stale and must be captured again
            model.transformer.wte.weight.data = model.transformer.wte.weight.data.clone()
        reply, _, context = turn(session, text, seed=i)
        assert_matches_reencoding(session, reply, context, seed=i)
    assert len(captured) == 2


def test_context_overflow_drops_oldest_turns_and_keeps_working(sharp):
    model, tok = sharp  # n_positions 128; each turn here takes 9 + 30 + 12 + <= 12 tokens
    session = ChatSession(model, tok, max_new_tokens=N)
    notices = []
    for i in range(4):
        reply, pieces, context = turn(session, f"message {i}: " + "x" * 19, seed=i)
        notices.append(reply.notice)
        assert len(context) + N <= model.config.n_positions
        assert_matches_reencoding(session, reply, context, seed=i)
    assert notices[:2] == [None, None]
    assert notices[2] == "context full (128 tokens, 12 kept for the reply): dropped the oldest turn"
    assert [m["content"] for m in session.messages if m["role"] == "user"][0].startswith("message 2")
    # a message longer than the whole context: its end is kept (with the "Assistant:" marker), and a notice
    reply, _, context = turn(session, "y" * 300, seed=9)
    assert reply.notice.endswith("dropped the 2 oldest turns, kept the last 116 tokens of your message")
    assert len(context) == 116 and tok.decode(context).endswith("yyy\n\nAssistant:")
    assert_matches_reencoding(session, reply, context, seed=9)


def test_system_text_goes_last(sharp):
    model, tok = sharp
    session = ChatSession(model, tok, max_new_tokens=N, system="s" * 60)
    turn(session, "hi")
    reply, _, context = turn(session, "z" * 50)
    assert reply.notice.endswith("dropped the oldest turn, dropped the system text")
    assert tok.decode(context).startswith("\n\nHuman: zzz") and session.messages[0]["role"] == "user"
    assert_matches_reencoding(session, reply, context, seed=0)
    session.reset()  # the system text comes back with a new conversation
    assert session.messages == [{"role": "system", "content": "s" * 60}]
    assert session.context_ids() == tok.encode("s" * 60)


def test_reset_clears_the_conversation(sharp):
    model, tok = sharp
    session = ChatSession(model, tok, max_new_tokens=N)
    turn(session, "Hello there")
    first = session.reply("Hello again")
    next(first, None)  # a reply still streaming when the conversation is reset
    session.reset()
    assert session.messages == [] and session.context_ids() == []
    reply, _, context = turn(session, "Hello again")
    assert context == tok.encode(hh_prompt([{"role": "user", "content": "Hello again"}]))
    assert_matches_reencoding(session, reply, context, seed=0)


def scripted(monkeypatch, tokens):
    """Make the chat sample `tokens` first, then sample as usual (the decode engine's sampler, eager on CPU)."""
    script, real = iter(tokens), decode_graph.sample_next_token

    def sample(logits, cfg, generator=None):
        token = next(script, None)
        return real(logits, cfg, generator) if token is None else torch.tensor([token])

    monkeypatch.setattr(decode_graph, "sample_next_token", sample)


@pytest.fixture
def bpe_tokenizer(tmp_path):
    """A small local byte-level BPE tokenizer like GPT-2's (no hub): all 256 bytes, a few merges, EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("H", "u"), ("Hu", "m"), ("Hum", "a"), ("Huma", "n"), ("Ã", "©"), ("o", "k"), ("Ġ", "ok")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab, merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(tmp_path / "bpe")
    tok = load_tokenizer(str(tmp_path / "bpe"))
    assert len(tok.encode(" ok\n\nHuman:")) == 5  # " ok", "\n", "\n", "Human", ":"
    return tok


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_streaming_holds_back_partial_characters_and_cuts_the_turn_marker(sharp, tokenizer, monkeypatch, request):
    model, _ = sharp
    tok = ByteTokenizer() if tokenizer == "byte" else request.getfixturevalue("bpe_tokenizer")
    session = ChatSession(model, tok, max_new_tokens=40)
    said = " Café ünï ✓ ok"
    scripted(monkeypatch, tok.encode(said + "\n\nHuman:"))  # the reply ends as the marker completes
    reply, pieces, context = turn(session, "Hi")
    assert reply.stop == "turn" and reply.text == said == "".join(pieces)
    assert len(pieces) > 5 and not any("\ufffd" in p or "\n" in p for p in pieces)  # streamed, whole characters
    assert tok.decode(reply.token_ids) == said and session.messages[-1] == {"role": "assistant", "content": said}
    # the marker the model started was rolled back from the cache: the next turn answers the conversation
    reply, _, context = turn(session, "Hello")
    assert tok.decode(context).endswith(said + "\n\nHuman: Hello\n\nAssistant:")
    assert_matches_reencoding(session, reply, context, seed=0)


def test_reply_ends_at_eos_and_at_max_new_tokens(sharp, monkeypatch):
    model, tok = sharp
    session = ChatSession(model, tok, max_new_tokens=5)
    scripted(monkeypatch, tok.encode(" Yes") + [tok.eos_token_id] + tok.encode(" abcd"))
    assert "".join(session.reply("a")) == " Yes"
    reply = session.reply("b")
    assert "".join(reply) == " abcd" and reply.stop == "length"
    reply, _, context = turn(session, "c")  # the 5th token was never fed: it goes in with this turn
    assert tok.decode(context).endswith(" Yes\n\nHuman: b\n\nAssistant: abcd\n\nHuman: c\n\nAssistant:")
    assert_matches_reencoding(session, reply, context, seed=0)


def test_repl_commands(sharp):
    model, tok = sharp
    session = ChatSession(model, tok, max_new_tokens=4)
    lines = iter(["Hello", "", "   ", "/foo", "/reset", "Hi", "/exit", "never read"])
    out = io.StringIO()
    assert run_repl(session, name="sharp", input_fn=lambda prompt: next(lines), output=out) == 0
    text = out.getvalue()
    assert text.startswith("chatting with sharp (128-token context, replies up to 4 tokens)")
    assert text.count("model: ") == 2 and "[unknown command /foo" in text and "[new conversation]" in text
    assert next(lines) == "never read"
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["Hi"]


@pytest.mark.parametrize("stop", [EOFError, KeyboardInterrupt])
def test_repl_eof_and_ctrl_c_at_the_prompt_exit_cleanly(sharp, stop):
    model, tok = sharp

    def input_fn(prompt):
        raise stop

    out = io.StringIO()
    assert run_repl(ChatSession(model, tok, max_new_tokens=4), input_fn=input_fn, output=out) == 0


def test_repl_ctrl_c_during_a_reply_stops_only_that_reply(sharp, monkeypatch):
    model, tok = sharp
    session = ChatSession(model, tok, max_new_tokens=N)
    real, calls = decode_graph.sample_next_token, []

    def interrupted(logits, cfg, generator=None):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(logits, cfg, generator)

    monkeypatch.setattr(decode_graph, "sample_next_token", interrupted)
    lines = iter(["Hello", "Again"])
    out = io.StringIO()
    assert run_repl(session, input_fn=lambda prompt: next(lines, "/exit"), output=out) == 0
    assert "[stopped]" in out.getvalue() and out.getvalue().count("model: ") == 2
    assert len(session.messages[1]["content"]) <= 3  # the stopped reply: what it had printed
    reply, _, context = turn(session, "Third")  # the conversation is intact after the interruption
    assert_matches_reencoding(session, reply, context, seed=0)


def test_session_rejects_impossible_settings(sharp):
    model, tok = sharp
    with pytest.raises(ValueError, match="max_new_tokens 120 leaves no room .* use at most 106"):
        ChatSession(model, tok, max_new_tokens=120)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        ChatSession(model, tok, max_new_tokens=0)
    with pytest.raises(ValueError, match="non-empty"):
        ChatSession(model, tok).reply("  ")


# --- the CLI --------------------------------------------------------------------------------------------


def test_cli_chat_preset_over_stdin():
    out = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "chat", "--model", "tiny", "--device", "cpu",
                          "--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "50"],
                         input="Hello\n/reset\nHi there\n/exit\n", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "chatting with tiny (random init" in out.stdout and out.stdout.count("model: ") == 2
    assert "[new conversation]" in out.stdout and "Traceback" not in out.stderr


def test_cli_chat_export(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    export = export_model(GPT.from_preset("tiny"), ByteTokenizer(), tmp_path / "export", None)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Tell me about Dogs.\nAnd Owls?\n"))  # then EOF
    assert main(["chat", "--model", str(export), "--device", "cpu", "--max-new-tokens", "6",
                 "--temperature", "0", "--system", "You are helpful."]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"chatting with {export} (128-token context") and out.count("model: ") == 2


def _export(tmp_path, name):
    directory = tmp_path / name
    GPT.from_preset("tiny").save_pretrained(directory)
    (directory / TOKENIZER_MARKER).write_text(json.dumps({"tokenizer": "byte"}))
    return directory


def test_cli_chat_bad_input_is_one_line(tmp_path, user_error):
    out = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "chat", "--model", str(tmp_path / "nope")],
                         input="", capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"rlhf-fast: error: {tmp_path / 'nope'}: not a model directory")
    bad_json = _export(tmp_path, "bad_json")
    (bad_json / "config.json").write_text("{not json")
    bad_weights = _export(tmp_path, "bad_weights")
    (bad_weights / "model.safetensors").write_bytes(b"garbage")
    bad_marker = _export(tmp_path, "bad_marker")
    (bad_marker / TOKENIZER_MARKER).write_text("{}")
    cases = [
        ([str(bad_json)], "config.json is not valid JSON"),
        ([str(bad_weights)], r"bad_weights/model.safetensors: corrupt or truncated weights \(Error while deser"),
        ([str(bad_marker)], r"bad_marker/rlhf_fast_tokenizer.json: not a tokenizer marker"),
        (["tiny", "--temperature", "-1"], r"must be >= 0 .*\(--temperature\)$"),
        (["tiny", "--top-p", "0"], r"must be in \(0, 1\] .*\(--top-p\)$"),
        (["tiny", "--top-k", "-2"], r"must be >= 0 .*\(--top-k\)$"),
        (["tiny", "--max-new-tokens", "500"], "max_new_tokens 500 leaves no room for a message"),
        (["tiny", "--max-new-tokens", "0"], r"must be >= 1, got 0 \(--max-new-tokens\)$"),
        (["tiny", "--device", "nonsense"], r"'nonsense' is not a device .*\(--device\)$"),
    ]
    for args, message in cases:
        device = [] if "--device" in args else ["--device", "cpu"]
        assert re.search(message, user_error(["chat", "--model", *args, *device]))
