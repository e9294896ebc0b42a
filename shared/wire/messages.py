"""Every NATS message Cake sends: small msgpack maps with a schema version and a type.

KV tensors never travel here (claim check: a loaded chunk's event carries the path of its
staged file). Token ids travel packed as little-endian uint32 bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import msgpack

from shared.core.keys import KeySpace, KVLayout

SCHEMA_VERSION = 1

_REGISTRY: dict[str, type[Message]] = {}
M = TypeVar("M", bound="Message")


class SchemaError(ValueError):
    """A message could not be decoded: wrong version, unknown type or missing fields."""


@dataclass
class Message:
    """Base of all messages: ``encode()`` to bytes, ``decode(bytes)`` back to the right class."""

    type_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.type_name = cls.__name__
        _REGISTRY[cls.__name__] = cls

    def encode(self) -> bytes:
        """msgpack bytes with the schema version and type name."""
        body = dataclasses.asdict(self)
        body["v"] = SCHEMA_VERSION
        body["t"] = self.type_name
        return msgpack.packb(body)

    @classmethod
    def decode(cls: type[M], data: bytes) -> M:
        """The message in data; raises SchemaError unless it is a cls (or subclass)."""
        try:
            body = msgpack.unpackb(data, strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise SchemaError(f"unreadable message: {exc}") from exc
        if not isinstance(body, dict) or body.pop("v", None) != SCHEMA_VERSION:
            raise SchemaError(f"message is not schema version {SCHEMA_VERSION}")
        kind = _REGISTRY.get(body.pop("t", ""))
        if kind is None or not issubclass(kind, cls):
            raise SchemaError(f"expected a {cls.__name__} message")
        try:
            return kind._from_body(body)  # type: ignore[return-value]
        except (TypeError, KeyError, ValueError) as exc:
            raise SchemaError(f"bad {kind.__name__} message: {exc}") from exc

    @classmethod
    def _from_body(cls, body: dict[str, Any]) -> Message:
        return cls(**body)


@dataclass
class Space:
    """A KeySpace on the wire (nested in messages as a map: ``asdict`` / ``Space(**map)``)."""

    fingerprint: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    chunk_tokens: int
    salt: str = ""

    @classmethod
    def of(cls, space: KeySpace) -> Space:
        """From a KeySpace."""
        lay = space.layout
        return cls(
            space.model_fingerprint,
            lay.layers,
            lay.kv_heads,
            lay.head_dim,
            lay.dtype,
            space.chunk_tokens,
            space.salt,
        )

    def key_space(self) -> KeySpace:
        """Back to a KeySpace."""
        layout = KVLayout(self.layers, self.kv_heads, self.head_dim, self.dtype)
        return KeySpace(self.fingerprint, layout, self.chunk_tokens, self.salt)


@dataclass
class Sampling:
    """How to decode, nested in messages as a map (stop strings are the gateway's job)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class GenerateRequest(Message):
    """gateway -> merger: one validated, tokenized request."""

    request_id: str
    tokens: bytes
    sampling: dict[str, Any]
    kv_mode: str = "cake"
    salt: str = ""
    deadline: float = 0.0  # unix seconds


@dataclass
class Accepted(Message):
    """Reply: the work was taken (by a compute replica on `node`, for prefill jobs)."""

    node: str = ""


@dataclass
class ModelInfo(Message):
    """Reply of the compute service: what it serves."""

    name: str
    space: dict[str, Any]
    max_context: int | None
    node: str


@dataclass
class LookupRequest(Message):
    """merger -> loader: how many leading chunks of this prompt are stored?"""

    request_id: str
    space: dict[str, Any]
    tokens: bytes


@dataclass
class LookupReply(Message):
    """loader -> merger."""

    stored_chunks: int


@dataclass
class PrefillJob(Message):
    """merger -> compute: compute this prompt's head and then serve it."""

    request_id: str
    tokens: bytes
    space: dict[str, Any]
    hit: int
    compute_head: bool
    sampling: dict[str, Any]
    deadline: float
    head_hint: int = -1  # predicted meeting chunk (the estimator's); -1: none


@dataclass
class FetchJob(Message):
    """merger -> loader: fetch hit chunks [0, hit) tail first and stage them."""

    request_id: str
    tokens: bytes
    space: dict[str, Any]
    hit: int
    deadline: float


@dataclass
class ChunkComputed(Message):
    """compute -> merger: head chunks [0, upto) are computed."""

    request_id: str
    upto: int
    duration_s: float


@dataclass
class ChunkLoaded(Message):
    """loader -> merger: hit chunk `index` is staged at `staged` (a file path)."""

    request_id: str
    index: int
    nbytes: int
    duration_s: float
    staged: str


@dataclass
class LoadFailed(Message):
    """loader -> merger: chunk `index` could not be loaded (missing, corrupt, error, stall)."""

    request_id: str
    index: int
    reason: str


@dataclass
class Meet(Message):
    """merger -> compute and loader: stop; use chunks [meet, hit) from these staged files."""

    request_id: str
    meet: int
    hit: int
    staged: dict[int, str] = field(default_factory=dict)


@dataclass
class Cancel(Message):
    """-> compute and loader: drop this request (client gone, deadline, stop string)."""

    request_id: str
    reason: str


@dataclass
class Tokens(Message):
    """compute -> gateway: new token ids (packed)."""

    request_id: str
    tokens: bytes


@dataclass
class Prefilled(Message):
    """compute -> gateway, just before the first token: where the prompt's KV came from."""

    request_id: str
    prompt_tokens: int
    hit_tokens: int  # prompt tokens found in storage (whichever side then supplied them)
    chunks_total: int
    chunks_computed: int
    chunks_loaded: int
    meet_chunk: int
    ttft_ms: float
    loaded_tokens: int  # prompt tokens whose KV was loaded from storage
    computed_tokens: int  # prompt tokens of the computed head (the rest is the suffix)

    def done(self, finish_reason: str, completion_tokens: int) -> Done:
        """The Done message that ends this request."""
        stats = {k: v for k, v in vars(self).items() if k != "request_id"}
        return Done(self.request_id, finish_reason, completion_tokens, **stats)


@dataclass
class Done(Message):
    """compute -> gateway: the request finished; usage and the Cake split."""

    request_id: str
    finish_reason: str
    completion_tokens: int
    prompt_tokens: int
    hit_tokens: int
    chunks_total: int
    chunks_computed: int
    chunks_loaded: int
    meet_chunk: int
    ttft_ms: float
    loaded_tokens: int = 0
    computed_tokens: int = 0


@dataclass
class Failed(Message):
    """-> gateway: the request failed; status is the HTTP status to answer with."""

    request_id: str
    status: int
    code: str
    message: str


@dataclass
class StoreJob(Message):
    """compute -> loader: write these staged chunk files (index -> path) back to storage."""

    request_id: str
    tokens: bytes
    space: dict[str, Any]
    staged: dict[int, str]
