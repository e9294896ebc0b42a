"""The one error tree of Cake. Every error a caller may handle derives from CakeError.

Every error has a code (ErrorCode); HTTP_STATUS is the one table from code to the HTTP status
the gateway answers with, wherever the error happened.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Why a request failed, as it appears on the wire, in metrics and in OpenAI's error body."""

    INTERNAL = "internal"
    BAD_CONFIG = "bad_config"
    UNSUPPORTED_MODEL = "unsupported_model"
    CORRUPT_CHUNK = "corrupt_chunk"
    STORE_ERROR = "store_error"
    BAD_REQUEST = "bad_request"
    MODEL_NOT_FOUND = "model_not_found"
    REQUEST_TOO_LARGE = "request_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    HTTP_ERROR = "http_error"  # aiohttp's own answer (unknown route, wrong method): its status
    CLIENT_DISCONNECTED = "client_disconnected"
    UNAVAILABLE = "unavailable"
    DEADLINE = "deadline"  # the backend saw the request's deadline pass
    TIMEOUT = "timeout"  # the gateway waited past the deadline

    @classmethod
    def of(cls, code: str) -> ErrorCode:
        """The code named code; INTERNAL for a name Cake does not know."""
        try:
            return cls(code)
        except ValueError:
            return cls.INTERNAL


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INTERNAL: 500,
    ErrorCode.BAD_CONFIG: 500,
    ErrorCode.UNSUPPORTED_MODEL: 500,
    ErrorCode.CORRUPT_CHUNK: 500,
    ErrorCode.STORE_ERROR: 500,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.REQUEST_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.HTTP_ERROR: 500,  # stands in only: the gateway answers with aiohttp's status
    ErrorCode.CLIENT_DISCONNECTED: 499,  # as nginx counts it
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE: 504,
    ErrorCode.TIMEOUT: 504,
}


def http_status(code: str) -> int:
    """The HTTP status for an error code (500 for a code Cake does not know)."""
    return HTTP_STATUS[ErrorCode.of(code)]


class CakeError(Exception):
    """Base of every error Cake raises on purpose."""

    code: str = ErrorCode.INTERNAL


class ConfigError(CakeError):
    """A setting or a command-line option is invalid."""

    code = ErrorCode.BAD_CONFIG


class UnsupportedModelError(CakeError):
    """The model keeps no plain per-layer key/value cache, so Cake cannot serve it exactly."""

    code = ErrorCode.UNSUPPORTED_MODEL


class CorruptChunkError(CakeError):
    """A stored chunk failed validation (header, key, fingerprint, shape or checksum)."""

    code = ErrorCode.CORRUPT_CHUNK


class StoreError(CakeError):
    """A storage backend failed (I/O error, network error, permission denied)."""

    code = ErrorCode.STORE_ERROR


class BadRequestError(CakeError):
    """The client sent something Cake cannot serve; the message says what to fix."""

    code = ErrorCode.BAD_REQUEST
