"""What a generation request asks for (Sampling, KvMode) and how it ends (FinishReason).

One definition each, used by the gateway's validation, the wire messages, the services and the
model's decoding. The enums are StrEnums: on the wire, in JSON and in metrics they are their
plain strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class KvMode(StrEnum):
    """Where a request's prompt KV may come from."""

    CAKE = "cake"  # compute the head while loading the tail of the stored prefix
    COMPUTE = "compute"  # compute everything (no lookup)
    LOAD = "load"  # load every stored chunk, compute only what is missing


class FinishReason(StrEnum):
    """Why generation ended (OpenAI's finish_reason for the first two)."""

    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    FAILED = "failed"


@dataclass(frozen=True)
class Sampling:
    """How to pick each new token: temperature 0 is greedy. Nested in messages as a map.

    Stop strings are the gateway's job; stop token ids are the model's (its end of sequence),
    so neither travels here.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
