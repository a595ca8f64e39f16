"""Attention over packed rows, one document at a time.

A packed row holds several documents whose positions restart at 0. Through transformers' SDPA path such a row
gets a block-diagonal mask, and SDPA computes every query against every key of the row, masked blocks included,
and cannot skip the causal half. Inside `document_attention`, each document is instead its own causal SDPA call
(`is_causal=True`, no mask), so the work is the sum of the documents' squared lengths, halved, rather than the
row's squared length. The outputs are the same (tests/invariants: equal to the masked path within float error).

The override is registered under transformers' "sdpa" name and passes every call through unchanged unless the
caller is inside `document_attention` (training and eval losses), the call is a full-row self-attention (no KV
cache), and dropout is off. Generation, other code and other attention implementations never see it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tunesmith.data.packing import document_bounds

# Per row of the current batch: the (start, end) of each document. None outside document_attention.
_SPANS: contextvars.ContextVar[list[list[tuple[int, int]]] | None] = contextvars.ContextVar("tunesmith_spans", default=None)


def document_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of every document: a document starts wherever the position is 0."""
    spans = []
    for row in position_ids.tolist():
        bounds = document_bounds(row)
        if not bounds or bounds[0][0] != 0:  # a row that opens mid-document: its head is a span too
            bounds.insert(0, (0, bounds[0][0] if bounds else len(row)))
        spans.append(bounds)
    return spans


@contextmanager
def document_attention(position_ids: torch.Tensor) -> Iterator[None]:
    """Within this block, SDPA attention of full packed rows runs per document (see the module's docstring)."""
    token = _SPANS.set(document_spans(position_ids))
    try:
        yield
    finally:
        _SPANS.reset(token)


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, per document inside `document_attention`; query (batch, heads, T, dim)."""
    spans = _SPANS.get()
    plain = (
        spans is None
        or dropout > 0
        or kwargs.get("softcap") is not None
        or kwargs.get("position_bias") is not None
        or query.shape[0] != len(spans)
        or query.shape[2] != key.shape[2]  # a KV cache: not a packed training row
        or query.shape[1] % key.shape[1] != 0
    )
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, row in enumerate(spans):
        parts = [
            F.scaled_dot_product_attention(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e],
                                           is_causal=True, scale=scaling, enable_gqa=gqa)
            for s, e in row
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)  # (batch, heads, T, dim)
    return out.transpose(1, 2).contiguous(), None  # (batch, T, heads, dim), as transformers expects


AttentionInterface.register("sdpa", _attention)
