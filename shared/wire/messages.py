"""Every NATS message Cake sends: msgspec Structs, encoded as msgpack maps.

Each message is tagged with its type name ("t") and the schema version ("v"); decoding checks
both and validates every field's type, nested ones included (Space, Sampling, the enums), so a
consumer gets typed values or a SchemaError, never a half-read map.

KV tensors never travel here (claim check: a loaded chunk's event carries the path of its
staged file). Token ids travel packed as little-endian uint32 bytes.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import msgspec

from shared.core.errors import BadRequestError, ErrorCode, http_status
from shared.core.keys import KeySpace, KVLayout
from shared.core.request import FinishReason, KvMode, Sampling

SCHEMA_VERSION = 2

_REGISTRY: dict[str, type[Message]] = {}
_DECODERS: dict[type[Message], msgspec.msgpack.Decoder[Any]] = {}
_ENCODER = msgspec.msgpack.Encoder()
M = TypeVar("M", bound="Message")


class SchemaError(BadRequestError):
    """A message could not be decoded: wrong version, unknown or unexpected type, missing
    fields or a field of the wrong type."""


class _Envelope(msgspec.Struct):
    """What every message starts with, read before the message itself."""

    v: Any = None
    t: Any = None


_ENVELOPE = msgspec.msgpack.Decoder(_Envelope)


class Message(msgspec.Struct, tag=True, tag_field="t", kw_only=True):
    """Base of all messages: ``encode()`` to bytes, ``decode(bytes)`` back to the right class.

    The tag ("t") is the class name; ``v`` is the schema version the message was written with.
    """

    v: int = SCHEMA_VERSION
    type_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.type_name = cls.__name__  # the tag (tag=True: the class name)
        _REGISTRY[cls.__name__] = cls

    def encode(self) -> bytes:
        """msgpack bytes with the schema version and type name."""
        return _ENCODER.encode(self)

    @classmethod
    def decode(cls: type[M], data: bytes) -> M:
        """The message in data; raises SchemaError unless it is a valid cls (or subclass)."""
        try:
            head = _ENVELOPE.decode(data)
        except msgspec.DecodeError as exc:
            raise SchemaError(f"unreadable message: {exc}") from exc
        if head.v != SCHEMA_VERSION:
            raise SchemaError(
                f"message has schema version {head.v!r}; this Cake reads version {SCHEMA_VERSION}"
            )
        kind = _REGISTRY.get(head.t) if isinstance(head.t, str) else None
        if kind is None:
            raise SchemaError(f"unknown message type {head.t!r}")
        if not issubclass(kind, cls):
            raise SchemaError(f"expected a {cls.__name__} message, got a {kind.__name__}")
        decoder = _DECODERS.get(kind)
        if decoder is None:
            decoder = _DECODERS[kind] = msgspec.msgpack.Decoder(kind)
        try:
            return decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise SchemaError(f"bad {kind.__name__} message: {exc}") from exc


class Space(msgspec.Struct, frozen=True):
    """A KeySpace on the wire, nested in messages."""

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

    def chunk_bytes(self) -> int:
        """Bytes of one chunk's KV, as loaded (keys and values of every layer)."""
        return self.chunk_tokens * self.key_space().layout.bytes_per_token

    def salted(self, salt: str) -> Space:
        """The same space with another salt."""
        return msgspec.structs.replace(self, salt=salt)


class GenerateRequest(Message):
    """gateway -> merger: one validated, tokenized request."""

    request_id: str
    tokens: bytes
    sampling: Sampling
    kv_mode: KvMode = KvMode.CAKE
    salt: str = ""
    deadline: float = 0.0  # unix seconds


class Accepted(Message):
    """Reply: the work was taken (by a compute replica on `node`, for prefill jobs, which holds
    the prompt's first `pooled` chunks in its memory tier now); from a loader asked if it is up,
    `problem` says what is wrong short of being down (its store refuses writes)."""

    node: str = ""
    pooled: int = 0
    problem: str = ""


class ModelInfo(Message):
    """Reply of the compute service: what it serves."""

    name: str
    space: Space
    max_context: int | None
    node: str
    chunk_compute_s: float = 0.0  # a head chunk's cost, measured when the model loaded (0: not)


class LookupRequest(Message):
    """merger -> loader: how many leading chunks of this prompt are stored?"""

    request_id: str
    space: Space
    tokens: bytes


class LookupReply(Message):
    """loader -> merger: the stored prefix, and the store's read rate its probe measured at
    start (0: none). With a near tier (CAKE_STORE_CACHE): which of those chunks it holds, and
    its own probed rate."""

    stored_chunks: int
    read_MBps: float = 0.0
    near_chunks: tuple[int, ...] = ()
    near_read_MBps: float = 0.0


class PrefillJob(Message):
    """merger -> compute: compute this prompt's head and then serve it."""

    request_id: str
    tokens: bytes
    space: Space
    hit: int
    compute_head: bool
    sampling: Sampling
    deadline: float
    head_hint: int = -1  # predicted meeting chunk (the estimator's); -1: none
    memory: bool = True  # may take chunks from compute's memory tier (kv_mode cake)
    looked_up: bool = True  # hit is what a lookup found stored (False: kv_mode compute, none)
    fetched: bool = True  # False: nothing is fetched (a hit too short to split): computed whole


