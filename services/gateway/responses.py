"""OpenAI's response shapes: completions, stream chunks, usage and Cake's prompt split."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from services.gateway.conversation import Generation
from services.gateway.validation import Endpoint
from shared.wire.messages import Done


def usage_of(prompt_tokens: int, gens: Sequence[Generation]) -> dict[str, Any]:
    """OpenAI's usage object over every choice; cached tokens are the prompt tokens whose KV
    was reused (loaded from storage or taken from compute's memory), not those computed."""
    completion = sum(gen.completion_tokens for gen in gens)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": sum(cached_tokens(g.done) for g in gens)},
    }


def cached_tokens(done: Done | None) -> int:
    """Prompt tokens whose KV was reused rather than computed."""
    return done.loaded_tokens + done.reused_tokens if done else 0


def cake_of(gens: Sequence[Generation]) -> dict[str, Any] | list[dict[str, Any] | None] | None:
    """Cake's split of the prompt; a list in choice order when there were several prompts."""
    if len(gens) > 1:
        return [_split(gen.done) for gen in gens]
    return _split(gens[0].done)


def _split(done: Done | None) -> dict[str, Any] | None:
    """Cake's split of one prompt (None when its request ended before Done arrived)."""
    if done is None:
        return None
    return {
        "hit_tokens": done.hit_tokens,
        "chunks_total": done.chunks_total,
        "chunks_computed": done.chunks_computed,
        "chunks_loaded": done.chunks_loaded,
        "reused_tokens": done.reused_tokens,
        "meet_chunk": done.meet_chunk,
        "ttft_ms": done.ttft_ms,
        "node": done.node,
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

    def completion(
        self, answers: Sequence[tuple[str, str]], extra: dict[str, Any]
    ) -> dict[str, Any]:
        """The whole answer (non-streamed): a choice per (text, finish reason), in prompt order;
        extra: usage and cake."""
        if self.endpoint is Endpoint.CHAT:
            choices = [
                {"index": i, "message": {"role": "assistant", "content": text},
                 "logprobs": None, "finish_reason": reason}
                for i, (text, reason) in enumerate(answers)
            ]  # fmt: skip
            return {**self._head("chat.completion"), "choices": choices, **extra}
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(answers)
        ]
        return {**self._head("text_completion"), "choices": choices, **extra}

    def chunk(self, text: str, finish_reason: str | None = None, index: int = 0) -> dict[str, Any]:
        """A streamed piece of choice `index`'s text, or (with finish_reason) its end."""
        if self.endpoint is Endpoint.CHAT:
            return self._chat_chunk({"content": text} if text else {}, finish_reason)
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
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
