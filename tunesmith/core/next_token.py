"""Next-token quantities over packed rows, computed from a causal LM's hidden states: the cross-entropy objective of
`sft` and `pretrain`, the per-sequence answer log-probabilities the preference methods compare, the hidden states
that predict labelled tokens, and which sequence each token belongs to."""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.core.contract import Objective
from tunesmith.model.parts import decoder_and_head, packed_hidden
from tunesmith.ops.losses import IGNORE_INDEX, chunked_cross_entropy_sum, chunked_token_logps, shift_targets


class CausalLMLoss(Objective):
    """Wraps a causal LM so one forward returns (sum of token losses, number of counted tokens).

    The whole loss lives inside `forward` so DDP sees every parameter use in one call.
    """

    reports_perplexity = True

    def __init__(self, model: nn.Module, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self._decoder, self._head = decoder_and_head(model)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Sum of next-token cross-entropies over counted tokens, and their number."""
        selected, targets, _ = labelled_states(self._decoder, input_ids, labels, position_ids)  # (counted, hidden)
        loss_sum = chunked_cross_entropy_sum(selected, targets, self._head, self.chunk_size)
        return loss_sum, torch.tensor(targets.numel(), device=selected.device), {}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss is averaged over: trained next-token positions."""
        return count_targets(batch["labels"])


def count_targets(labels: torch.Tensor) -> int:
    """Number of tokens a batch's loss counts (each document's first label is already ignored)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def num_sequences(seq_index: torch.Tensor) -> int:
    """Sequences in a pair batch (seq_index numbers them 0..n-1, -1 on padding)."""
    return int(seq_index.max()) + 1


def answer_logps(
    decoder: nn.Module,
    head: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor,
    seq_index: torch.Tensor,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each sequence's answer tokens and their number, each (seqs,).

    Sequences are whole documents inside packed rows (`seq_index` says which token belongs to which),
    so chosen and rejected answers of many pairs go through one forward pass.
    """
    selected, targets, positions = labelled_states(decoder, input_ids, labels, position_ids)
    token_logps = chunked_token_logps(selected, targets, head, chunk_size)  # (counted,)
    owner = token_owner(seq_index, positions)
    n = num_sequences(seq_index)
    sums = token_logps.new_zeros(n).index_add(0, owner, token_logps)  # (seqs,)
    counts = token_logps.new_zeros(n).index_add(0, owner, torch.ones_like(token_logps))  # (seqs,)
    return sums, counts


def labelled_states(
    decoder: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states at the positions that predict a labelled token, those tokens, and the flat positions."""
    hidden = packed_hidden(decoder, input_ids, position_ids)  # (batch, seq, hidden)
    positions, targets = shift_targets(labels)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions), targets, positions  # (counted, hidden)


def token_owner(seq_index: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The sequence each predicted token belongs to: position p predicts token p + 1, in the same row."""
    return seq_index.reshape(-1)[positions + 1]


def last_positions(seq_index: torch.Tensor) -> torch.Tensor:
    """Flat index (into batch * seq) of every sequence's last token: (seqs,)."""
    flat = seq_index.reshape(-1)
    where = (flat >= 0).nonzero(as_tuple=True)[0]
    last = torch.full((num_sequences(seq_index),), -1, dtype=torch.long, device=seq_index.device)
    return last.scatter_reduce(0, flat[where], where, reduce="amax")
