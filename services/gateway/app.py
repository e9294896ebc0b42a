"""The gateway's HTTP application: OpenAI-compatible completions served by the Cake backend.

A request is validated and tokenized here, sent to the merger as a GenerateRequest, and
answered from the Tokens / Done / Failed messages on its stream subject, either as one JSON
body or as server-sent events. Whenever the gateway stops listening before the backend is
done (stop string, deadline, client gone, error) it publishes a Cancel.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import nats.errors
import structlog
from aiohttp import web
from nats.aio.subscription import Subscription
from opentelemetry.trace import Span, Status, StatusCode

from services.gateway.validation import (
    Endpoint,
    Limits,
    ParsedRequest,
    RequestError,
    decode_body,
    parse_request,
    tokenize,
)
from shared import subjects
from shared.bus import Bus, RemoteError, Unavailable
from shared.config import Settings
from shared.keys import pack_tokens, unpack_tokens
from shared.metrics import CONTENT_TYPE, Registry
from shared.observability import tracer
from shared.schemas import (
    Accepted,
    Cancel,
    Done,
    Failed,
    GenerateRequest,
    Message,
    Prefilled,
    SchemaError,
    Telemetry,
    Tokens,
)
from shared.tokenizer import Tokenizer

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MESSAGE_OVERHEAD_BYTES = 4096  # room for the other fields of a GenerateRequest
REMOTE_STATUS = {"bad_request": 400, "unavailable": 503}
LEVEL_SUFFIXES = ("_bytes", "_per_s", "_ratio")  # Telemetry keys that are levels, not counts


class ApiError(Exception):
    """An unsuccessful answer: HTTP status, error code, message and the offending field."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @classmethod
    def of(cls, exc: RequestError) -> ApiError:
        """The answer to a request that failed validation."""
        return cls(exc.status, str(exc), exc.code, exc.param)

    def body(self) -> dict[str, Any]:
        """OpenAI's error body."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self) -> web.Response:
        """The error as an HTTP response."""
        return web.json_response(self.body(), status=self.status)


# --- metrics --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What became of one request, for metrics, the log line and the span."""

    kv_mode: str = "unknown"
    status: int = 200
    error: str | None = None  # the error kind (cake_errors_total), None on success
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    done: Done | None = None

    def fail(self, error: ApiError) -> None:
        """The request ended with this error."""
        self.status, self.error = error.status, error.code

    def disconnected(self) -> None:
        """The client went away (499, as nginx counts it)."""
        self.status, self.error = 499, "client_disconnected"


def cacheable_tokens(prompt_tokens: int, chunk_tokens: int) -> int:
    """Prompt tokens a full cache hit could serve: whole chunks before the last token."""
    return max(prompt_tokens - 1, 0) // chunk_tokens * chunk_tokens


