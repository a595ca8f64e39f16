"""Losses of a causal LM computed from its hidden states: next-token loss (`sft`, `pretrain`) and the
per-sequence answer log-probabilities the preference methods compare."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.model.attention import document_attention
from tunesmith.ops.losses import IGNORE_INDEX, chunked_cross_entropy_sum, chunked_token_logps, shift_targets


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP and PEFT wrappers (LoRA layers stay injected in it)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


class _Head(nn.Module):
    """The output projection plus the logit transforms some architectures apply after it."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.proj = lm.get_output_embeddings()
        config = lm.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.scale = getattr(config, "logit_scale", None)

    def linear_weight(self) -> torch.Tensor | None:
        """The weight when the head is just `hidden @ weight.T` (no bias, scale or softcap, not adapted), else None."""
        if type(self.proj) is nn.Linear and self.proj.bias is None and self.scale is None and not self.softcap:
            return self.proj.weight
        return None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab)."""
        logits = self.proj(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class CausalLMLoss(nn.Module):
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

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> int:
        """What the loss is averaged over: trained next-token positions."""
        return count_targets(batch["labels"])


def count_targets(labels: torch.Tensor) -> int:
    """Number of tokens a batch's loss counts (each document's first label is already ignored)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returns hidden states) and the output head of a causal LM, under any wrapper."""
    lm = unwrap(model)
    return lm.get_decoder(), _Head(lm)


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


def packed_hidden(decoder: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states (batch, seq, hidden) over packed rows: documents never attend to each
    other (positions restart), and attention runs per document, with no masked blocks."""
    with document_attention(position_ids) as layout:
        out = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False)
    if layout.has_branches and layout.calls == 0:
        raise TunesmithError(
            f"this model's attention ({getattr(getattr(decoder, 'config', None), '_attn_implementation', None)!r}) does not "
            "go through tunesmith's per-document SDPA, which rows of answers sharing one prompt need; load the "
            "model with SDPA attention, or set rl.share_prompts: false"
        )
    return out.last_hidden_state


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


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of the model's current weights: the reference of full fine-tuning (LoRA needs none)."""
    return copy.deepcopy(unwrap(model)).eval().requires_grad_(False)


@contextmanager
def reference_model(policy: nn.Module, frozen: nn.Module | None) -> Iterator[tuple[nn.Module, nn.Module]]:
    """(decoder, head) of the reference model of DPO, PPO and GRPO, for the duration of the block.

    A frozen copy when one was made (full fine-tuning); else the policy itself with its LoRA adapters
    disabled, so the reference costs no second copy in memory (or the policy as it is, when it has no
    adapters: full fine-tuning whose reference log-probs are measured before its first step).
    """
    if frozen is not None:
        yield decoder_and_head(frozen)
        return
    with policy.disable_adapter() if hasattr(policy, "disable_adapter") else nullcontext():
        yield decoder_and_head(policy)
