"""Loaded KV onto the compute device, overlapping the head's compute where the device allows.

On a CUDA device a chunk read from its staged file goes through pinned host memory and is
copied with non_blocking=True on a side stream, so the copy runs while the default stream
computes the head; an int8 chunk crosses as int8 and is dequantised on the device (half the
bytes of fp16 over the bus). Compute waits for the copies (`ready`) before the merge makes the
chunks part of a cache. On the CPU every step is a plain copy, in order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class Uploader:
    """Host tensors to one device: pinned and on a side stream for CUDA, else as they are."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def copying(self, target: torch.Tensor) -> Iterator[None]:
        """Device work inside runs on the side stream, after the default stream's work so far
        (the target's memory may have served a tensor it still uses); `target` is kept from
        reuse until the side stream is done with it."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.default_stream(self.device))
        target.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            yield

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device: through pinned memory, not waiting for the copy, on
        CUDA (the host allocator keeps the pinned block until the copy is done)."""
        if host.device == self.device or self.stream is None:
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def ready(self) -> None:
        """Make the default stream wait for every copy handed out so far."""
        if self.stream is not None:
            torch.cuda.default_stream(self.device).wait_stream(self.stream)