class GatewayMetrics:
    """The gateway's metric families, and the values mirrored from Telemetry messages."""

    def __init__(self, registry: Registry | None = None) -> None:
        r = self.registry = registry or Registry()
        self.requests = r.counter(
            "cake_requests_total",
            "Completion requests answered, by kv_mode and HTTP status",
            ("kv_mode", "status"),
        )
        self.ttft = r.histogram(
            "cake_ttft_seconds",
            "Time to first token reported by the compute service",
            buckets=TTFT_BUCKETS,
        )
        self.prompt_tokens = r.counter(
            "cake_prompt_tokens_total",
            "Prompt tokens of finished requests by where their KV came from",
            ("source",),
        )
        self.lookups = r.counter(
            "cake_cache_lookups_total", "Finished requests that looked up the KV store"
        )
        self.hit_tokens = r.counter(
            "cake_cache_hit_tokens_total", "Prompt tokens found in the KV store"
        )
        self.cacheable = r.counter(
            "cake_prompt_tokens_cacheable_total",
            "Prompt tokens a full hit could have served (the hit rate's denominator)",
        )
        self.errors = r.counter("cake_errors_total", "Failed requests by kind", ("kind",))
        self.generated = r.counter(
            "cake_generated_tokens_total", "Completion tokens returned to clients"
        )

    def record(self, outcome: Outcome, chunk_tokens: int) -> None:
        """Count one answered request."""
        self.requests.inc(kv_mode=outcome.kv_mode, status=str(outcome.status))
        if outcome.error:
            self.errors.inc(kind=outcome.error)
        self.generated.inc(outcome.completion_tokens)
        if outcome.done is not None:
            self._record_done(outcome.done, outcome.kv_mode, chunk_tokens)

    def _record_done(self, done: Done, kv_mode: str, chunk_tokens: int) -> None:
        self.ttft.observe(done.ttft_ms / 1000)
        suffix = max(done.prompt_tokens - done.loaded_tokens - done.computed_tokens, 0)
        self.prompt_tokens.inc(done.loaded_tokens, source="loaded")
        self.prompt_tokens.inc(done.computed_tokens, source="computed")
        self.prompt_tokens.inc(suffix, source="suffix")
        if kv_mode != "compute":
            self.lookups.inc()
            self.hit_tokens.inc(done.hit_tokens)
            self.cacheable.inc(cacheable_tokens(done.prompt_tokens, chunk_tokens))

    def record_telemetry(self, message: Telemetry) -> None:
        """Mirror a service's counters, labelled by service and node: levels (keys ending in
        LEVEL_SUFFIXES) as gauges cake_<key>, counts as counters cake_<key>_total."""
        r, names = self.registry, ("service", "node")
        labels = {"service": message.service, "node": message.node}
        for key, value in message.counters.items():
            help_text = f"{key} as last reported in Telemetry by each service and node"
            try:
                if key.endswith(LEVEL_SUFFIXES):
                    r.gauge(f"cake_{key}", help_text, names).set(value, **labels)
                else:
                    r.counter(f"cake_{key}_total", help_text, names).set_total(value, **labels)
            except ValueError as exc:
                log.debug("telemetry value not exported", key=key, error=str(exc))


# --- the backend conversation ---------------------------------------------------------------


