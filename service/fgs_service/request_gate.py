"""What every request passes before the app reads its body, and every response gets: `RequestGate`.

- **A key before a body.** A request that carries a body (every body-taking route is a tenant's) and no API key
  the service knows is a 401 before one byte of its body is read, so an unauthenticated client costs a header
  parse, never a body read, a spooled upload or a threadpool thread.
- **Size.** 413 for a body over its route's limit: at once when its Content-Length says so (or is not a number),
  else while it streams in, chunked bodies included, so no more than the limit is ever held. Limits: JSON routes
  FGS_MAX_JSON_BODY_BYTES; image uploads FGS_MAX_UPLOAD_BYTES; classifier uploads the archive plus statistics
  limits; each with 1 MiB for the multipart framing and form fields.
- **Rate.** 408 for a body that arrives slower than FGS_HTTP_BODY_MIN_RATE after a FGS_HTTP_BODY_TIMEOUT_S grace
  (Apache mod_reqtimeout's `body=20,MinRate=500`): by t seconds after the request began, at least
  min_rate * (t - grace) bytes must have come. The header timeout (fgs_service.http_protocol) covers the head.
- **Headers.** Every response (errors of this gate included) says it may not be framed, its type may not be
  sniffed, and no referrer leaves with links from the page.

A plain ASGI middleware: Starlette's `@app.middleware("http")` wraps every request in extra tasks and streams,
which showed up as latency under load.
"""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fgs_common.settings import Settings
from fgs_service.auth import KEY_HELP, bearer_key

# frame-ancestors: the page and the docs cannot be framed (clickjacking); a policy of its own beside the page's,
# as browsers enforce every Content-Security-Policy header a response has. X-Frame-Options for older browsers.
SECURITY_HEADERS = [
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class _GateRefusal(StarletteHTTPException):
    """Raised from `receive` while a body streams in (an HTTPException: FastAPI's body parsing lets those
    through, where any other error would become a 400); the gate answers it."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(status, message, headers={"Connection": "close"})  # the rest of the body is never read
        self.code = code


def _refusal(status: int, code: str, message: str) -> JSONResponse:
    # Connection: close, as the rest of the body is never read
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers={"Connection": "close"})


class RequestGate:
    """Key before body, size and rate limits on bodies, security headers on responses (module docstring)."""

    _FRAMING = 1 << 20

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.limits = {
            "/v1/classifiers": (
                settings.max_classifier_bytes
                + settings.max_hardness_stats_bytes
                + settings.max_upload_bytes
                + self._FRAMING
            ),
            "/v1/images": settings.max_upload_bytes + self._FRAMING,
        }
        self.default = settings.max_json_body_bytes
        self.grace_s = settings.http_body_timeout_s
        self.min_rate = settings.http_body_min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        refusal = self._refusal_before_body(scope)
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        try:
            await self.app(scope, self._limited(scope, receive), send_with_headers)
        except _GateRefusal as error:
            if started:
                raise
            await _refusal(error.status_code, error.code, str(error.detail))(scope, receive, send_with_headers)

    def _limit(self, scope: Scope) -> int:
        return self.limits.get(scope["path"].rstrip("/"), self.default)

    def _refusal_before_body(self, scope: Scope) -> JSONResponse | None:
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        has_body = b"transfer-encoding" in headers or (length is not None and length != b"0")
        if not has_body:
            return None
        keyring = getattr(scope["app"].state, "keyring", None)
        key = bearer_key(headers.get(b"authorization", b"").decode("latin-1"))
        if keyring is None or key is None or keyring.tenant_for(key) is None:
            reason = "no API key was sent" if key is None else "the API key is not one this service knows"
            return _refusal(401, "unauthorized", f"{reason}; the request body was not read. {KEY_HELP}")
        limit = self._limit(scope)
        if length is not None and (not length.isdigit() or int(length) > limit):
            return _refusal(413, "upload_too_large", f"request body over {limit} bytes")
        return None

    def _limited(self, scope: Scope, receive: Receive) -> Receive:
        limit = self._limit(scope)
        began = time.monotonic()
        received = 0
        complete = False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body: a disconnect, awaited as long as the response streams
                return await receive()
            deadline = began + self.grace_s + received / self.min_rate
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):  # unlike wait_for, no task per chunk
                    message = await receive()
            except TimeoutError:
                raise _GateRefusal(
                    408,
                    "request_timeout",
                    f"the request body arrived slower than {self.min_rate} bytes/s (after a "
                    f"{self.grace_s:g} s grace; FGS_HTTP_BODY_MIN_RATE, FGS_HTTP_BODY_TIMEOUT_S)",
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > limit:
                    raise _GateRefusal(413, "upload_too_large", f"request body over {limit} bytes")
            else:
                complete = True
            return message

        return limited_receive
