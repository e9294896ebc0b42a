"""Request validation of the gateway: over HTTP (no NATS traffic for bad requests) and direct."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.gateway.app import MAX_BODY_BYTES, make_app
from services.gateway.metrics import GatewayMetrics
from services.gateway.validation import (
    Endpoint,
    Limits,
    RequestError,
    TokenIds,
    decode_body,
    parse_request,
    tokenize,
)
from shared.core.errors import BadRequestError
from shared.kv.tokenizer import ByteTokenizer
from shared.runtime.config import Settings
from shared.wire import subjects
from shared.wire.bus import Bus
from shared.wire.messages import Message

MODEL = "test-model"
MAX_CONTEXT = 64
MAX_TOKENS_LIMIT = 32
LIMITS = Limits(MODEL, MAX_TOKENS_LIMIT, MAX_CONTEXT)
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


@dataclass
class Gateway:
    """A gateway app under test and the GenerateRequests that reached NATS."""

    client: TestClient[Any, Any]
    generate_requests: list[Message]


@pytest.fixture(scope="module")
async def gateway(nats_url: str) -> AsyncIterator[Gateway]:
    bus = await Bus.connect(nats_url, "test-gateway-validation")
    seen: list[Message] = []

    async def record(msg: Message, _: str) -> None:
        seen.append(msg)

    await bus.handle(subjects.GENERATE, record)
    settings = Settings(max_tokens_limit=MAX_TOKENS_LIMIT, rpc_timeout_s=0.5).validated()
    app = make_app(bus, settings, ByteTokenizer(), MODEL, GatewayMetrics(), MAX_CONTEXT)
    async with TestClient(TestServer(app)) as client:
        yield Gateway(client, seen)
    await bus.close()


# (name, path, body (dict: JSON; bytes: raw), status, words in the message, param)
BAD_REQUESTS: list[tuple[str, str, Any, int, tuple[str, ...], str | None]] = [
    ("malformed json", COMPLETIONS, b'{"prompt": "hi"', 400, ("not valid JSON",), None),
    ("array body", COMPLETIONS, b'["hi"]', 400, ("JSON object", "array"), None),
    ("missing prompt", COMPLETIONS, {"max_tokens": 4}, 400, ("prompt is required",), "prompt"),
    ("empty prompt", COMPLETIONS, {"prompt": ""}, 400, ("prompt is empty",), "prompt"),
    ("65 prompts", COMPLETIONS, {"prompt": ["a"] * 65}, 400,
     ("a list of 1 to 64 of them, got a list of 65",), "prompt"),
    ("no prompts", COMPLETIONS, {"prompt": []}, 400, ("got a list of 0",), "prompt"),
    ("ids and text", COMPLETIONS, {"prompt": [1, "b"]}, 400,
     ("prompt[0] must be a string or a list of token ids, got an integer",), "prompt"),
    ("an empty prompt among several", COMPLETIONS, {"prompt": ["a", ""]}, 400,
     ("prompt[1] is empty",), "prompt"),
    ("negative id", COMPLETIONS, {"prompt": [1, -2]}, 400, ("negative",), "prompt"),
    ("id too big", COMPLETIONS, {"prompt": [1, 10**9]}, 400, ("vocabulary size",), "prompt"),
    ("boolean ids", COMPLETIONS, {"prompt": [True]}, 400, ("string or a list",), "prompt"),
    ("prompt number", COMPLETIONS, {"prompt": 5}, 400, ("prompt must be a string",), "prompt"),
    (
        "prompt too long", COMPLETIONS, {"prompt": "x" * 60, "max_tokens": 10}, 400,
        (f"maximum context length is {MAX_CONTEXT}", "61 prompt tokens", "max_tokens=10"),
        "prompt",
    ),
    (
        "max_tokens bool", COMPLETIONS, {"prompt": "a", "max_tokens": True}, 400,
        ("max_tokens must be an integer", "boolean"), "max_tokens",
    ),
    (
        "max_tokens string", COMPLETIONS, {"prompt": "a", "max_tokens": "8"}, 400,
        ("max_tokens must be an integer", "string"), "max_tokens",
    ),
    (
        "max_tokens zero", COMPLETIONS, {"prompt": "a", "max_tokens": 0}, 400,
        ("max_tokens must be between 1 and 32", "got 0"), "max_tokens",
    ),
    (
        "max_tokens negative", COMPLETIONS, {"prompt": "a", "max_tokens": -3}, 400,
        ("max_tokens", "got -3"), "max_tokens",
    ),
    (
        "max_tokens huge", COMPLETIONS, {"prompt": "a", "max_tokens": 10**12}, 400,
        ("max_tokens must be between 1 and 32",), "max_tokens",
    ),
    (
        "max_tokens float", COMPLETIONS, {"prompt": "a", "max_tokens": 4.5}, 400,
        ("max_tokens must be an integer",), "max_tokens",
    ),
    (
        "temperature high", COMPLETIONS, {"prompt": "a", "temperature": 2.5}, 400,
        ("temperature must be between 0 and 2",), "temperature",
    ),
    (
        "temperature negative", COMPLETIONS, {"prompt": "a", "temperature": -0.1}, 400,
        ("temperature",), "temperature",
    ),
    (
        "temperature string", COMPLETIONS, {"prompt": "a", "temperature": "hot"}, 400,
        ("temperature must be a finite number",), "temperature",
    ),
    ("top_p zero", COMPLETIONS, {"prompt": "a", "top_p": 0}, 400, ("top_p",), "top_p"),
    ("top_p above 1", COMPLETIONS, {"prompt": "a", "top_p": 1.5}, 400, ("top_p",), "top_p"),
    (
        "seed float", COMPLETIONS, {"prompt": "a", "seed": 1.5}, 400,
        ("seed must be an integer",), "seed",
    ),
    (
        "seed bool", COMPLETIONS, {"prompt": "a", "seed": False}, 400,
        ("seed must be an integer",), "seed",
    ),
    (
        "five stops", COMPLETIONS, {"prompt": "a", "stop": list("abcde")}, 400,
        ("at most 4",), "stop",
    ),
    ("stop number", COMPLETIONS, {"prompt": "a", "stop": [1]}, 400, ("stop must be",), "stop"),
    ("empty stop", COMPLETIONS, {"prompt": "a", "stop": ""}, 400, ("stop must be",), "stop"),
    (
        "stream string", COMPLETIONS, {"prompt": "a", "stream": "yes"}, 400,
        ("stream must be a boolean",), "stream",
    ),
    (
        "unknown kv_mode", COMPLETIONS, {"prompt": "a", "kv_mode": "fast"}, 400,
        ("kv_mode must be one of cake, compute, load", "'fast'"), "kv_mode",
    ),
    (
        "salt too long", COMPLETIONS, {"prompt": "a", "cache_salt": "s" * 257}, 400,
        ("cache_salt must be at most 256",), "cache_salt",
    ),
    (
        "unknown model", COMPLETIONS, {"prompt": "a", "model": "gpt-4"}, 404,
        ("'gpt-4' does not exist", f"serves '{MODEL}'"), "model",
    ),
    ("n of 2", COMPLETIONS, {"prompt": "a", "n": 2}, 400, ("n=2 is not supported",), "n"),
    ("echo", COMPLETIONS, {"prompt": "a", "echo": True}, 400, ("echo",), "echo"),
    ("logprobs", COMPLETIONS, {"prompt": "a", "logprobs": 3}, 400, ("logprobs",), "logprobs"),
    (
        "no messages", CHAT, {"model": MODEL}, 400,
        ("messages must be a non-empty array", "null"), "messages",
    ),
    (
        "empty messages", CHAT, {"messages": []}, 400,
        ("messages must be a non-empty array", "empty array"), "messages",
    ),
    ("message string", CHAT, {"messages": ["hi"]}, 400, ("messages[0]",), "messages[0]"),
    (
        "bad role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400,
        ("messages[0].role must be one of",), "messages[0].role",
    ),
    (
        "missing content", CHAT, {"messages": [{"role": "user", "content": "a"}, {"role": "user"}]},
        400, ("messages[1].content must be a string",), "messages[1].content",
    ),
    (
        "chat max_completion_tokens", CHAT,
        {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 0}, 400,
        ("max_completion_tokens must be between 1 and 32",), "max_completion_tokens",
    ),
    (
        "chat too long", CHAT, {"messages": [{"role": "user", "content": "y" * 80}]}, 400,
        (f"maximum context length is {MAX_CONTEXT}",), "messages",
    ),
    ("lone surrogate in prompt", COMPLETIONS, b'{"prompt": "a\\ud800b"}', 400,
     ("invalid Unicode", "lone surrogate"), "prompt"),
    ("lone surrogate in chat content", CHAT,
     b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, ("invalid Unicode",),
     "messages[0].content"),
    ("lone surrogate in cache_salt", COMPLETIONS, b'{"prompt": "a", "cache_salt": "\\udfff"}',
     400, ("invalid Unicode",), "cache_salt"),
    ("nested 100k deep", COMPLETIONS,
     b'{"prompt": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400,
     ("nested too deeply",), None),
    ("presence_penalty out of range", COMPLETIONS, {"prompt": "a", "presence_penalty": 2.5},
     400, ("presence_penalty must be between -2 and 2, got 2.5",), "presence_penalty"),
    ("repetition_penalty of 0", CHAT,
     {"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 0}, 400,
     ("repetition_penalty must be between 0.01 and 10, got 0",), "repetition_penalty"),
    ("logit_bias key not a token id", COMPLETIONS, {"prompt": "a", "logit_bias": {"a": 1}},
     400, ("logit_bias must map token ids to numbers",), "logit_bias"),
    ("logit_bias value not a number", COMPLETIONS, {"prompt": "a", "logit_bias": {"1": "x"}},
     400, ("logit_bias must map token ids to numbers",), "logit_bias"),
    ("logit_bias too strong", COMPLETIONS, {"prompt": "a", "logit_bias": {"65": 200}},
     400, ("between -100 and 100, got 200.0 for token 65",), "logit_bias"),
    ("logit_bias of 10^400", COMPLETIONS,
     b'{"prompt": "a", "logit_bias": {"65": 1' + b"0" * 400 + b"}}", 400,
     ("logit_bias must map token ids to numbers",), "logit_bias"),
    ("logit_bias naming a token twice", COMPLETIONS,
     {"prompt": "a", "logit_bias": {"65": 1, "065": 1}}, 400, ("names a token twice",),
     "logit_bias"),
    ("logit_bias outside the vocabulary", COMPLETIONS,
     {"prompt": "a", "logit_bias": {"100000": 1}}, 400,
     ("token ids below the vocabulary size",), "logit_bias"),
    *[
        (f"unsupported {name}", COMPLETIONS, {"prompt": "a", name: value}, 400,
         (f"{name} is not supported",), name)
        for name, value in [
            ("suffix", "tail"), ("tools", [{"type": "function"}]),
            ("response_format", {"type": "json_object"}),
        ]
    ],
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "words", "param"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
async def test_bad_request_is_rejected_with_a_helpful_message(
    gateway: Gateway,
    path: str,
    body: Any,
    status: int,
    words: tuple[str, ...],
    param: str | None,
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await gateway.client.post(path, data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == status
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"]
    for word in words:
        assert word in error["message"]
    assert gateway.generate_requests == []


async def test_wrong_content_type_is_415(gateway: Gateway) -> None:
    resp = await gateway.client.post(COMPLETIONS, data=b'{"prompt": "a"}')
    assert resp.status == 415
    assert "Content-Type must be application/json" in (await resp.json())["error"]["message"]


async def test_body_over_the_limit_is_413(gateway: Gateway) -> None:
    raw = b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
    resp = await gateway.client.post(
        COMPLETIONS, data=raw, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 413
    assert "larger than" in (await resp.json())["error"]["message"]
    assert gateway.generate_requests == []


async def test_unknown_routes_and_methods_get_json_errors(gateway: Gateway) -> None:
    resp = await gateway.client.get("/v1/nothing")
    assert resp.status == 404
    assert "/v1/nothing" in (await resp.json())["error"]["message"]
    resp = await gateway.client.get(COMPLETIONS)
    assert resp.status == 405
    assert "GET" in (await resp.json())["error"]["message"]


# --- validation.py directly -----------------------------------------------------------------


def test_completion_defaults() -> None:
    parsed = parse_request({"prompt": "hello"}, Endpoint.COMPLETIONS, LIMITS)
    assert parsed.prompt == "hello"
    assert parsed.endpoint is Endpoint.COMPLETIONS
    assert (parsed.sampling.max_tokens, parsed.sampling.temperature) == (16, 0.0)
    assert (parsed.sampling.top_p, parsed.sampling.seed) == (1.0, None)
    assert (parsed.stop, parsed.stream, parsed.kv_mode) == ((), False, "cake")
    assert parsed.cache_salt == ""


def test_completion_with_every_field() -> None:
    body = {
        "model": MODEL, "prompt": ["one string"], "max_tokens": 8, "temperature": 1,
        "top_p": 0.5, "seed": -7, "stop": "\n", "stream": True, "cache_salt": "tenant-a",
        "kv_mode": "load", "n": 1, "echo": False, "logprobs": None, "user": "ignored",
    }  # fmt: skip
    parsed = parse_request(body, Endpoint.COMPLETIONS, LIMITS)
    assert parsed.prompt == "one string"
    assert parsed.sampling.max_tokens == 8
    assert parsed.sampling.temperature == 1.0 and isinstance(parsed.sampling.temperature, float)
    assert (parsed.sampling.top_p, parsed.sampling.seed) == (0.5, -7)
    assert (parsed.stop, parsed.stream, parsed.cache_salt, parsed.kv_mode) == (
        ("\n",), True, "tenant-a", "load",
    )  # fmt: skip


def test_a_list_of_prompts_is_several_prompts_each_checked() -> None:
    body = {"prompt": ["one", [5, 6, 7], "x" * 56], "max_tokens": 4}
    parsed = parse_request(body, Endpoint.COMPLETIONS, LIMITS)
    assert parsed.prompts == ("one", TokenIds((5, 6, 7)), "x" * 56)
    tokenizer = ByteTokenizer()
    assert tokenize(parsed, tokenizer, LIMITS) == [tokenizer.encode("one"), [5, 6, 7],
                                                   tokenizer.encode("x" * 56)]  # fmt: skip
    long = parse_request({**body, "max_tokens": 10}, Endpoint.COMPLETIONS, LIMITS)
    with pytest.raises(RequestError, match=r"^prompt 2: this model's maximum context length"):
        tokenize(long, tokenizer, LIMITS)


def test_a_prompt_of_token_ids() -> None:
    for prompt in ([5, 6, 7], [[5, 6, 7]]):
        parsed = parse_request({"prompt": prompt}, Endpoint.COMPLETIONS, LIMITS)
        assert parsed.prompt == TokenIds((5, 6, 7))


def test_the_default_max_tokens_never_exceeds_the_limit() -> None:
    low = Limits(MODEL, max_tokens_limit=8)
    assert parse_request({"prompt": "a"}, Endpoint.COMPLETIONS, low).sampling.max_tokens == 8


def test_nulls_mean_defaults() -> None:
    body = {"prompt": "a", "max_tokens": None, "temperature": None, "stop": None, "seed": None}
    parsed = parse_request(body, Endpoint.COMPLETIONS, LIMITS)
    assert parsed.sampling.max_tokens == 16
    assert parsed.stop == ()


def test_chat_messages_and_text_parts() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text",
                                                                         "text": "there"}]},
        ],
        "max_completion_tokens": 5,
        "stop": ["a", "b"],
    }  # fmt: skip
    parsed = parse_request(body, Endpoint.CHAT, LIMITS)
    assert parsed.prompt == (
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"},
    )
    assert parsed.sampling.max_tokens == 5
    assert parsed.stop == ("a", "b")


def test_chat_rejects_non_text_parts() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    with pytest.raises(RequestError, match=r"messages\[0\]\.content"):
        parse_request(body, Endpoint.CHAT, LIMITS)


def test_tokenize_accepts_the_context_exactly_and_rejects_one_more() -> None:
    tokenizer = ByteTokenizer()
    fits = parse_request({"prompt": "x" * 53, "max_tokens": 10}, Endpoint.COMPLETIONS, LIMITS)
    assert [len(ids) for ids in tokenize(fits, tokenizer, LIMITS)] == [54]  # BOS + 53 bytes
    over = parse_request({"prompt": "x" * 54, "max_tokens": 10}, Endpoint.COMPLETIONS, LIMITS)
    with pytest.raises(RequestError, match="55 prompt tokens plus max_tokens=10") as info:
        tokenize(over, tokenizer, LIMITS)
    assert info.value.param == "prompt"
    unlimited = Limits(MODEL, MAX_TOKENS_LIMIT, None)
    assert [len(ids) for ids in tokenize(over, tokenizer, unlimited)] == [55]


def test_request_errors_are_bad_request_errors_with_status() -> None:
    with pytest.raises(BadRequestError) as info:
        parse_request({"prompt": "a", "model": "other"}, Endpoint.COMPLETIONS, LIMITS)
    error = info.value
    assert isinstance(error, RequestError)
    assert (error.status, error.code, error.param) == (404, "model_not_found", "model")


def test_decode_body() -> None:
    assert decode_body(b'{"a": 1}') == {"a": 1}
    with pytest.raises(RequestError, match="not valid JSON"):
        decode_body(b"\xff\xfe")
    with pytest.raises(RequestError, match="JSON object, not a string"):
        decode_body(b'"text"')


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 10**400])
def test_non_finite_temperatures_are_rejected(value: float) -> None:
    with pytest.raises(RequestError, match="temperature must be a finite number"):
        parse_request({"prompt": "a", "temperature": value}, Endpoint.COMPLETIONS, LIMITS)


def test_penalties_and_logit_bias_are_taken() -> None:
    body = {
        "prompt": "a", "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2,
        "logit_bias": {"65": 10, "7": -100},
    }  # fmt: skip
    sampling = parse_request(body, Endpoint.COMPLETIONS, LIMITS).sampling
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -1.0)
    assert sampling.repetition_penalty == 1.2
    assert sampling.logit_bias == ((65, 10.0), (7, -100.0))


def test_unsupported_parameters_at_their_neutral_values_are_accepted() -> None:
    body = {
        "prompt": "a", "suffix": "", "tools": [], "response_format": {"type": "text"},
    }  # fmt: skip
    assert parse_request(body, Endpoint.COMPLETIONS, LIMITS).prompt == "a"
