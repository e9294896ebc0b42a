"""The gateway's HTTP application: OpenAI-compatible completions served by the Cake backend.

A request is validated and tokenized here, sent to the merger as a GenerateRequest, and
answered from the Tokens / Done / Failed messages on its stream subject, either as one JSON
body or as server-sent events. Whenever the gateway stops listening before the backend is
done (stop string, deadline, client gone, error) it publishes a Cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from aiohttp import web
from opentelemetry.trace import Span, Status, StatusCode

from services.gateway.auth import TENANT, ApiKeys, auth_middleware
from services.gateway.conversation import Call, Dispatch, Generation, TextAssembler
from services.gateway.errors import ApiError
from services.gateway.metrics import GatewayMetrics, Outcome
from services.gateway.openapi import openapi_document
from services.gateway.responses import Shapes, cake_of, send_event, usage_of
from services.gateway.validation import (
    Endpoint,
    Limits,
    ParsedRequest,
    RequestError,
    decode_body,
    parse_request,
    tokenize,
)
from shared.core.errors import ErrorCode, TransportError
from shared.core.gather import all_of
from shared.core.keys import pack_tokens, tenant_salt
from shared.kv.tokenizer import Tokenizer
from shared.runtime.config import Settings
from shared.runtime.metrics import render
from shared.runtime.observability import tracer
from shared.wire import subjects
from shared.wire.bus import Bus
from shared.wire.messages import Accepted, GenerateRequest, LoaderTelemetry, Message, ModelInfo

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
MESSAGE_OVERHEAD_BYTES = 4096  # room for the other fields of a GenerateRequest
SILENT_HEARTBEATS = 3  # a stream silent for this many heartbeats has lost its compute replica
HEALTH_PROBE_S = 1.0  # how long /health waits for each service's answer
HEALTH_CACHE_S = 1.0  # how long a /health finding is reused


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
        self.model_known = limits.max_context is not None  # else asked of compute once
        self.checked_at = -math.inf  # when /health last probed the services
        self.problem: str | None = None  # and what it found
        self.degraded = ""  # what is wrong short of refusing requests
        self.store_problems: dict[str, tuple[str, float]] = {}  # node: (problem, when heard)
        self.started = int(time.time())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        return await self._serve(request, Endpoint.COMPLETIONS)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        return await self._serve(request, Endpoint.CHAT)

    async def models(self, _: web.Request) -> web.Response:
        """GET /v1/models: the one served model (its context length once compute told it)."""
        with contextlib.suppress(ApiError):
            await self.model_limits()
        model = {
            "id": self.limits.model_name,
            "object": "model",
            "created": self.started,
            "owned_by": "cake",
            "max_model_len": self.limits.max_context,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def health(self, _: web.Request) -> web.Response:
        """GET /health: 200 when a request would be served (NATS connected; compute, with its
        model loaded, a merger and a loader answering), else 503 with the reason; 200 with
        `degraded` when requests are served but something is wrong (a store refusing writes:
        nothing new is cached)."""
        now = time.monotonic()
        if now - self.checked_at > HEALTH_CACHE_S:  # probes, at most once a second
            self.checked_at, (self.problem, self.degraded) = now, await self.backend_problem()
        problem = "NATS is not connected" if not self.bus.connected else self.problem
        if problem is None:
            body = {"status": "ok", **({"degraded": self.degraded} if self.degraded else {})}
            return web.json_response(body)
        return web.json_response({"status": "unavailable", "reason": problem}, status=503)

    async def listen(self, _: web.Application) -> None:
        """Hear every node's telemetry (when the app starts)."""
        await self.bus.handle(subjects.TELEMETRY_ALL, self.on_telemetry)

    async def on_telemetry(self, msg: Message, _: str) -> None:
        """Remember what each loader says of its store's writes: /health's probe reaches only
        one loader, and every node's problem should show, whichever answers."""
        if isinstance(msg, LoaderTelemetry):
            self.store_problems[msg.node] = (msg.store_problem, time.monotonic())

    def stores_degraded(self, probed: Accepted) -> str:
        """Every loader's store problem heard lately, the probed loader's as it answered."""
        heard_since = time.monotonic() - self.settings.telemetry_stale_s
        problems = {node: problem for node, (problem, at) in self.store_problems.items()
                    if at >= heard_since}  # fmt: skip
        problems[probed.node] = probed.problem
        return "; ".join(f"loader on {n}: {p}" for n, p in sorted(problems.items()) if p)

    async def backend_problem(self) -> tuple[str | None, str]:
        """Why a request would not be served now (by the services), or None; and what is
        wrong short of that ("" when nothing)."""
        if not self.bus.connected:
            return "NATS is not connected", ""
        timeout = min(HEALTH_PROBE_S, self.settings.rpc_timeout_s)
        probes = (
            ("compute", subjects.COMPUTE_INFO, ModelInfo),
            ("merger", subjects.MERGER_INFO, Accepted),
            ("loader", subjects.LOADER_INFO, Accepted),
        )
        answers = await asyncio.gather(
            *(
                self.bus.request(subject, Accepted(), reply, timeout)
                for _, subject, reply in probes
            ),
            return_exceptions=True,
        )
        by_name = {name: a for (name, _, _), a in zip(probes, answers, strict=True)}
        silent = [name for name, a in by_name.items() if isinstance(a, BaseException)]
        if silent:
            down = (
                f"no {' or '.join(silent)} service answers (starting, loading the model, or down)"
            )
            return down, ""
        loader = by_name["loader"]
        assert isinstance(loader, Accepted)
        return None, self.stores_degraded(loader)

    async def openapi(self, _: web.Request) -> web.Response:
        """GET /openapi.json: the API's OpenAPI document (open, like /health)."""
        return web.json_response(openapi_document(self.limits, self.tokenizer.vocab_size))

    async def metrics_text(self, request: web.Request) -> web.Response:
        """GET /metrics: Prometheus text format (OpenMetrics when the scraper asks for it)."""
        body, content_type = render(self.metrics.registry, request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

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
        if not self.bus.connected:  # at once, not after the RPC timeout
            raise ApiError(ErrorCode.UNAVAILABLE, "the gateway has lost its NATS connection")
        parsed = parse_request(decode_body(await read_body(request)), endpoint, self.limits)
        outcome.kv_mode = parsed.kv_mode
        prompts = tokenize(parsed, self.tokenizer, await self.model_limits())
        outcome.prompt_tokens = sum(len(ids) for ids in prompts)
        for ids in prompts:
            self._check_payload(
                len(ids), "prompt" if endpoint is Endpoint.COMPLETIONS else "messages"
            )
        deadline = time.time() + self.settings.request_timeout_s
        salt = tenant_salt(request.get(TENANT, ""), parsed.cache_salt)
        shapes = Shapes(rid, self.limits.model_name, endpoint, int(time.time()))
        several = len(prompts) > 1
        dispatches = [
            self._dispatch(f"{rid}-{i}" if several else rid, parsed, ids, salt, deadline)
            for i, ids in enumerate(prompts)
        ]
        try:
            if parsed.stream:
                return await self._stream(request, shapes, dispatches, outcome)
            return await self._complete(shapes, dispatches, outcome)
        finally:
            reason = "client disconnected or request abandoned"
            await asyncio.gather(*(d.close(reason) for d in dispatches))

    def _dispatch(
        self, rid: str, parsed: ParsedRequest, ids: list[int], salt: str, deadline: float
    ) -> Dispatch:
        """One prompt's backend request (rid: its backend id; a retry takes a fresh one)."""
        silence = SILENT_HEARTBEATS * self.settings.heartbeat_s
        first_word = 2 * self.settings.rpc_timeout_s  # the merger's lookup and dispatch come first
        timeout = self.settings.request_timeout_s

        def message_of(backend_rid: str) -> GenerateRequest:
            return GenerateRequest(
                request_id=backend_rid,
                tokens=pack_tokens(ids),
                sampling=parsed.sampling,
                kv_mode=parsed.kv_mode,
                salt=salt,
                deadline=deadline,
            )

        return Dispatch(
            rid,
            call_of=lambda backend_rid: Call(
                self.bus, backend_rid, deadline, timeout, silence, first_word
            ),
            message_of=message_of,
            text_of=lambda: TextAssembler(self.tokenizer, parsed.stop),
            rpc_timeout_s=self.settings.rpc_timeout_s,
            retried=self.metrics.retries.inc,
        )

    async def model_limits(self) -> Limits:
        """The limits, with the model's context length asked of compute the first time."""
        if not self.model_known:
            try:
                info = await self.bus.request(
                    subjects.COMPUTE_INFO, Accepted(), ModelInfo, self.settings.rpc_timeout_s
                )
            except TransportError as exc:
                message = f"the compute service is not answering ({exc}); try again later"
                raise ApiError(ErrorCode.UNAVAILABLE, message) from exc
            self.limits = dataclasses.replace(self.limits, max_context=info.max_context)
            self.model_known = True
        return self.limits

    def _check_payload(self, n_tokens: int, param: str) -> None:
        limit = self.bus.max_payload - MESSAGE_OVERHEAD_BYTES
        if n_tokens * 4 > limit:
            raise ApiError(
                ErrorCode.BAD_REQUEST,
                f"the prompt has {n_tokens} tokens, more than one NATS message carries "
                f"({limit // 4}); shorten it",
                param,
            )

    def _finish(self, gens: Sequence[Generation], outcome: Outcome) -> dict[str, Any]:
        """Note the results; usage and cake for the answer."""
        outcome.dones = [gen.done for gen in gens if gen.done is not None]
        outcome.finish_reason = ",".join(gen.finish_reason for gen in gens)
        outcome.completion_tokens = sum(gen.completion_tokens for gen in gens)
        return {"usage": usage_of(outcome.prompt_tokens, gens), "cake": cake_of(gens)}

    async def _complete(
        self, shapes: Shapes, dispatches: Sequence[Dispatch], outcome: Outcome
    ) -> web.Response:
        async def whole(gen: Generation) -> tuple[str, Generation]:
            return "".join([delta async for delta in gen.deltas()]), gen

        answers = await all_of([d.run(whole) for d in dispatches])
        extra = self._finish([gen for _, gen in answers], outcome)
        choices = [(text, gen.finish_reason) for text, gen in answers]
        return web.json_response(shapes.completion(choices, extra))

    async def _stream(
        self,
        request: web.Request,
        shapes: Shapes,
        dispatches: Sequence[Dispatch],
        outcome: Outcome,
    ) -> web.StreamResponse:
        async def started(gen: Generation) -> Generation:
            await gen.started()  # a request refused before its first token gets a real status
            return gen

        gens = await all_of([d.run(started) for d in dispatches])
        response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        response.content_type = "text/event-stream"
        writing = asyncio.Lock()  # one event at a time, whichever choice it belongs to

        async def send(data: dict[str, Any]) -> None:
            async with writing:
                await send_event(response, data)

        async def relay(index: int, gen: Generation) -> None:
            async for delta in gen.deltas():
                await send(shapes.chunk(delta, index=index))
            await send(shapes.chunk("", gen.finish_reason, index=index))

        try:
            await response.prepare(request)
            try:
                if shapes.endpoint is Endpoint.CHAT:
                    await send_event(response, shapes.role_chunk())
                await all_of([relay(i, gen) for i, gen in enumerate(gens)])
                await send_event(response, shapes.final_chunk(self._finish(gens, outcome)))
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
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type must be application/json, got {kind!r}",
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            ErrorCode.REQUEST_TOO_LARGE,
            f"the request body is larger than {MAX_BODY_BYTES} bytes; send less",
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
        return ApiError(ErrorCode.HTTP_ERROR, message, status=exc.status).response()
    except Exception:
        log.exception("unhandled error", path=request.path)
        return ApiError(ErrorCode.INTERNAL, "internal error in the gateway").response()


def make_app(
    bus: Bus,
    settings: Settings,
    tokenizer: Tokenizer,
    model_name: str,
    metrics: GatewayMetrics,
    max_context: int | None = None,
) -> web.Application:
    """The gateway's aiohttp application (max_context: the model's context length; None: ask
    the compute service on the first request)."""
    limits = Limits(model_name, settings.max_tokens_limit, max_context)
    gateway = Gateway(bus, settings, tokenizer, metrics, limits)
    refused = metrics.errors.labels(kind=ErrorCode.INVALID_API_KEY).inc
    middlewares = [json_errors, auth_middleware(ApiKeys.of(settings), refused)]
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
    app.router.add_post("/v1/completions", gateway.completions)
    app.router.add_post("/v1/chat/completions", gateway.chat_completions)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/health", gateway.health)
    app.router.add_get("/metrics", gateway.metrics_text)
    app.router.add_get("/openapi.json", gateway.openapi)
    app.on_startup.append(gateway.listen)
    return app
