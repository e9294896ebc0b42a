"""The gateway's unsuccessful answers, in OpenAI's error body."""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from services.gateway.validation import RequestError
from shared.core.errors import CakeError, http_status


class ApiError(CakeError):
    """An unsuccessful answer: error code, message, the offending field and the HTTP status
    (by default the code's, from shared.core.errors.HTTP_STATUS)."""

    def __init__(
        self,
        code: str,
        message: str,
        param: str | None = None,
        status: int | None = None,
        retry_after_s: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param
        self.status = http_status(code) if status is None else status
        self.retry_after_s = retry_after_s

    @classmethod
    def of(cls, exc: RequestError) -> ApiError:
        """The answer to a request that failed validation."""
        return cls(exc.code, str(exc), exc.param)

    def body(self) -> dict[str, Any]:
        """OpenAI's error body."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self) -> web.Response:
        """The error as an HTTP response."""
        headers = {"Retry-After": str(math.ceil(self.retry_after_s))} if self.retry_after_s else {}
        return web.json_response(self.body(), status=self.status, headers=headers)
