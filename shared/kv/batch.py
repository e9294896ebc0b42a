"""One forward pass over the pieces of several requests, each with its own KV cache.

The pieces (a decode token of one request, a prefill chunk of another, ...) run packed as one
sequence through the model's linear layers, so a step costs one pass however many requests it
serves. Attention is the only per-request part: `StepCache` appends each piece's new keys and
values to its request's own cache, and the attention function registered here attends each
piece's queries to its own request's keys and values only (causal within the piece). Nothing
is gathered or copied across requests. A model whose attention implementation is "cake_step"
runs any other forward (no StepCache) with the stock SDPA attention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from shared.kv.slots import KVCache

ATTENTION = "cake_step"


class StepCache:
    """Stands in for a cache during one step: routes each piece's keys and values to its
    request's own cache and keeps, per layer, what each piece attends to."""

    def __init__(self, caches: Sequence[KVCache], lengths: Sequence[int]) -> None:
        self.caches, self.lengths = list(caches), list(lengths)
        self.attended: list[tuple[torch.Tensor, torch.Tensor]] = []  # the current layer's

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append every piece's new keys and values (packed [1, kv_heads, T, dim]) to its own
        cache; the packed ones go back (the attention below reads self.attended)."""
        self.attended, start = [], 0
        for cache, n in zip(self.caches, self.lengths, strict=True):
            piece = slice(start, start + n)
            self.attended.append(cache.update(keys[:, :, piece], values[:, :, piece], layer_idx))
            start += n
        return keys, values


def step_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Each piece's queries (packed [1, heads, T, dim]) over its own request's keys/values.

    Outside a step (a plain forward pass) transformers builds no mask for this implementation,
    so the queries are attended as one piece after what the cache held; with a mask given,
    stock SDPA.
    """
    step: StepCache | None = kwargs.pop("cake_step", None)
    if step is None and attention_mask is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    attended, lengths = (
        (step.attended, step.lengths) if step else ([(key, value)], [query.shape[2]])
    )
    outputs, start = [], 0
    for (k, v), n in zip(attended, lengths, strict=True):
        outputs.append(attend(query[:, :, start : start + n], k, v, scaling))
        start += n
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


QUERY_BLOCK = 512  # off the CPU, a later piece's queries are attended this many at a time


def cpu_flash() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """torch's CPU flash attention, which returns its log-sum-exp too (what stock SDPA runs on
    the CPU), if this torch has it and it shares GQA heads as SDPA does: it is private, so it is
    checked once on a tiny input. None: the query-block path serves the CPU too."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return None
    rng = torch.Generator().manual_seed(0)  # not the global generator: seeds stay the caller's
    q, k, v = (torch.randn(1, heads, 5, 8, generator=rng) for heads in (4, 2, 2))
    try:
        out, _ = op(q, k, v, 0.0, True)
    except RuntimeError:
        return None
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return op if torch.allclose(out, want, atol=1e-5) else None


CPU_FLASH = cpu_flash()


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """n queries that follow what the keys held before them, causally (GQA heads shared).

    A later piece's causal diagonal is offset by what the cache held, and a masked attention
    costs about as much as the whole n x held matrix it materialises. On the CPU a later piece
    attends the held keys (all visible) and its own (plain causal) as two flash passes merged by
    their log-sum-exps (`held_then_own`: as fast as a first piece of the same length); elsewhere
    QUERY_BLOCK queries at a time, each over the keys up to its own end (`after_held`)."""
    n, before = q.shape[2], k.shape[2] - q.shape[2]  # keys: those held before, then its own
    if n == 1:  # a decode token sees everything before it
        return F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True)
    if before == 0:  # a first piece: plain causal
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, enable_gqa=True
        )
    if q.device.type == "cpu" and CPU_FLASH is not None:
        return held_then_own(q, k, v, before, scaling)
    blocks = [
        after_held(q[:, :, start : start + QUERY_BLOCK], k, v, before + start, scaling)
        for start in range(0, n, QUERY_BLOCK)
    ]
    return torch.cat(blocks, dim=2)


def held_then_own(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, held: int, scaling: float | None
) -> torch.Tensor:
    """Queries after the first `held` keys: softmax over all of those and, causally, their own,
    as two attentions (the CPU's flash kernel) weighted by each one's share of the softmax
    (the held keys': sigmoid of the difference of the two log-sum-exps)."""
    assert CPU_FLASH is not None
    held_out, held_lse = CPU_FLASH(q, k[:, :, :held], v[:, :, :held], 0.0, False, scale=scaling)
    own_out, own_lse = CPU_FLASH(q, k[:, :, held:], v[:, :, held:], 0.0, True, scale=scaling)
    held_share = torch.sigmoid(held_lse - own_lse).unsqueeze(-1)
    return (own_out + held_share * (held_out - own_out)).to(q.dtype)


def after_held(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, held: int, scaling: float | None
) -> torch.Tensor:
    """Queries that follow the first `held` keys, causally (over those and their own keys)."""
    seen = held + q.shape[2]
    positions = torch.arange(seen, device=q.device)
    mask = positions[None, :] <= torch.arange(held, seen, device=q.device)[:, None]
    k, v = k[:, :, :seen], v[:, :, :seen]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)


AttentionInterface.register(ATTENTION, step_attention)
