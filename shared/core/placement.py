"""Which node a request goes to: the one whose memory tier holds the longest prefix of its
prompt, when that node has room, else the least loaded one (prefix-aware routing, as Dynamo's
KV router and SGLang's router do). A pure policy: the merger feeds it telemetry and its own
placements and asks it before each dispatch.

What a node holds is remembered from where this merger sent earlier prompts (chained chunk
keys, newest placement wins), so it is a hint: a node may since have evicted a chunk, which
only costs the reuse, never correctness.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX_SLACK = 2  # a prefix holder may have this many more requests than the least loaded node
REMEMBERED_KEYS = 200_000  # chunk keys remembered (about 30 MB), least recently placed forgotten


@dataclass
class NodeLoad:
    """What a node's compute last said of itself, and what was sent to it since."""

    running: int
    waiting: int
    seen_at: float  # monotonic time of its last telemetry
    sent_since: int = 0  # requests this merger placed there after that telemetry

    @property
    def load(self) -> int:
        """Requests it holds or will hold."""
        return self.running + self.waiting + self.sent_since


class Placement:
    """Nodes alive (their compute's telemetry is recent) with their load, whose loaders are
    alive, and who holds which chunks."""

    def __init__(self, stale_after_s: float, remembered_keys: int = REMEMBERED_KEYS) -> None:
        self.stale_after_s = stale_after_s
        self.remembered_keys = remembered_keys
        self.nodes: dict[str, NodeLoad] = {}
        self.loaders: dict[str, float] = {}  # node -> when its loader's telemetry last came
        self.holder: OrderedDict[str, str] = OrderedDict()  # chunk key -> node that has it

    def observe(self, node: str, running: int, waiting: int, now: float) -> None:
        """A node's compute telemetry."""
        self.nodes[node] = NodeLoad(running, waiting, now)

    def observe_loader(self, node: str, now: float) -> None:
        """A node's loader telemetry."""
        self.loaders[node] = now

    def forget(self, node: str) -> None:
        """A node that did not answer: not chosen again until its telemetry says it is back."""
        self.nodes.pop(node, None)

    def alive(self, now: float) -> dict[str, NodeLoad]:
        """Nodes whose compute was heard from within stale_after_s."""
        return {n: s for n, s in self.nodes.items() if now - s.seen_at <= self.stale_after_s}

    def choose(self, keys: Sequence[str], now: float) -> str | None:
        """The node for a prompt with these chunk keys, counted as sent there at once (requests
        placed together spread); None when no node is known (any will do: the compute queue
        group picks). Nodes whose loader is alive too come first: on one without, a request
        computes what it could have loaded."""
        alive = self.alive(now)
        whole = {n: s for n, s in alive.items() if now - self.loaders.get(n, -math.inf)
                 <= self.stale_after_s}  # fmt: skip
        alive = whole or alive
        if not alive:
            return None
        least = min(alive, key=lambda n: (alive[n].load, n))
        holder = self.prefix_holder(keys)
        fits = holder in alive and alive[holder].load <= alive[least].load + PREFIX_SLACK
        chosen = holder if fits and holder is not None else least
        alive[chosen].sent_since += 1
        return chosen

    def prefix_holder(self, keys: Sequence[str]) -> str | None:
        """The node that was sent the deepest known chunk of this prompt's leading chunks."""
        holder = None
        for key in keys:  # chained keys: a known chunk's whole prefix went there too
            if key not in self.holder:
                break
            holder = self.holder[key]
        return holder

    def placed(self, node: str, keys: Sequence[str]) -> None:
        """A prompt went to node: its chunks will be in that node's memory tier."""
        for key in keys:
            self.holder[key] = node
            self.holder.move_to_end(key)
        while len(self.holder) > self.remembered_keys:
            self.holder.popitem(last=False)
