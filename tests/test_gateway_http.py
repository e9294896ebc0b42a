"""The gateway over HTTP against a real nats-server, with a fake merger+compute behind it.

The fake stands in only for the backend services: it accepts GenerateRequests and plays a
scripted stream of Tokens / Done / Failed messages.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext

from services.gateway import service
from services.gateway.app import make_app
from services.gateway.conversation import TextAssembler
from services.gateway.metrics import GatewayMetrics
from shared.core.errors import ErrorCode
from shared.core.keys import pack_tokens, unpack_tokens
from shared.core.request import FinishReason, Sampling
from shared.kv.tokenizer import ByteTokenizer
from shared.runtime import observability
from shared.runtime.config import Settings
from shared.runtime.observability import configure_tracing
from shared.runtime.service import TaskSet, serve
from shared.wire import subjects
from shared.wire.bus import Bus
from shared.wire.messages import (
    Accepted,
    Cancel,
    Done,
    Failed,
    GenerateRequest,
    Message,
    ModelInfo,
    Prefilled,
    Space,
    Tokens,
)
from tests.prom import families, samples

MODEL = "test-model"
TEXT = "Hello, wörld ☃!"
SETTINGS = Settings(rpc_timeout_s=0.5, request_timeout_s=5.0, chunk_tokens=4).validated()
Script = Callable[[GenerateRequest], list[Message]]


def text_tokens(rid: str, text: str, piece: int = 3) -> list[Message]:
    """The byte tokens of text, `piece` per message (multibyte characters get split)."""
    data = text.encode()
    return [Tokens(rid, pack_tokens(list(data[i : i + piece]))) for i in range(0, len(data), piece)]


def done(
    req: GenerateRequest, completion_tokens: int, reason: FinishReason = FinishReason.LENGTH
) -> Done:
    """A Done with a recognisable Cake split."""
    prompt = len(req.tokens) // 4
    return Done(
        req.request_id, reason, completion_tokens, prompt, hit_tokens=8, chunks_total=3,
        chunks_computed=1, chunks_loaded=2, meet_chunk=1, ttft_ms=12.5, loaded_tokens=8,
        computed_tokens=4,
    )  # fmt: skip


def prefilled(req: GenerateRequest) -> Prefilled:
    """The split the fake compute reports before its first token (as Done repeats it)."""
    d = done(req, 0)
    fields = msgspec.structs.asdict(d)
    stats = {k: v for k, v in fields.items() if k not in ("finish_reason", "completion_tokens")}
    return Prefilled(**stats)


def say(text: str) -> Script:
    """Stream text, then Done."""
    return lambda req: [
        prefilled(req),
        *text_tokens(req.request_id, text),
        done(req, len(text.encode())),
    ]


class FakeBackend:
    """Accepts GENERATE like the merger and plays `script` on the request's stream subject."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.script: Script = say(TEXT)
        self.delay_s = 0.0  # before playing the script
        self.gap_s = 0.0  # between its messages
        self.requests: list[GenerateRequest] = []
        self.parents: list[SpanContext] = []  # the trace context each request arrived in
        self.cancels: asyncio.Queue[Cancel] = asyncio.Queue()
        self.tasks = TaskSet()

    async def on_generate(self, msg: Message, _: str) -> Message:
        assert isinstance(msg, GenerateRequest)
        self.requests.append(msg)
        self.parents.append(trace.get_current_span().get_span_context())
        self.tasks.spawn(self.play(msg))
        return Accepted(node="fake")

    async def on_info(self, _: Message, __: str) -> Message:
        space = Space("fp", 2, 1, 4, "float32", SETTINGS.chunk_tokens)
        return ModelInfo(MODEL, space, 32768, "fake")

    async def on_up(self, _: Message, __: str) -> Message:
        return Accepted()

    async def play(self, req: GenerateRequest) -> None:
        await asyncio.sleep(self.delay_s)
        for message in self.script(req):
            await self.bus.publish(subjects.stream(req.request_id), message)
            await asyncio.sleep(self.gap_s)

    async def on_cancel(self, message: Message, subject: str) -> None:
        if isinstance(message, Cancel):
            assert subjects.request_id_of(subject) == message.request_id
            await self.cancels.put(message)

    async def next_cancel(self, timeout_s: float = 2.0) -> Cancel:
        return await asyncio.wait_for(self.cancels.get(), timeout_s)


