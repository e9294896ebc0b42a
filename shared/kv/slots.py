"""A request's KV cache in one tensor of its final size: appends write in place, reads are views.

`DynamicCache` appends by concatenation, so every decode step copies the request's whole cache
(tens of MB per token at a few thousand tokens). A slot is allocated once, when the request is
admitted, for its prompt plus max_tokens (what admission reserved), in Cake's chunk layout
(layers, 2, kv_heads, capacity, head_dim): a new token's keys and values are written in place,
attention reads views, loaded chunks are copied in once and write-back reads views. It gives
the same bits as a DynamicCache (tested).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from shared.core.keys import KVLayout


class SlotLayer:
    """One layer of a slot, as code reading a DynamicCache's layers expects it."""

    def __init__(self, slot: SlotCache, index: int) -> None:
        self.slot, self.index = slot, index

    @property
    def keys(self) -> torch.Tensor:
        """The keys held, (1, kv_heads, tokens, head_dim): a view."""
        return self.slot.kv[self.index, 0, :, : self.slot.lengths[self.index]][None]

    @property
    def values(self) -> torch.Tensor:
        """The values held, (1, kv_heads, tokens, head_dim): a view."""
        return self.slot.kv[self.index, 1, :, : self.slot.lengths[self.index]][None]


class SlotCache:
    """KV of one request in a tensor of `capacity` tokens, filled from the front."""

    def __init__(
        self, layout: KVLayout, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (layout.layers, 2, layout.kv_heads, capacity, layout.head_dim)
        self.kv = torch.empty(shape, dtype=dtype, device=device)
        self.lengths = [0] * layout.layers
        self.layers = [SlotLayer(self, i) for i in range(layout.layers)]

    @property
    def capacity(self) -> int:
        """Tokens the slot can hold."""
        return int(self.kv.shape[3])

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (1, kv_heads, n, head_dim) keys and values to a layer; all it holds, as views."""
        held, n = self.lengths[layer_idx], keys.shape[2]
        if held + n > self.capacity:
            raise ValueError(f"the KV slot holds {self.capacity} tokens; {held + n} do not fit")
        self.kv[layer_idx, 0, :, held : held + n] = keys[0]
        self.kv[layer_idx, 1, :, held : held + n] = values[0]
        self.lengths[layer_idx] = held + n
        return self.layers[layer_idx].keys, self.layers[layer_idx].values

    def append(self, kv: torch.Tensor) -> None:
        """Append (layers, 2, kv_heads, n, head_dim) KV to every layer in one copy (the layers
        must hold the same number of tokens, as they do between forward passes)."""
        held = self.lengths[0]
        self.place(held, kv)
        self.extend_to(held + kv.shape[3])

    def place(self, start: int, kv: torch.Tensor) -> None:
        """Write (layers, 2, kv_heads, n, head_dim) KV (any dtype or device: converted) at
        tokens [start, start + n), at or past what every layer holds; extend_to() then makes
        them part of the cache. Loaded chunks are placed as they arrive."""
        n = kv.shape[3]
        if start < max(self.lengths) or start + n > self.capacity:
            raise ValueError(f"tokens [{start}, {start + n}) are held already or do not fit")
        self.kv[:, :, :, start : start + n] = kv

    def extend_to(self, length: int) -> None:
        """Hold `length` tokens in every layer (the layers must agree; the tokens past what
        they held must have been placed)."""
        if any(held != self.lengths[0] for held in self.lengths) or length > self.capacity:
            raise ValueError(f"cannot extend the slot's layers {set(self.lengths)} to {length}")
        self.lengths = [max(self.lengths[0], length)] * len(self.lengths)

    def chunk(self, start: int, end: int) -> torch.Tensor:
        """A copy of tokens [start, end) of every layer: (layers, 2, kv_heads, n, head_dim)."""
        if end > min(self.lengths):
            raise ValueError(f"the slot holds {min(self.lengths)} tokens, not {end}")
        return self.kv[:, :, :, start:end].clone()

    def crop(self, length: int) -> None:
        """Forget every token from `length` on (as DynamicCache.crop)."""
        self.lengths = [min(held, length) for held in self.lengths]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens held (in a layer)."""
        return self.lengths[layer_idx]


KVCache = DynamicCache | SlotCache
