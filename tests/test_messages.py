"""The wire messages: typed round trips, validation on decode, versions, enums as strings."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from shared.core.errors import HTTP_STATUS, CakeError, ErrorCode, http_status
from shared.core.keys import KeySpace, KVLayout, pack_tokens
from shared.core.request import FinishReason, KvMode, Sampling
from shared.wire import messages
from shared.wire.messages import (
    SCHEMA_VERSION,
    Accepted,
    Alive,
    Cancel,
    ChunkComputed,
    ChunkLoaded,
    ComputeTelemetry,
    Done,
    Failed,
    FetchJob,
    GenerateRequest,
    HeadComputing,
    LoaderTelemetry,
    LoadFailed,
    LookupReply,
    LookupRequest,
    Meet,
    Message,
    ModelInfo,
    Prefilled,
    PrefillJob,
    SchemaError,
    Space,
    StartHead,
    StoreJob,
    Tokens,
)  # fmt: skip

SPACE = Space.of(KeySpace("f" * 64, KVLayout(8, 4, 64, "float32"), chunk_tokens=64, salt="s"))
SAMPLING = Sampling(max_tokens=20, temperature=0.5, top_p=0.9, seed=-7)
TOKENS = pack_tokens([1, 2, 3, 70000])
PREFILLED = Prefilled("r1", 300, 128, 5, 3, 2, 3, 12.5, 128, 192)

EXAMPLES: list[Message] = [
    GenerateRequest("r1", TOKENS, SAMPLING, KvMode.LOAD, "tenant", 1.7e9),
    Accepted(node="node-a"),
    ModelInfo("default", SPACE, 32768, "node-a"),
    ModelInfo("default", SPACE, None, "node-a"),
    LookupRequest("r1", SPACE, TOKENS),
    LookupReply(stored_chunks=4),
    PrefillJob("r1", TOKENS, SPACE, 4, True, SAMPLING, 1.7e9, head_hint=2),
    FetchJob("r1", TOKENS, SPACE, 4, 1.7e9),
    HeadComputing("r1", 6),
    ChunkComputed("r1", 2, 0.25),
    ChunkLoaded("r1", 3, 1 << 20, 0.5, "/staging/r1/3.kv"),
    LoadFailed("r1", 3, "timeout"),
    Meet("r1", 2, 4, {2: "/staging/r1/2.kv", 3: "/staging/r1/3.kv"}),
    Cancel("r1", "client went away"),
    StartHead("r1"),
    StartHead("r1", head_hint=6),
    Alive("r1"),
    ComputeTelemetry(
        node="node-a",
        window_s=1.0,
        steps=3,
        step_s=0.2,
        tokens={"decode": 4, "prefill": 512, "head": 256},
        head_chunks=2,
        head_s=0.5,
        running=2,
        waiting=1,
        kv_pool_bytes=1 << 20,
        kv_budget_bytes=1 << 30,
    ),
    LoaderTelemetry(
        node="node-a",
        window_s=1.0,
        reads=8,
        nbytes=16 << 20,
        read_s=0.05,
        busy_s=0.25,
        in_flight=2,
        read_limit=4,
        stalls=0,
        failures=1,
    ),
    Tokens("r1", TOKENS),
    PREFILLED,
    PREFILLED.done(FinishReason.LENGTH, 8),
    Failed("r1", ErrorCode.DEADLINE, "the request ran past its deadline"),
    StoreJob("r1-wb", TOKENS, SPACE, {4: "/staging/r1-wb/4.kv"}),
    Failed("r1", ErrorCode.OVERLOADED, "busy", retry_after_s=3.0),
]


def body_of(message: Message) -> dict[Any, Any]:
    """The plain msgpack map a message travels as."""
    body = msgpack.unpackb(message.encode(), strict_map_key=False)
    assert isinstance(body, dict)
    return body


def packed(body: dict[Any, Any]) -> bytes:
    return msgpack.packb(body)


def test_every_message_type_has_an_example() -> None:
    assert {type(m).__name__ for m in EXAMPLES} == set(messages._REGISTRY)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    data = message.encode()
    assert Message.decode(data) == message
    again = type(message).decode(data)
    assert type(again) is type(message) and again == message
    body = body_of(message)
    assert (body["t"], body["v"]) == (type(message).__name__, SCHEMA_VERSION)


def test_nested_types_come_back_typed() -> None:
    req = GenerateRequest.decode(EXAMPLES[0].encode())
    assert isinstance(req.sampling, Sampling) and req.sampling == SAMPLING
    assert isinstance(req.sampling.temperature, float)
    assert isinstance(req.kv_mode, KvMode) and req.kv_mode is KvMode.LOAD
    assert isinstance(req.tokens, bytes) and req.tokens == TOKENS
    job = PrefillJob.decode(PrefillJob("r", TOKENS, SPACE, 1, False, Sampling(), 0.0).encode())
    assert isinstance(job.space, Space) and isinstance(job.sampling, Sampling)
    assert job.space.key_space() == SPACE.key_space()
    done = Done.decode(PREFILLED.done(FinishReason.STOP, 3).encode())
    assert done.finish_reason is FinishReason.STOP
    failed = Failed.decode(Failed("r", ErrorCode.UNAVAILABLE, "gone").encode())
    assert failed.code is ErrorCode.UNAVAILABLE and failed.status == 503
    meet = Meet.decode(Meet("r", 1, 3, {1: "a", 2: "b"}).encode())
    assert meet.staged == {1: "a", 2: "b"}
    busy = Failed.decode(EXAMPLES[-1].encode())
    assert busy.status == 429 and busy.retry_after_s == 3.0


def test_salted_space_keeps_the_rest() -> None:
    salted = SPACE.salted("other")
    assert salted.salt == "other" and SPACE.salt == "s"
    assert salted.key_space().layout == SPACE.key_space().layout


def test_enums_encode_as_their_plain_strings() -> None:
    body = body_of(GenerateRequest("r", b"", Sampling(), KvMode.COMPUTE))
    assert body["kv_mode"] == "compute" and type(body["kv_mode"]) is str
    assert body["sampling"] == {
        "max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "seed": None, "presence_penalty": 0.0,
        "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": [],
    }  # fmt: skip
    body = body_of(PREFILLED.done(FinishReason.LENGTH, 8))
    assert body["finish_reason"] == "length" and type(body["finish_reason"]) is str
    body = body_of(Failed("r", ErrorCode.BAD_REQUEST, "no"))
    assert body["code"] == "bad_request" and type(body["code"]) is str
    assert "status" not in body  # the status follows from the code (HTTP_STATUS)


def _broken(change: str) -> bytes:
    body = body_of(EXAMPLES[0])  # a GenerateRequest
    if change == "wrong type":
        body["request_id"] = 42
    elif change == "wrong nested type":
        body["sampling"]["temperature"] = "hot"
    elif change == "unknown kv_mode":
        body["kv_mode"] = "fast"
    elif change == "missing field":
        del body["tokens"]
    elif change == "nested not a map":
        body["sampling"] = "greedy"
    elif change == "unknown type":
        body["t"] = "Teleport"
    elif change == "no type":
        del body["t"]
    elif change == "old version":
        body["v"] = 1
    elif change == "no version":
        del body["v"]
    return packed(body)


@pytest.mark.parametrize(
    "change",
    [
        "wrong type", "wrong nested type", "unknown kv_mode", "missing field",
        "nested not a map", "unknown type", "no type", "old version", "no version",
    ],
)  # fmt: skip
def test_a_broken_message_raises_schema_error(change: str) -> None:
    data = _broken(change)
    with pytest.raises(SchemaError):
        Message.decode(data)
    with pytest.raises(SchemaError):
        GenerateRequest.decode(data)


def test_a_missing_nested_field_raises_schema_error() -> None:
    body = body_of(ModelInfo("m", SPACE, None, "n"))
    del body["space"]["fingerprint"]
    with pytest.raises(SchemaError, match="fingerprint"):
        Message.decode(packed(body))


def test_a_wrong_schema_version_says_so() -> None:
    with pytest.raises(SchemaError, match=f"schema version 1.*version {SCHEMA_VERSION}"):
        Message.decode(_broken("old version"))


@pytest.mark.parametrize(
    "data", [b"", b"\xc1", b"not msgpack at all", msgpack.packb([1, 2]), msgpack.packb("hi")]
)
def test_garbage_raises_schema_error(data: bytes) -> None:
    with pytest.raises(SchemaError):
        Message.decode(data)


def test_decoding_as_another_type_raises_schema_error() -> None:
    data = Failed("r", ErrorCode.INTERNAL, "boom").encode()
    with pytest.raises(SchemaError, match="expected a Done message, got a Failed"):
        Done.decode(data)
    assert isinstance(Message.decode(data), Failed)  # the base class takes any message


def test_schema_error_is_a_bad_request_cake_error() -> None:
    assert issubclass(SchemaError, CakeError) and not issubclass(SchemaError, ValueError)
    assert SchemaError("x").code == ErrorCode.BAD_REQUEST == "bad_request"


def test_one_table_maps_every_error_code_to_a_status() -> None:
    assert set(HTTP_STATUS) == set(ErrorCode)
    assert http_status("bad_request") == 400
    assert http_status(ErrorCode.UNAVAILABLE) == 503
    assert http_status(ErrorCode.DEADLINE) == http_status(ErrorCode.TIMEOUT) == 504
    assert http_status("no_such_code") == 500
    assert ErrorCode.of("no_such_code") is ErrorCode.INTERNAL
    assert Failed("r", ErrorCode.MODEL_NOT_FOUND, "?").status == 404