@pytest.fixture(scope="module")
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    bus = await Bus.connect(nats_url, "test-gateway-http")
    yield bus
    await bus.close()


@pytest.fixture
async def backend(bus: Bus) -> AsyncIterator[FakeBackend]:
    fake = FakeBackend(bus)
    subs = [
        await bus.handle(subjects.GENERATE, fake.on_generate, queue="merger"),
        await bus.handle(subjects.COMPUTE_INFO, fake.on_info, queue="compute"),
        await bus.handle(subjects.MERGER_INFO, fake.on_up, queue="merger"),
        await bus.handle(subjects.LOADER_INFO, fake.on_up, queue="loader"),
        await bus.handle(subjects.CANCEL_ALL, fake.on_cancel),
    ]
    await bus.flush()
    yield fake
    for sub in subs:
        await sub.unsubscribe()


@asynccontextmanager
async def gateway(
    bus: Bus, settings: Settings = SETTINGS, metrics: GatewayMetrics | None = None
) -> AsyncIterator[TestClient[Any, Any]]:
    """A gateway app on a free port."""
    app = make_app(bus, settings, ByteTokenizer(), MODEL, metrics or GatewayMetrics(), 1024)
    async with TestClient(TestServer(app)) as client:
        yield client


@asynccontextmanager
async def openai_client(client: TestClient[Any, Any]) -> AsyncIterator[openai.AsyncOpenAI]:
    oai = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    try:
        yield oai
    finally:
        await oai.close()


async def sse_events(resp: aiohttp.ClientResponse) -> list[Any]:
    """The data of every server-sent event ("[DONE]" kept as a string)."""
    body = (await resp.read()).decode()
    assert body.endswith("\n\n")
    events = [block.removeprefix("data: ") for block in body.strip().split("\n\n")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


# --- answers --------------------------------------------------------------------------------


async def test_completion_returns_text_usage_and_cake(bus: Bus, backend: FakeBackend) -> None:
    async with gateway(bus) as client:
        before = time.time()
        body = {"prompt": "tell me", "max_tokens": 20, "temperature": 0.5, "seed": 3,
                "cache_salt": "tenant", "kv_mode": "load"}  # fmt: skip
        resp = await client.post("/v1/completions", json=body)
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    assert answer["id"].startswith("cmpl-")
    assert (answer["object"], answer["model"]) == ("text_completion", MODEL)
    assert answer["choices"] == [
        {"index": 0, "text": TEXT, "logprobs": None, "finish_reason": "length"}
    ]
    n_text = len(TEXT.encode())
    assert answer["usage"] == {
        "prompt_tokens": 8, "completion_tokens": n_text, "total_tokens": 8 + n_text,
        "prompt_tokens_details": {"cached_tokens": 8},
    }  # fmt: skip
    assert answer["cake"] == {
        "hit_tokens": 8, "chunks_total": 3, "chunks_computed": 1, "chunks_loaded": 2,
        "reused_tokens": 0, "meet_chunk": 1, "ttft_ms": 12.5, "node": "",
    }  # fmt: skip
    [req] = backend.requests
    assert req.request_id == answer["id"]
    assert unpack_tokens(req.tokens) == [ByteTokenizer.BOS, *b"tell me"]
    assert req.sampling == Sampling(max_tokens=20, temperature=0.5, seed=3)
    assert (req.kv_mode, req.salt) == ("load", "tenant")
    assert before + SETTINGS.request_timeout_s <= req.deadline <= time.time() + 5.0


async def test_streamed_completion_with_the_openai_client(bus: Bus, backend: FakeBackend) -> None:
    async with gateway(bus) as client, openai_client(client) as oai:
        stream = await oai.completions.create(model=MODEL, prompt="hi", max_tokens=30, stream=True)
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    final = chunks[-1]
    assert final.choices == []
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (3, len(TEXT.encode()))
    assert final.model_extra is not None and final.model_extra["cake"]["chunks_loaded"] == 2


async def test_the_last_tokens_text_streams_before_done(bus: Bus, backend: FakeBackend) -> None:
    """A one-token answer whose byte is half a character: its text (the replacement character)
    streams when the token comes, marked last, not when Done comes after the write-back (0.2 s
    later at 2,048 tokens: a compute-only request's TTFT in the benchmark had that in it). The
    stream still ends after Done, so the next request with the prompt hits."""
    write_back_s = 2.0

    async def play(req: GenerateRequest) -> None:
        rid = req.request_id
        for message in (prefilled(req), Tokens(rid, pack_tokens([0xE2]), last=True)):
            await bus.publish(subjects.stream(rid), message)
        await asyncio.sleep(write_back_s)
        await bus.publish(subjects.stream(rid), done(req, 1))

    backend.play = play  # type: ignore[method-assign]
    async with gateway(bus) as client:
        sent = time.perf_counter()
        body = {"prompt": "hi", "max_tokens": 1, "stream": True}
        resp = await client.post("/v1/completions", json=body)
        first = await resp.content.readline()
        first_s = time.perf_counter() - sent
        events = [json.loads(first.decode().removeprefix("data: ")), *await sse_events(resp)]
        end_s = time.perf_counter() - sent
    assert events[0]["choices"][0]["text"] == "\ufffd"
    assert first_s < write_back_s <= end_s
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 1


async def test_streamed_chat_with_the_openai_client(bus: Bus, backend: FakeBackend) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    async with gateway(bus) as client, openai_client(client) as oai:
        stream = await oai.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=30, stream=True
        )
        chunks = [chunk async for chunk in stream]
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == TEXT
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > len(TEXT.encode())
    [req] = backend.requests
    assert unpack_tokens(req.tokens) == ByteTokenizer().encode_chat(messages)


async def test_chat_completion_with_the_openai_client(bus: Bus, backend: FakeBackend) -> None:
    async with gateway(bus) as client, openai_client(client) as oai:
        answer = await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=30
        )
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.content == TEXT
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == 8


# --- stop strings ---------------------------------------------------------------------------


async def test_stop_string_cuts_the_text_and_cancels(bus: Bus, backend: FakeBackend) -> None:
    backend.script = say("Hello world, again")  # "o w" spans the pieces "lo " and "wor"
    async with gateway(bus) as client, openai_client(client) as oai:
        answer = await oai.completions.create(model=MODEL, prompt="x", stop=["o w", "zz"])
    assert answer.choices[0].text == "Hell"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == 9  # "Hel|lo |wor"
    details = answer.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens == 8  # the split arrived before Done
    assert answer.model_extra is not None and answer.model_extra["cake"]["meet_chunk"] == 1
    cancel = await backend.next_cancel()
    assert (cancel.request_id, cancel.reason) == (answer.id, "stop string")


async def test_streamed_stop_string_never_leaks_text(bus: Bus, backend: FakeBackend) -> None:
    backend.script = say("Hello world, again")
    async with gateway(bus) as client, openai_client(client) as oai:
        stream = await oai.completions.create(model=MODEL, prompt="x", stop="o w", stream=True)
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hell"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert (await backend.next_cancel()).request_id == chunks[0].id


def test_text_assembler_waits_for_complete_characters_and_stops() -> None:
    text = TextAssembler(ByteTokenizer(), stop=["☃"])
    snowman = "☃".encode()
    assert text.add(list(b"ab")) == "ab"
    assert text.add([snowman[0]]) == ""  # an incomplete character: nothing yet
    assert text.add(list(snowman[1:])) == ""
    assert text.stopped and text.text == "ab"
    plain = TextAssembler(ByteTokenizer(), stop=[])
    assert plain.add([*"é".encode()[:1]]) == ""
    assert plain.add([*"é".encode()[1:], ByteTokenizer.EOS]) == "é"
    assert plain.finish() == ""


# --- several prompts ------------------------------------------------------------------------


def answer_for(req: GenerateRequest) -> str:
    """A different answer for each prompt: its last byte, repeated by how long it is."""
    ids = unpack_tokens(req.tokens)
    return chr(ids[-1]) * (len(ids) + 3)


PROMPTS = ["a", "bbbb", "cc"]


