"""HTTP errors in one shape: {"error": {"code", "message"}}, for our own errors, validation errors and 404s alike."""

from __future__ import annotations

import errno
import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fgs_common.wire import ErrorBody, ErrorResponse

logger = logging.getLogger("fgs.service")

# Documented on every route that can fail this way, so the OpenAPI schema says what a client gets.
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 422, 429, 503, 507)}
# errno values that mean "the artifact store's volume has no room" (a 507, not a 500)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class ApiError(Exception):
    """A client error with its HTTP status; raised by handlers and dependencies."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def not_found(kind: str, object_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no {kind} with id {object_id!r}")


def _body(code: str, message: str) -> dict:
    return ErrorResponse(error=ErrorBody(code=code, message=message)).model_dump()


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_body("invalid_request", _validation_message(exc)), status_code=422)

    @app.exception_handler(redis.RedisError)
    async def _redis_unavailable(request: Request, exc: redis.RedisError) -> JSONResponse:
        # Redis down, restarting (loading its AOF) or timing out: the request may succeed later, so 503 and
        # when to come back, never a 500.
        logger.warning("redis error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        retry_after = str(request.app.state.settings.unavailable_retry_after_s)
        message = f"the job store (Redis) is unavailable ({type(exc).__name__}); retry in {retry_after} s"
        return JSONResponse(_body("unavailable", message), status_code=503, headers={"Retry-After": retry_after})

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        if exc.errno in _NO_SPACE:
            logger.error("artifact store full on %s %s: %s", request.method, request.url.path, exc)
            message = "the artifact store has no space left; nothing was stored. Retry once space is freed"
            return JSONResponse(_body("insufficient_storage", message), status_code=507)
        return await _unexpected(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(_body("internal_error", "internal server error (logged)"), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "upload_too_large"}
        code = codes.get(exc.status_code, "http_error")
        return JSONResponse(
            _body(code, str(exc.detail)), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )
