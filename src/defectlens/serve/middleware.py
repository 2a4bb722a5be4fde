"""ASGI layers in front of every route: the API token, the request-size limit, and request metrics.

They are plain ASGI (not BaseHTTPMiddleware) so an unauthenticated or oversized upload is refused
before its body is read.
"""

from __future__ import annotations

import hmac
import json
import time

TOKEN_COOKIE = "defectlens_token"
#: Reachable without a token: the dashboard's static files (they hold no data) and the login that
#: turns a token into a cookie for the dashboard's own requests.
PUBLIC_PREFIXES = ("/dashboard/",)
PUBLIC_PATHS = ("/", "/favicon.ico", "/v1/login")


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(f"request body is over the limit of {limit} bytes")


async def send_error(send, status: int, code: str, message: str, headers: dict | None = None) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def presented_token(headers: dict[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == TOKEN_COOKIE:
            return value
    return None


def token_valid(token: str | None, tokens: tuple[str, ...]) -> bool:
    # compare_digest on every configured token: the time taken says nothing about the token.
    return token is not None and any(hmac.compare_digest(token.encode(), t.encode()) for t in tokens)


class TokenAuth:
    def __init__(self, app, tokens: tuple[str, ...]):
        self.app, self.tokens = app, tokens

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.tokens:
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return await self.app(scope, receive, send)
        token = presented_token(_headers(scope))
        if not token_valid(token, self.tokens):
            problem = "missing API token" if token is None else "invalid API token"
            return await send_error(send, 401, "unauthorized",
                                    f"{problem}: send 'Authorization: Bearer <token>'",
                                    {"www-authenticate": "Bearer"})
        return await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app, limit: int, metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _headers(scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            self.metrics.rejected.labels("too_large").inc()
            return await send_error(send, 413, "too_large",
                                    f"request body is {declared} bytes, over the limit of {self.limit} bytes")
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # A chunked upload with no declared length: the route's error handler answers 413.
                    raise BodyTooLarge(self.limit)
            return message

        return await self.app(scope, counted, send)


class RequestMetrics:
    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def recorded(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recorded)
        finally:
            route = scope.get("route")
            # Route templates, not raw paths, keep the label set small whatever clients request.
            name = getattr(route, "path", None) or ("/dashboard" if scope["path"].startswith("/dashboard/") else "unmatched")
            self.metrics.requests.labels(scope["method"], name, str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - started)
