"""OpenAI-compatible HTTP server over the batched generation engine (FastAPI + uvicorn: the `serve` extra).

    POST /v1/completions       {"prompt": str, "max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
                               "stream", "stream_options": {"include_usage"}}
    POST /v1/chat/completions  {"messages": [{"role", "content"}, ...], same options}: the conversation in the
                               HH format (conversation.py); the reply ends at EOS or where the model starts a
                               new turn. max_tokens defaults to 16 for completions (as OpenAI's), and to what the
                               context leaves (at most CHAT_MAX_TOKENS) for chat
    GET  /v1/models, /v1/models/{id}, /health (queue and batch counters), / (the chat page, static/index.html)

Every request goes through the dynamic batcher (batcher.py); handlers only await its pieces, so the event loop
keeps answering (/health included) while the worker thread generates. `stream: true` answers with server-sent
events ("data: {chunk}", then "data: [DONE]"); a client that leaves mid-reply frees its slot. Errors are
OpenAI-shaped JSON, {"error": {"message", "type", "param", "code"}}: 400 naming the field (`param`) for a bad
request, 401 without the API key (when the server has one), 404 for an unknown model or path, 413 for a body
over the size limit, 429 when the queue is full or too many streams are open, 500 when generation itself fails.
The key check and the limits are in guard.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .batcher import BatchConfig, Batcher, Completion, GenerationError, QueueFull, Request, Sampling
from .conversation import check_messages, hh_prompt
from .guard import APIError, RequireApiKey, ServerLimits, StreamSlots, read_body

INDEX_HTML = Path(__file__).parent / "static" / "index.html"
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 256  # a chat reply without max_tokens: what the context leaves, at most this
MAX_STOP = 4  # stop strings per request, as OpenAI
# OpenAI fields not implemented here: accepted only at their neutral value (or null), else 400 naming them.
NEUTRAL = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False, 0), "top_logprobs": (0,),
           "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "suffix": ("",),
           "tools": ([],)}


# ----------------------------------------------------------------------------------------------
# Request parsing: JSON body -> batcher Request, naming the offending field in every error


def _bad(name: str, what: str, value) -> APIError:
    shown = json.dumps(value)
    return APIError(400, f"{name}: {what}, got {shown if len(shown) <= 60 else shown[:57] + '...'}", name)


def _int(body: dict, name: str, default: int | None = None, minimum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, "must be an integer", value)
    if minimum is not None and value < minimum:
        raise _bad(name, f"must be >= {minimum}", value)
    return value


def _float(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, "must be a number", value)
    return float(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, "must be true or false", value)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop", f"must be a non-empty string or a list of at most {MAX_STOP} of them", stop)
    return tuple(stops)


def _prompt_text(body: dict, chat: bool) -> tuple[str, str]:
    """(field, prompt text) of a chat or completion request."""
    if chat:
        if "messages" not in body:
            raise APIError(400, "messages: required, a list of {\"role\", \"content\"} objects", "messages")
        try:
            return "messages", hh_prompt(check_messages(body["messages"]))
        except ValueError as e:
            raise APIError.from_value_error(e) from None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:  # a batch of one, as some clients send it
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt", "required, a string", prompt)
    return "prompt", prompt


def parse_request(body, *, chat: bool, model_name: str, tokenizer, n_positions: int) -> tuple[Request, bool, bool]:
    """(batcher Request, stream, include_usage) from a decoded JSON body; raises APIError."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model", model_name)  # optional: this server serves one model
    if not isinstance(model, str):
        raise _bad("model", "must be a string", model)
    if model != model_name:
        raise APIError(404, f"model: {model!r} is not served here; this server serves {model_name!r}", "model",
                       "model_not_found")
    for name, neutral in NEUTRAL.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise _bad(name, f"not supported by this server (only {json.dumps(neutral[0])})", body[name])
    field, text = _prompt_text(body, chat)
    prompt_ids = tokenizer.encode(text) or [tokenizer.eos_token_id]  # an empty prompt starts from EOS
    room = n_positions - len(prompt_ids)
    if room < 1:
        raise APIError(400, f"{field}: the prompt is {len(prompt_ids)} tokens, which leaves no room for a reply in "
                            f"the model's context of {n_positions} tokens", field)
    limit_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, limit_name, minimum=1)
    if max_tokens is None:
        max_tokens = min(CHAT_MAX_TOKENS if chat else COMPLETION_MAX_TOKENS, room)
    elif max_tokens > room:
        raise APIError(400, f"{limit_name}: {max_tokens} new tokens + the prompt's {len(prompt_ids)} exceed the "
                            f"model's context of {n_positions} tokens (at most {room} fit)", limit_name)
    try:
        sampling = Sampling(temperature=_float(body, "temperature", 1.0), top_p=_float(body, "top_p", 1.0),
                            top_k=_int(body, "top_k", 0), seed=_int(body, "seed"))
    except ValueError as e:
        raise APIError.from_value_error(e) from None
    stream = _bool(body, "stream")
    options = body.get("stream_options") or {}
    include_usage = options.get("include_usage", False) if isinstance(options, dict) else None
    if not isinstance(include_usage, bool):
        raise _bad("stream_options", "must be an object like {\"include_usage\": true}", options)
    request = Request(prompt_ids=prompt_ids, max_tokens=max_tokens, sampling=sampling, stop=_stop(body),
                      stop_at_turn=chat, strip_leading=chat)
    return request, stream, include_usage


async def _json_body(http: HTTPRequest, limit: int):
    body = await read_body(http, limit)  # 413 beyond the limit
    try:
        return json.loads(body)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise APIError(400, f"invalid JSON in the request body: {e}") from None


