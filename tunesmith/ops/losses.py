"""Language-model losses computed from hidden states, never from the full logits tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def shift_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose next token is counted, and those next tokens.

    Hidden state t predicts token t+1. Returns `(positions, targets)` where positions index the
    flattened `(batch * seq)` hidden states and targets are the token ids they must predict.
    """
    batch, seq = labels.shape
    next_labels = torch.full_like(labels, IGNORE_INDEX)  # (batch, seq)
    next_labels[:, :-1] = labels[:, 1:]
    flat = next_labels.reshape(-1)  # (batch * seq,)
    positions = (flat != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    return positions, flat[positions]


def _chunk_ce_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, vocab); float32 for a stable log-softmax under bf16
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy_sum(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk_size: int = 1024
) -> torch.Tensor:
    """Sum of token cross-entropies of `head(hidden)` against `targets`, chunk by chunk.

    hidden: (tokens, hidden_size) — only positions that carry a loss, so no logits are computed
    for prompt tokens. Each chunk's logits are recomputed in backward (activation checkpointing),
    so at most one `(chunk_size, vocab)` float32 block is alive at a time instead of the full
    `(tokens, vocab)` logits and their gradient.
    """
    if hidden.shape[0] == 0:
        # keep the graph connected so DDP and accumulation see a (zero) gradient for every parameter
        return hidden.sum() * 0.0
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        t = targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_ce_sum, h, t, head, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h, t, head)
    return total


def _chunk_token_logps(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, vocab)
    return -F.cross_entropy(logits, targets, reduction="none")  # (chunk,)


def chunked_token_logps(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk_size: int = 1024
) -> torch.Tensor:
    """log p(target) of every row of `hidden`, chunk by chunk, never holding the full logits: (tokens,)."""
    if hidden.shape[0] == 0:
        return hidden.sum(-1) * 0.0
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        t = targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk_token_logps, h, t, head, use_reentrant=False))
        else:
            parts.append(_chunk_token_logps(h, t, head))
    return torch.cat(parts)


@torch.no_grad()
def chunked_token_logps_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Without gradients: log p(target) and the entropy of the next-token distribution at every row: (tokens,) each."""
    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = head(hidden[start : start + chunk_size]).float()  # (chunk, vocab)
        log_probs = torch.log_softmax(logits, dim=-1)
        logps.append(log_probs.gather(-1, targets[start : start + chunk_size, None]).squeeze(-1))
        entropies.append(-(log_probs.exp() * log_probs).sum(-1))
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(entropies)