async def test_a_list_of_prompts_gets_a_choice_for_each_in_order(
    bus: Bus, backend: FakeBackend
) -> None:
    """As with OpenAI and vLLM: one backend request per prompt, all at once; choice i answers
    prompt i; usage adds them up; cake has each prompt's split in order."""
    backend.script = lambda req: say(answer_for(req))(req)
    backend.delay_s = 1.0  # all three are in flight together
    async with gateway(bus) as client:
        started = time.monotonic()
        resp = await client.post("/v1/completions", json={"prompt": PROMPTS, "max_tokens": 9})
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
        assert time.monotonic() - started < 2 * backend.delay_s  # one after another: 3 s
    texts = [p[-1] * (len(p) + 4) for p in PROMPTS]  # BOS + bytes, plus 3
    assert answer["choices"] == [
        {"index": i, "text": t, "logprobs": None, "finish_reason": "length"}
        for i, t in enumerate(texts)
    ]
    prompt_tokens = sum(len(p) + 1 for p in PROMPTS)
    completion_tokens = sum(len(t) for t in texts)
    assert answer["usage"] == {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 3 * 8},
    }  # fmt: skip
    assert [c["chunks_loaded"] for c in answer["cake"]] == [2, 2, 2]
    ids = sorted(r.request_id for r in backend.requests)
    assert ids == [f"{answer['id']}-{i}" for i in range(3)]


async def test_a_list_of_prompts_streams_its_choices_interleaved(
    bus: Bus, backend: FakeBackend
) -> None:
    backend.script = lambda req: say(answer_for(req))(req)
    backend.gap_s = 0.02  # all three stream at once
    async with gateway(bus) as client, openai_client(client) as oai:
        stream = await oai.completions.create(
            model=MODEL, prompt=PROMPTS, max_tokens=9, stream=True
        )
        chunks = [chunk async for chunk in stream]
    order = [chunk.choices[0].index for chunk in chunks[:-1]]
    assert order != sorted(order)  # interleaved, not one choice after another
    texts: dict[int, str] = {}
    finishes: dict[int, str | None] = {}
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        finishes[choice.index] = choice.finish_reason
    assert texts == {i: p[-1] * (len(p) + 4) for i, p in enumerate(PROMPTS)}
    assert finishes == {0: "length", 1: "length", 2: "length"}
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert final.usage.completion_tokens == sum(len(t) for t in texts.values())


async def test_one_refused_prompt_fails_the_request_and_cancels_the_others(
    bus: Bus, backend: FakeBackend
) -> None:
    busy = Failed("", ErrorCode.OVERLOADED, "compute is full", retry_after_s=2.0)
    backend.script = lambda req: (
        [msgspec.structs.replace(busy, request_id=req.request_id)]
        if unpack_tokens(req.tokens)[-1] == ord("b") else text_tokens(req.request_id, "slow")
    )  # fmt: skip
    async with gateway(bus) as client:
        resp = await client.post("/v1/completions", json={"prompt": PROMPTS})
        assert resp.status == 429
        assert (await resp.json())["error"]["message"] == "compute is full"
    cancelled = {(await backend.next_cancel()).request_id for _ in range(2)}
    by_prompt = {unpack_tokens(r.tokens)[-1]: r.request_id for r in backend.requests}
    assert cancelled == {by_prompt[ord("a")], by_prompt[ord("c")]}


# --- failures -------------------------------------------------------------------------------


async def test_failed_answers_with_its_status(bus: Bus, backend: FakeBackend) -> None:
    backend.script = lambda req: [Failed(req.request_id, ErrorCode.UNAVAILABLE, "compute is gone")]
    async with gateway(bus) as client:
        resp = await client.post("/v1/completions", json={"prompt": "x"})
        assert resp.status == 503
        error = (await resp.json())["error"]
    assert (error["message"], error["code"], error["type"]) == (
        "compute is gone", "unavailable", "server_error"
    )  # fmt: skip
    assert backend.cancels.empty()


async def test_streamed_failure_is_an_error_event_then_done(bus: Bus, backend: FakeBackend) -> None:
    backend.script = lambda req: [
        *text_tokens(req.request_id, "partial"),
        Failed(req.request_id, ErrorCode.INTERNAL, "compute crashed"),
    ]
    async with gateway(bus) as client:
        resp = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        events = await sse_events(resp)
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == "partial"
    assert events[-2] == {"error": {"message": "compute crashed", "type": "server_error",
                                    "param": None, "code": "internal"}}  # fmt: skip
    assert events[-1] == "[DONE]"
    async with gateway(bus) as client, openai_client(client) as oai:
        stream = await oai.completions.create(model=MODEL, prompt="x", stream=True)
        with pytest.raises(openai.APIError, match="compute crashed"):
            _ = [chunk async for chunk in stream]


