"""The server's guard on a real loopback port: with an API key every /v1/* route answers 401 (OpenAI-shaped error)
without it or with a wrong one, and 200 with it through the `openai` client, while /health and the chat page stay
open; a body over --max-body-bytes gets 413 (declared or chunked); streams beyond --max-streams(-per-client) get
429 and their slots come back; the server keeps serving after each refusal. `rlhf-fast serve` wiring:
--served-model-name (and its default), the key from $RLHF_FAST_API_KEY, the warning for a non-loopback host."""

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serving_testing import running, tiny_model  # noqa: E402

from rlhf_fast.cli import main  # noqa: E402
from rlhf_fast.data import ByteTokenizer  # noqa: E402
from rlhf_fast.serving import server as server_module  # noqa: E402
from rlhf_fast.serving.batcher import BatchConfig  # noqa: E402
from rlhf_fast.serving.commands import served_model_name  # noqa: E402
from rlhf_fast.serving.guard import ServerLimits  # noqa: E402
from rlhf_fast.serving.server import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = ByteTokenizer()
NAME = "tiny-guarded"
KEY = "sk-test-0123456789"
COMPLETE, CHAT = "/v1/completions", "/v1/chat/completions"
BODY = dict(prompt="Hi", max_tokens=3, temperature=0)


@pytest.fixture(scope="module")
def url():
    app = create_app(tiny_model(), TOK, NAME, BatchConfig(max_batch_size=4, batch_window_ms=0),
                     ServerLimits(api_key=KEY, max_body_bytes=512))
    with running(app) as base:
        yield base


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


def auth(key=KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"] and error["type"], error
    if code is not None:
        assert error["code"] == code, error
    return error


# ----------------------------------------------------------------------------------------------
# API key


@pytest.mark.parametrize("headers", [{}, auth("sk-wrong"), auth(KEY + "x"), {"Authorization": KEY},
                                     {"Authorization": "Basic " + KEY}], ids=["none", "wrong", "longer", "no-scheme",
                                                                              "basic"])
@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("GET", f"/v1/models/{NAME}"), ("POST", COMPLETE),
                                          ("POST", CHAT), ("GET", "/v1/nothing")])
def test_every_v1_route_needs_the_key(http, headers, method, path):
    r = http.request(method, path, headers=headers, json=BODY)
    error = assert_error(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer" and KEY not in error["message"]
    assert http.get("/health").status_code == 200


def test_health_and_the_chat_page_stay_open_and_the_key_opens_v1(http):
    assert http.get("/health").json()["status"] == "ok"
    assert http.get("/").status_code == 200
    assert [m["id"] for m in http.get("/v1/models", headers=auth()).json()["data"]] == [NAME]
    assert http.get("/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200  # any case
    r = http.post(COMPLETE, json=BODY, headers=auth())
    assert r.status_code == 200 and r.json()["model"] == NAME


def test_openai_client_with_and_without_the_key(url, http):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == [NAME]
    done = client.completions.create(model=NAME, prompt="Hello", max_tokens=4, temperature=0)
    assert done.model == NAME and done.usage.completion_tokens >= 1
    streamed = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                              temperature=0, stream=True)
    assert all(chunk.model == NAME for chunk in streamed)
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model=NAME, prompt="Hello", max_tokens=4)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert http.get("/health").status_code == 200


# ----------------------------------------------------------------------------------------------
# Body size


def test_an_oversized_body_gets_413_declared_or_chunked(http):
    big = json.dumps(dict(BODY, prompt="x" * 600)).encode()
    assert_error(http.post(COMPLETE, content=big, headers={**auth(), "content-type": "application/json"}), 413,
                 "request_too_large")
    chunked = (big[i:i + 100] for i in range(0, len(big), 100))  # no Content-Length: counted while read
    error = assert_error(http.post(COMPLETE, content=chunked, headers=auth()), 413, "request_too_large")
    assert "--max-body-bytes" in error["message"]
    small = json.dumps(dict(BODY, prompt="x" * 100)).encode()
    assert len(small) < 512 and http.post(COMPLETE, content=small, headers=auth()).status_code == 200
    assert http.get("/health").status_code == 200


# ----------------------------------------------------------------------------------------------
# Concurrent streams


