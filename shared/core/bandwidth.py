"""A link's bandwidth over time, as CAKE_STORE_BANDWIDTH_TRACE gives it, and how long a
transfer takes on it (the throttled store waits that long; the benchmark's oracle reads it)."""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from shared.core.errors import ConfigError

MB = 1e6


@dataclass(frozen=True)
class BandwidthTrace:
    """Steps of (start second, MB/s), the first at second 0, repeating every period_s seconds
    (None: the last step lasts for ever). A step may be 0 (link down) as long as some step of
    each period, or the open-ended last one, is not."""

    steps: tuple[tuple[float, float], ...]
    period_s: float | None = None
    epoch: float | None = None  # the Unix time of second 0; None: when its link starts

    def __post_init__(self) -> None:
        steps = self.steps
        if not steps:
            raise ConfigError("bandwidth trace is empty")
        if steps[0][0] != 0:
            raise ConfigError(f"bandwidth trace must start at second 0, got {steps[0][0]}")
        for (t0, _), (t1, _) in itertools.pairwise(steps):
            if not t1 > t0:
                raise ConfigError(f"bandwidth trace times must increase: {t0} then {t1}")
        if any(not mbps >= 0 for _, mbps in steps):
            raise ConfigError("bandwidth trace rates must be >= 0 MB/s")
        if self.period_s is None and not steps[-1][1] > 0:
            raise ConfigError("the last step of a bandwidth trace must have a rate > 0 MB/s")
        if self.period_s is not None:
            if not self.period_s > steps[-1][0]:
                raise ConfigError(
                    f"the trace's period ({self.period_s} s) must end after its last step "
                    f"starts ({steps[-1][0]} s)"
                )
            if not any(mbps > 0 for _, mbps in steps):
                raise ConfigError("a repeating bandwidth trace needs a step with a rate > 0 MB/s")

    @classmethod
    def parse(
        cls, spec: str, period_s: float | None = None, epoch: float | None = None
    ) -> BandwidthTrace:
        """From `t0:MBps,t1:MBps,...` or the path of a file of `t MBps` lines (# comments).
        It repeats after period_s, by default its last t plus that step's gap (a single step
        is a constant link)."""
        text = spec.strip()
        if Path(text).is_file():
            lines = (line.split("#", 1)[0].split() for line in Path(text).read_text().splitlines())
            pairs = [pair for pair in lines if pair]
        else:
            pairs = [entry.split(":") for entry in text.split(",") if entry.strip()]
        try:
            steps = tuple((float(t), float(mbps)) for t, mbps in pairs)
        except ValueError:
            raise ConfigError(
                f"CAKE_STORE_BANDWIDTH_TRACE={spec[:80]!r}: use `t0:MBps,t1:MBps,...` or the "
                "path of a file of `t MBps` lines"
            ) from None
        if period_s is None and len(steps) > 1:
            period_s = 2 * steps[-1][0] - steps[-2][0]
        return cls(steps, period_s, epoch)

    def step_at(self, t: float) -> tuple[float, float]:
        """The rate (bytes/s) at second t and when that step ends (inf: never)."""
        base = 0.0
        if self.period_s is not None:
            periods = math.floor(t / self.period_s)
            if (periods + 1) * self.period_s <= t:  # t / period rounded a hair short of a whole
                periods += 1  # period: the step would end at t, and transfer_end never moved on
            base = periods * self.period_s
        offset = max(0.0, t - base)  # (rounding may put base a hair past t)
        i = bisect.bisect_right([start for start, _ in self.steps], offset) - 1
        if i + 1 < len(self.steps):
            end = base + self.steps[i + 1][0]
        else:
            end = math.inf if self.period_s is None else base + self.period_s
        return self.steps[i][1] * MB, end

    def rate_MBps(self, t: float) -> float:
        """The bandwidth at second t, MB/s."""
        return self.step_at(t)[0] / MB

    def transfer_end(self, start_s: float, nbytes: int) -> float:
        """When nbytes sent from second start_s have crossed the link."""
        remaining, t = float(nbytes), start_s
        while True:
            rate, end = self.step_at(t)
            if rate > 0 and remaining <= rate * (end - t):
                return t + remaining / rate
            remaining -= rate * (end - t)
            t = end
