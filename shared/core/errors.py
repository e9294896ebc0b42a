"""The one error tree of Cake. Every error a caller may handle derives from CakeError.

CakeError
├── ConfigError, UnsupportedModelError       (start-up: settings, model)
├── CorruptChunkError, StoreError            (storage: a chunk is a miss, a backend failed)
├── BadRequestError                          (a client sent something Cake cannot serve)
└── TransportError                           (the control plane)
    ├── Unavailable: NoResponders | RequestTimeout   (nobody answered)
    ├── ConnectionLost                                (the bus connection is closed)
    └── RemoteError                                   (the other service answered an error)

Each class has a `code`; shared.wire carries it across services, the gateway maps it to HTTP.
"""

from __future__ import annotations


class CakeError(Exception):
    """Base of every error Cake raises on purpose."""

    code = "internal"


class ConfigError(CakeError):
    """A setting or a command-line option is invalid."""

    code = "bad_config"


class UnsupportedModelError(CakeError):
    """The model keeps no plain per-layer key/value cache, so Cake cannot serve it exactly."""

    code = "unsupported_model"


class CorruptChunkError(CakeError):
    """A stored chunk failed validation (header, key, fingerprint, shape or checksum)."""

    code = "corrupt_chunk"


class StoreError(CakeError):
    """A storage backend failed (I/O error, network error, permission denied)."""

    code = "store_error"


class BadRequestError(CakeError):
    """The client sent something Cake cannot serve; the message says what to fix."""

    code = "bad_request"


class TransportError(CakeError):
    """A message could not be exchanged with another service (the control plane failed)."""

    code = "unavailable"


class Unavailable(TransportError):
    """Nobody answered a request: no service is listening, or none answered in time."""


class NoResponders(Unavailable):
    """No service is subscribed to the subject (not started, or gone)."""


class RequestTimeout(Unavailable):
    """A service took the request but did not answer within the timeout."""


class ConnectionLost(TransportError):
    """The connection to the message bus is closed."""


class RemoteError(TransportError):
    """The service that handled a request answered with an error code and description."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description
