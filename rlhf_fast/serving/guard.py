"""What the HTTP server refuses before any generation: requests without the API key (401), bodies over
--max-body-bytes (413) and streams beyond --max-streams / --max-streams-per-client (429). Errors are
OpenAI-shaped JSON, {"error": {"message", "type", "param", "code"}} (`APIError`).

The key check is a plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which wraps `receive`): the
handlers keep seeing the client's disconnect, which is how a client that leaves frees its batcher slot.
Importing this module needs no fastapi (`ServerLimits` is the serve command's config, read before the extra is
checked); answering does.
"""

from __future__ import annotations

import secrets
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import Request as HTTPRequest
    from fastapi.responses import JSONResponse

API_KEY_ENV = "RLHF_FAST_API_KEY"


class APIError(Exception):
    """An error answer: HTTP status, message, and the request field it is about (OpenAI's `param`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @classmethod
    def from_value_error(cls, e: ValueError) -> APIError:
        """400 from a ValueError whose message starts with the field it names ("messages[1].role: ...")."""
        message = str(e)
        field, sep, _ = message.partition(": ")
        return cls(400, message, field if sep and " " not in field else None)

    def response(self) -> JSONResponse:
        from fastapi.responses import JSONResponse

        kind = {404: "not_found_error", 429: "rate_limit_error"}.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        headers = {"Retry-After": "1"} if self.status == 429 else None
        if self.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}},
                            status_code=self.status, headers=headers)


@dataclass(frozen=True)
class ServerLimits:
    api_key: str | None = None  # required as `Authorization: Bearer <key>` on /v1/*; None: open
    max_body_bytes: int = 1 << 20  # a request body beyond this: 413 (prompts are at most a context long)
    max_streams: int = 64  # streaming answers open at once, all clients together; beyond: 429
    max_streams_per_client: int = 16  # the same, per client address (behind a proxy: the proxy's)

    def __post_init__(self):
        if self.api_key is not None and not self.api_key:
            raise ValueError("--api-key must not be empty")
        for name in ("max_body_bytes", "max_streams", "max_streams_per_client"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {value!r}")


class RequireApiKey:
    """ASGI middleware: every path under /v1 answers 401 unless the request carries `Authorization: Bearer <key>`
    (compared in constant time); /health and the chat page stay open."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/")):
            error = self._refusal(dict(scope.get("headers", ())).get(b"authorization"))
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, header: bytes | None) -> APIError | None:
        scheme, _, given = (header or b"").strip().partition(b" ")
        if not header or scheme.lower() != b"bearer":
            return APIError(401, "no API key: send the header `Authorization: Bearer <key>` (the key the server "
                                 "was started with, --api-key or $" + API_KEY_ENV + ")", code="invalid_api_key")
        if not secrets.compare_digest(given.strip(), self.key):
            return APIError(401, "incorrect API key", code="invalid_api_key")
        return None


async def read_body(http: HTTPRequest, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed `limit` bytes (from Content-Length, else while
    reading), so an oversized body is never held in memory whole."""
    too_large = APIError(413, f"the request body exceeds the server's limit of {limit} bytes (--max-body-bytes)",
                         code="request_too_large")
    length = http.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in http.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


class StreamSlots:
    """Counts streaming answers, all together and per client; used from the event loop only (no lock)."""

    def __init__(self, total: int, per_client: int):
        self.total, self.per_client = total, per_client
        self.open: Counter = Counter()  # client address -> its open streams

    def acquire(self, client: str) -> None:
        """Take a slot for `client`, or raise 429 when it (or the server) has as many streams open as allowed."""
        if self.open[client] >= self.per_client:
            raise APIError(429, f"too many streams open from this client ({self.per_client}, "
                                "--max-streams-per-client): finish or close one, then retry", code="too_many_streams")
        if sum(self.open.values()) >= self.total:
            raise APIError(429, f"too many streams open ({self.total}, --max-streams); retry later",
                           code="too_many_streams")
        self.open[client] += 1

    def release(self, client: str) -> None:
        self.open[client] -= 1
        if self.open[client] <= 0:
            del self.open[client]

    def count(self) -> int:
        return sum(self.open.values())
