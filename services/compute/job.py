"""One request on the compute side: its prompt, cache and progress through the phases."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from transformers import DynamicCache

from shared.core.keys import PromptChunks
from shared.core.plan import MeetTracker, head_step
from shared.core.scheduler import Phase
from shared.kv.model import SamplingParams
from shared.wire.messages import Prefilled, PrefillJob


@dataclass
class Job:
    """One request on the compute side."""

    msg: PrefillJob
    prompt: PromptChunks
    params: SamplingParams
    cache: DynamicCache
    ctx: Context = field(default_factory=otel_context.get_current)  # the request's trace
    arrival: float = field(default_factory=time.monotonic)
    piece: int = 0  # most tokens one prefill piece computes (whole chunks)
    head_done: int = 0  # chunks [0, head_done) computed
    meet: int | None = None  # where loaded chunks start, once known
    staged: dict[int, str] = field(default_factory=dict)
    loads: MeetTracker = field(init=False)  # the loader's progress (frontier), as compute sees it
    head_piece: int = 1  # most head chunks one step computes
    merged: bool = False
    tokens_out: Iterator[int] | None = None
    generated: int = 0
    ttft_ms: float = 0.0
    finish_reason: str = ""
    prefilled: Prefilled | None = None
    writeback: asyncio.Task[None] | None = None

    @property
    def hit(self) -> int:
        """Hit chunks that the loader may supply."""
        return self.msg.hit

    @property
    def chunk(self) -> int:
        """Tokens per chunk."""
        return self.prompt.space.chunk_tokens

    def phase(self) -> Phase:
        """Where this job is (its scheduling priority)."""
        if self.finish_reason:
            return Phase.FINISHED
        if self.tokens_out is not None:
            return Phase.DECODE
        if self.meet is None and self.head_done < self.hit:
            # once the loads reach the head, the merger's Meet is on its way: wait for it
            racing = self.msg.compute_head and self.load_frontier() > self.head_done
            return Phase.HEAD if racing else Phase.WAITING
        return Phase.PREFILL

    def __post_init__(self) -> None:
        self.loads = MeetTracker(self.msg.hit)

    def load_frontier(self) -> int:
        """The lowest chunk from which every hit chunk is staged."""
        return self.loads.load_frontier

    def head_chunks(self) -> int:
        """Head chunks the next step computes (see shared.core.plan.head_step)."""
        return head_step(
            self.head_done, self.hit, self.load_frontier(), self.msg.head_hint,
            self.head_piece, self.piece // self.chunk,
        )  # fmt: skip

    def kv_bytes(self) -> int:
        """Bytes of this job's KV cache (keys and values of every layer)."""
        total = 0
        for layer in list(self.cache.layers):
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.nbytes
        return total

    def next_tokens(self) -> int:
        """Tokens the next piece computes."""
        phase = self.phase()
        if phase == Phase.DECODE:
            return 1
        if phase == Phase.HEAD:
            return self.head_chunks() * self.chunk
        return min(self.piece, len(self.prompt.token_ids) - self.cache.get_seq_length())