@pytest.mark.parametrize("merger", ["absent", "silent"])
async def test_no_merger_answer_is_503_within_rpc_timeout(bus: Bus, merger: str) -> None:
    silent = None
    if merger == "silent":
        silent = await bus.subscribe(subjects.GENERATE)
        await bus.flush()
    try:
        async with gateway(bus) as client:
            start = time.monotonic()
            resp = await client.post("/v1/completions", json={"prompt": "x"})
            elapsed = time.monotonic() - start
            error = (await resp.json())["error"]
    finally:
        if silent is not None:
            await silent.close()
    assert resp.status == 503
    assert "the merger service is not answering" in error["message"]
    assert elapsed < SETTINGS.rpc_timeout_s + 2.0  # the hop's timeout, not the request's


@pytest.mark.parametrize("stream", [False, True])
async def test_silent_backend_times_out_at_the_deadline(
    bus: Bus, backend: FakeBackend, stream: bool
) -> None:
    backend.script = lambda req: []
    settings = SETTINGS.replace(request_timeout_s=1.0)
    async with gateway(bus, settings) as client:
        start = time.monotonic()
        resp = await client.post("/v1/completions", json={"prompt": "x", "stream": stream})
        # a stream starts with its first token, so one that never starts gets a real status
        assert resp.status == 504
        error = (await resp.json())["error"]
        assert error["code"] == "timeout" and "deadline" in error["message"]
        elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 3.0
    cancel = await backend.next_cancel()
    assert (cancel.request_id, cancel.reason) == (backend.requests[0].request_id, "deadline")


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_whose_compute_goes_silent_before_answering_is_sent_again(
    bus: Bus, backend: FakeBackend, stream: bool
) -> None:
    """Its compute died before the client saw anything (nothing, not even Alive, for the
    silence window): the gateway cancels that attempt and sends the request once more, under a
    fresh backend id; the client gets the answer and never sees the first attempt."""
    backend.script = lambda req: [] if len(backend.requests) == 1 else say(TEXT)(req)
    settings = SETTINGS.replace(heartbeat_s=0.1, rpc_timeout_s=0.1)
    async with gateway(bus, settings) as client:
        resp = await client.post("/v1/completions", json={"prompt": "x", "stream": stream})
        assert resp.status == 200
        body = await resp.text()
    assert TEXT[:3] in body if stream else json.loads(body)["choices"][0]["text"] == TEXT
    first, second = (r.request_id for r in backend.requests)
    assert second == f"{first}-retry1"
    cancel = await backend.next_cancel()
    assert (cancel.request_id, cancel.reason) == (first, "backend silent")


async def test_client_disconnect_during_streaming_cancels(bus: Bus, backend: FakeBackend) -> None:
    backend.script = lambda req: text_tokens(req.request_id, "first")  # and then nothing
    async with gateway(bus) as client:
        resp = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
        assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")
        resp.close()
        cancel = await backend.next_cancel()
    assert cancel.request_id == backend.requests[0].request_id


# --- models, health, metrics ----------------------------------------------------------------

# every family the gateway exposes: the names its users scrape today (new ones only added)
GATEWAY_FAMILIES = {
    "cake_requests_total",
    "cake_ttft_seconds",
    "cake_prompt_tokens_total",
    "cake_cache_lookups_total",
    "cake_cache_hit_tokens_total",
    "cake_prompt_tokens_cacheable_total",
    "cake_errors_total",
    "cake_generated_tokens_total",
    "cake_request_duration_seconds",
    "cake_backend_retries_total",  # new
}


async def test_models_lists_the_served_model(bus: Bus) -> None:
    async with gateway(bus) as client, openai_client(client) as oai:
        models = [m async for m in oai.models.list()]
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra is not None and models[0].model_extra["max_model_len"] == 1024


async def test_health_follows_the_nats_connection(nats_url: str, backend: FakeBackend) -> None:
    own = await Bus.connect(nats_url, "test-health")
    async with gateway(own) as client:
        resp = await client.get("/health")
        assert (resp.status, await resp.json()) == (200, {"status": "ok"})
        await own.close()
        resp = await client.get("/health")
        assert (resp.status, (await resp.json())["reason"]) == (503, "NATS is not connected")
        resp = await client.post("/v1/completions", json={"prompt": "hi"})
        assert resp.status == 503  # at once, not after the RPC timeout


