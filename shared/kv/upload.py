"""Loaded KV onto the compute device.

On a CUDA device a chunk read from its staged file is copied into pinned host memory and on to
the device with non_blocking=True, so the host thread does not wait for the transfer; the copy
is queued on the default stream, ahead of the step that reads the chunk, so nothing can read it
early. An int8 chunk crosses as int8 values and scales and is dequantised on the device (half
of fp16's bytes on the bus; `shared.kv.codec.decode_chunk`). On the CPU the tensor over the
staged file is used as it is.

Not done: copies on a side stream that overlap the head's compute. That needs events per
placed chunk (a head step may compute over a chunk placed out of order), and it should first
run on a GPU; this path has not (no device has been lent).
"""

from __future__ import annotations

import torch

from shared.kv.codec import Move


def mover(device: torch.device) -> Move:
    """How a host tensor goes onto `device`."""
    if device.type != "cuda":
        return lambda host: host.to(device)  # the CPU: the same tensor, no copy

    def pinned(host: torch.Tensor) -> torch.Tensor:
        # the caching host allocator keeps the pinned block until its copy is done
        return host.pin_memory().to(device, non_blocking=True)

    return pinned
