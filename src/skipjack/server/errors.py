"""The server's errors: OpenAI-style JSON bodies with one line of message, the status from the error's kind
(`skipjack.errors`: bad input 400, `Unavailable` 503 with Retry-After, a `Fault` or a bug 500)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from skipjack.errors import RETRY_AFTER_S, http_status, message, one_line


def _retry(status: int, headers: dict | None) -> dict | None:
    """A 503 tells the client when to retry."""
    return {"Retry-After": str(RETRY_AFTER_S)} if status == 503 and headers is None else headers


class ApiError(Exception):
    """`code`: OpenAI's error code where it has one (e.g. "model_not_found"); default: the status."""

    def __init__(
        self, status: int, message: str, param: str | None = None, headers: dict | None = None, code=None
    ) -> None:
        self.status, self.message, self.param, self.code = status, one_line(message), param, code
        self.headers = _retry(status, headers)


def error(status: int, message: str, param: str | None = None, headers: dict | None = None, code=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    body = {"error": {"message": one_line(message), "type": kind, "param": param, "code": code or status}}
    return JSONResponse(body, status_code=status, headers=_retry(status, headers))


def failure(e: BaseException) -> JSONResponse:
    """The response for an exception raised while handling a request: its kind's status and its one line."""
    return error(http_status(e), message(e))