# ----------------------------------------------------------------------------------------------
# Answers


def _usage(request: Request, completion: Completion) -> dict:
    n_prompt, n_new = len(request.prompt_ids), completion.completion_tokens
    return dict(prompt_tokens=n_prompt, completion_tokens=n_new, total_tokens=n_prompt + n_new)


def _choice(chat: bool, stream: bool, text: str | None, finish_reason: str | None) -> dict:
    if not chat:
        return dict(index=0, text=text or "", logprobs=None, finish_reason=finish_reason)
    if stream:
        return dict(index=0, delta={} if text is None else {"content": text}, logprobs=None,
                    finish_reason=finish_reason)
    return dict(index=0, message={"role": "assistant", "content": text}, logprobs=None, finish_reason=finish_reason)


def _sse(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _stream(completion: Completion, chat: bool, head: dict, include_usage: bool):
    """Server-sent events of one completion. Starlette cancels this generator when the client disconnects (it
    listens for http.disconnect while streaming); the finally then frees the request's slot in the batcher."""
    chunk = lambda text, reason=None: {**head, "choices": [_choice(chat, True, text, reason)]}  # noqa: E731
    try:
        if chat:
            yield _sse({**head, "choices": [dict(index=0, delta={"role": "assistant", "content": ""}, logprobs=None,
                                                 finish_reason=None)]})
        async for piece in completion:
            yield _sse(chunk(piece))
        yield _sse(chunk(None, completion.finish_reason))
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(completion.request, completion)})
    except GenerationError as e:
        yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
    finally:
        completion.cancel()  # a no-op once it has finished
    yield "data: [DONE]\n\n"


class _SlotStream(StreamingResponse):
    """A streaming answer that calls `release` once it ends, however it ends: also when the client is gone before
    the body generator starts (then the generator's own finally never runs)."""

    def __init__(self, content, release, **kwargs):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def _disconnected(http: HTTPRequest) -> None:
    """Returns when the client has gone (the body is read: all that is left to receive is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _text_unless_gone(http: HTTPRequest, completion: Completion) -> str | None:
    """The whole reply, or None when the client disconnects first (its slot is then freed)."""
    text = asyncio.ensure_future(completion.text())
    gone = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({text, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not text.done():
            completion.cancel()
            text.cancel()
    return text.result() if text.done() and not text.cancelled() else None


# ----------------------------------------------------------------------------------------------
# The app


def create_app(model, tokenizer, model_name: str, batch: BatchConfig | None = None,
               limits: ServerLimits | None = None) -> FastAPI:
    """The server's FastAPI app: `model` (eval mode, on its device) and `tokenizer` served as `model_name`,
    batched as `batch` says, guarded as `limits` says (API key, body size, open streams). The batcher's worker
    thread runs from app startup to shutdown (the lifespan); it is `app.state.batcher`."""
    batcher = Batcher(model, tokenizer, batch or BatchConfig())
    limits = limits or ServerLimits()
    streams = StreamSlots(limits.max_streams, limits.max_streams_per_client)
    n_positions = model.config.n_positions
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.close)

    app = FastAPI(title="rlhf-fast serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    if limits.api_key is not None:
        app.add_middleware(RequireApiKey, api_key=limits.api_key)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):  # unknown path, wrong method
        return APIError(e.status_code, str(e.detail)).response()

    async def answer(http: HTTPRequest, chat: bool):
        request, stream, include_usage = parse_request(await _json_body(http, limits.max_body_bytes), chat=chat,
                                                       model_name=model_name, tokenizer=tokenizer,
                                                       n_positions=n_positions)
        client = http.client.host if http.client else "?"
        if stream:
            streams.acquire(client)  # 429 when this client (or everyone) has too many open
        try:
            completion = batcher.submit(request)
        except (QueueFull, GenerationError) as e:
            if stream:
                streams.release(client)
            if isinstance(e, QueueFull):
                raise APIError(429, f"server busy: {e}; retry later", code="queue_full") from None
            raise APIError(503, str(e)) from None
        kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
        head = dict(id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, object=kind, created=int(time.time()),
                    model=model_name)
        if stream:
            def release():
                completion.cancel()  # a no-op once it has finished
                streams.release(client)

            return _SlotStream(_stream(completion, chat, head, include_usage), release, media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text = await _text_unless_gone(http, completion)
        except GenerationError as e:
            raise APIError(500, str(e)) from None
        if text is None:
            return JSONResponse({"error": {"message": "client closed the request"}}, status_code=499)
        return {**head, "choices": [_choice(chat, False, text, completion.finish_reason)],
                "usage": _usage(request, completion)}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        return await answer(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        return await answer(http, chat=True)

    card = dict(id=model_name, object="model", created=started, owned_by="rlhf_fast", max_model_len=n_positions)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"model: {model_id!r} is not served here; this server serves {model_name!r}",
                           "model", "model_not_found")
        return card

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "streams": streams.count(), **batcher.stats()}

    @app.get("/", include_in_schema=False)
    async def index():
        if not INDEX_HTML.is_file():
            raise APIError(404, f"no chat page installed ({INDEX_HTML.name} missing from the package)")
        return FileResponse(INDEX_HTML, media_type="text/html")

    return app


def serve(model, tokenizer, model_name: str, *, host: str = "127.0.0.1", port: int = 8000,
          batch: BatchConfig | None = None, limits: ServerLimits | None = None, log_level: str = "info") -> None:
    """Run the server until interrupted (Ctrl-C)."""
    import uvicorn

    uvicorn.run(create_app(model, tokenizer, model_name, batch, limits), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)