class FetchJob(Message):
    """merger -> loader: fetch hit chunks [0, hit) tail first and stage them."""

    request_id: str
    tokens: bytes
    space: Space
    hit: int
    deadline: float


class HeadComputing(Message):
    """compute -> loader: a step computing head chunks [0, upto) has begun. Computed chunks win
    any overlap, so loading one of them is wasted: the loader stops short of `upto`."""

    request_id: str
    upto: int


class ChunkComputed(Message):
    """compute -> merger and loader: head chunks [0, upto) are computed (or, reused: taken
    from compute's memory tier). They act on `upto`; the step's duration and `reused` are for
    observers of the request's events (the mergers learn compute's pace from its telemetry)."""

    request_id: str
    upto: int
    duration_s: float
    reused: bool = False


class ChunkLoaded(Message):
    """loader -> merger and compute: hit chunk `index` is staged at `staged` (a file path);
    its bytes and read time are for observers (the link's pace travels on telemetry)."""

    request_id: str
    index: int
    nbytes: int
    duration_s: float
    staged: str


class LoadFailed(Message):
    """loader -> merger: chunk `index` could not be loaded (missing, corrupt, error, stall)."""

    request_id: str
    index: int
    reason: str


class ComputeTelemetry(Message):
    """compute -> mergers and operators, every CAKE_TELEMETRY_S: one replica's last window."""

    node: str
    window_s: float
    steps: int
    step_s: float  # their mean duration (0: none)
    tokens: dict[str, int]  # tokens computed, by kind: decode, prefill, head
    head_chunks: int  # Cake head chunks computed in multi-chunk pieces (if none: single ones)
    head_s: float  # their cost, queueing included: from runnable as a head to its step's end
    running: int  # requests admitted (holding KV memory)
    waiting: int  # requests queued for admission
    kv_pool_bytes: int  # the memory tier's prompt chunks
    kv_budget_bytes: int  # the replica's whole KV budget


class LoaderTelemetry(Message):
    """loader -> mergers and operators, every CAKE_TELEMETRY_S: one node's last window."""

    node: str
    window_s: float
    reads: int  # chunk reads that finished
    nbytes: int
    read_s: float  # their mean duration (0: none)
    busy_s: float  # time with at least one read in flight: busy_s / reads is the link's pace
    in_flight: int
    read_limit: int
    stalls: int  # reads past CAKE_FETCH_TIMEOUT_S
    failures: int  # reads that failed or found a corrupt chunk
    near_reads: int = 0  # of the reads, those the near tier served (CAKE_STORE_CACHE)
    near_nbytes: int = 0
    near_busy_s: float = 0.0  # time with a near read in flight
    far_reads: int = 0  # with a near tier: the reads the store behind it served
    far_busy_s: float | None = None  # time with a far read in flight (None: no near tier)
    store_problem: str = ""  # why its last write-back failed, until one succeeds ("": none)
    probe_chunk_s: float = 0.0  # a chunk's load time now, by the idle link probe (0: none)

    def far_pace(self) -> tuple[int, float]:
        """Reads of the store proper (behind the near tier, if any) and the time it was busy
        with them: the link's pace is the second over the first."""
        if self.far_busy_s is None:
            return self.reads, self.busy_s
        return self.far_reads, self.far_busy_s


class Meet(Message):
    """merger -> compute and loader: stop; use chunks [meet, hit) from these staged files."""

    request_id: str
    meet: int
    hit: int
    staged: dict[int, str] = {}


class StartHead(Message):
    """merger -> compute: the loads fell behind their pace; compute the head after all (a
    load-only plan becomes a Cake split, and the two sides meet as usual)."""

    request_id: str
    head_hint: int = -1  # where the sides should meet at the loads' own pace; -1: not known


class Cancel(Message):
    """-> compute and loader: drop this request (client gone, deadline, stop string)."""

    request_id: str
    reason: str


class Alive(Message):
    """compute -> gateway, every CAKE_HEARTBEAT_S for each request it holds: still on it. A
    request whose stream stays silent for three heartbeats has lost its compute replica."""

    request_id: str


class Tokens(Message):
    """compute -> gateway: new token ids (packed)."""

    request_id: str
    tokens: bytes
    last: bool = False  # the request's last: its text is whole now (Done, after the write-back)


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
    reused_tokens: int = 0  # prompt tokens whose KV compute's memory tier held
    node: str = ""  # the node that served it

    def done(self, finish_reason: FinishReason, completion_tokens: int) -> Done:
        """The Done message that ends this request."""
        stats = msgspec.structs.asdict(self)
        del stats["request_id"], stats["v"]
        return Done(self.request_id, finish_reason, completion_tokens, **stats)


class Done(Message):
    """compute -> gateway: the request finished; usage and the Cake split."""

    request_id: str
    finish_reason: FinishReason
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
    reused_tokens: int = 0
    node: str = ""


class Failed(Message):
    """-> gateway: the request failed; `status` is the HTTP status its code answers with."""

    request_id: str
    code: ErrorCode
    message: str
    retry_after_s: float = 0.0  # > 0: the gateway answers with Retry-After

    @property
    def status(self) -> int:
        """The HTTP status to answer with (shared.core.errors.HTTP_STATUS)."""
        return http_status(self.code)


class StoreJob(Message):
    """compute -> loader: write these staged chunk files (index -> path) back to storage."""

    request_id: str
    tokens: bytes
    space: Space
    staged: dict[int, str]
