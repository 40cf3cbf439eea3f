"""The server's errors: OpenAI-style JSON bodies with one line of message."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from skipjack.errors import one_line


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        self.status, self.message, self.param, self.headers = status, one_line(message), param, headers


def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    body = {"error": {"message": one_line(message), "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)
