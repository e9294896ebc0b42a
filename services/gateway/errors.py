"""The gateway's unsuccessful answers, in OpenAI's error body."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from services.gateway.validation import RequestError
from shared.core.errors import CakeError


class ApiError(CakeError):
    """An unsuccessful answer: HTTP status, error code, message and the offending field."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @classmethod
    def of(cls, exc: RequestError) -> ApiError:
        """The answer to a request that failed validation."""
        return cls(exc.status, str(exc), exc.code, exc.param)

    def body(self) -> dict[str, Any]:
        """OpenAI's error body."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self) -> web.Response:
        """The error as an HTTP response."""
        return web.json_response(self.body(), status=self.status)
