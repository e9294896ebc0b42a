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
    presence_penalty: float = 0.0  # subtracted from a token's logit once it has been generated
    frequency_penalty: float = 0.0  # subtracted once per time it has been generated
    repetition_penalty: float = 1.0  # divides (or multiplies) the logits of prompt and output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    @property
    def penalises(self) -> bool:
        """Whether any penalty or bias changes the logits."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.logit_bias
            or self.repetition_penalty != 1.0
        )  # fmt: skip

    def problem(self, vocab_size: int | None = None) -> tuple[str, str] | None:
        """The first field out of range, as (field, what is wrong); None when all are fine.
        Token ids in logit_bias are checked against vocab_size when it is given."""
        for name, value, (low, high) in (
            ("temperature", self.temperature, TEMPERATURE_RANGE),
            ("presence_penalty", self.presence_penalty, PENALTY_RANGE),
            ("frequency_penalty", self.frequency_penalty, PENALTY_RANGE),
            ("repetition_penalty", self.repetition_penalty, REPETITION_PENALTY_RANGE),
        ):
            if not low <= value <= high:
                return name, f"{name} must be between {low:g} and {high:g}, got {value}"
        if not 0 < self.top_p <= 1:
            return "top_p", f"top_p must be in (0, 1], got {self.top_p}"
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            return (
                "logit_bias",
                f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}",
            )
        for token, bias in self.logit_bias:
            if not BIAS_RANGE[0] <= bias <= BIAS_RANGE[1]:
                return (
                    "logit_bias",
                    f"logit_bias values must be between -100 and 100, got {bias} for token {token}",
                )
            if token < 0 or (vocab_size is not None and token >= vocab_size):
                below = f" below the vocabulary size {vocab_size}" if vocab_size else ""
                return "logit_bias", f"logit_bias keys must be token ids{below}, got {token}"
        return None


TEMPERATURE_RANGE = (0.0, 2.0)
PENALTY_RANGE = (-2.0, 2.0)  # presence and frequency penalties, as OpenAI takes them
REPETITION_PENALTY_RANGE = (0.01, 10.0)  # a smaller one blows positive logits up to inf
BIAS_RANGE = (-100.0, 100.0)  # logit_bias values, as OpenAI takes them
MAX_LOGIT_BIAS = 1024  # tokens one request may bias