class TextAssembler:
    """Generated text, decoded incrementally; stop strings cut it and end generation."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._sent = 0  # characters of text handed out
        self._prefix = 0  # ids[_prefix:_read] decode to text already in self.text
        self._read = 0

    def add(self, ids: Sequence[int]) -> str:
        """Text that is now final: complete characters that cannot begin a stop string."""
        self.ids.extend(ids)
        prefix, full = self._decode_tail()
        if len(full) <= len(prefix) or full.endswith("\ufffd"):  # an incomplete character
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return self._append(full[len(prefix) :], final=False)

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        prefix, full = self._decode_tail()
        self._prefix = self._read = len(self.ids)
        return self._append(full[len(prefix) :], final=True)

    def _decode_tail(self) -> tuple[str, str]:
        tail = self.ids[self._prefix :]
        return self.tokenizer.decode(tail[: self._read - self._prefix]), self.tokenizer.decode(tail)

    def _append(self, new: str, final: bool) -> str:
        search_from = max(len(self.text) - self.holdback, 0)
        self.text += new
        found = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        if found:
            self.text, self.stopped, final = self.text[: min(found)], True, True
        end = len(self.text) if final else max(len(self.text) - self.holdback, self._sent)
        delta, self._sent = self.text[self._sent : end], end
        return delta


class Call:
    """One request sent to the merger: its stream subscription and the Cancel it may owe."""

    def __init__(self, bus: Bus, request_id: str, deadline: float, timeout_s: float) -> None:
        self.bus, self.request_id = bus, request_id
        self.deadline, self.timeout_s = deadline, timeout_s
        self.settled = False  # Done or Failed arrived, or Cancel was sent: nothing to cancel
        self._sub: Subscription | None = None

    async def start(self, request: GenerateRequest, rpc_timeout_s: float) -> None:
        """Subscribe to the stream, then hand the request to a merger."""
        self._sub = await self.bus.nc.subscribe(subjects.stream(self.request_id))
        timeout = max(min(rpc_timeout_s, self.deadline - time.time()), 0.001)
        try:
            await self.bus.request(subjects.GENERATE, request, Accepted, timeout)
        except Unavailable as exc:
            raise ApiError(
                503, f"the merger service is not answering ({exc}); try again later", "unavailable"
            ) from exc
        except RemoteError as exc:
            self.settled = True
            status = REMOTE_STATUS.get(exc.code, 500)
            message = f"the merger refused the request: {exc.description}"
            raise ApiError(status, message, exc.code) from exc

    async def next(self) -> Prefilled | Tokens | Done | Failed:
        """The next message on the stream; ApiError at the deadline."""
        assert self._sub is not None, "start() first"
        while True:
            try:
                msg = await self._sub.next_msg(timeout=max(self.deadline - time.time(), 0.001))
            except nats.errors.TimeoutError:
                await self.cancel("deadline")
                raise ApiError(
                    504, f"no answer within the request deadline ({self.timeout_s:g}s)", "timeout"
                ) from None
            except nats.errors.ConnectionClosedError:
                raise ApiError(503, "the gateway lost its NATS connection", "unavailable") from None
            try:
                message = Message.decode(msg.data)
            except SchemaError as exc:
                log.warning("unreadable stream message skipped", error=str(exc))
                continue
            if isinstance(message, Done | Failed):
                self.settled = True
            if isinstance(message, Prefilled | Tokens | Done | Failed):
                return message

    async def cancel(self, reason: str) -> None:
        """Tell compute and loader to drop the request (once)."""
        if self.settled:
            return
        self.settled = True
        try:
            await self.bus.publish(
                subjects.control(self.request_id), Cancel(self.request_id, reason)
            )
        except nats.errors.Error as exc:
            log.warning("could not publish Cancel", reason=reason, error=str(exc))

    async def close(self, reason: str) -> None:
        """Cancel unless the backend is done, and stop listening."""
        await self.cancel(reason)
        if self._sub is not None and not self.bus.nc.is_closed:
            await self._sub.unsubscribe()


class Generation:
    """The text of one dispatched request as it arrives."""

    def __init__(self, call: Call, text: TextAssembler) -> None:
        self.call, self.text = call, text
        self.done: Done | None = None
        self.prefilled: Prefilled | None = None
        self.finish_reason = "length"

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas until Done or a stop string; ApiError on Failed or at the deadline."""
        while True:
            message = await self.call.next()
            if isinstance(message, Failed):
                raise ApiError(message.status, message.message, message.code)
            if isinstance(message, Prefilled):
                self.prefilled = message
                continue
            if isinstance(message, Done):
                self.done, self.finish_reason = message, message.finish_reason
                delta = self.text.finish()
            else:
                delta = self.text.add(unpack_tokens(message.tokens))
            if self.text.stopped:
                self.finish_reason = "stop"
                await self.call.cancel("stop string")
                if self.done is None and self.prefilled is not None:
                    self.done = self.prefilled.done("stop", len(self.text.ids))
            if delta:
                yield delta
            if self.text.stopped or self.done is not None:
                return

    @property
    def completion_tokens(self) -> int:
        """Tokens generated for the answer (up to the stop string, if one cut it)."""
        if self.done is not None and not self.text.stopped:
            return self.done.completion_tokens
        return len(self.text.ids)


# --- response shapes ------------------------------------------------------------------------


def usage_of(prompt_tokens: int, gen: Generation) -> dict[str, Any]:
    """OpenAI's usage object; cached tokens are the prompt tokens found in the store."""
    done = gen.done
    completion = gen.completion_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": done.hit_tokens if done else 0},
    }


def cake_of(done: Done | None) -> dict[str, Any] | None:
    """Cake's split of the prompt (None when the request ended before Done arrived)."""
    if done is None:
        return None
    return {
        "hit_tokens": done.hit_tokens,
        "chunks_total": done.chunks_total,
        "chunks_computed": done.chunks_computed,
        "chunks_loaded": done.chunks_loaded,
        "meet_chunk": done.meet_chunk,
        "ttft_ms": done.ttft_ms,
    }


