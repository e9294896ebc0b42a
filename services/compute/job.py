"""One request on the compute side: its prompt, cache and progress through the phases."""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field

import torch
from opentelemetry import context as otel_context
from opentelemetry.context import Context

from shared.core.keys import PromptChunks
from shared.core.plan import MeetTracker, head_step, head_waits_for, live_hint, loads_due_in
from shared.core.request import FinishReason
from shared.core.scheduler import Candidate, Phase
from shared.core.step_budget import TokenPace
from shared.kv.slots import KVCache
from shared.wire.bus import RawInbox
from shared.wire.messages import Prefilled, PrefillJob


@dataclass
class Job:
    """One request on the compute side."""

    msg: PrefillJob
    prompt: PromptChunks
    stop_ids: frozenset[int]  # the model's end-of-sequence ids
    cache: KVCache | None  # allocated when admitted: a slot of prompt + max_tokens
    ctx: Context = field(default_factory=otel_context.get_current)  # the request's trace
    arrival: float = field(default_factory=time.monotonic)
    piece: int = 0  # most tokens one prefill piece computes (whole chunks)
    head_done: int = 0  # chunks [0, head_done) computed
    meet: int | None = None  # where loaded chunks start, once known
    staged: dict[int, str] = field(default_factory=dict)  # loaded chunk -> its staged file
    loads: MeetTracker = field(init=False)  # the loader's progress (frontier), as compute sees it
    load_arrivals: list[float] = field(default_factory=list)  # when each loaded chunk was staged
    head_piece: int = 1  # most head chunks one step computes
    token_pace: TokenPace | None = None  # with controllers: steers its head by the loads' pace
    loads_batch: int = 1  # reads the loader has in flight at once (they land in bursts)
    resumed: bool = False  # the merger's StartHead came: its hint is of the loads' pace now
    merged: bool = False
    generator: torch.Generator | None = None  # sampling's random source (None: greedy)
    decoding: bool = False  # the first token is out
    output: list[int] = field(default_factory=list)  # the generated tokens
    ttft_ms: float = 0.0
    finish_reason: FinishReason | None = None
    prefilled: Prefilled | None = None
    writeback: asyncio.Task[None] | None = None
    waited: int = 0  # scheduler steps since it last ran while runnable
    memory: bool = False  # takes chunks from the memory tier and leaves its own there
    reused: set[int] = field(default_factory=set)  # prompt chunks taken from the memory tier
    placed: set[int] = field(default_factory=set)  # loaded chunks already copied into the slot
    blocked: bool = False  # its next chunk is one an earlier request is computing: wait for it
    listening: list[RawInbox] = field(default_factory=list)  # its control and events
    news_at: float = field(default_factory=time.monotonic)  # last progress or word about it
    head_ready_at: float = field(default_factory=time.monotonic)  # runnable as a head since

    @property
    def generated(self) -> int:
        """Tokens generated so far."""
        return len(self.output)

    @functools.cached_property
    def prompt_ids(self) -> torch.Tensor:
        """The prompt's ids as a tensor, made once (a repetition penalty reads them each step)."""
        return torch.tensor(self.prompt.token_ids, dtype=torch.long)

    @property
    def last_token(self) -> int:
        """The newest generated token: the next decode step's input."""
        return self.output[-1]

    @property
    def hit(self) -> int:
        """Hit chunks that the loader may supply."""
        return self.msg.hit

    def placeable(self) -> list[int]:
        """Staged chunks not yet placed that the head will not compute: past its computed
        chunks and, once the meeting point is known, at or past it (a read that landed below
        it after the Meet is the head's to compute)."""
        floor = self.head_done if self.meet is None else max(self.head_done, self.meet)
        return sorted(j for j in set(self.staged) - self.placed if j >= floor)

    @property
    def chunk(self) -> int:
        """Tokens per chunk."""
        return self.prompt.space.chunk_tokens

    def phase(self) -> Phase:
        """Where this job is (its scheduling priority)."""
        if self.finish_reason:
            return Phase.FINISHED
        if not self.admitted:
            return Phase.WAITING
        if self.decoding:
            return Phase.DECODE
        if self.blocked:
            return Phase.WAITING
        if self.meet is None and self.head_done < self.hit:
            # a load-only plan waits for its loads (or the merger's StartHead); a head, for
            # loads due before a one-chunk step would end (waits_for_loads)
            steps = self.racing() and self.waits_for_loads(time.monotonic()) is None
            return Phase.HEAD if steps else Phase.WAITING
        return Phase.PREFILL

    def racing(self) -> bool:
        """Whether it computes a head that its loads have not reached yet."""
        return self.msg.compute_head and self.load_frontier() > self.head_done

    def waits_for_its_loads(self) -> bool:
        """A head racing its loads that waits for them (a WAITING phase it chose)."""
        return (
            self.phase() == Phase.WAITING and not self.blocked and self.admitted and self.racing()
        )

    def awaits_merger(self) -> bool:
        """Whether only loads or a word from the merger (Meet or StartHead) let it go on (or,
        for a head waiting for loads due sooner than its step, the end of that wait)."""
        return (
            self.admitted and not self.blocked and self.meet is None
            and self.head_done < self.hit and self.phase() == Phase.WAITING
        )  # fmt: skip

    def loads_left(self) -> int:
        """Hit chunks from the head on that are not staged yet."""
        return self.hit - self.head_done - sum(1 for j in self.loads.loaded if j >= self.head_done)

    def waits_for_loads(self, now: float) -> float | None:
        """Seconds a head racing its loads waits for them (shared.core.plan.head_waits_for):
        they should reach it before a one-chunk step would end (with controllers)."""
        step_s = None if self.token_pace is None else self.token_pace.chunk_step_s
        return head_waits_for(self.load_arrivals, self.loads_left(), now, self.loads_batch, step_s)

    def loads_due_in(self, now: float) -> float | None:
        """For a job that waits for its loads: seconds until the last it needs is staged, at
        their pace so far, loads_batch reads landing together at most (None: not waiting, no
        pace yet, or overdue)."""
        if not self.awaits_merger():
            return None
        return loads_due_in(self.load_arrivals, self.loads_left(), now, self.loads_batch)

    def meet_if_reached(self) -> None:
        """Once its head (computed, or none for a load-only plan) has reached where every
        chunk after it is staged, the meeting point is there, by the merger's own rule
        (MeetTracker.meet, fed the same events): take it now, not a round trip later (or
        never, if that word is lost). Called on the event loop, the thread that takes the Meet."""
        if self.meet is not None or self.decoding:
            return
        self.loads.on_computed(self.head_done)
        split = self.loads.meet()
        if split is not None:
            self.meet = split.meet

    def go_on_alone(self) -> str:
        """No word came from the merger (a lost message, a dead merger) and its loads have
        not reached its head (compute meets them there without a word: meet_if_reached):
        compute the head, as the merger would have had it; what it did."""
        self.news_at = time.monotonic()
        self.msg.compute_head, self.msg.head_hint = True, -1
        return "computes_head"

    def __post_init__(self) -> None:
        self.loads = MeetTracker(self.msg.hit)

    @property
    def filling_prompt(self) -> bool:
        """Whether it is filling its prompt's chunks with the memory tier's help."""
        return self.memory and self.admitted and not self.decoding and not self.finish_reason

    def next_chunk(self) -> int | None:
        """The prompt chunk this job fills next when the memory tier could supply it (a whole
        chunk at the end of its cache, before the merge or the one holding the last token)."""
        if not self.filling_prompt:
            return None
        if not self.merged:
            end = self.meet if self.meet is not None else self.hit
            return self.head_done if self.head_done < end else None
        held = self.kv_cache.get_seq_length()
        usable = (len(self.prompt.token_ids) - 1) // self.chunk
        return (
            held // self.chunk if held % self.chunk == 0 and held // self.chunk < usable else None
        )

    def chunks_to_fill(self) -> range:
        """Complete prompt chunks it has yet to fill (and then leaves in the memory tier)."""
        if not self.filling_prompt:
            return range(0)
        filled = self.kv_cache.get_seq_length() // self.chunk if self.merged else self.head_done
        return range(filled, len(self.prompt.keys))

    def load_frontier(self) -> int:
        """The lowest chunk from which every hit chunk is staged."""
        return self.loads.load_frontier

    def head_chunks(self) -> int:
        """Head chunks the next step computes (see shared.core.plan.head_step). With a token
        pace, a head hinted by the estimate starts with one chunk, and goes on to where it
        should meet the loads at their pace so far when that is nearer than the hint. A
        resumed head's hint is the merger's reading of that pace, stalls and all: it keeps to
        it."""
        live, first = -1, None
        if self.token_pace is not None and not self.resumed:
            pace = self.token_pace.seconds
            chunk_s = None if pace is None else pace * self.chunk
            live = live_hint(
                self.load_arrivals, self.load_frontier(), self.head_done, chunk_s,
                time.monotonic(), self.arrival, self.loads_batch,
                early=self.head_done < self.msg.head_hint,
            )  # fmt: skip
            first = 1
        return head_step(
            self.head_done, self.hit, self.load_frontier(), self.msg.head_hint,
            self.head_piece, self.piece // self.chunk, live, first,
        )  # fmt: skip

    @property
    def admitted(self) -> bool:
        """Whether it has its KV memory (shared.core.admission) and so a cache."""
        return self.cache is not None

    @property
    def kv_cache(self) -> KVCache:
        """The cache of an admitted job."""
        assert self.cache is not None, "the job is not admitted yet"
        return self.cache

    @property
    def capacity(self) -> int:
        """Tokens its cache must hold: the prompt and every token it may generate."""
        return len(self.prompt.token_ids) + self.msg.sampling.max_tokens

    def kv_bytes(self) -> int:
        """Bytes of KV this job holds (keys and values of every layer)."""
        total = 0
        for layer in list(self.cache.layers if self.cache is not None else []):
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.nbytes
        return total

    def next_tokens(self, phase: Phase) -> int:
        """Tokens the next piece wants to compute (the scheduler may grant fewer)."""
        if phase == Phase.DECODE:
            return 1
        if phase == Phase.HEAD:
            return self.head_chunks() * self.chunk
        meet = self.meet if self.meet is not None else self.hit
        if self.head_done < meet and not self.merged:  # the rest of the head, in whole chunks
            return min(meet - self.head_done, self.piece // self.chunk) * self.chunk
        if not self.merged:
            return 1  # appending the loaded chunks: no forward pass
        return min(self.piece, len(self.prompt.token_ids) - self.kv_cache.get_seq_length())

    def candidate(self) -> Candidate:
        """The next piece as the scheduler sees it: prompt work is cut in whole chunks, so a
        head stays aligned to the stored chunks."""
        phase = self.phase()
        granule = 1 if phase == Phase.DECODE else self.chunk
        tokens = self.next_tokens(phase) if phase < Phase.WAITING else 0
        ends_loaded_prompt = (
            phase == Phase.PREFILL and self.merged and bool(self.load_arrivals)
            and self.meet is not None and self.meet < self.hit  # it uses loaded chunks
            and self.kv_cache.get_seq_length() + tokens == len(self.prompt.token_ids)
        )  # fmt: skip
        races_loads = phase == Phase.HEAD and (self.msg.head_hint < self.hit or self.resumed)
        return Candidate(
            self.msg.request_id, phase, tokens, self.arrival, granule, self.waited,
            ends_loaded_prompt, races_loads,
        )  # fmt: skip
