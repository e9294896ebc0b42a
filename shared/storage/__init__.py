"""Chunk stores: one small interface (ChunkStore) with memory, local-directory and S3 backends."""

from __future__ import annotations

import inspect
import re
from typing import Any

from shared.core.bandwidth import BandwidthTrace
from shared.core.errors import ConfigError
from shared.storage.base import ChunkStore
from shared.storage.local import LocalStore, validate_key
from shared.storage.memory import MemoryStore
from shared.storage.s3 import S3Store
from shared.storage.throttled import ThrottledStore

__all__ = [
    "ChunkStore",
    "LocalStore",
    "MemoryStore",
    "S3Store",
    "ThrottledStore",
    "is_s3",
    "open_store",
    "validate_key",
]

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_S3_OPTIONS = frozenset(inspect.signature(S3Store).parameters) - {"bucket", "prefix"}


def is_s3(spec: str) -> bool:
    """Whether a store spec names S3 (s3://bucket/prefix)."""
    return spec.strip().lower().startswith("s3://")


def open_store(
    spec: str,
    capacity_bytes: int | None = None,
    bandwidth: BandwidthTrace | float | None = None,
    **s3_options: Any,
) -> ChunkStore:
    """Build the store a spec names, not yet started.

    spec: ``memory://``, ``s3://bucket[/prefix]``, ``file:///abs/path`` or a plain path.
    capacity_bytes bounds memory and local stores (S3 is bounded by the bucket's own rules).
    With a bandwidth (a trace, or constant MB/s) the store is wrapped in a ThrottledStore.
    s3_options go to S3Store (endpoint_url, region, access_key_id, ...); None means not set.
    Raises ConfigError for a spec or an option that cannot be served.
    """
    options = {k: v for k, v in s3_options.items() if v is not None}
    unknown = sorted(set(options) - _S3_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown store options {unknown}; known: {sorted(_S3_OPTIONS)}")
    store = _open_base(spec.strip(), capacity_bytes, options)
    if isinstance(bandwidth, BandwidthTrace):
        return ThrottledStore(store, trace=bandwidth)
    if bandwidth is not None:
        return ThrottledStore(store, bandwidth_MBps=bandwidth)
    return store


def _open_base(spec: str, capacity_bytes: int | None, options: dict[str, Any]) -> ChunkStore:
    if capacity_bytes is not None and capacity_bytes < 0:
        raise ConfigError(f"store capacity must be >= 0 bytes, got {capacity_bytes}")
    if not spec:
        raise ConfigError("empty store spec; use memory://, s3://bucket/prefix or a directory")
    scheme, sep, rest = spec.partition("://")
    if not sep:
        scheme, rest = "file", spec
    scheme = scheme.lower()
    if scheme == "s3":
        return _open_s3(spec, rest, options)
    if options:
        raise ConfigError(f"S3 options {sorted(options)} given for non-S3 store {spec!r}")
    if scheme == "memory":
        if rest:
            raise ConfigError(f"memory store spec takes no path: use 'memory://', not {spec!r}")
        return MemoryStore(capacity_bytes)
    if scheme == "file":
        if sep and not rest.startswith("/"):
            raise ConfigError(f"file URL needs an absolute path (file:///dir), got {spec!r}")
        return LocalStore(rest, capacity_bytes)
    raise ConfigError(
        f"unknown store scheme {scheme!r} in {spec!r}; "
        "use memory://, s3://bucket/prefix, file:///path or a plain path"
    )


def _open_s3(spec: str, rest: str, options: dict[str, Any]) -> S3Store:
    bucket, _, prefix = rest.partition("/")
    if len(bucket) < 3:
        raise ConfigError(f"S3 bucket name in {spec!r} is shorter than 3 characters")
    if _BUCKET_RE.fullmatch(bucket) is None:
        raise ConfigError(
            f"invalid S3 bucket name {bucket!r} in {spec!r}: 3-63 chars of a-z, 0-9, '.', '-'"
        )
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return S3Store(bucket, prefix=prefix, **options)
