"""The conversation with the backend over NATS for one request: dispatch, stream, cancel."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import structlog

from services.gateway.errors import ApiError
from shared.core.errors import (
    ConnectionLost,
    ErrorCode,
    RemoteError,
    RequestTimeout,
    TransportError,
    Unavailable,
)
from shared.core.keys import unpack_tokens
from shared.core.request import FinishReason
from shared.kv.tokenizer import Tokenizer
from shared.wire import subjects
from shared.wire.bus import Bus, Inbox
from shared.wire.messages import (
    Accepted,
    Cancel,
    Done,
    Failed,
    GenerateRequest,
    Prefilled,
    Tokens,
)

log = structlog.get_logger(__name__)

BACKEND_RETRIES = 1  # a request whose compute died before the client saw anything: sent again
T = TypeVar("T")


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


class BackendLost(ApiError):
    """The compute replica holding the request went silent (its node died): a request whose
    client has seen nothing yet may be sent again, to another node."""


class Call:
    """One request sent to the merger: its stream subscription and the Cancel it may owe."""

    def __init__(
        self,
        bus: Bus,
        request_id: str,
        deadline: float,
        timeout_s: float,
        silence_s: float,
        first_word_s: float,
    ) -> None:
        self.bus, self.request_id = bus, request_id
        self.deadline, self.timeout_s = deadline, timeout_s
        self.silence_s = silence_s  # the backend is gone when the stream is silent this long
        self.first_word_s = first_word_s  # more, before its first word (lookup, dispatch)
        self.heard = False
        self.settled = False  # Done or Failed arrived, or Cancel was sent: nothing to cancel
        self._inbox: Inbox | None = None

    async def start(self, request: GenerateRequest, rpc_timeout_s: float) -> None:
        """Subscribe to the stream, then hand the request to a merger."""
        self._inbox = await self.bus.subscribe(subjects.stream(self.request_id))
        timeout = max(min(rpc_timeout_s, self.deadline - time.time()), 0.001)
        try:
            await self.bus.request(subjects.GENERATE, request, Accepted, timeout)
        except Unavailable as exc:
            raise ApiError(
                ErrorCode.UNAVAILABLE,
                f"the merger service is not answering ({exc}); try again later",
            ) from exc
        except RemoteError as exc:
            self.settled = True
            message = f"the merger refused the request: {exc.description}"
            raise ApiError(exc.code, message) from exc

    async def next(self) -> Prefilled | Tokens | Done | Failed:
        """The next message on the stream; ApiError at the deadline, or when the stream has been
        silent (not even an Alive) for silence_s: the compute replica is gone."""
        assert self._inbox is not None, "start() first"
        while True:
            left = self.deadline - time.time()
            silence = self.silence_s + (0.0 if self.heard else self.first_word_s)
            try:
                message = (await self._inbox.next(min(left, silence))).message
            except RequestTimeout:
                await self.cancel("deadline" if left <= silence else "backend silent")
                if left <= silence:
                    raise ApiError(
                        ErrorCode.TIMEOUT,
                        f"no answer within the request deadline ({self.timeout_s:g}s)",
                    ) from None
                raise BackendLost(
                    ErrorCode.UNAVAILABLE,
                    f"the compute service stopped answering (nothing for {silence:g}s); try again",
                ) from None
            except ConnectionLost:
                lost = "the gateway lost its NATS connection"
                raise ApiError(ErrorCode.UNAVAILABLE, lost) from None
            self.heard = True
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
                subjects.cancel(self.request_id), Cancel(self.request_id, reason)
            )
        except TransportError as exc:
            log.warning("could not publish Cancel", reason=reason, error=str(exc))

    async def close(self, reason: str) -> None:
        """Cancel unless the backend is done, and stop listening."""
        try:
            await self.cancel(reason)
        finally:
            if self._inbox is not None:
                await self._inbox.close()


class Generation:
    """The text of one dispatched request as it arrives."""

    def __init__(self, call: Call, text: TextAssembler) -> None:
        self.call, self.text = call, text
        self.done: Done | None = None
        self.prefilled: Prefilled | None = None
        self.finish_reason = FinishReason.LENGTH
        self._first: Prefilled | Tokens | Done | None = None

    async def started(self) -> None:
        """Until the backend has taken the request and prefilled it (ApiError if it failed,
        e.g. 429 when it is busy), so the HTTP status can still say so."""
        self._first = self._checked(await self.call.next())

    def _checked(self, message: Prefilled | Tokens | Done | Failed) -> Prefilled | Tokens | Done:
        if isinstance(message, Failed):
            raise ApiError(message.code, message.message, retry_after_s=message.retry_after_s)
        return message

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas until Done or a stop string; ApiError on Failed or at the deadline."""
        while True:
            first, self._first = self._first, None
            message = first or self._checked(await self.call.next())
            if isinstance(message, Prefilled):
                self.prefilled = message
                continue
            if isinstance(message, Done):
                self.done, self.finish_reason = message, message.finish_reason
                delta = self.text.finish()
            else:  # the last token's text goes out now, not after Done (the write-back)
                delta = self.text.add(unpack_tokens(message.tokens))
                if message.last and not self.text.stopped:
                    delta += self.text.finish()
            if self.text.stopped:
                self.finish_reason = FinishReason.STOP
                await self.call.cancel("stop string")
                if self.done is None and self.prefilled is not None:
                    self.done = self.prefilled.done(FinishReason.STOP, len(self.text.ids))
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


class Dispatch:
    """One prompt's request to the backend: a Call, made once more under a fresh id when its
    compute goes silent before the client has seen anything of it (BackendLost)."""

    def __init__(
        self,
        request_id: str,
        call_of: Callable[[str], Call],
        message_of: Callable[[str], GenerateRequest],
        text_of: Callable[[], TextAssembler],
        rpc_timeout_s: float,
        retried: Callable[[], None],
    ) -> None:
        self.request_id, self.rpc_timeout_s = request_id, rpc_timeout_s
        self.call_of, self.message_of, self.text_of = call_of, message_of, text_of
        self.retried = retried  # counts a retry
        self.call: Call | None = None

    async def run(self, until: Callable[[Generation], Awaitable[T]]) -> T:
        """until(generation) of a fresh dispatch, once more under a fresh id if it is lost."""
        for attempt in range(1 + BACKEND_RETRIES):
            rid = f"{self.request_id}-retry{attempt}" if attempt else self.request_id
            await self.close("compute went silent")  # the lost attempt's, if any
            self.call = self.call_of(rid)
            try:
                await self.call.start(self.message_of(rid), self.rpc_timeout_s)
                return await until(Generation(self.call, self.text_of()))
            except BackendLost:
                if attempt == BACKEND_RETRIES:
                    raise
                log.warning("compute went silent before answering; sending the request again")
                self.retried()
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def close(self, reason: str) -> None:
        """Cancel the current call unless the backend is done, and stop listening."""
        if self.call is not None:
            await self.call.close(reason)
