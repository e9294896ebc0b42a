"""The one error tree of Cake. Every error a caller may handle derives from CakeError."""

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