async def test_metrics_count_requests_tokens_and_errors(bus: Bus, backend: FakeBackend) -> None:
    metrics = GatewayMetrics()
    async with gateway(bus, metrics=metrics) as client:
        for mode in ("cake", "compute"):
            body = {"prompt": "0123456789", "kv_mode": mode}
            resp = await client.post("/v1/completions", json=body)
            assert resp.status == 200
        assert (await client.post("/v1/completions", json={"prompt": ""})).status == 400
        resp = await client.get("/metrics")
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    n_text = len(TEXT.encode())
    expected = {
        'cake_requests_total{kv_mode="cake",status="200"}': 1,
        'cake_requests_total{kv_mode="compute",status="200"}': 1,
        'cake_requests_total{kv_mode="unknown",status="400"}': 1,
        'cake_errors_total{kind="bad_request"}': 1,
        'cake_prompt_tokens_total{source="loaded"}': 16,
        'cake_prompt_tokens_total{source="computed"}': 8,
        'cake_prompt_tokens_total{source="suffix"}': 0,  # 11 prompt tokens - 8 - 4, twice: 0
        "cake_cache_lookups_total": 1,  # kv_mode compute looks nothing up
        "cake_cache_hit_tokens_total": 8,
        "cake_prompt_tokens_cacheable_total": 8,  # (11 - 1) // 4 chunks of 4 tokens
        "cake_generated_tokens_total": 2 * n_text,
        "cake_ttft_seconds_count": 2,
        'cake_ttft_seconds_bucket{le="0.025"}': 2,
        'cake_ttft_seconds_bucket{le="0.01"}': 0,
        'cake_request_duration_seconds_count{kv_mode="cake"}': 1,  # successful answers only
        'cake_request_duration_seconds_count{kv_mode="compute"}': 1,
    }
    got = samples(text)
    assert {k: got.get(k) for k in expected} == expected
    assert families(text)["cake_ttft_seconds"] == "histogram"
    assert families(text)["cake_requests_total"] == "counter"


async def test_request_span_travels_in_bus_headers(
    bus: Bus, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = InMemorySpanExporter()
    monkeypatch.setattr(observability, "_provider", None)  # restored afterwards
    configure_tracing("gateway-test", SimpleSpanProcessor(exporter))
    async with gateway(bus) as client:
        answer = await (await client.post("/v1/completions", json={"prompt": "x"})).json()
    [span] = [s for s in exporter.get_finished_spans() if s.name == "gateway.request"]
    assert span.attributes is not None
    assert span.attributes["cake.request_id"] == answer["id"]
    assert span.attributes["http.response.status_code"] == 200
    parent = backend.parents[0]
    assert (parent.trace_id, parent.span_id) == (span.context.trace_id, span.context.span_id)


async def test_service_serves_metrics_and_drains_on_stop(
    nats_url: str, bus: Bus, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(observability, "_provider", None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(nats_url=nats_url, port=port, log_format="json").validated()
    stop = asyncio.Event()
    task = asyncio.create_task(serve("gateway", service.build, settings, stop))
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await wait_for_health(http, url, task)
            async with http.get(f"{url}/metrics") as resp:
                assert resp.status == 200
                exposed = families(await resp.text())
            assert set(exposed) == GATEWAY_FAMILIES  # the loader's families are the loader's
            async with http.get(f"{url}/v1/models") as resp:
                data = (await resp.json())["data"]
            assert (data[0]["id"], data[0]["max_model_len"]) == ("default", 32768)
            backend.delay_s = 0.3
            body = {"prompt": "in flight", "max_tokens": 32}
            in_flight = asyncio.create_task(http.post(f"{url}/v1/completions", json=body))
            while not backend.requests:
                await asyncio.sleep(0.01)
            stop.set()
            async with await in_flight as resp:
                assert resp.status == 200
                assert (await resp.json())["choices"][0]["text"] == TEXT
            await asyncio.wait_for(task, 5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def wait_for_health(http: aiohttp.ClientSession, url: str, task: asyncio.Task[Any]) -> None:
    """Until the service answers /health with 200 (fails if it died)."""
    for _ in range(300):
        assert not task.done(), task
        try:
            async with http.get(f"{url}/health") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("the gateway never became healthy")