@dataclass(frozen=True)
class Shapes:
    """The JSON objects of one request's answer, for its endpoint."""

    request_id: str
    model: str
    endpoint: Endpoint
    created: int

    def _head(self, object_name: str) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
        }

    def completion(self, text: str, reason: str, extra: dict[str, Any]) -> dict[str, Any]:
        """The whole answer (non-streamed) with its finish reason; extra: usage and cake."""
        if self.endpoint is Endpoint.CHAT:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
            return {**self._head("chat.completion"), "choices": [choice], **extra}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {**self._head("text_completion"), "choices": [choice], **extra}

    def chunk(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        """A streamed piece of text, or (with finish_reason) the end of the choice."""
        if self.endpoint is Endpoint.CHAT:
            return self._chat_chunk({"content": text} if text else {}, finish_reason)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def role_chunk(self) -> dict[str, Any]:
        """The first chunk of a chat stream: who speaks."""
        return self._chat_chunk({"role": "assistant", "content": ""}, None)

    def _chat_chunk(self, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def final_chunk(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The last streamed object: no choices, usage and cake (as with include_usage)."""
        name = "chat.completion.chunk" if self.endpoint is Endpoint.CHAT else "text_completion"
        return {**self._head(name), "choices": [], **extra}


async def send_event(response: web.StreamResponse, data: dict[str, Any]) -> None:
    """One server-sent event."""
    await response.write(b"data: " + json.dumps(data).encode() + b"\n\n")


# --- the application ------------------------------------------------------------------------


def new_request_id() -> str:
    """A fresh request id (a valid subject token)."""
    return "cmpl-" + uuid.uuid4().hex


class Gateway:
    """The HTTP handlers and what they share."""

    def __init__(
        self,
        bus: Bus,
        settings: Settings,
        tokenizer: Tokenizer,
        metrics: GatewayMetrics,
        limits: Limits,
    ) -> None:
        self.bus, self.settings, self.tokenizer = bus, settings, tokenizer
        self.metrics, self.limits = metrics, limits
        self.started = int(time.time())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        return await self._serve(request, Endpoint.COMPLETIONS)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        return await self._serve(request, Endpoint.CHAT)

    async def models(self, _: web.Request) -> web.Response:
        """GET /v1/models: the one served model."""
        model = {
            "id": self.limits.model_name,
            "object": "model",
            "created": self.started,
            "owned_by": "cake",
            "max_model_len": self.limits.max_context,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def health(self, _: web.Request) -> web.Response:
        """GET /health: 200 while connected to NATS, 503 otherwise."""
        if self.bus.nc.is_connected:
            return web.json_response({"status": "ok"})
        return web.json_response(
            {"status": "unavailable", "reason": "NATS is not connected"}, status=503
        )

    async def metrics_text(self, _: web.Request) -> web.Response:
        """GET /metrics: Prometheus text format."""
        return web.Response(
            body=self.metrics.registry.render().encode(), headers={"Content-Type": CONTENT_TYPE}
        )

    # --- serving one request ----------------------------------------------------------------

    async def _serve(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        rid = new_request_id()
        outcome = Outcome()
        with (
            tracer(__name__).start_as_current_span(
                "gateway.request", attributes={"cake.request_id": rid}
            ) as span,
            structlog.contextvars.bound_contextvars(request_id=rid),
        ):
            try:
                return await self._run(request, endpoint, rid, outcome)
            except (RequestError, ApiError) as exc:
                error = exc if isinstance(exc, ApiError) else ApiError.of(exc)
                outcome.fail(error)
                return error.response()
            except asyncio.CancelledError:
                outcome.disconnected()
                raise
            finally:
                self._record(outcome, span)

    async def _run(
        self, request: web.Request, endpoint: Endpoint, rid: str, outcome: Outcome
    ) -> web.StreamResponse:
        parsed = parse_request(decode_body(await read_body(request)), endpoint, self.limits)
        outcome.kv_mode = parsed.kv_mode
        ids = tokenize(parsed, self.tokenizer, self.limits)
        outcome.prompt_tokens = len(ids)
        self._check_payload(len(ids), "prompt" if endpoint is Endpoint.COMPLETIONS else "messages")
        deadline = time.time() + self.settings.request_timeout_s
        call = Call(self.bus, rid, deadline, self.settings.request_timeout_s)
        try:
            await call.start(self._message(rid, parsed, ids, deadline), self.settings.rpc_timeout_s)
            gen = Generation(call, TextAssembler(self.tokenizer, parsed.stop))
            shapes = Shapes(rid, self.limits.model_name, endpoint, int(time.time()))
            if parsed.stream:
                return await self._stream(request, shapes, gen, outcome)
            return await self._complete(shapes, gen, outcome)
        finally:
            await call.close("client disconnected or request abandoned")

    def _check_payload(self, n_tokens: int, param: str) -> None:
        limit = self.bus.nc.max_payload - MESSAGE_OVERHEAD_BYTES
        if n_tokens * 4 > limit:
            raise ApiError(
                400,
                f"the prompt has {n_tokens} tokens, more than one NATS message carries "
                f"({limit // 4}); shorten it",
                "bad_request",
                param,
            )

    def _message(
        self, rid: str, parsed: ParsedRequest, ids: list[int], deadline: float
    ) -> GenerateRequest:
        return GenerateRequest(
            request_id=rid,
            tokens=pack_tokens(ids),
            sampling=asdict(parsed.sampling),
            kv_mode=parsed.kv_mode,
            salt=parsed.cache_salt,
            deadline=deadline,
        )

    def _finish(self, gen: Generation, outcome: Outcome) -> dict[str, Any]:
        """Note the result; usage and cake for the answer."""
        outcome.done, outcome.finish_reason = gen.done, gen.finish_reason
        outcome.completion_tokens = gen.completion_tokens
        return {"usage": usage_of(outcome.prompt_tokens, gen), "cake": cake_of(gen.done)}

    async def _complete(self, shapes: Shapes, gen: Generation, outcome: Outcome) -> web.Response:
        text = "".join([delta async for delta in gen.deltas()])
        extra = self._finish(gen, outcome)
        return web.json_response(shapes.completion(text, gen.finish_reason, extra))

    async def _stream(
        self, request: web.Request, shapes: Shapes, gen: Generation, outcome: Outcome
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        response.content_type = "text/event-stream"
        try:
            await response.prepare(request)
            try:
                if shapes.endpoint is Endpoint.CHAT:
                    await send_event(response, shapes.role_chunk())
                async for delta in gen.deltas():
                    await send_event(response, shapes.chunk(delta))
                extra = self._finish(gen, outcome)
                await send_event(response, shapes.chunk("", gen.finish_reason))
                await send_event(response, shapes.final_chunk(extra))
            except ApiError as exc:
                outcome.fail(exc)
                await send_event(response, exc.body())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            outcome.disconnected()
        return response

    def _record(self, outcome: Outcome, span: Span) -> None:
        self.metrics.record(outcome, self.settings.chunk_tokens)
        span.set_attribute("cake.kv_mode", outcome.kv_mode)
        span.set_attribute("http.response.status_code", outcome.status)
        if outcome.error:
            span.set_status(Status(StatusCode.ERROR, outcome.error))
        log.info(
            "request answered",
            status=outcome.status,
            kv_mode=outcome.kv_mode,
            error=outcome.error,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            finish_reason=outcome.finish_reason,
        )


async def read_body(request: web.Request) -> bytes:
    """The body of a JSON request; 415 for another content type, 413 when too large."""
    kind = request.content_type
    if kind != "application/json" and not kind.endswith("+json"):
        raise ApiError(
            415, f"Content-Type must be application/json, got {kind!r}", "unsupported_media_type"
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            413,
            f"the request body is larger than {MAX_BODY_BYTES} bytes; send less",
            "request_too_large",
        ) from None


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Unknown routes, wrong methods and unexpected failures answered in OpenAI's error body."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = f"{exc.reason}: {request.method} {request.path}"
        return ApiError(exc.status, message, "http_error").response()
    except Exception:
        log.exception("unhandled error", path=request.path)
        return ApiError(500, "internal error in the gateway", "internal").response()


def make_app(
    bus: Bus,
    settings: Settings,
    tokenizer: Tokenizer,
    model_name: str,
    metrics: GatewayMetrics,
    max_context: int | None = None,
) -> web.Application:
    """The gateway's aiohttp application (max_context: the model's context length, if known)."""
    limits = Limits(model_name, settings.max_tokens_limit, max_context)
    gateway = Gateway(bus, settings, tokenizer, metrics, limits)
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[json_errors])
    app.router.add_post("/v1/completions", gateway.completions)
    app.router.add_post("/v1/chat/completions", gateway.chat_completions)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/health", gateway.health)
    app.router.add_get("/metrics", gateway.metrics_text)
    return app
