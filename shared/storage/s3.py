"""A chunk store on S3 or any S3-compatible service (MinIO, moto), through aioboto3."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aioboto3
import aiohttp
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from shared.core.errors import StoreError
from shared.core.gather import all_of
from shared.storage.base import Allocate, ChunkStore

READ_PART_BYTES = 1 << 20  # a GetObject body is copied into its buffer this much at a time
RANGE_PART_BYTES = 8 << 20  # objects larger than this are read as ranged GETs in parallel
PARALLEL_PARTS = 4  # connections one large read may hold at once (its parts beyond wait)
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class S3Store(ChunkStore):
    """Stores each value as one object ``prefix + key`` in bucket.

    A put is one PutObject, so a value is visible only once complete. The client is opened in
    ``start()`` and kept until ``close()``. Credentials not given fall back to boto's default
    chain (the usual AWS environment variables, profiles, instance roles). Every call is bounded
    by connect/read timeouts and a small retry budget; failures raise StoreError.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        max_concurrency: int = 16,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        max_attempts: int = 3,
        part_bytes: int = RANGE_PART_BYTES,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region
        self.batch_concurrency = max_concurrency
        if part_bytes < 0:
            raise ValueError(f"part_bytes must be >= 0 (0: one GET per object), got {part_bytes}")
        self.part_bytes = part_bytes
        self._session = aioboto3.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
        )
        self._config = Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=max_concurrency * PARALLEL_PARTS,  # a large object's parts
            # custom endpoints (MinIO, moto, an IP address) rarely resolve bucket subdomains
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        self._sem = asyncio.Semaphore(max_concurrency)
        self._stack: AsyncExitStack | None = None
        self._client: Any = None

    async def start(self) -> None:
        """Open the S3 client. Idempotent."""
        if self._client is not None:
            return
        stack = AsyncExitStack()
        try:
            client_cm = self._session.client(
                "s3", endpoint_url=self.endpoint_url, config=self._config
            )
            self._client = await stack.enter_async_context(client_cm)
        except (BotoCoreError, ValueError) as e:
            await stack.aclose()
            raise StoreError(f"cannot open S3 client for {self._where()}: {e}") from e
        self._stack = stack

    async def close(self) -> None:
        """Close the S3 client. Idempotent, safe after a failed start."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist (tests, compose setups)."""
        async with self._call("head_bucket"):
            try:
                await self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as e:
                if _code(e) not in _MISSING_CODES:
                    raise
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if self.region and self.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            try:
                await self._client.create_bucket(**kwargs)
            except ClientError as e:
                if _code(e) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise

    async def exists(self, key: str) -> bool:
        """HeadObject: whether the object exists."""
        async with self._call("head_object", key):
            try:
                await self._client.head_object(Bucket=self.bucket, Key=self.prefix + key)
            except ClientError as e:
                if _code(e) in _MISSING_CODES:
                    return False
                raise
            return True

    async def get(self, key: str) -> bytes | None:
        """GetObject: the object's bytes, or None when it does not exist."""
        return await self.get_copy(key)  # (the loader reads with get_into)

    async def get_into(self, key: str, allocate: Allocate) -> memoryview | None:
        """Read the object straight into allocate's buffer; None when it does not exist.

        The first GET asks for the first `part_bytes`; the reply says the object's size, and a
        larger object's other parts are ranged GETs in parallel (as S3's own clients read large
        objects: one connection rarely carries a link's full rate), each of the same version
        (If-Match its ETag). With part_bytes 0, every object is one GET."""
        first_range = f"bytes=0-{self.part_bytes - 1}" if self.part_bytes else None
        async with self._call("get_object", key):
            try:
                first = await self._get(key, first_range)
            except ClientError as e:
                if _code(e) in _MISSING_CODES:
                    return None
                if _code(e) == "InvalidRange":  # an empty object has no first byte
                    return allocate(0)
                raise
            size = _object_size(first)
            whole = self.part_bytes == 0 or not first.get("ContentRange")  # (Range ignored)
            buffer, version = allocate(size), first.get("ETag")
            step = max(size, 1) if whole else self.part_bytes
            more = asyncio.Semaphore(PARALLEL_PARTS - 1)  # the first part holds one connection
            parts = [
                self._get_range(key, buffer, start, version, more)
                for start in range(step, size, step)
            ]
            await all_of([_fill(first, buffer[: min(size, step)], key), *parts])
            return buffer

    async def _get(self, key: str, byte_range: str | None, version: str | None = None) -> Any:
        extra = {"IfMatch": version} if version else {}
        if byte_range:
            extra["Range"] = byte_range
        return await self._client.get_object(Bucket=self.bucket, Key=self.prefix + key, **extra)

    async def _get_range(
        self, key: str, buffer: memoryview, start: int, version: str, limit: asyncio.Semaphore
    ) -> None:
        end = min(start + self.part_bytes, len(buffer))
        async with limit:
            reply = await self._get(key, f"bytes={start}-{end - 1}", version)
            await _fill(reply, buffer[start:end], key)

    async def put(self, key: str, data: bytes) -> None:
        """PutObject: one atomic write."""
        async with self._call("put_object", key):
            await self._client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    async def delete(self, key: str) -> None:
        """DeleteObject (S3 reports success for a missing key too)."""
        async with self._call("delete_object", key):
            await self._client.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    @asynccontextmanager
    async def _call(self, op: str, key: str | None = None) -> AsyncIterator[None]:
        """Bound concurrency and turn every backend failure into a StoreError."""
        if self._client is None:
            raise RuntimeError("S3Store used before start()")
        async with self._sem:
            try:
                yield
            except (ClientError, BotoCoreError, aiohttp.ClientError, TimeoutError) as e:
                where = self._where(key or "")
                raise StoreError(f"S3 {op} {where} failed: {type(e).__name__}: {e}") from e

    def _where(self, key: str = "") -> str:
        endpoint = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{key}{endpoint}"


def _object_size(reply: Any) -> int:
    """The whole object's size from a (ranged) GetObject reply: Content-Range "bytes a-b/size",
    or the body's length when the server sent the whole object."""
    content_range = reply.get("ContentRange") or ""
    if "/" in content_range:
        return int(content_range.rsplit("/", 1)[1])
    return int(reply["ContentLength"])


async def _fill(reply: Any, buffer: memoryview, key: str) -> None:
    """Copy a GetObject body into buffer, which it must fill exactly."""
    filled, body = 0, reply["Body"]
    async with body:  # (what it enters is the raw response; reads go through body itself)
        while part := await body.read(READ_PART_BYTES):
            if filled + len(part) > len(buffer):
                raise StoreError(f"s3 object {key[:16]} is longer than announced")
            buffer[filled : filled + len(part)] = part
            filled += len(part)
    if filled != len(buffer):
        raise StoreError(f"s3 object {key[:16]} ended after {filled} of {len(buffer)} bytes")


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))
