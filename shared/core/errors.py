"""The one error tree of Cake. Every error a caller may handle derives from CakeError.

CakeError
├── ConfigError, UnsupportedModelError       (start-up: settings, model)
├── CorruptChunkError, StoreError            (storage: a chunk is a miss, a backend failed)
├── BadRequestError                          (a client sent something Cake cannot serve)
├── Overloaded, TooLarge (shared.core.admission: no room for the request's KV now, or ever)
└── TransportError                           (the control plane)
    ├── Unavailable: NoResponders | RequestTimeout   (nobody answered)
    ├── ConnectionLost                                (the bus connection is closed)
    └── RemoteError                                   (the other service answered an error)

Every error has a code (ErrorCode): the wire carries it across services, and HTTP_STATUS is the
one table from code to the HTTP status the gateway answers with, wherever the error happened.
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
    INVALID_API_KEY = "invalid_api_key"  # OpenAI's code for a missing or unknown key
    MODEL_NOT_FOUND = "model_not_found"
    REQUEST_TOO_LARGE = "request_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    HTTP_ERROR = "http_error"  # aiohttp's own answer (unknown route, wrong method): its status
    CLIENT_DISCONNECTED = "client_disconnected"
    UNAVAILABLE = "unavailable"
    OVERLOADED = "overloaded"  # no room in the waiting queue: retry after a while
    TOO_LARGE = "too_large"  # the request's KV would not fit the memory budget at all
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
    ErrorCode.INVALID_API_KEY: 401,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.REQUEST_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.HTTP_ERROR: 500,  # stands in only: the gateway answers with aiohttp's status
    ErrorCode.CLIENT_DISCONNECTED: 499,  # as nginx counts it
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.TOO_LARGE: 400,
    ErrorCode.DEADLINE: 504,
    ErrorCode.TIMEOUT: 504,
}


def http_status(code: str) -> int:
    """The HTTP status for an error code (500 for a code Cake does not know)."""
    return HTTP_STATUS[ErrorCode.of(code)]


class CakeError(Exception):
    """Base of every error Cake raises on purpose."""

    code: str = ErrorCode.INTERNAL
    retry_after_s: float = 0.0  # when > 0: when the same request may succeed


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


class TransportError(CakeError):
    """A message could not be exchanged with another service (the control plane failed)."""

    code = ErrorCode.UNAVAILABLE


class Unavailable(TransportError):
    """Nobody answered a request: no service is listening, or none answered in time."""


class NoResponders(Unavailable):
    """No service is subscribed to the subject (not started, or gone)."""


class RequestTimeout(Unavailable):
    """A service took the request but did not answer within the timeout."""


class PayloadTooLarge(TransportError):
    """A message is larger than the bus carries (NATS max_payload)."""


class ConnectionLost(TransportError):
    """The connection to the message bus is closed."""


class RemoteError(TransportError):
    """The service that handled a request answered with an error code and description."""

    def __init__(self, code: str, description: str, retry_after_s: float = 0.0) -> None:
        super().__init__(f"{code}: {description}")
        self.code = ErrorCode.of(code)
        self.description = description
        self.retry_after_s = retry_after_s
