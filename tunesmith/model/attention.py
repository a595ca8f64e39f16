"""Attention over packed rows, one document at a time, and prompts shared by several answers.

A packed row holds several documents whose positions restart at 0. Through transformers' SDPA path such a row
gets a block-diagonal mask, and SDPA computes every query against every key of the row, masked blocks included,
and cannot skip the causal half. Inside `document_attention`, each document is instead its own causal SDPA call
(`is_causal=True`, no mask), so the work is the sum of the documents' squared lengths, halved, rather than the
row's squared length. The outputs are the same (tests/invariants: equal to the masked path within float error).

A document may also be a tree: a shared prefix (positions 0..q-1) followed by branches that each restart at
position q, as when the answers sampled for one prompt are trained together (`rollout.sequences`). Each branch
attends to the prefix and, causally, to itself, exactly as if it were the prefix followed by that branch alone,
while the prefix is computed once instead of once per branch. Positions say all of it: within a document, the
first jump back to a position q > 0 ends the prefix at q and starts the second branch; later jumps back to q
start the others.

The override is registered with transformers under its own name, `ATTENTION` ("tunesmith_sdpa", with SDPA's
masks), and tunesmith selects it when it loads a model with `load.attn_implementation: sdpa`: other models in
the same process keep transformers' own "sdpa". It passes every call through to transformers' SDPA unchanged
unless the caller is inside `document_attention` (training and eval losses) and the call is a full-row
self-attention (no KV cache). Generation and other attention implementations never see it; rows with branches
need it, and say so (`Layout.calls`) when a model's attention does not go through it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tunesmith.errors import TunesmithError

ATTENTION = "tunesmith_sdpa"  # the name models loaded by tunesmith with SDPA attention run under

# One attention call: queries [start, end) of a row, which also see the keys [prefix_start, prefix_end) (a shared
# prefix; empty for a plain document or the prefix itself), causally.
Span = tuple[int, int, int, int]


@dataclass
class Layout:
    """The spans of every row of the batch inside `document_attention`, and how many layers used them."""

    spans: list[list[Span]]
    has_branches: bool
    longest: int  # the most keys one query of any call can see
    calls: int = 0


_LAYOUT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("tunesmith_layout", default=None)


def row_spans(positions: list[int]) -> list[Span]:
    """The attention calls of one row: every document, or every prefix and branch of a tree (module docstring)."""
    spans: list[Span] = []
    doc = seg = 0  # start of the current document and of its current run of positions
    prefix: tuple[int, int] | None = None  # the current document's shared prefix, once a branch has started

    def close(end: int) -> None:
        if prefix is not None and seg != prefix[0]:
            spans.append((seg, end, *prefix))
        else:
            spans.append((seg, end, seg, seg))

    for i in range(1, len(positions)):
        p = positions[i]
        if p == 0:
            close(i)
            doc = seg = i
            prefix = None
        elif p != positions[i - 1] + 1 and positions[doc] == 0:
            if prefix is None and 0 < p < i - doc and positions[doc + p] == p:  # (no prefix yet: seg == doc)
                # The first jump back to p: the run so far is the prefix [doc, doc + p), then the first branch.
                prefix = (doc, doc + p)
                spans.append((doc, doc + p, doc, doc))
                seg = doc + p
                close(i)
                seg = i
            elif prefix is not None and p == prefix[1] - prefix[0]:  # another branch of the same prefix
                close(i)
                seg = i
    if positions:
        close(len(positions))
    return spans


def trees_fit(config, max_length: int) -> bool:
    """Whether rows of up to `max_length` tokens holding trees run right on a model with this config: SDPA
    attention in every layer, no logit softcapping, and no sliding window shorter than a row."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(config, "_attn_implementation", None) != ATTENTION:
        return False
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return False
    types = getattr(text, "layer_types", None)
    if types is not None and any(t not in ("full_attention", "sliding_attention") for t in types):
        return False  # linear-attention or state-space layers mix tokens along the row
    window = getattr(text, "sliding_window", None)
    if window is not None and window < max_length:
        if types is None and getattr(text, "use_sliding_window", True):
            return False
        if types is not None and "sliding_attention" in types:
            return False
    return True


def document_spans(position_ids: torch.Tensor) -> list[list[Span]]:
    """Per row, the (start, end, prefix_start, prefix_end) of every attention call."""
    return [row_spans(row) for row in position_ids.tolist()]


@contextmanager
def document_attention(position_ids: torch.Tensor) -> Iterator[Layout]:
    """Within this block, SDPA attention of full packed rows runs per document (see the module's docstring)."""
    spans = document_spans(position_ids)
    layout = Layout(spans, has_branches=any(ps != pe for row in spans for _, _, ps, pe in row),
                    longest=max((e - s + pe - ps for row in spans for s, e, ps, pe in row), default=0))
    with _within(layout):
        yield layout


@contextmanager
def _within(layout: Layout | None) -> Iterator[None]:
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def checkpoint_context() -> tuple[AbstractContextManager, AbstractContextManager]:
    """`context_fn` for torch's non-reentrant activation checkpointing: a layer recomputed in backward runs under
    the layout its forward saw (else it would take the masked path, and tree rows would lose their prefix)."""
    return nullcontext(), _within(_LAYOUT.get())


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, per document inside `document_attention`; query (batch, heads, T, dim)."""
    layout = _LAYOUT.get()
    plain = (
        layout is None
        or kwargs.get("softcap") is not None
        or kwargs.get("position_bias") is not None
        or (kwargs.get("sliding_window") or layout.longest) < layout.longest  # only the mask holds a window
        or query.shape[0] != len(layout.spans)
        or query.shape[2] != key.shape[2]  # a KV cache: not a packed training row
        or query.shape[1] % key.shape[1] != 0
    )
    if plain:
        if layout is not None and layout.has_branches:
            raise TunesmithError(
                "rows of answers sharing one prompt need per-document attention, which this model's attention "
                "layers cannot use (a sliding window shorter than a row's documents, softcap or position bias); "
                "set rl.share_prompts: false"
            )
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    layout.calls += 1
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, row in enumerate(layout.spans):
        parts = []
        for s, e, ps, pe in row:
            q, k, v = query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e]
            if ps == pe:
                parts.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                            scale=scaling, enable_gqa=gqa))
                continue
            k = torch.cat([key[b : b + 1, :, ps:pe], k], dim=2)
            v = torch.cat([value[b : b + 1, :, ps:pe], v], dim=2)
            # Query i sees the whole prefix and the branch up to i: causal, aligned to the keys' end. A CausalBias,
            # not a stored mask, so CUDA's flash kernel can take it.
            mask = causal_lower_right(e - s, pe - ps + e - s)
            parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                                        enable_gqa=gqa))
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)  # (batch, heads, T, dim)
    return out.transpose(1, 2).contiguous(), None  # (batch, T, heads, dim), as transformers expects


def register() -> str:
    """Make `ATTENTION` known to transformers (idempotent); returns the name to load models with."""
    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION
