"""The dynamic batcher without HTTP: text pieces (UTF-8, stop strings, turn markers), grouping by sampling
settings and context fit, per-request limits inside one generate call, stopping the call early, seeds, the
bounded queue, cancellation, and a failing call. Tiny fp32 model on CPU."""

import asyncio
import time

import pytest
import torch

from rlhf_fast.data import ByteTokenizer
from rlhf_fast.generation import generate
from rlhf_fast.model import GPT
from rlhf_fast.serving.batcher import (
    BatchConfig,
    Batcher,
    GenerationError,
    QueueFull,
    Request,
    Sampling,
    TextStream,
)

TOK = ByteTokenizer()
GREEDY = Sampling(temperature=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT.from_preset("tiny", attn_backend="torch").eval()


def pieces(stream: TextStream, text: str) -> list[str]:
    return [stream.add(t) for t in TOK.encode(text)]


def greedy_alone(model, prompt: str, max_tokens: int) -> list[int]:
    """Token ids a greedy request alone gets from generate, EOS dropped."""
    ids = torch.tensor([TOK.encode(prompt)])
    out = generate(model, ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=TOK.eos_token_id,
                   pad_token_id=TOK.pad_token_id)
    tokens = out.sequences[0, ids.shape[1]:][out.response_mask[0].bool()].tolist()
    return tokens[:-1] if tokens and tokens[-1] == TOK.eos_token_id else tokens


def request(prompt: str, max_tokens: int, sampling: Sampling = GREEDY, **kw) -> Request:
    return Request(prompt_ids=TOK.encode(prompt), max_tokens=max_tokens, sampling=sampling, **kw)


async def collect(completion) -> str:
    return await completion.text()


def wait_idle(batcher, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = batcher.stats()
        if not s["busy"] and s["queued"] == 0 and s["running"] == 0:
            return s
        time.sleep(0.01)
    raise AssertionError(f"batcher not idle after {timeout} s: {batcher.stats()}")


# ----------------------------------------------------------------------------------------------
# TextStream


def test_text_stream_holds_incomplete_utf8_characters():
    text = "héllo € 𝄞!"
    stream = TextStream(TOK)
    out = pieces(stream, text)
    assert not any("\ufffd" in p for p in out)
    assert "".join(out) + stream.flush() == text
    assert out[1] == "" and out[2] == "é"  # é is two bytes: nothing until both arrived


def test_text_stream_stop_string_held_back_then_cut():
    stream = TextStream(TOK, stop=("END",))
    out = pieces(stream, "abcEN")
    assert "".join(out) == "abc" and not stream.stopped  # "EN" may start "END": held back
    assert pieces(stream, "x") == ["ENx"]
    assert "".join(pieces(stream, "yEND")) == "y" and stream.stopped
    assert stream.flush() == "" and stream.text.startswith("abcENxyEND")


def test_text_stream_turn_marker_ends_a_chat_reply_and_flush_releases_a_held_tail():
    stream = TextStream(TOK, stop_at_turn=True)
    assert "".join(pieces(stream, " Sure.\n\nHuman: more")) == " Sure." and stream.stopped
    stream = TextStream(TOK, stop_at_turn=True)
    assert "".join(pieces(stream, "Ok\n\nHu")) == "Ok"  # might become "\n\nHuman:"
    assert stream.flush() == "\n\nHu"  # ...but the reply ended (EOS / max_tokens): it is text after all


# ----------------------------------------------------------------------------------------------
# Batching


def test_groups_compatible_requests_and_each_gets_its_alone_text(tiny):
    batcher = Batcher(tiny, TOK, BatchConfig(max_batch_size=4, batch_window_ms=20))
    warm = Sampling(temperature=0.7)
    specs = [("g0", "Hello", 3, GREEDY), ("s0", "Once upon", 6, warm), ("g1", "ab", 6, GREEDY),
             ("g2", "The quick brown fox", 9, GREEDY), ("s1", "x", 5, warm), ("g3", "Why?", 12, GREEDY),
             ("g4", "Hi", 4, GREEDY)]

    async def main():
        # all queued before the worker starts: the grouping is then deterministic
        completions = {name: batcher.submit(request(prompt, n, s)) for name, prompt, n, s in specs}
        batcher.start()
        texts = await asyncio.gather(*(collect(c) for c in completions.values()))
        return completions, dict(zip(completions, texts))

    try:
        completions, texts = asyncio.run(main())
    finally:
        batcher.close()
    # oldest first: the four greedy requests that fit, then both sampled ones, then the greedy one left
    assert {name: c.batch_size for name, c in completions.items()} == dict(g0=4, g1=4, g2=4, g3=4, s0=2, s1=2, g4=1)
    assert batcher.stats()["batch_sizes"] == {"1": 1, "2": 1, "4": 1}
    for name, prompt, n, s in specs:
        c = completions[name]
        assert 1 <= c.completion_tokens <= n
        if s is GREEDY:
            alone = greedy_alone(tiny, prompt, n)
            assert texts[name] == TOK.decode(alone), name  # its own max_tokens, inside a longer call
            ended_by_eos = len(alone) < n
            assert c.finish_reason == ("stop" if ended_by_eos else "length"), name
            assert c.completion_tokens == len(alone) + ended_by_eos, name


def test_a_batch_must_fit_the_context(tiny):
    batcher = Batcher(tiny, TOK, BatchConfig(max_batch_size=4, batch_window_ms=0))
    n = tiny.config.n_positions

    async def main():
        long_prompt = batcher.submit(request("p" * (n - 10), 10))
        long_reply = batcher.submit(request("q" * 10, n - 10))
        batcher.start()
        await asyncio.gather(collect(long_prompt), collect(long_reply))
        return long_prompt, long_reply

    try:
        a, b = asyncio.run(main())
    finally:
        batcher.close()
    assert a.batch_size == b.batch_size == 1  # together: 118 + 118 > 128
    with pytest.raises(ValueError, match="context"):
        asyncio.run(_submit(batcher, request("p" * (n - 5), 6)))


async def _submit(batcher, req):
    return batcher.submit(req)


def test_call_stops_once_every_request_is_done(tiny):
    prompt = "Hi"
    alone = TOK.decode(greedy_alone(tiny, prompt, 24))
    stop = alone[3:5]
    assert alone.find(stop) > 0, "precondition: the greedy reply holds the stop string after some text"
    forwards = []
    hook = tiny.transformer.ln_f.register_forward_hook(lambda *_: forwards.append(1))
    batcher = Batcher(tiny, TOK, BatchConfig(max_batch_size=2, batch_window_ms=0))

    async def main():
        stopped = batcher.submit(request(prompt, 24, stop=(stop,)))
        short = batcher.submit(request("Tell me", 3))
        batcher.start()
        return stopped, short, await collect(stopped), await collect(short)

    try:
        stopped, short, text, _ = asyncio.run(main())
        wait_idle(batcher)
    finally:
        hook.remove()
        batcher.close()
    assert stopped.batch_size == 2 and stopped.finish_reason == "stop"
    assert text == alone[: alone.find(stop)]
    assert short.completion_tokens <= 3
    assert len(forwards) <= 8  # prefill + steps up to the stop string, not 24


def test_seeded_requests_run_alone_and_reproduce(tiny):
    batcher = Batcher(tiny, TOK, BatchConfig(max_batch_size=4, batch_window_ms=20))
    seeded = lambda seed: request("Once", 12, Sampling(temperature=1.0, seed=seed))  # noqa: E731

    async def main():
        completions = [batcher.submit(r) for r in (seeded(3), seeded(3), seeded(4), request("Once", 12, GREEDY))]
        batcher.start()
        return completions, await asyncio.gather(*(collect(c) for c in completions))

    try:
        completions, texts = asyncio.run(main())
    finally:
        batcher.close()
    assert [c.batch_size for c in completions] == [1, 1, 1, 1]
    assert texts[0] == texts[1] and texts[0] != texts[2]
    ids = torch.tensor([TOK.encode("Once")])
    direct = generate(tiny, ids, max_new_tokens=12, do_sample=True, eos_token_id=TOK.eos_token_id,
                      generator=torch.Generator().manual_seed(3))
    tokens = direct.sequences[0, 4:][direct.response_mask[0].bool()].tolist()
    assert texts[0] == TOK.decode([t for t in tokens if t != TOK.eos_token_id])


# ----------------------------------------------------------------------------------------------
# Queue, cancellation, failures


def test_bounded_queue_and_cancel_frees_a_place(tiny):
    batcher = Batcher(tiny, TOK, BatchConfig(max_queue=2))  # not started: requests stay queued

    async def main():
        first = batcher.submit(request("a", 4))
        batcher.submit(request("b", 4))
        with pytest.raises(QueueFull, match="max-queue 2"):
            batcher.submit(request("c", 4))
        first.cancel()
        assert batcher.stats()["queued"] == 1
        third = batcher.submit(request("c", 4))
        batcher.close()  # waiting requests fail instead of hanging
        with pytest.raises(GenerationError, match="shutting down"):
            await collect(third)

    asyncio.run(main())


def test_cancelled_request_frees_its_slot_and_stops_the_call(tiny):
    prompt = "Go on"
    assert len(greedy_alone(tiny, prompt, 40)) == 40, "precondition: no EOS within 40 greedy tokens"
    forwards = []

    def slow(*_):
        forwards.append(1)
        time.sleep(0.005)

    hook = tiny.transformer.ln_f.register_forward_hook(slow)
    batcher = Batcher(tiny, TOK, BatchConfig(max_batch_size=2, batch_window_ms=0))
    batcher.start()

    async def main():
        completion = batcher.submit(request(prompt, 40))
        async for _ in completion:  # the first piece: it is running
            break
        assert batcher.stats()["running"] == 1
        completion.cancel()

    try:
        asyncio.run(main())
        stats = wait_idle(batcher)
    finally:
        hook.remove()
        batcher.close()
    assert stats["batches"] == 1
    assert len(forwards) < 25  # the call stopped soon after, not at 40 tokens


def test_a_failing_call_fails_its_requests_and_the_worker_carries_on(tiny):
    failures = [RuntimeError("boom")]

    def fail_once(*_):
        if failures:
            raise failures.pop()

    hook = tiny.transformer.ln_f.register_forward_hook(fail_once)
    batcher = Batcher(tiny, TOK, BatchConfig(batch_window_ms=0))
    batcher.start()

    async def main():
        with pytest.raises(GenerationError, match="RuntimeError: boom"):
            await collect(batcher.submit(request("a", 4)))
        return await collect(batcher.submit(request("Hello", 3)))

    try:
        text = asyncio.run(main())
    finally:
        hook.remove()
        batcher.close()
    assert text == TOK.decode(greedy_alone(tiny, "Hello", 3))