@pytest.mark.parametrize("limits", [dict(max_streams_per_client=1), dict(max_streams=1)], ids=["per-client", "total"])
def test_streams_beyond_the_cap_get_429_and_their_slots_come_back(limits):
    model, gate = tiny_model(), threading.Event()
    model.transformer.ln_f.register_forward_hook(lambda *_: gate.wait(30) and None)  # generation waits for it
    app = create_app(model, TOK, NAME, BatchConfig(max_batch_size=4, batch_window_ms=0), ServerLimits(**limits))
    stream = dict(BODY, stream=True)
    with running(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        held = threading.Thread(target=lambda: httpx.post(base + COMPLETE, json=stream, timeout=30))
        held.start()
        deadline = time.monotonic() + 10
        while http.get("/health").json()["streams"] != 1:  # the first stream is open, its generation held
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = http.post(COMPLETE, json=stream)
        error = assert_error(r, 429, "too_many_streams")
        flag = "--max-streams-per-client" if "max_streams_per_client" in limits else "--max-streams"
        assert flag in error["message"]
        gate.set()
        held.join()
        assert http.get("/health").json()["streams"] == 0
        r = http.post(COMPLETE, json=stream)
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


# ----------------------------------------------------------------------------------------------
# `rlhf-fast serve`: the name, the key from the environment, the warning


@pytest.fixture
def served(monkeypatch):
    """Runs `rlhf-fast serve ...` in-process with uvicorn replaced: returns what the app was built with."""
    built = {}

    def fake_serve(model, tokenizer, model_name, *, host, port, batch, limits, log_level="info"):
        built.update(name=model_name, limits=limits, app=create_app(model, tokenizer, model_name, batch, limits))

    monkeypatch.setattr(server_module, "serve", fake_serve)

    def run(*argv):
        built.clear()
        assert main(["serve", *argv]) == 0
        return built

    return run


def test_served_model_name_shows_in_v1_models(served):
    from fastapi.testclient import TestClient

    built = served("--model", "tiny", "--served-model-name", "my-assistant", "--device", "cpu")
    with TestClient(built["app"]) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["my-assistant"]
        r = client.post(COMPLETE, json=dict(BODY, model="my-assistant"))
        assert r.status_code == 200 and r.json()["model"] == "my-assistant"
        assert client.post(COMPLETE, json=dict(BODY, model="tiny")).status_code == 404


def test_default_served_model_name(tmp_path):
    assert served_model_name("tiny") == "tiny"
    run = tmp_path / "my-policy"
    (run / "export").mkdir(parents=True)
    (run / "export" / "config.json").write_text("{}")
    assert served_model_name(str(run / "export")) == "export"  # no run config beside it: the directory's name
    (run / "config.json").write_text(json.dumps({"stage": "ppo"}))
    assert served_model_name(str(run / "export")) == "my-policy"
    hf = tmp_path / "downloaded"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"_name_or_path": "openai-community/gpt2"}))
    assert served_model_name(str(hf)) == "openai-community/gpt2"
    (hf / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path / "somewhere")}))
    assert served_model_name(str(hf)) == "downloaded"  # a local path is no model name


def test_key_from_the_environment_and_the_open_host_warning(served, monkeypatch, capsys):
    monkeypatch.setenv("RLHF_FAST_API_KEY", KEY)
    capsys.readouterr()
    assert served("--model", "tiny", "--device", "cpu", "--host", "0.0.0.0")["limits"].api_key == KEY
    assert "API key" not in capsys.readouterr().err  # a key: no warning
    assert served("--model", "tiny", "--device", "cpu", "--api-key", "other")["limits"].api_key == "other"
    monkeypatch.delenv("RLHF_FAST_API_KEY")
    capsys.readouterr()
    assert served("--model", "tiny", "--device", "cpu", "--host", "0.0.0.0")["limits"].api_key is None
    warned = [line for line in capsys.readouterr().err.splitlines() if "without an API key" in line]
    assert len(warned) == 1 and "0.0.0.0" in warned[0] and "--api-key" in warned[0]
    capsys.readouterr()
    served("--model", "tiny", "--device", "cpu")  # loopback: no warning
    assert "without an API key" not in capsys.readouterr().err
