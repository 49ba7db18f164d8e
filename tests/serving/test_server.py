"""The HTTP server through real clients (httpx and the `openai` client) on a free loopback port: completions
and chat completions, plain and streamed; concurrent requests batched, each getting its alone text; 429 when
the queue is full; 4xx JSON errors naming the field; a client leaving mid-stream frees its slot; /health,
/v1/models, the chat page; `rlhf-fast serve` without the extra. A tiny random-init model on CPU."""

import json
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serving_testing import running, tiny_model  # noqa: E402

from rlhf_fast.data import ByteTokenizer  # noqa: E402
from rlhf_fast.generation import generate  # noqa: E402
from rlhf_fast.serving import server as server_module  # noqa: E402
from rlhf_fast.serving.batcher import BatchConfig  # noqa: E402
from rlhf_fast.serving.conversation import end_of_reply, hh_prompt  # noqa: E402
from rlhf_fast.serving.server import create_app  # noqa: E402

TOK = ByteTokenizer()
NAME = "tiny-test"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def url(model):
    app = create_app(model, TOK, NAME, BatchConfig(max_batch_size=8, batch_window_ms=100))
    with running(app) as base:
        yield base


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


def wait_idle(http, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = http.get("/health").json()
        if health["queued"] == 0 and health["running"] == 0 and not health["busy"]:
            return health
        assert time.monotonic() < deadline, f"server not idle: {health}"
        time.sleep(0.01)


def greedy_text(model, prompt: str, max_tokens: int) -> tuple[str, int]:
    """(text, tokens) a greedy request alone gets from generate: up to EOS (excluded, but counted)."""
    ids = torch.tensor([TOK.encode(prompt)])
    out = generate(model, ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=TOK.eos_token_id)
    tokens = out.sequences[0, ids.shape[1]:][out.response_mask[0].bool()].tolist()
    return TOK.decode([t for t in tokens if t != TOK.eos_token_id]), len(tokens)


def sse(response) -> list:
    """The JSON payloads of a server-sent event stream, "[DONE]" kept as the string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ----------------------------------------------------------------------------------------------
# Endpoints through httpx


def test_health_models_and_unknown_paths(http):
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == NAME and health["max_batch_size"] == 8
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]
    assert http.get(f"/v1/models/{NAME}").json()["max_model_len"] == 128
    r = http.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_completion_equals_generate_and_streams_the_same_text(http, model):
    body = dict(model=NAME, prompt="Hello there", max_tokens=12, temperature=0)
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    text, n = greedy_text(model, "Hello there", 12)
    assert out["object"] == "text_completion" and out["model"] == NAME
    assert out["choices"][0]["text"] == text
    assert out["choices"][0]["finish_reason"] == ("length" if n == 12 and text else "stop")
    assert out["usage"] == dict(prompt_tokens=11, completion_tokens=n, total_tokens=11 + n)

    with http.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                       "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert all(e["object"] == "text_completion" and e["id"] == chunks[0]["id"] for e in chunks)
    assert "".join(e["choices"][0]["text"] for e in chunks) == text
    assert [e["choices"][0]["finish_reason"] for e in chunks][-1] == out["choices"][0]["finish_reason"]
    assert events[-2]["usage"] == out["usage"]


def test_chat_completion_streamed_and_not(http, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    body = dict(model=NAME, messages=messages, max_tokens=16, temperature=0)
    out = http.post("/v1/chat/completions", json=body).json()
    assert out["object"] == "chat.completion"
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant"
    # the reply is the HH-format continuation, cut at a new turn, leading whitespace dropped
    raw, _ = greedy_text(model, hh_prompt(messages), 16)
    end = end_of_reply(raw)
    assert message["content"] == (raw if end is None else raw[:end]).lstrip()

    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == message["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]


def test_concurrent_requests_are_batched_and_each_gets_its_alone_text(http):
    prompts = [f"{i}: " + "ab" * i for i in range(8)]
    bodies = [dict(model=NAME, prompt=p, max_tokens=4 + 2 * i, temperature=0) for i, p in enumerate(prompts)]
    alone = [http.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in bodies]  # one at a time
    before = http.get("/health").json()["batch_sizes"]
    assert set(before) == {"1"}

    results = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def send(i):
        with httpx.Client(timeout=30) as client:
            start.wait()
            results[i] = client.post(str(http.base_url) + "/v1/completions", json=bodies[i]).json()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r["choices"][0]["text"] for r in results] == alone
    health = wait_idle(http)
    assert max(int(size) for size in health["batch_sizes"]) > 1, health["batch_sizes"]


# ----------------------------------------------------------------------------------------------
# The openai client


def test_openai_client(url, http):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == [NAME]

    done = client.completions.create(model=NAME, prompt="Hello there", max_tokens=12, temperature=0)
    plain = http.post("/v1/completions", json=dict(model=NAME, prompt="Hello there", max_tokens=12,
                                                    temperature=0)).json()
    assert done.choices[0].text == plain["choices"][0]["text"]
    assert done.usage.completion_tokens == plain["usage"]["completion_tokens"]
    streamed = client.completions.create(model=NAME, prompt="Hello there", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text

    messages = [{"role": "user", "content": "Hi there"}]
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content

    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4", messages=messages)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "bot", "content": "hi"}])
    assert e.value.body["param"] == "messages[0].role"


# ----------------------------------------------------------------------------------------------
# Bad requests


CHAT = "/v1/chat/completions"
COMPLETE = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("path, body, status, param", [
    (CHAT, dict(model=NAME), 400, "messages"),
    (CHAT, dict(messages=[]), 400, "messages"),
    (CHAT, dict(messages="Hi"), 400, "messages"),
    (CHAT, dict(messages=[{"role": "robot", "content": "Hi"}]), 400, "messages[0].role"),
    (CHAT, dict(messages=[{"role": "user", "content": 3}]), 400, "messages[0].content"),
    (CHAT, dict(messages=USER + [{"role": "assistant", "content": "Yes"}]), 400, "messages[1].role"),
    (CHAT, dict(messages=USER, max_tokens=200), 400, "max_tokens"),
    (CHAT, dict(messages=USER, max_completion_tokens=500), 400, "max_completion_tokens"),
    (CHAT, dict(messages=USER, model="gpt-4"), 404, "model"),
    (CHAT, dict(messages=USER, model=7), 400, "model"),
    (CHAT, dict(messages=USER, temperature="hot"), 400, "temperature"),
    (CHAT, dict(messages=USER, temperature=-1), 400, "temperature"),
    (CHAT, dict(messages=USER, top_p=0), 400, "top_p"),
    (CHAT, dict(messages=USER, stream="yes"), 400, "stream"),
    (CHAT, dict(messages=USER, n=2), 400, "n"),
    (CHAT, dict(messages=USER, stream_options={"include_usage": "yes"}), 400, "stream_options"),
    (CHAT, dict(messages=USER, seed=1.5), 400, "seed"),
    (COMPLETE, dict(model=NAME), 400, "prompt"),
    (COMPLETE, dict(prompt=["a", "b"]), 400, "prompt"),
    (COMPLETE, dict(prompt="x" * 200), 400, "prompt"),
    (COMPLETE, dict(prompt="Hi", max_tokens=127), 400, "max_tokens"),
    (COMPLETE, dict(prompt="Hi", max_tokens="10"), 400, "max_tokens"),
    (COMPLETE, dict(prompt="Hi", max_tokens=0), 400, "max_tokens"),
    (COMPLETE, dict(prompt="Hi", top_k=-1), 400, "top_k"),
    (COMPLETE, dict(prompt="Hi", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (COMPLETE, dict(prompt="Hi", stop=[""]), 400, "stop"),
    (COMPLETE, dict(prompt="Hi", frequency_penalty=0.5), 400, "frequency_penalty"),
    (COMPLETE, [1, 2], 400, None),
    (COMPLETE, b"{not json", 400, None),
    (CHAT, b"\xff\xfe", 400, None),
])
def test_bad_requests_get_json_errors_naming_the_field(http, path, body, status, param):
    kw = dict(content=body) if isinstance(body, bytes) else dict(json=body)
    r = http.post(path, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] and error["message"]
    if param is not None:
        assert error["message"].startswith(param + ": ")
    if isinstance(body, bytes):
        assert "invalid JSON" in error["message"]
    assert http.get("/health").status_code == 200


def test_max_tokens_that_just_fit_the_context_are_served(http):
    r = http.post(COMPLETE, json=dict(prompt="Hi", max_tokens=126, temperature=0, stop="\x00"))
    assert r.status_code == 200, r.text


# ----------------------------------------------------------------------------------------------
# Queue full, disconnects, the page, the CLI


def test_full_queue_answers_429_and_the_waiting_requests_still_complete():
    model, gate = tiny_model(), threading.Event()
    model.transformer.ln_f.register_forward_hook(lambda *_: gate.wait(30) and None)  # generation waits for it
    app = create_app(model, TOK, NAME, BatchConfig(max_batch_size=1, batch_window_ms=0, max_queue=2))
    body = dict(prompt="Hi", max_tokens=3, temperature=0)
    with running(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        statuses = []
        senders = [threading.Thread(target=lambda: statuses.append(
            httpx.post(base + COMPLETE, json=body, timeout=30).status_code)) for _ in range(3)]
        senders[0].start()
        deadline = time.monotonic() + 10
        while http.get("/health").json()["running"] != 1:  # the first is held inside generate
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for t in senders[1:]:
            t.start()
        while http.get("/health").json()["queued"] != 2:  # answered while generate is blocked
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = http.post(COMPLETE, json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        gate.set()
        for t in senders:
            t.join()
        assert statuses == [200, 200, 200]
        assert wait_idle(http)["batch_sizes"] == {"1": 3}


@pytest.mark.parametrize("stream", [True, False])
def test_client_leaving_mid_reply_frees_its_slot(stream):
    model = tiny_model()
    prompt = "Go on"
    text, n = greedy_text(model, prompt, 60)
    assert n == 60 and len(text) > 2, "precondition: no EOS within 60 greedy tokens"
    forwards = []

    def slow(*_):
        forwards.append(1)
        time.sleep(0.02)

    model.transformer.ln_f.register_forward_hook(slow)
    app = create_app(model, TOK, NAME, BatchConfig(max_batch_size=4, batch_window_ms=0))
    body = dict(prompt=prompt, max_tokens=60, temperature=0, stream=stream)
    with running(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        if stream:
            with httpx.Client(base_url=base, timeout=30) as leaving:
                with leaving.stream("POST", COMPLETE, json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                            break  # one piece of text, then hang up
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and closes the connection
                httpx.post(base + COMPLETE, json=body, timeout=0.3)
        health = wait_idle(http)
        assert len(forwards) < 40, "the call went on for the client that left"
        assert health["batches"] == 1
        r = http.post(COMPLETE, json=dict(prompt="Hi", max_tokens=3, temperature=0))
        assert r.status_code == 200  # and the server serves the next one


def test_chat_page_at_root(http, tmp_path, monkeypatch):
    page = tmp_path / "index.html"
    page.write_text("<!doctype html><title>chat</title>")
    monkeypatch.setattr(server_module, "INDEX_HTML", page)
    r = http.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and "chat" in r.text
    monkeypatch.setattr(server_module, "INDEX_HTML", tmp_path / "missing.html")
    r = http.get("/")
    assert r.status_code == 404 and "chat page" in r.json()["error"]["message"]


def test_cli_serve_without_the_extra_says_what_to_install(monkeypatch, user_error):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert "pip install 'rlhf_fast[serve]'" in user_error(["serve", "--model", "tiny"])
