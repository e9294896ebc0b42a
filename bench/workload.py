"""The serving benchmark's workload, as pure functions of a seed: Poisson arrival times and a
mix of long prompts that share stored documents with fresh short ones."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from bench.client import completion_body, prompt_text


@dataclass(frozen=True)
class Document:
    """A long prefix stored before the timed requests; requests that share it use its salt."""

    text: str
    salt: str

    @property
    def tokens(self) -> int:
        """Its length in tokens (BOS + one per character)."""
        return len(self.text) + 1


@dataclass(frozen=True)
class Spec:
    """One request of the mix: a long prompt on a stored document, or a fresh short one."""

    kind: str  # "long" or "short"
    prompt: str
    max_tokens: int
    salt: str

    def body(self) -> dict[str, Any]:
        """Its completion request (greedy, default kv_mode: cake)."""
        return completion_body(self.prompt, self.max_tokens, self.salt)


@dataclass(frozen=True)
class Mix:
    """How requests are drawn (token ranges are inclusive)."""

    long_share: float = 0.5  # share of requests on a stored document
    suffix_tokens: tuple[int, int] = (16, 64)  # a long prompt's own text after its document
    short_tokens: tuple[int, int] = (64, 300)
    max_tokens: tuple[int, int] = (16, 64)


def documents(lengths: tuple[int, ...] | list[int], seed: int) -> list[Document]:
    """One document per length (in tokens), each under its own salt."""
    return [
        Document(prompt_text(n, seed=seed * 1000 + i), f"doc-{seed}-{i}")
        for i, n in enumerate(lengths)
    ]


def poisson_arrivals(rate: float, count: int, seed: int, max_s: float | None = None) -> list[float]:
    """Arrival times (seconds from the start) of an open-loop Poisson process of `rate` per
    second: up to `count` of them, none after `max_s`."""
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(count):
        t += rng.expovariate(rate)
        if max_s is not None and t > max_s:
            break
        times.append(t)
    return times


def request_mix(count: int, docs: list[Document], mix: Mix, seed: int, tag: str) -> list[Spec]:
    """`count` requests: long ones (a document plus a fresh suffix, under the document's salt)
    with probability long_share, fresh short ones (a salt of their own, `tag`-i) otherwise."""
    rng = random.Random(seed)
    specs = []
    for i in range(count):
        max_tokens = rng.randint(*mix.max_tokens)
        if docs and rng.random() < mix.long_share:
            doc = rng.choice(docs)
            suffix = prompt_text(rng.randint(*mix.suffix_tokens) + 1, seed=rng.getrandbits(32))
            specs.append(Spec("long", doc.text + suffix, max_tokens, doc.salt))
        else:
            text = prompt_text(rng.randint(*mix.short_tokens), seed=rng.getrandbits(32))
            specs.append(Spec("short", text, max_tokens, f"{tag}-{i}"))
    return specs


def mean_service_s(long_s: float, short_s: float, mix: Mix) -> float:
    """Expected time one request of the mix takes alone, from one long and one short timing."""
    return mix.long_share * long_s + (1 - mix.long_share) * short_s
